//! The non-convolution layers of a ResNet training step on the CPU: batch norm, ReLU and
//! residual adds, max and average pooling, the fully connected layer, softmax
//! cross-entropy and SGD.
//!
//! Each op has two versions:
//! - an **oracle** (`*_oracle`), plain sequential loops in f64 on f64 inputs, written to
//!   be obviously PyTorch's formula; the tests compare every kernel and fast path with it
//!   and check its gradients by finite differences;
//! - a **fast path**, what the CPU device runs: rayon-parallel, f32 arithmetic (f64 where
//!   it is cheap and helps: batch statistics, loss sums) on the layers' element types.
//!
//! The fast paths take slices whose lengths the wrappers in `crate::ops::layers` have
//! checked; they panic if the lengths disagree.

pub mod bn;
pub mod elementwise;
pub mod fc;
pub mod loss;
pub mod pool;
pub mod sgd;

use half::bf16;

/// Element types of activations on the CPU: f32 and bf16, computed in f32.
pub trait Real: Copy + Send + Sync + 'static {
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
    /// The nearest value (round to nearest even for bf16).
    fn from_f32(x: f32) -> Self;
}

impl Real for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Real for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// ReLU with NaN kept, as `torch.relu`.
#[inline]
pub fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// The gradient through a ReLU whose output is `out`: PyTorch's `threshold_backward`,
/// `out <= 0 ? 0 : dy` (a NaN output lets the gradient through).
#[inline]
pub fn relu_grad(out: f32, dy: f32) -> f32 {
    if out <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// [`relu`] in f64, for the oracles.
#[inline]
pub fn relu64(v: f64) -> f64 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// [`relu_grad`] in f64, for the oracles.
#[inline]
pub fn relu_grad64(out: f64, dy: f64) -> f64 {
    if out <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// Rows per rayon task for row-parallel loops over `[m, c]` data: about 64 Ki elements.
pub(crate) fn rows_per_task(m: usize, c: usize) -> usize {
    (65536 / c.max(1)).clamp(1, m.max(1))
}
