//! The non-convolution layers of a ResNet training step, forward and backward, behind
//! one API for the CPU and kernel devices: batch norm (with a fused ReLU), ReLU and
//! residual adds, max and average pooling, the fully connected layer, softmax
//! cross-entropy, SGD and casts.
//!
//! Conventions:
//! - activations are NHWC; per-channel ops see them as `[m = N*H*W, c]`, c fastest;
//! - activations are `T: LayerElem` (f32, or bf16 in mixed precision, computed in f32);
//!   BN parameters and statistics, the FC layer, the loss and SGD are f32;
//! - every output is overwritten (nothing accumulates into an output unless the name
//!   says so: [`add_assign`]);
//! - every function checks lengths, the device of every buffer and counts against the
//!   kernels' integer types, and returns `Err` instead of panicking;
//! - on a kernel device nothing allocates device memory and nothing waits for the device:
//!   a training step can be captured or queued as is. Reductions keep their per-block
//!   partials in the output they later overwrite (see [`bn_forward_train`]) and are
//!   summed in a fixed order, so results do not depend on scheduling.
//!
//! Kernels: `kernels/{bn,elementwise,pool,fc,loss,sgd}.cu`; CPU versions (the fast path
//! the CPU device runs, and the f64 oracles the tests use): [`crate::cpu::layers`].

mod bn;
mod elementwise;
mod fc;
mod loss;
mod pool;
mod sgd;

pub use bn::{
    bn_apply_residual, bn_apply_saved, bn_backward, bn_backward_dx, bn_backward_dx_pair, bn_backward_masking_dy,
    bn_backward_pair, bn_backward_through_relu, bn_backward_through_relu_maxpool, bn_forward_eval, bn_forward_train,
    bn_row_chunks, relu_bits_len, BnInput, BnLayer, BnSide, Residual,
};
pub(crate) use bn::{bn_launch_finalize_tiles, bn_launch_grad_finalize, relu_output_host};
pub use elementwise::{add_assign, add_relu, cast, relu_backward};
pub use fc::{fc_backward, fc_forward};
pub use loss::{check_targets, softmax_cross_entropy, softmax_cross_entropy_smoothed};
pub use pool::{
    avgpool_backward, avgpool_forward, maxpool_backward, maxpool_backward_taps, maxpool_forward, maxpool_forward_bn,
    maxpool_out,
};
pub use sgd::{sgd_step, sgd_step_multi, SgdStep, SgdTable, SgdTensor};

pub(crate) use super::check_len;
use super::on_gpu;
use crate::cpu::layers::Real;
use crate::device::Buf;
use crate::gpu::{Elem, Gpu, Kernel};
use crate::{invalid, Result};
use half::bf16;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Element types [`cast`] converts between: f32 and bf16.
pub trait CastElem: Elem + Real + sealed::Sealed {
    /// The kernels' name for the type: "f32" or "bf16".
    const DTYPE: &'static str;
}
impl CastElem for f32 {
    const DTYPE: &'static str = "f32";
}
impl CastElem for bf16 {
    const DTYPE: &'static str = "bf16";
}

/// Element types of activations: f32, and bf16 (stored in bf16, computed in f32, rounded
/// to nearest even). The constants name each op's kernel for the type.
pub trait LayerElem: CastElem {
    /// `bn_stats_<dtype>`.
    const BN_STATS: Kernel;
    /// `bn_apply_<dtype>`.
    const BN_APPLY: Kernel;
    /// `bn_backward_reduce_<dtype>`.
    const BN_BACKWARD_REDUCE: Kernel;
    /// The backward's reduction through the BN's own ReLU, its output recomputed from x.
    const BN_BACKWARD_REDUCE_RELU: Kernel;
    /// The backward's dx pass through the BN's own ReLU, its output recomputed from x.
    const BN_BACKWARD_DX_RELU: Kernel;
    /// `bn_backward_dx_<dtype>`.
    const BN_BACKWARD_DX: Kernel;
    /// The reduction through the BN's own ReLU, g gathered from a max pool's backward.
    const BN_BACKWARD_REDUCE_RELU_MAXPOOL: Kernel;
    /// The dx pass through the BN's own ReLU, g gathered from a max pool's backward.
    const BN_BACKWARD_DX_RELU_MAXPOOL: Kernel;
    /// `bn_apply_bnres_<dtype>`: the residual through a second batch norm.
    const BN_APPLY_BNRES: Kernel;
    /// `bn_backward_reduce_pair_<dtype>`: two batch norms' sums from one dy.
    const BN_BACKWARD_REDUCE_PAIR: Kernel;
    /// `bn_backward_dx_pair_<dtype>`: two batch norms' dx from one dy.
    const BN_BACKWARD_DX_PAIR: Kernel;
    /// `add_relu_<dtype>`.
    const ADD_RELU: Kernel;
    /// `relu_backward_<dtype>`.
    const RELU_BACKWARD: Kernel;
    /// `add_assign_<dtype>`.
    const ADD_ASSIGN: Kernel;
    /// `maxpool_forward_<dtype>`.
    const MAXPOOL_FORWARD: Kernel;
    /// `maxpool_forward_bn_<dtype>`.
    const MAXPOOL_FORWARD_BN: Kernel;
    /// `maxpool_backward_<dtype>`.
    const MAXPOOL_BACKWARD: Kernel;
    /// `maxpool_backward_arg_<dtype>`.
    const MAXPOOL_BACKWARD_ARG: Kernel;
    /// `avgpool_forward_<dtype>`.
    const AVGPOOL_FORWARD: Kernel;
    /// `avgpool_backward_<dtype>`.
    const AVGPOOL_BACKWARD: Kernel;
}

