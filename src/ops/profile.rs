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
use crate::shape::{ConvShape, Pass};
use crate::{ensure, Result};
use std::cell::{Cell, RefCell};

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
/// constructors are the one place the counts are defined; `elem` is the element size in
/// bytes of the activations (4 for f32, 2 for bf16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Floating-point operations.
    pub flops: u64,
    /// Bytes read plus bytes written.
    pub bytes: u64,
}

fn u(x: usize) -> u64 {
    x as u64
}

const F32: u64 = 4;

impl Cost {
    /// A convolution pass: FLOPs `2 * N*P*Q * K * C*R*S` for each pass (dgrad of a strided
    /// conv skips the taps that meet no input, as its phase GEMMs do); bytes: fprop reads
    /// x and w and writes y, dgrad reads dy and w and writes dx (all in `elem`), wgrad
    /// reads x and dy (`elem`) and writes dw (f32).
    pub fn conv(pass: Pass, sh: &ConvShape, elem: usize) -> Cost {
        let (e, x, w, y) = (u(elem), u(sh.x_len()), u(sh.w_len()), u(sh.y_len()));
        let macs = u(sh.n) * u(sh.p()) * u(sh.q()) * u(sh.k) * u(sh.c) * u(sh.r) * u(sh.s);
        let bytes = match pass {
            Pass::Fprop | Pass::Dgrad => (x + w + y) * e,
            Pass::Wgrad => (x + y) * e + w * F32,
        };
        Cost { flops: 2 * macs, bytes }
    }

