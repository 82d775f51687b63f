//! Criterion benches of the convolution passes on every distinct convolution of ResNet50
//! (224x224), dense (sparsity 0) and pruned (sparsity 0.5, widths rounded to 8): on the
//! CPU fast path (f32, batch `PK_BENCH_CPU_BATCH`, default 2) and, where there is a GPU,
//! on cuda (bf16 and f32, batch `PK_BENCH_GPU_BATCH`, default 32, timed with CUDA events).
//!
//! `cargo bench --bench conv -- cpu/fprop` filters as usual.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use prunekit::bench::conv::distinct_convs;
use prunekit::gpu::Gpu;
use prunekit::ops::conv::{self, ConvElem, ConvShape, Pass};
use prunekit::{Buf, Device};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Bufs<T: ConvElem> {
    x: Buf<T>,
    w: Buf<T>,
    y: Buf<T>,
    dy: Buf<T>,
    dx: Buf<T>,
    dw: Buf<f32>,
}

fn bufs<T: ConvElem>(dev: &Device, sh: &ConvShape) -> Bufs<T> {
    let fill = |n: usize, seed: usize| -> Buf<T> {
        dev.upload((0..n).map(|i| T::from_f32((((i * 7919 + seed) % 1009) as f32 / 504.5) - 1.0)).collect()).unwrap()
    };
    Bufs {
        x: fill(sh.x_len(), 1),
        w: fill(sh.w_len(), 2),
        y: dev.zeros(sh.y_len()).unwrap(),
        dy: fill(sh.y_len(), 3),
        dx: dev.zeros(sh.x_len()).unwrap(),
        dw: dev.zeros(sh.w_len()).unwrap(),
    }
}

fn run<T: ConvElem>(dev: &Device, b: &mut Bufs<T>, pass: Pass, sh: &ConvShape) {
    match pass {
        Pass::Fprop => conv::conv2d_fprop(dev, sh, &b.x, &b.w, &mut b.y),
        Pass::Dgrad => conv::conv2d_dgrad(dev, sh, &b.dy, &b.w, &mut b.dx),
        Pass::Wgrad => conv::conv2d_wgrad(dev, sh, &b.x, &b.dy, &mut b.dw),
    }
    .unwrap();
}

fn bench_device<T: ConvElem>(c: &mut Criterion, dev: &Device, label: &str, batch: usize) {
    for pass in Pass::ALL {
        let mut g = c.benchmark_group(format!("{label}/{}", pass.name()));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        for sparsity in [0.0, 0.5] {
            for (layer, sh) in distinct_convs(batch, 224, sparsity, 8).unwrap() {
                let mut b = bufs::<T>(dev, &sh);
                g.throughput(Throughput::Elements(sh.flops() as u64));
                g.bench_function(BenchmarkId::new(format!("s{sparsity}"), &layer), |bch| match dev {
                    Device::Gpu(gpu) => bch.iter_custom(|iters| {
                        run(dev, &mut b, pass, &sh);
                        let start = gpu.record().unwrap();
                        for _ in 0..iters {
                            run(dev, &mut b, pass, &sh);
                        }
                        let end = gpu.record().unwrap();
                        Duration::from_secs_f64(gpu.elapsed_ms(&start, &end).unwrap() / 1e3)
                    }),
                    Device::Cpu => bch.iter_custom(|iters| {
                        let t = Instant::now();
                        for _ in 0..iters {
                            run(dev, &mut b, pass, &sh);
                        }
                        t.elapsed()
                    }),
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
            let dev = Device::Gpu(gpu);
            let batch = env_usize("PK_BENCH_GPU_BATCH", 32);
            bench_device::<bf16>(c, &dev, "cuda-bf16", batch);
            bench_device::<f32>(c, &dev, "cuda-f32", batch);
        }
        Err(e) => eprintln!("conv benches: no cuda device ({e}); CPU only"),
    }
}

criterion_group!(conv_benches, benches);
criterion_main!(conv_benches);
