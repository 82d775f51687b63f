//! A per-op profile of whatever runs inside a scope, typically one training step:
//! per op family (conv fprop/dgrad/wgrad, BN forward/backward, ReLU/add, pooling, fc,
//! loss, SGD, casts, layout conversions) the time, the FLOPs and the bytes moved.
//!
//! ```no_run
//! # fn main() -> prunekit::Result<()> {
//! use prunekit::model::{Arch, Model, PrecisionKind, Sgd};
//! use prunekit::ops::profile::profile;
//! let dev = prunekit::Device::parse("cpu")?;
//! let mut model = Model::new(&dev, &Arch::resnet50(10), 0, PrecisionKind::F32)?;
//! let mut ws = model.workspace(2, 64, 64)?;
//! model.set_batch(&mut ws, &vec![0.5; 2 * 3 * 64 * 64], Some(&[1, 2][..]))?;
//! let sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 1e-4 };
//! let ((), p) = profile(&dev, || model.train_step(&mut ws, &sgd))?;
//! for f in &p.families {
//!     println!("{:?}: {:.2} ms, {} FLOPs, {} bytes", f.family, f.ms, f.flops, f.bytes);
//! }
//! # Ok(()) }
//! ```
//!
//! **How it records.** Every wrapper of `ops::conv` and `ops::layers` that does work
//! passes it through [`timed`]: outside a [`profile`] scope that is one read of a
//! thread-local flag and a branch (no allocation, no lock, no device call); inside, a
//! [`Device::mark`] before and after the op (the wall clock on the CPU and in the
//! emulation, whose launches are synchronous; a CUDA event pair on the stream of a GPU,
//! read only when the scope ends, so the profile does not wait on the device per op) and
//! the op's [`Cost`], computed from its shape arguments. A scope covers the ops that the
//! calling thread runs (the model runs its ops from the caller's thread; the CPU fast
//! paths' own worker threads are inside the ops). The model needs no change: the ops
//! layer is the one place every op of a step passes through. Scopes do not nest.
//!
//! **What is counted** (the same on every device, from the shapes alone; see [`Cost`]):
//! - FLOPs of convolutions and the fc layer are 2 x multiply-adds, as
//!   [`Arch::flops_train`](crate::model::Arch::flops_train) counts them (the fc's bias
//!   add and bias gradient are not counted). A step's conv and fc rows together are
//!   `flops_train(h, w) * batch` exactly (the stem has no input gradient).
//! - FLOPs of the other ops are nominal arithmetic per element, listed at each
//!   function of [`Cost`]; they matter little, those ops are bound by memory.
//! - Bytes are those the kernels' passes read and write: each pass over a tensor counts
//!   the tensor once (BN's statistics pass and its apply pass each read `x`), and nothing
//!   else: not the re-reads of tiles from cache, not the CPU's im2col buffer, not wgrad's
//!   split-K zeroing and atomic adds, not BN's per-chunk partial sums. The CPU fast path
//!   of BN forward takes one more pass than the kernels (mean, then variance) and is
//!   counted as the kernels are. Achieved GB/s is therefore a lower bound of the traffic
//!   the memory system served.

use crate::device::{Device, Mark};
use crate::shape::Pass;
use crate::{ensure, Result};
use std::cell::{Cell, RefCell};

mod aggregate;

pub use aggregate::{Call, FamilyProfile, Profile};

/// A family of ops in the profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Convolution forward ([`conv2d_fprop`](crate::ops::conv::conv2d_fprop)).
    ConvFprop,
    /// Convolution input gradient ([`conv2d_dgrad`](crate::ops::conv::conv2d_dgrad)).
    ConvDgrad,
    /// Convolution weight gradient ([`conv2d_wgrad`](crate::ops::conv::conv2d_wgrad)).
    ConvWgrad,
    /// Batch norm forward, train and eval (with its fused ReLU).
    BnForward,
    /// Batch norm backward (with the fused ReLU's gradient).
    BnBackward,
    /// Residual add + ReLU, ReLU backward, gradient accumulation.
    ReluAdd,
    /// Max and average pooling, forward and backward.
    Pool,
    /// The fully connected layer, forward and backward.
    Fc,
    /// Softmax cross-entropy and its gradient.
    Loss,
    /// SGD steps.
    Sgd,
    /// Precision conversions (f32 <-> bf16: images, weight copies after SGD).
    Cast,
    /// Layout conversions (NCHW <-> NHWC, OIHW <-> KRSC).
    Layout,
}