    /// Batch norm train forward over `[m, c]`: a statistics pass reads x, the apply pass
    /// reads x and writes y; per channel gamma and beta are read, the running mean and
    /// variance read and written, the saved mean and inverse deviation written (8 f32).
    /// FLOPs per element: 3 for the statistics (sum, fused square-sum), 2 to apply
    /// (`x * scale + shift`), 1 for a fused ReLU.
    pub fn bn_forward_train(m: usize, c: usize, elem: usize, relu: bool) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * (5 + relu as u64), bytes: 3 * mc * u(elem) + 8 * u(c) * F32 }
    }

    /// A convolution forward whose epilogue also computes batch statistics of y
    /// ([`crate::ops::fused::conv2d_fprop_bn_stats`]): the fprop's count, plus per
    /// channel and row tile one (mean, M2) pair written (8 bytes); y is not read again.
    /// FLOPs: the GEMM's only (the conv families count GEMM FLOPs, which add up to the
    /// model's); the statistics' FLOPs are counted with the BN ([`Cost::bn_finalize_tiles`]).
    pub fn conv_bn_stats(sh: &ConvShape, elem: usize, tiles: usize) -> Cost {
        let c = Cost::conv(Pass::Fprop, sh, elem);
        Cost { flops: c.flops, bytes: c.bytes + 8 * u(tiles) * u(sh.k) }
    }

    /// A convolution pass (fprop or wgrad) whose x operand is the batch norm (+ ReLU) of the
    /// x it reads, applied as x is loaded ([`crate::ops::fused::conv2d_fprop_bn_input`]):
    /// the pass's count, plus per input channel the 4 f32 of the BN (gamma, beta, saved
    /// mean and inverse deviation); FLOPs: 2 per x element loaded once (+1 for the ReLU),
    /// counted over x's `N*H*W*C` (a 3x3 conv loads an element up to 9 times; the count is
    /// the work the unfused apply pass did). The BN's output is neither written nor read.
    pub fn conv_bn_input(pass: Pass, sh: &ConvShape, elem: usize, relu: bool) -> Cost {
        let c = Cost::conv(pass, sh, elem);
        Cost { flops: c.flops + u(sh.x_len()) * (2 + relu as u64), bytes: c.bytes + 4 * u(sh.c) * F32 }
    }

    /// The BN statistics of an `[m, c]` conv output computed in the conv's epilogue, merged
    /// by `bn_stats_finalize_f32`: reads `tiles` pairs per channel (8 bytes each; with one
    /// tile the two `[c]` buffers), reads and writes the running mean and variance, writes
    /// the saved mean and inverse deviation (6 f32 per channel). FLOPs: 3 per element
    /// (sum, deviation, fused square: done in the epilogue), 10 per pair.
    pub fn bn_finalize_tiles(m: usize, c: usize, tiles: usize) -> Cost {
        Cost { flops: 3 * u(m) * u(c) + 10 * u(tiles) * u(c), bytes: 8 * u(tiles) * u(c) + 6 * u(c) * F32 }
    }

    /// The normalisation of a train forward from saved statistics
    /// ([`crate::ops::layers::bn_apply_saved`]): reads x (and the residual) and writes y;
    /// per channel gamma, beta, the saved mean and inverse deviation (4 f32). FLOPs per
    /// element: 2, +1 for the residual add, +1 for the ReLU.
    pub fn bn_apply(m: usize, c: usize, elem: usize, residual: bool, relu: bool) -> Cost {
        let mc = u(m) * u(c);
        let (r, l) = (residual as u64, relu as u64);
        Cost { flops: mc * (2 + r + l), bytes: (2 + r) * mc * u(elem) + 4 * u(c) * F32 }
    }

    /// Batch norm eval forward over `[m, c]`: one pass reads x and writes y; per channel
    /// 4 f32 are read. FLOPs per element: 2 (+1 for a fused ReLU).
    pub fn bn_forward_eval(m: usize, c: usize, elem: usize, relu: bool) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * (2 + relu as u64), bytes: 2 * mc * u(elem) + 4 * u(c) * F32 }
    }

    /// Batch norm backward over `[m, c]`: a reduction pass reads x and dy (and the fused
    /// ReLU's output), the dx pass reads them again and writes dx; per channel gamma, the
    /// saved statistics (read) and dgamma, dbeta (written): 5 f32. FLOPs per element: 5 in
    /// the reduction (`xhat`, two sums), 6 for dx, and 1 per pass for a ReLU mask.
    pub fn bn_backward(m: usize, c: usize, elem: usize, relu: bool) -> Cost {
        let (mc, r) = (u(m) * u(c), relu as u64);
        Cost { flops: mc * (11 + 2 * r), bytes: (2 * (2 + r) + 1) * mc * u(elem) + 5 * u(c) * F32 }
    }

    /// Batch norm backward through a ReLU whose masked gradient g is kept
    /// ([`crate::ops::layers::bn_backward_masking_dy`]): the reduction reads x, dy and the
    /// ReLU's output and writes g over dy, the dx pass reads x and g and writes dx; per channel 5
    /// f32 as [`Cost::bn_backward`]. FLOPs per element: 1 for the mask, 5 in the reduction,
    /// 6 for dx.
    pub fn bn_backward_masking_dy(m: usize, c: usize, elem: usize) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * 12, bytes: 7 * mc * u(elem) + 5 * u(c) * F32 }
    }

    /// `out = max(a + b, 0)` over n elements: reads 2, writes 1; 2 FLOPs per element.
    pub fn add_relu(n: usize, elem: usize) -> Cost {
        Cost { flops: 2 * u(n), bytes: 3 * u(n) * u(elem) }
    }

    /// ReLU backward over n elements: reads the output and dy, writes dx; 1 FLOP each.
    pub fn relu_backward(n: usize, elem: usize) -> Cost {
        Cost { flops: u(n), bytes: 3 * u(n) * u(elem) }
    }

    /// `dst += src` over n elements: reads 2, writes 1; 1 FLOP each.
    pub fn add_assign(n: usize, elem: usize) -> Cost {
        Cost { flops: u(n), bytes: 3 * u(n) * u(elem) }
    }

    /// A conversion of n elements from `from`-byte to `to`-byte elements: no FLOPs.
    pub fn cast(n: usize, from: usize, to: usize) -> Cost {
        Cost { flops: 0, bytes: u(n) * u(from + to) }
    }

    /// A layout conversion (transpose) of n elements: reads and writes each once.
    pub fn transpose(n: usize, elem: usize) -> Cost {
        Cost { flops: 0, bytes: 2 * u(n) * u(elem) }
    }

    /// Max pool 3x3 forward from `inputs` to `outputs` elements: reads x, writes y; 9
    /// comparisons per output.
    pub fn maxpool_forward(inputs: usize, outputs: usize, elem: usize) -> Cost {
        Cost { flops: 9 * u(outputs), bytes: (u(inputs) + u(outputs)) * u(elem) }
    }

    /// Max pool 3x3 backward: reads x and dy, writes dx; per output 9 comparisons to find
    /// its maximum and 1 add.
    pub fn maxpool_backward(inputs: usize, outputs: usize, elem: usize) -> Cost {
        Cost { flops: 10 * u(outputs), bytes: (2 * u(inputs) + u(outputs)) * u(elem) }
    }

    /// Global average pool forward of `[n, hw, c]` into f32 `[n, c]`: 1 add per input and
    /// 1 multiply per output.
    pub fn avgpool_forward(n: usize, hw: usize, c: usize, elem: usize) -> Cost {
        let (x, y) = (u(n) * u(hw) * u(c), u(n) * u(c));
        Cost { flops: x + y, bytes: x * u(elem) + y * F32 }
    }

    /// Global average pool backward: reads f32 dy `[n, c]`, writes dx `[n, hw, c]`; 1
    /// multiply per output.
    pub fn avgpool_backward(n: usize, hw: usize, c: usize, elem: usize) -> Cost {
        let (x, y) = (u(n) * u(hw) * u(c), u(n) * u(c));
        Cost { flops: x, bytes: x * u(elem) + y * F32 }
    }

    /// The fc forward `[n, cin] x [cout, cin]^T + b` (f32): `2 n cin cout` FLOPs (the bias
    /// add is not counted, as in `Arch`); reads x, w and b, writes y.
    pub fn fc_forward(n: usize, cin: usize, cout: usize) -> Cost {
        let (n, cin, cout) = (u(n), u(cin), u(cout));
        Cost { flops: 2 * n * cin * cout, bytes: (n * cin + cout * cin + cout + n * cout) * F32 }
    }

    /// The fc backward: dx and dw are two GEMMs, `4 n cin cout` FLOPs (the bias gradient is
    /// not counted); reads x, w and dy, writes dx, dw and db.
    pub fn fc_backward(n: usize, cin: usize, cout: usize) -> Cost {
        let (n, cin, cout) = (u(n), u(cin), u(cout));
        Cost { flops: 4 * n * cin * cout, bytes: (2 * n * cin + 2 * cout * cin + n * cout + cout) * F32 }
    }

    /// Softmax cross-entropy of `[n, classes]` logits: reads logits and targets (i32),
    /// writes dlogits and the loss; 5 FLOPs per logit (max, subtract, exp, sum, scale).
    pub fn softmax_cross_entropy(n: usize, classes: usize) -> Cost {
        let nc = u(n) * u(classes);
        Cost { flops: 5 * nc, bytes: (2 * nc + u(n) + 1) * F32 }
    }

    /// An SGD step on n f32 parameters: reads param and grad, writes param and the
    /// momentum buffer, and reads the buffer except on the first step; 6 FLOPs per
    /// parameter (weight decay, momentum, update: a multiply and an add each).
    pub fn sgd(n: usize, first_step: bool) -> Cost {
        Cost { flops: 6 * u(n), bytes: u(n) * F32 * (4 + !first_step as u64) }
    }
}

