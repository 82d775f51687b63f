//! Helpers shared by the benches: the devices to run on, random inputs, and the timing of
//! an op (wall clock on the CPU, CUDA events on a GPU).
#![allow(dead_code)]

use criterion::BenchmarkGroup;
use prunekit::gpu::{Elem, Gpu};
use prunekit::{Buf, Device};
use std::time::{Duration, Instant};

/// A criterion group measured in wall-clock time (on a GPU: the events' time).
pub type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// The CPU with batch `PK_BENCH_CPU_BATCH` (default `cpu_batch`) and, where there is one,
/// `cuda:0` with batch 256; `bench` names the bench in the message when there is no GPU.
pub fn devices(bench: &str, cpu_batch: usize) -> Vec<(Device, usize)> {
    let cpu_batch = std::env::var("PK_BENCH_CPU_BATCH").ok().and_then(|s| s.parse().ok()).unwrap_or(cpu_batch);
    let mut d = vec![(Device::Cpu, cpu_batch)];
    match Gpu::cuda(0) {
        Ok(g) => d.push((Device::Gpu(g), 256)),
        Err(e) => eprintln!("{bench} bench: no cuda device ({e}); CPU only"),
    }
    d
}

/// `n` values uniform in [-1, 1) (xorshift from `seed`), rounded to T.
pub fn filled<T: Elem + prunekit::cpu::layers::Real>(dev: &Device, n: usize, seed: u32) -> Buf<T> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    let v: Vec<T> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            T::from_f32((s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0)
        })
        .collect();
    dev.upload(v).unwrap()
}

/// The GPU time of `iters` runs of `op`, launched back to back: CUDA events recorded before
/// and after (no host sync in between); the wall clock if the events cannot be read.
pub fn gpu_time<F: FnMut()>(gpu: &Gpu, iters: u64, mut op: F) -> Duration {
    let start = gpu.record().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        op();
    }
    let end = gpu.record().unwrap();
    match gpu.elapsed_ms(&start, &end) {
        Ok(ms) => Duration::from_secs_f64(ms / 1e3),
        Err(_) => t.elapsed(),
    }
}

/// The wall-clock time of `iters` runs of `op`.
pub fn cpu_time<F: FnMut()>(iters: u64, mut op: F) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        op();
    }
    t.elapsed()
}

/// Times `op` on `dev` as `{id}/{device kind}`: wall clock on the CPU, [`gpu_time`] on a
/// GPU after one warm-up run (which loads the modules).
pub fn bench<F: FnMut()>(g: &mut Group<'_>, id: &str, dev: &Device, mut op: F) {
    let name = format!("{id}/{}", dev.kind());
    match dev {
        Device::Cpu => {
            g.bench_function(name, |b| b.iter(&mut op));
        }
        Device::Gpu(gpu) => {
            op();
            gpu.synchronize().unwrap();
            g.bench_function(name, |b| b.iter_custom(|iters| gpu_time(gpu, iters, &mut op)));
        }
    }
}