impl Family {
    /// Every family, in the order of the tables.
    pub const ALL: [Family; 12] = [
        Family::ConvFprop,
        Family::ConvDgrad,
        Family::ConvWgrad,
        Family::BnForward,
        Family::BnBackward,
        Family::ReluAdd,
        Family::Pool,
        Family::Fc,
        Family::Loss,
        Family::Sgd,
        Family::Cast,
        Family::Layout,
    ];

    /// The name in tables and JSON: `conv_fprop`, `bn_backward`, `relu_add`, ...
    pub fn name(self) -> &'static str {
        match self {
            Family::ConvFprop => "conv_fprop",
            Family::ConvDgrad => "conv_dgrad",
            Family::ConvWgrad => "conv_wgrad",
            Family::BnForward => "bn_forward",
            Family::BnBackward => "bn_backward",
            Family::ReluAdd => "relu_add",
            Family::Pool => "pool",
            Family::Fc => "fc",
            Family::Loss => "loss",
            Family::Sgd => "sgd",
            Family::Cast => "cast",
            Family::Layout => "layout",
        }
    }

    /// The convolution family of a pass.
    pub fn of_pass(pass: Pass) -> Family {
        match pass {
            Pass::Fprop => Family::ConvFprop,
            Pass::Dgrad => Family::ConvDgrad,
            Pass::Wgrad => Family::ConvWgrad,
        }
    }

    /// True for the families whose FLOPs are 2 x multiply-adds of a GEMM (conv and fc),
    /// false where they are nominal.
    pub fn is_gemm(self) -> bool {
        matches!(self, Family::ConvFprop | Family::ConvDgrad | Family::ConvWgrad | Family::Fc)
    }
}

/// What one op costs, counted from its shapes: floating-point operations and bytes read
/// plus written (see the module documentation for the model of the bytes). The
/// constructors are the one place the counts are defined, each in an `impl Cost` block
/// beside its op (`ops::conv`, `ops::fused`, `ops::layers::*`); `elem` is the element size
/// in bytes of the activations (4 for f32, 2 for bf16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cost {
    /// Floating-point operations.
    pub flops: u64,
    /// Bytes read plus bytes written.
    pub bytes: u64,
}

/// A count as `u64`, for the cost formulas.
pub(crate) fn u(x: usize) -> u64 {
    x as u64
}

/// Bytes of an f32.
pub(crate) const F32: u64 = 4;

/// An op recorded in the scope, its marks not yet read.
struct Pending {
    family: Family,
    cost: Cost,
    dev: Device,
    start: Mark,
    end: Mark,
}

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Runs `work`, the device work of one op of `family` on `dev`. Inside a [`profile`]
/// scope the op is timed and `cost` is called for its counts; outside, this is `work()`
/// behind one thread-local flag.
#[inline]
pub fn timed<R>(
    dev: &Device,
    family: Family,
    cost: impl FnOnce() -> Cost,
    work: impl FnOnce() -> Result<R>,
) -> Result<R> {
    if !ACTIVE.with(Cell::get) {
        return work();
    }
    timed_slow(dev, family, cost(), work)
}

#[inline(never)]
fn timed_slow<R>(dev: &Device, family: Family, cost: Cost, work: impl FnOnce() -> Result<R>) -> Result<R> {
    let start = dev.mark()?;
    let r = work()?;
    let end = dev.mark()?;
    PENDING.with(|p| p.borrow_mut().push(Pending { family, cost, dev: dev.clone(), start, end }));
    Ok(r)
}