/// One recorded op of a profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Call {
    /// Its family.
    pub family: Family,
    /// Its counted cost.
    pub cost: Cost,
    /// Its time in milliseconds (events on a GPU, the wall clock elsewhere).
    pub ms: f64,
}

/// One family's line of a [`Profile`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FamilyProfile {
    /// The family (in JSON its [`Family::name`]).
    pub family: Family,
    /// Ops of this family that ran.
    pub calls: usize,
    /// Their time in milliseconds.
    pub ms: f64,
    /// `ms` over the profile's `step_ms` (a fraction, not a percentage).
    pub share: f64,
    /// Counted FLOPs.
    pub flops: u64,
    /// Counted bytes read and written.
    pub bytes: u64,
    /// Achieved GFLOP/s: `flops / ms`.
    pub gflop_per_s: f64,
    /// Achieved GB/s (10^9 bytes): `bytes / ms`.
    pub gb_per_s: f64,
}

/// The profile of one scope (one training step, say), from [`profile`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Profile {
    /// The device kind: cpu, emu or cuda.
    pub device: String,
    /// Milliseconds of the whole scope (device marks around it).
    pub step_ms: f64,
    /// The sum of the ops' times.
    pub ops_ms: f64,
    /// `step_ms - ops_ms`: time between the ops (host work, launch gaps).
    pub other_ms: f64,
    /// Counted FLOPs of every op.
    pub flops: u64,
    /// Counted bytes read and written by every op.
    pub bytes: u64,
    /// One line per family that ran, in [`Family::ALL`]'s order.
    pub families: Vec<FamilyProfile>,
    /// Every op in the order it ran (not in JSON).
    #[serde(skip)]
    pub calls: Vec<Call>,
}

impl Profile {
    /// A profile of `calls` in a scope of `step_ms` on a `device` kind.
    pub fn from_calls(device: &str, step_ms: f64, calls: Vec<Call>) -> Profile {
        let families = Family::ALL
            .iter()
            .filter_map(|&family| {
                let of: Vec<&Call> = calls.iter().filter(|c| c.family == family).collect();
                if of.is_empty() {
                    return None;
                }
                let ms: f64 = of.iter().map(|c| c.ms).sum();
                let flops: u64 = of.iter().map(|c| c.cost.flops).sum();
                let bytes: u64 = of.iter().map(|c| c.cost.bytes).sum();
                let per_s = |x: u64| if ms > 0.0 { x as f64 / (ms * 1e6) } else { 0.0 };
                Some(FamilyProfile {
                    family,
                    calls: of.len(),
                    ms,
                    share: if step_ms > 0.0 { ms / step_ms } else { 0.0 },
                    flops,
                    bytes,
                    gflop_per_s: per_s(flops),
                    gb_per_s: per_s(bytes),
                })
            })
            .collect::<Vec<_>>();
        let ops_ms: f64 = calls.iter().map(|c| c.ms).sum();
        Profile {
            device: device.to_string(),
            step_ms,
            ops_ms,
            other_ms: step_ms - ops_ms,
            flops: calls.iter().map(|c| c.cost.flops).sum(),
            bytes: calls.iter().map(|c| c.cost.bytes).sum(),
            families,
            calls,
        }
    }

    /// The line of `family`, if any op of it ran.
    pub fn family(&self, family: Family) -> Option<&FamilyProfile> {
        self.families.iter().find(|f| f.family == family)
    }
}

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
