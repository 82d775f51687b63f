//! ResNet50 training step (forward, backward, SGD) at 224x224: images per second on the
//! GPU for batch 32/64/128/256 in f32 and bf16 (256 where memory allows), and one small
//! configuration on the CPU. PyTorch's step on the same model comes from
//! scripts/torch_train_step.py, which the GPU bundle runs in the same session.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prunekit::gpu::Gpu;
use prunekit::model::{init::torchvision_init, Arch, Model, PrecisionKind, Sgd};
use prunekit::Device;

fn bench(c: &mut Criterion) {
    let sd = torchvision_init(&Arch::resnet50(1000), 0);
    let mut configs: Vec<(Device, usize, PrecisionKind)> = vec![(Device::Cpu, 4, PrecisionKind::F32)];
    match Gpu::cuda(0) {
        Ok(g) => {
            for p in [PrecisionKind::F32, PrecisionKind::Bf16] {
                for b in [32, 64, 128, 256] {
                    configs.push((Device::Gpu(g.clone()), b, p));
                }
            }
        }
        Err(e) => eprintln!("train_step bench: no cuda device ({e}); cpu only"),
    }
    let mut group = c.benchmark_group("resnet50_train_step_224");
    group.sample_size(10);
    for (dev, batch, p) in configs {
        let mut model = Model::from_state(&dev, &sd, p).unwrap();
        let mut ws = match model.workspace(batch, 224, 224) {
            Ok(ws) => ws,
            Err(e) => {
                eprintln!("skipping {} batch {batch} {p}: {e}", dev.kind());
                continue;
            }
        };
        let images: Vec<f32> = (0..batch * 3 * 224 * 224).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect();
        let targets: Vec<i64> = (0..batch as i64).map(|i| (i * 37) % 1000).collect();
        model.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        let sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 1e-4 };
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("{}/{p}/batch{batch}", dev.kind()), |b| {
            b.iter(|| {
                model.train_step(&mut ws, &sgd).unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