/// Ends a scope even when its work fails or panics.
struct ScopeGuard;

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(false));
        PENDING.with(|p| p.borrow_mut().clear());
    }
}

/// Runs `work` (one training step, say) on `dev` and profiles every op it runs from this
/// thread: waits for queued work, marks the start, runs, marks the end, then reads every
/// op's time. The results are those of an unprofiled run (the ops run unchanged, one
/// after another as always); the time grows by the marks (two per op). Profile scopes do
/// not nest.
pub fn profile<R>(dev: &Device, work: impl FnOnce() -> Result<R>) -> Result<(R, Profile)> {
    ensure!(!ACTIVE.with(Cell::get), "profile scopes do not nest");
    dev.synchronize()?;
    let start = dev.mark()?;
    let guard = ScopeGuard;
    PENDING.with(|p| p.borrow_mut().reserve(1024));
    ACTIVE.with(|a| a.set(true));
    let r = work();
    ACTIVE.with(|a| a.set(false));
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    drop(guard);
    let r = r?;
    let end = dev.mark()?;
    let step_ms = dev.elapsed_ms(&start, &end)?;
    let calls = pending
        .into_iter()
        .map(|p| Ok(Call { family: p.family, cost: p.cost, ms: p.dev.elapsed_ms(&p.start, &p.end)? }))
        .collect::<Result<Vec<_>>>()?;
    Ok((r, Profile::from_calls(dev.kind(), step_ms, calls)))
}

