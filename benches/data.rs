//! The data loader alone: synthetic in-memory 28x28 gray images (Fashion-MNIST's shape and
//! format), batches of 256 at 32x32 with crop-flip augmentation and ImageNet normalization,
//! on the default thread count. `cached` is the steady state after the first epoch (images
//! kept resized to 32x32); `uncached` resizes every image every time. Criterion's
//! throughput is in images per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prunekit::data::{Augment, Loader, LoaderConfig, Position, Split};

fn synthetic(n: usize) -> Split {
    let mut images = Vec::with_capacity(n * 28 * 28);
    for i in 0..n {
        for p in 0..28 * 28 {
            images.push(((i * 131 + p * 7) % 256) as u8);
        }
    }
    let labels = (0..n).map(|i| (i % 10) as i64).collect();
    Split::from_u8(images, (28, 28, 1), labels, (0..10).map(|c| c.to_string()).collect()).unwrap()
}

fn loader(c: &mut Criterion) {
    let split = synthetic(10_000);
    let batch = 256;
    let mut group = c.benchmark_group("data_loader_28to32_cropflip_b256");
    group.throughput(Throughput::Elements(batch as u64));
    group.sample_size(20);
    for (name, cache_bytes) in [("cached", 1usize << 30), ("uncached", 0)] {
        let cfg = LoaderConfig { batch, size: 32, augment: Augment::CropFlip, cache_bytes, ..LoaderConfig::default() };
        let mut l = Loader::train(&split, &cfg, Position::default()).unwrap();
        let mut b = l.new_batch();
        // Warm up: one epoch fills the cache.
        for _ in 0..l.steps_per_epoch() {
            l.next(&mut b).unwrap();
        }
        eprintln!("{name}: {}", l.cache_report());
        group.bench_function(name, |bench| bench.iter(|| l.next(&mut b).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, loader);
criterion_main!(benches);
