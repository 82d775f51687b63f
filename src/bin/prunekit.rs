fn main() {
    println!("{}", prunekit::gpu::resource_report());
}