macro_rules! layer_elem {
    ($t:ty, $d:literal) => {
        impl LayerElem for $t {
            const BN_STATS: Kernel = Kernel::new("bn", concat!("bn_stats_", $d));
            const BN_APPLY: Kernel = Kernel::new("bn", concat!("bn_apply_", $d));
            const BN_BACKWARD_REDUCE: Kernel = Kernel::new("bn", concat!("bn_backward_reduce_", $d));
            const BN_BACKWARD_DX: Kernel = Kernel::new("bn", concat!("bn_backward_dx_", $d));
            const BN_BACKWARD_REDUCE_RELU: Kernel = Kernel::new("bn", concat!("bn_backward_reduce_relu_", $d));
            const BN_BACKWARD_DX_RELU: Kernel = Kernel::new("bn", concat!("bn_backward_dx_relu_", $d));
            const BN_BACKWARD_REDUCE_RELU_MAXPOOL: Kernel =
                Kernel::new("bn", concat!("bn_backward_reduce_relu_maxpool_", $d));
            const BN_BACKWARD_DX_RELU_MAXPOOL: Kernel = Kernel::new("bn", concat!("bn_backward_dx_relu_maxpool_", $d));
            const BN_APPLY_BNRES: Kernel = Kernel::new("bn", concat!("bn_apply_bnres_", $d));
            const BN_BACKWARD_REDUCE_PAIR: Kernel = Kernel::new("bn", concat!("bn_backward_reduce_pair_", $d));
            const BN_BACKWARD_DX_PAIR: Kernel = Kernel::new("bn", concat!("bn_backward_dx_pair_", $d));
            const ADD_RELU: Kernel = Kernel::new("elementwise", concat!("add_relu_", $d));
            const RELU_BACKWARD: Kernel = Kernel::new("elementwise", concat!("relu_backward_", $d));
            const ADD_ASSIGN: Kernel = Kernel::new("elementwise", concat!("add_assign_", $d));
            const MAXPOOL_FORWARD: Kernel = Kernel::new("pool", concat!("maxpool_forward_", $d));
            const MAXPOOL_FORWARD_BN: Kernel = Kernel::new("pool", concat!("maxpool_forward_bn_", $d));
            const MAXPOOL_BACKWARD: Kernel = Kernel::new("pool", concat!("maxpool_backward_", $d));
            const MAXPOOL_BACKWARD_ARG: Kernel = Kernel::new("pool", concat!("maxpool_backward_arg_", $d));
            const AVGPOOL_FORWARD: Kernel = Kernel::new("pool", concat!("avgpool_forward_", $d));
            const AVGPOOL_BACKWARD: Kernel = Kernel::new("pool", concat!("avgpool_backward_", $d));
        }
    };
}
layer_elem!(f32, "f32");
layer_elem!(bf16, "bf16");

/// Blocks of a grid-stride launch: enough to fill a large GPU a few times over.
pub(crate) const MAX_STRIDE_BLOCKS: usize = 4096;

/// Blocks for `work` items at `threads` per block, grid-stride beyond [`MAX_STRIDE_BLOCKS`].
pub(crate) fn stride_blocks(work: usize, threads: u32) -> u32 {
    work.div_ceil(threads as usize).clamp(1, MAX_STRIDE_BLOCKS) as u32
}

/// The device address of `b`, which must live on `gpu`.
pub(crate) fn dptr<T: Elem>(b: &Buf<T>, gpu: &Gpu, what: &str) -> Result<u64> {
    Ok(on_gpu(b, gpu, what)?.ptr())
}

/// The host slice of `b`, which must live on the CPU.
pub(crate) fn host<'a, T: Elem>(b: &'a Buf<T>, what: &str) -> Result<&'a [T]> {
    b.host().ok_or_else(|| invalid!("{what} is not on the device cpu"))
}

/// The mutable host slice of `b`, which must live on the CPU.
pub(crate) fn host_mut<'a, T: Elem>(b: &'a mut Buf<T>, what: &str) -> Result<&'a mut [T]> {
    b.host_mut().ok_or_else(|| invalid!("{what} is not on the device cpu"))
}

/// `a * b`, or an error naming the shape.
pub(crate) fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| invalid!("{what} is too large ({a} x {b})"))
}

/// A count as the i64 the kernels take.
pub(crate) fn i64_of(x: usize, what: &str) -> Result<i64> {
    i64::try_from(x).map_err(|_| invalid!("{what} = {x} is too large for the kernels"))
}

/// True if every address is 16-byte aligned (vector loads and stores are allowed).
pub(crate) fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}
