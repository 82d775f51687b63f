//! The whole pruning pipeline (filter scores, group sums, top-k, compaction) for
//! ResNet50's 53 convs and all tensors they touch, at sparsity 0.5, on the CPU and, where
//! there is one, the GPU. Uploading the dense weights is not timed.

use criterion::{criterion_group, criterion_main, Criterion};
use prunekit::gpu::Gpu;
use prunekit::model::{init::torchvision_init, Arch};
use prunekit::prune::{DeviceState, Mode, Norm, Plan, PruneConfig};
use prunekit::Device;

fn pipeline(c: &mut Criterion) {
    let arch = Arch::resnet50(1000);
    let sd = torchvision_init(&arch, 0);
    let mut devices = vec![Device::Cpu];
    match Gpu::cuda(0) {
        Ok(g) => devices.push(Device::Gpu(g)),
        Err(e) => eprintln!("prune bench: no cuda device ({e}); cpu only"),
    }
    let mut group = c.benchmark_group("prune_pipeline_resnet50_s0.5");
    group.sample_size(20);
    for mode in [Mode::Filters, Mode::Channels] {
        let cfg = PruneConfig::new(mode, "0.5".parse().unwrap(), 8, Norm::L1).unwrap();
        let plan = Plan::new(&arch, &cfg).unwrap();
        for dev in &devices {
            let ds = DeviceState::for_plan(dev, &sd, &plan).unwrap();
            group.bench_function(format!("{mode}/{}", dev.kind()), |b| {
                b.iter(|| {
                    let out = ds.run(&plan).unwrap();
                    dev.synchronize().unwrap();
                    out
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
