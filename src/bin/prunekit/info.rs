//! `prunekit info`: the devices and how the kernels were built.

use prunekit::Device;

/// Show the devices and how the kernels were built (nvcc version, ptxas resource report).
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Print ptxas' per-kernel report (registers, spills, shared memory).
    #[arg(long)]
    report: bool,
}

/// Runs `prunekit info`.
pub fn run(a: InfoArgs) -> prunekit::Result<()> {
    println!("prunekit {}", env!("CARGO_PKG_VERSION"));
    match prunekit::gpu::nvcc_version() {
        Some(v) => println!("CUDA kernels: compiled by nvcc {v}"),
        None => println!("CUDA kernels: not compiled (no nvcc at build time); cpu and emu work"),
    }
    match prunekit::gpu::Gpu::cuda(0) {
        Ok(g) => println!("cuda: {}", g.name()),
        Err(e) => println!("cuda: unavailable: {e}"),
    }
    println!("cpu: {}", Device::Cpu.name());
    if a.report {
        println!("\n{}", prunekit::gpu::resource_report());
    }
    Ok(())
}
