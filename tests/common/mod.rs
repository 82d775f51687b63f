//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cli;
pub mod layers;
pub mod report;

use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::conv::ConvElem;
use prunekit::shape::ConvShape;
use prunekit::Device;

/// splitmix64, uniform in [lo, hi). [`SplitMix::new`] seeds the fused ops' tests,
/// [`SplitMix::for_layers`] the layer families' tests (bn, elementwise, pool, fc, loss,
/// sgd): the same generator from differently mixed seeds.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0F0F_1234_5678_9ABC)
    }
    pub fn for_layers(seed: u64) -> Self {
        SplitMix(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0123_4567_89AB_CDEF)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Rounded to the convolutions' element type.
pub fn to_t<T: ConvElem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Widened to f64.
pub fn f64s<T: ConvElem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

pub fn d64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A convolution with a square r x r filter and square stride and padding.
#[allow(clippy::too_many_arguments)]
pub fn square_conv(n: usize, h: usize, w: usize, c: usize, k: usize, r: usize, stride: usize, pad: usize) -> ConvShape {
    ConvShape { n, h, w, c, k, r, s: r, stride, pad }
}

/// A small deterministic generator (PCG-style LCG), so that tests need no RNG crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 23) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
    pub fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }
}

/// The emulation in forward, reversed and shuffled fiber order.
pub fn emu_devices() -> Vec<Device> {
    vec![
        Device::Gpu(Gpu::emu_with(Schedule::Forward)),
        Device::Gpu(Gpu::emu_with(Schedule::Reverse)),
        Device::Gpu(Gpu::emu_with(Schedule::Shuffle(0x5eed))),
    ]
}

/// The first CUDA device; for tests marked `#[ignore = "needs a CUDA GPU"]`.
pub fn cuda_device() -> Device {
    Device::Gpu(Gpu::cuda(0).unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}")))
}

/// A file of tests/data. `PRUNEKIT_TEST_DATA` points elsewhere (the GPU bundle sets it,
/// since its test binaries run far from the source tree).
pub fn data(name: &str) -> std::path::PathBuf {
    match std::env::var_os("PRUNEKIT_TEST_DATA") {
        Some(dir) => std::path::PathBuf::from(dir).join(name),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name),
    }
}
