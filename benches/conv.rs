//! Criterion benches of the convolution passes on every distinct convolution of ResNet50
//! (224x224), dense (sparsity 0) and pruned (sparsity 0.5, widths rounded to 8): on the
//! CPU fast path (f32, batch `PK_BENCH_CPU_BATCH`, default 2) and, where there is a GPU,
//! on cuda (bf16 and f32, batch `PK_BENCH_GPU_BATCH`, default 32, timed with CUDA events;
//! on an sm_90 GPU also bf16 on the warpgroup-MMA kernels, `cuda-bf16-wgmma`).
//!
//! `cargo bench --bench conv -- cpu/fprop` filters as usual.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use prunekit::gpu::Gpu;
use prunekit::measure::conv::{distinct_convs, PassBuffers};
use prunekit::ops::conv::ConvElem;
use prunekit::shape::Pass;
use prunekit::Device;
use std::time::Duration;

mod common;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench_device<T: ConvElem>(c: &mut Criterion, dev: &Device, label: &str, batch: usize) {
    for pass in Pass::ALL {
        let mut g = c.benchmark_group(format!("{label}/{}", pass.name()));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        for sparsity in [0.0, 0.5] {
            for (layer, sh) in distinct_convs(batch, 224, sparsity, 8).unwrap() {
                let mut b = PassBuffers::<T>::new(dev, &sh).unwrap();
                g.throughput(Throughput::Elements(sh.flops() as u64));
                g.bench_function(BenchmarkId::new(format!("s{sparsity}"), &layer), |bch| match dev {
                    Device::Gpu(gpu) => bch.iter_custom(|iters| {
                        b.run(dev, pass, &sh).unwrap();
                        common::gpu_time(gpu, iters, || b.run(dev, pass, &sh).unwrap())
                    }),
                    Device::Cpu => bch.iter_custom(|iters| common::cpu_time(iters, || b.run(dev, pass, &sh).unwrap())),
                });
            }
        }
        g.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_device::<f32>(c, &Device::Cpu, "cpu-f32", env_usize("PK_BENCH_CPU_BATCH", 2));
    match Gpu::cuda(0) {
        Ok(gpu) => {
            let batch = env_usize("PK_BENCH_GPU_BATCH", 32);
            if gpu.has_wgmma() {
                // The warpgroup-MMA kernels (sm_90), beside the mma.sync ones below.
                let mut wg = gpu.clone();
                wg.set_conv_wgmma(true).unwrap();
                bench_device::<bf16>(c, &Device::Gpu(wg), "cuda-bf16-wgmma", batch);
            }
            let mut gpu = gpu;
            gpu.set_conv_wgmma(false).unwrap();
            let dev = Device::Gpu(gpu);
            bench_device::<bf16>(c, &dev, "cuda-bf16", batch);
            bench_device::<f32>(c, &dev, "cuda-f32", batch);
        }
        Err(e) => eprintln!("conv benches: no cuda device ({e}); CPU only"),
    }
}

criterion_group!(conv_benches, benches);
criterion_main!(conv_benches);