/// True inside a [`profile`] scope on this thread.
pub fn active() -> bool {
    ACTIVE.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::ConvShape;

    #[test]
    fn conv_counts() {
        // ResNet50's layer1.0.conv2 at batch 2, 56x56: 3x3, 64 -> 64.
        let sh = ConvShape { n: 2, h: 56, w: 56, c: 64, k: 64, r: 3, s: 3, stride: 1, pad: 1 };
        let macs = 2 * 56 * 56 * 64 * 64 * 9u64;
        for pass in Pass::ALL {
            assert_eq!(Cost::conv(pass, &sh, 4).flops, 2 * macs);
        }
        let (x, w, y) = (2 * 56 * 56 * 64u64, 64 * 9 * 64u64, 2 * 56 * 56 * 64u64);
        assert_eq!(Cost::conv(Pass::Fprop, &sh, 4).bytes, 4 * (x + w + y));
        assert_eq!(Cost::conv(Pass::Dgrad, &sh, 2).bytes, 2 * (x + w + y));
        assert_eq!(Cost::conv(Pass::Wgrad, &sh, 2).bytes, 2 * (x + y) + 4 * w);
        // Stride 2: P = Q = 28, every pass counts the taps of the output positions.
        let s2 = ConvShape { stride: 2, ..sh };
        assert_eq!(Cost::conv(Pass::Dgrad, &s2, 4).flops, 2 * 2 * 28 * 28 * 64 * 64 * 9);
        // The counts agree with Arch's per-layer FLOPs.
        let arch = crate::model::Arch::resnet50(1000);
        for l in arch.convs(224, 224) {
            let sh = l.shape(1);
            assert_eq!(Cost::conv(Pass::Fprop, &sh, 4).flops as f64, l.flops(), "{}", l.name);
        }
    }

    #[test]
    fn layer_counts() {
        // BN forward reads x twice and writes y, plus 8 f32 per channel.
        assert_eq!(Cost::bn_forward_train(100, 8, 4, true), Cost { flops: 4800, bytes: 3 * 800 * 4 + 8 * 8 * 4 });
        assert_eq!(Cost::bn_forward_train(100, 8, 2, false).bytes, 3 * 800 * 2 + 8 * 8 * 4);
        assert_eq!(Cost::bn_forward_eval(100, 8, 4, false), Cost { flops: 1600, bytes: 2 * 800 * 4 + 4 * 8 * 4 });
        // BN backward: (x, dy, relu_out) twice, dx once.
        assert_eq!(Cost::bn_backward(100, 8, 4, true).bytes, 7 * 800 * 4 + 5 * 8 * 4);
        assert_eq!(Cost::bn_backward(100, 8, 4, false).bytes, 5 * 800 * 4 + 5 * 8 * 4);
        assert_eq!(Cost::add_relu(10, 2), Cost { flops: 20, bytes: 60 });
        assert_eq!(Cost::relu_backward(10, 4), Cost { flops: 10, bytes: 120 });
        assert_eq!(Cost::add_assign(10, 4), Cost { flops: 10, bytes: 120 });
        assert_eq!(Cost::cast(10, 4, 2), Cost { flops: 0, bytes: 60 });
        assert_eq!(Cost::transpose(10, 4), Cost { flops: 0, bytes: 80 });
        assert_eq!(Cost::maxpool_forward(400, 100, 4), Cost { flops: 900, bytes: 2000 });
        assert_eq!(Cost::maxpool_backward(400, 100, 4), Cost { flops: 1000, bytes: 3600 });
        assert_eq!(Cost::avgpool_forward(2, 49, 8, 2), Cost { flops: 2 * 49 * 8 + 16, bytes: 2 * 49 * 8 * 2 + 64 });
        assert_eq!(Cost::avgpool_backward(2, 49, 8, 4), Cost { flops: 2 * 49 * 8, bytes: 2 * 49 * 8 * 4 + 64 });
        assert_eq!(Cost::fc_forward(2, 3, 5), Cost { flops: 60, bytes: (6 + 15 + 5 + 10) * 4 });
        assert_eq!(Cost::fc_backward(2, 3, 5), Cost { flops: 120, bytes: (12 + 30 + 10 + 5) * 4 });
        assert_eq!(Cost::softmax_cross_entropy(2, 5), Cost { flops: 50, bytes: (20 + 2 + 1) * 4 });
        assert_eq!(Cost::sgd(10, true), Cost { flops: 60, bytes: 160 });
        assert_eq!(Cost::sgd(10, false), Cost { flops: 60, bytes: 200 });
    }

    #[test]
    fn profile_lines_sum_and_scopes_do_not_nest() {
        let c = |family, ms| Call { family, cost: Cost { flops: 1_000_000, bytes: 2_000_000 }, ms };
        let p = Profile::from_calls(
            "cpu",
            10.0,
            vec![c(Family::Sgd, 1.0), c(Family::ConvFprop, 4.0), c(Family::ConvFprop, 4.0)],
        );
        assert_eq!(p.families.len(), 2);
        assert_eq!(p.families[0].family, Family::ConvFprop, "in Family::ALL's order");
        let f = p.family(Family::ConvFprop).unwrap();
        assert_eq!((f.calls, f.ms, f.flops, f.bytes), (2, 8.0, 2_000_000, 4_000_000));
        assert!((f.share - 0.8).abs() < 1e-12);
        assert!((f.gflop_per_s - 0.25).abs() < 1e-12 && (f.gb_per_s - 0.5).abs() < 1e-12);
        assert!((p.other_ms - 1.0).abs() < 1e-12);
        assert_eq!(serde_json::to_value(f).unwrap()["family"], "conv_fprop");

        let dev = Device::Cpu;
        let outer = profile(&dev, || {
            assert!(active());
            let inner = profile(&dev, || Ok(()));
            assert!(inner.is_err());
            timed(&dev, Family::Loss, || Cost { flops: 1, bytes: 2 }, || Ok(7))
        });
        let (v, p) = outer.unwrap();
        assert_eq!(v, 7);
        assert!(!active());
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].cost, Cost { flops: 1, bytes: 2 });
        // Outside a scope nothing is recorded and the cost is never computed.
        let r = timed(&dev, Family::Loss, || panic!("not counted outside a scope"), || Ok(3));
        assert_eq!(r.unwrap(), 3);
        // A failing scope ends the scope.
        let failed: Result<((), Profile)> = profile(&dev, || Err(crate::invalid!("no")));
        assert!(failed.is_err() && !active());
    }
}
