//! Fused ops of the training step: the memory-bound work around the convolutions folded
//! into fewer passes over the activations.
//!
//! - [`conv2d_fprop_bn_stats`]: a convolution whose epilogue also computes the batch
//!   statistics of its output for the batch norm that follows (per row tile of the GEMM:
//!   the tile mean and the sum of squared deviations from it, over the values as stored),
//!   then `bn_stats_finalize_f32` merges the tiles in a fixed order into the saved mean and
//!   inverse deviation and updates the running statistics. Deterministic: no atomics, the
//!   per-tile pairs go to a workspace (the bytes of the BN's own output, which the apply
//!   overwrites afterwards, so nothing is allocated).
//! - [`conv2d_fprop_bn_input_stats`]: the same with the previous layer's batch norm (+
//!   ReLU) applied as the convolution loads its input (BN on load), so that a train step
//!   never writes that batch norm's output.
//! - [`conv_bn_forward_train`]: that, then one pass `y = relu?(bn(conv) + residual?)`
//!   ([`crate::ops::layers::bn_apply_saved`]): a train-mode conv + BN (+ ReLU) reads the
//!   conv output once instead of twice, and a bottleneck's last BN, residual add and ReLU
//!   are one pass instead of two.
//!
//! On the CPU device the same ops run the CPU implementations (the statistics in f64, as
//! [`crate::cpu::layers::bn::bn_forward_train`]). Profile counts are the same on every
//! device: the conv pass counts its epilogue's pairs, the finalize reads them.

use super::conv::{self, ConvElem, Epilogue, GradSecond, MaskPtr, Plan, ReluMask, StatsOut};
use super::layers::{bn_apply_saved, BnInput, BnLayer, LayerElem};
use super::profile::{timed, u, Cost, Family, F32};
use super::{check_bufs, check_len, check_on};
use crate::cpu::layers::bn as cpu_bn;
use crate::device::{Buf, Device};
use crate::shape::{ConvShape, Pass};
use crate::{ensure, invalid, Result};

/// Row tiles the fprop of `sh` runs on a kernel device for elements of `T`, and the rows of
/// each (the tile's BM): the number of per-tile statistics pairs per channel.
pub fn stats_tiles<T: ConvElem>(sh: &ConvShape, plan: Option<Plan>) -> (usize, usize) {
    let (bm, _, _) = plan.unwrap_or_else(|| conv::plan::<T>(Pass::Fprop, sh)).tile.dims::<T>();
    let m = sh.n * sh.p() * sh.q();
    (m.div_ceil(bm), bm)
}

/// `y = conv(x, w)` as [`conv::conv2d_fprop`], and the train-mode batch statistics of `y`
/// (`[m = N*P*Q, K]`, `K = bn.c`) as [`crate::ops::layers::bn_forward_train`] computes
/// them: `bn.save_mean`, `bn.save_invstd = 1 / sqrt(var + eps)` (biased variance) and
/// `bn`'s running statistics updated with `bn.momentum` (the variance unbiased). Needs
/// `m >= 2`.
///
/// `workspace` (as many elements as `y`) holds the per-tile statistics between the two
/// launches; its contents are left undefined. The BN's output buffer is the natural
/// choice: the apply overwrites it next. On a kernel device: two launches (the conv with
/// the statistics epilogue, then `bn_stats_finalize_f32`).
pub fn conv2d_fprop_bn_stats<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    workspace: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
) -> Result<()> {
    conv2d_fprop_bn_stats_with(dev, sh, x, w, y, workspace, bn, None)
}

/// [`conv2d_fprop_bn_stats`] with a given conv plan on a kernel device (`None`: the
/// default; the CPU ignores it). For tests and benchmarks of every tile.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fprop_bn_stats_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    workspace: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
    plan: Option<Plan>,
) -> Result<()> {
    fprop_stats(dev, sh, x, None, w, y, workspace, bn, plan)
}

/// [`conv2d_fprop_bn_stats`] of `conv(bn_in(x), w)`: the previous layer's batch norm (+
/// ReLU) applied while the convolution loads x, as [`conv2d_fprop_bn_input`] does, and the
/// batch statistics of the output for `bn` computed in its epilogue. A train-mode step
/// then never writes (or reads) `bn_in`'s output: `y` is bitwise the y of
/// [`conv2d_fprop_bn_input`], the statistics those [`conv2d_fprop_bn_stats`] takes of it.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fprop_bn_input_stats<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn_in: &BnInput<'_>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    workspace: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
) -> Result<()> {
    conv2d_fprop_bn_input_stats_with(dev, sh, x, bn_in, w, y, workspace, bn, None)
}

/// [`conv2d_fprop_bn_input_stats`] with a given plan on a kernel device (see
/// [`conv2d_fprop_bn_stats_with`]).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fprop_bn_input_stats_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn_in: &BnInput<'_>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    workspace: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
    plan: Option<Plan>,
) -> Result<()> {
    fprop_stats(dev, sh, x, Some(bn_in), w, y, workspace, bn, plan)
}

/// The fprop with the statistics epilogue, its input through `bn_in` when given.
#[allow(clippy::too_many_arguments)]
fn fprop_stats<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn_in: Option<&BnInput<'_>>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    workspace: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
    plan: Option<Plan>,
) -> Result<()> {
    conv::prepare(dev, sh, (x, "x", sh.x_len()), (w, "w", sh.w_len()), (&*y, "y", sh.y_len()))?;
    if let Some(b) = bn_in {
        ensure!(b.c == sh.c, "the input's batch norm has {} channels, the conv's input {}", b.c, sh.c);
        b.check(dev)?;
    }
    let (m, c) = (sh.n * sh.p() * sh.q(), sh.k);
    ensure!(bn.c == c, "the batch norm has {} channels, the conv's output {c}", bn.c);
    ensure!(m >= 2, "batch norm in train mode needs more than one value per channel (m = {m})");
    check_len(workspace, sh.y_len(), "workspace")?;
    check_on(workspace, dev, "workspace")?;
    check_bufs(
        dev,
        c,
        &[
            (&*bn.running_mean, "running_mean"),
            (&*bn.running_var, "running_var"),
            (&*bn.save_mean, "save_mean"),
            (&*bn.save_invstd, "save_invstd"),
        ],
    )?;
    // The plan the launch will run (on a kernel device it depends on the device).
    let plan = match dev {
        Device::Gpu(g) => Some(plan.unwrap_or_else(|| conv::plan_on::<T>(g, Pass::Fprop, sh, bn_in.is_some()))),
        Device::Cpu => plan,
    };
    let (tiles, bm) = stats_tiles::<T>(sh, plan);
    let elem = std::mem::size_of::<T>();
    // The pairs fit in the workspace: 8 * tiles <= elem * m whenever tiles > 1 (BM >= 64).
    ensure!(tiles == 1 || 8 * tiles * c <= elem * sh.y_len(), "internal: the statistics do not fit the workspace");
    let conv_cost = || {
        let c = Cost::conv_bn_stats(sh, elem, tiles);
        if bn_in.is_some() {
            c.with_bn_on_load(sh)
        } else {
            c
        }
    };
    // On the CPU in f32, the moments of each block of rows the GEMM wrote, taken while it is
    // in cache (16-bit types: over the values as stored, in the pass below).
    let blocks = std::sync::Mutex::new(Vec::<(usize, cpu_bn::Moments)>::new());
    timed(dev, Family::ConvFprop, conv_cost, || match dev {
        Device::Cpu => {
            // Not conv2d_fprop: that would record the pass a second time inside a profile.
            let a = match bn_in {
                Some(b) => std::borrow::Cow::Owned(b.apply_host(x)?),
                None => conv::host_f32(x),
            };
            let wf = conv::host_f32(w);
            if T::NAME == "f32" {
                let after = |m0: usize, rows: &[f32]| {
                    let mo = cpu_bn::block_moments(c, rows);
                    blocks.lock().unwrap_or_else(|e| e.into_inner()).push((m0, mo));
                };
                conv::with_f32_out(y, sh.y_len(), |o| crate::cpu::conv::fprop_then(sh, &a, &wf, o, &after));
            } else {
                conv::with_f32_out(y, sh.y_len(), |o| crate::cpu::conv::fprop(sh, &a, &wf, o));
            }
            Ok(())
        }
        Device::Gpu(gpu) => {
            let ptr = |b: &Buf<f32>, what: &str| super::on_gpu(b, gpu, what).map(|g| g.ptr());
            let part = super::on_gpu(workspace, gpu, "workspace")?.ptr();
            let out = StatsOut { part, mean: ptr(bn.save_mean, "save_mean")?, m2: ptr(bn.save_invstd, "save_invstd")? };
            let p = bn_in.map(|b| b.ptrs(gpu)).transpose()?;
            let (t, b) = conv::launch_bnin(gpu, Pass::Fprop, sh, x, w, y, plan, Epilogue::Stats(out), p)?;
            ensure!((t, b) == (tiles, bm), "internal: the fprop ran {t} tiles of {b} rows, not {tiles} of {bm}");
            Ok(())
        }
    })?;
    let fin_cost = || Cost::bn_finalize_tiles(m, c, tiles);
    timed(dev, Family::BnForward, fin_cost, || match dev {
        Device::Cpu => {
            let mut blocks = blocks.into_inner().unwrap_or_else(|e| e.into_inner());
            let (mean, var) = if T::NAME == "f32" {
                // Merged in row order: the same statistics whatever order the blocks came in.
                blocks.sort_by_key(|b| b.0);
                ensure!(
                    blocks.iter().map(|b| b.1.n).sum::<usize>() == m,
                    "internal: the conv's epilogue saw {} rows, not {m}",
                    blocks.iter().map(|b| b.1.n).sum::<usize>()
                );
                cpu_bn::merge_moments(c, blocks.iter().map(|b| &b.1))
            } else {
                let yh = y.host().ok_or_else(|| invalid!("y is not on the cpu"))?;
                cpu_bn::batch_stats_by(m, c, yh, T::to_f32)
            };
            cpu_bn::finish_stats(m, &mean, &var, &mut bn.host()?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let part = super::on_gpu(workspace, gpu, "workspace")?.ptr();
            super::layers::bn_launch_finalize_tiles(gpu, m, tiles, bm, part, bn)
        }
    })
}

/// Row tiles the dgrad of `sh` runs on a kernel device for elements of `T`, over all its
/// stride phases (each phase's rows in tiles of the plan's BM): the pairs per channel that
/// its batch norm backward sums write ([`conv2d_dgrad_bn_sums`]).
pub fn grad_sums_tiles<T: ConvElem>(sh: &ConvShape, plan: Option<Plan>) -> usize {
    let (bm, _, _) = plan.unwrap_or_else(|| conv::plan::<T>(Pass::Dgrad, sh)).tile.dims::<T>();
    let st = sh.stride;
    let rows = |d: usize, ph: usize| if ph < d { (d - ph).div_ceil(st) } else { 0 };
    (0..st * st).map(|z| (sh.n * rows(sh.h, z / st) * rows(sh.w, z % st)).div_ceil(bm)).sum()
}

/// The f32 elements of the workspace that [`conv2d_dgrad_bn_sums`] needs for `sh` with
/// elements of `T`: two per channel and row tile, none with one tile.
pub fn grad_sums_workspace_len<T: ConvElem>(sh: &ConvShape, plan: Option<Plan>) -> usize {
    match grad_sums_tiles::<T>(sh, plan) {
        0 | 1 => 0,
        t => 2 * t * sh.c,
    }
}

/// The batch norm whose backward's sums a dgrad takes in its epilogue
/// ([`conv2d_dgrad_bn_sums`]): the dgrad's output is the gradient of that BN's output.
pub struct GradBn<'a, 'b, T: crate::gpu::Elem> {
    /// The BN's input (the conv output it normalized), `[N, H, W, C]` as the dgrad's dx.
    pub x: &'a Buf<T>,
    /// The layer: gamma, beta and the saved statistics are read, `dbeta` and `dgamma`
    /// written.
    pub bn: &'a mut BnLayer<'b>,
    /// The gradient goes through the BN's own ReLU (its output recomputed from `x`).
    pub relu: bool,
    /// A second batch norm without a ReLU whose output has the same gradient (a downsample
    /// block's shortcut BN shares its output gradient with bn3): its input (as `x`) and
    /// layer, whose `dbeta` and `dgamma` are written too.
    pub second: Option<(&'a Buf<T>, &'a mut BnLayer<'b>)>,
    /// The per-tile sums between the two launches: at least
    /// [`grad_sums_workspace_len`] values on a kernel device, twice that with `second`; its
    /// contents are left undefined.
    pub workspace: &'a mut Buf<f32>,
}

/// `dx = ` [`conv::conv2d_dgrad`]`(dy, w)`, where dx is the gradient of a batch norm's output,
/// and that BN's parameter gradients as [`crate::ops::layers::bn_backward`] computes them:
/// `bn.dbeta = sum g`, `bn.dgamma = invstd * sum g * (x - mean)`, `g = dx` (through the BN's
/// ReLU with `grad.relu`); [`crate::ops::layers::bn_backward_dx`] then gives the BN's input
/// gradient. On a kernel device the sums are taken in the dgrad's epilogue, which reads
/// the BN's input: the BN backward's reduction pass over x and dx is gone. `dx` is bitwise
/// that of [`conv::conv2d_dgrad`] with the same tile; the sums are in f32 per row tile,
/// merged in a fixed order (the CPU: f64, as `bn_backward`). Two launches: the dgrad, then
/// `bn_backward_finalize_f32`.
pub fn conv2d_dgrad_bn_sums<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    dx: &mut Buf<T>,
    grad: GradBn<'_, '_, T>,
) -> Result<()> {
    dgrad_sums(dev, sh, dy, w, None, dx, grad, None)
}

/// [`conv2d_dgrad_bn_sums`] with a given plan on a kernel device (`None`: the default; the
/// CPU ignores it). For tests and benchmarks of every tile.
pub fn conv2d_dgrad_bn_sums_with<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    dx: &mut Buf<T>,
    grad: GradBn<'_, '_, T>,
    plan: Option<Plan>,
) -> Result<()> {
    dgrad_sums(dev, sh, dy, w, None, dx, grad, plan)
}

/// [`conv2d_dgrad_bn_sums`] of [`conv::conv2d_dgrad_accumulate`]: dx gets the dgrad added
/// (and masked by `relu_out` when given), and the sums are those of the stored result. A
/// block input's gradient, complete once the last dgrad adds into it, is the gradient of
/// the previous block's bn3 output (through the final ReLU, which `relu_out` applies).
pub fn conv2d_dgrad_accumulate_bn_sums<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    relu_out: Option<ReluMask<'_, T>>,
    dx: &mut Buf<T>,
    grad: GradBn<'_, '_, T>,
) -> Result<()> {
    dgrad_sums(dev, sh, dy, w, Some(relu_out), dx, grad, None)
}

/// [`conv2d_dgrad_accumulate_bn_sums`] with a given plan on a kernel device (see
/// [`conv2d_dgrad_bn_sums_with`]).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_dgrad_accumulate_bn_sums_with<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    relu_out: Option<ReluMask<'_, T>>,
    dx: &mut Buf<T>,
    grad: GradBn<'_, '_, T>,
    plan: Option<Plan>,
) -> Result<()> {
    dgrad_sums(dev, sh, dy, w, Some(relu_out), dx, grad, plan)
}

/// The dgrad (accumulating into dx when `acc` is given, with its mask) with the BN
/// backward sums, then their finalize.
#[allow(clippy::too_many_arguments)]
fn dgrad_sums<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    acc: Option<Option<ReluMask<'_, T>>>,
    dx: &mut Buf<T>,
    grad: GradBn<'_, '_, T>,
    plan: Option<Plan>,
) -> Result<()> {
    let GradBn { x, bn, relu, mut second, workspace } = grad;
    conv::prepare(dev, sh, (dy, "dy", sh.y_len()), (w, "w", sh.w_len()), (&*dx, "dx", sh.x_len()))?;
    if let Some(mask) = acc.flatten() {
        mask.check(dev, sh.x_len())?;
    }
    check_len(x, sh.x_len(), "the batch norm's input")?;
    check_on(x, dev, "the batch norm's input")?;
    let (m, c) = (sh.n * sh.h * sh.w, sh.c);
    ensure!(bn.c == c, "the batch norm has {} channels, the dgrad's output {c}", bn.c);
    check_bufs(
        dev,
        c,
        &[
            (bn.gamma, "gamma"),
            (bn.beta, "beta"),
            (&*bn.save_mean, "save_mean"),
            (&*bn.save_invstd, "save_invstd"),
            (&*bn.dgamma, "dgamma"),
            (&*bn.dbeta, "dbeta"),
        ],
    )?;
    if let Some((x2, bn2)) = second.as_ref() {
        ensure!(!relu, "a second batch norm takes the gradient unmasked: the first cannot go through a ReLU");
        check_len(*x2, sh.x_len(), "the second batch norm's input")?;
        check_on(*x2, dev, "the second batch norm's input")?;
        ensure!(bn2.c == c, "the second batch norm has {} channels, the dgrad's output {c}", bn2.c);
        check_bufs(
            dev,
            c,
            &[
                (&*bn2.save_mean, "save_mean"),
                (&*bn2.save_invstd, "save_invstd"),
                (&*bn2.dgamma, "dgamma"),
                (&*bn2.dbeta, "dbeta"),
            ],
        )?;
    }
    // The plan the launch will run (on a kernel device it depends on the device).
    let plan = match dev {
        Device::Gpu(g) => Some(plan.unwrap_or_else(|| conv::plan_on::<T>(g, Pass::Dgrad, sh, true))),
        Device::Cpu => plan,
    };
    let tiles = grad_sums_tiles::<T>(sh, plan);
    let per_bn = grad_sums_workspace_len::<T>(sh, plan);
    check_on(workspace, dev, "workspace")?;
    if !matches!(dev, Device::Cpu) {
        let need = per_bn * (1 + second.is_some() as usize);
        ensure!(workspace.len() >= need, "the workspace holds {} values, the sums need {need}", workspace.len());
    }
    let elem = std::mem::size_of::<T>();
    let two = second.is_some();
    let conv_cost = || {
        let base = match acc {
            None => Cost::conv(Pass::Dgrad, sh, elem),
            Some(mask) => Cost::conv_accumulate(sh, elem, ReluMask::kind(mask.as_ref())),
        };
        base.with_grad_sums(sh, elem, tiles, two)
    };
    timed(dev, Family::ConvDgrad, conv_cost, || match dev {
        Device::Cpu => {
            // Not conv2d_dgrad(_accumulate): that would record the pass a second time.
            match acc {
                None => conv::cpu_run(dy, w, dx, sh.x_len(), |a, b, o| crate::cpu::conv::dgrad(sh, a, b, o)),
                Some(mask) => conv::dgrad_accumulate_host(sh, dy, w, mask, dx),
            }
            Ok(())
        }
        Device::Gpu(gpu) => {
            let ptr = |b: &Buf<f32>, what: &str| super::on_gpu(b, gpu, what).map(|g| g.ptr());
            let out = StatsOut {
                part: ptr(workspace, "workspace")?,
                mean: ptr(bn.dbeta, "dbeta")?,
                m2: ptr(bn.dgamma, "dgamma")?,
            };
            let accumulate = match acc {
                Some(mask) => Some(mask.map(|r| r.ptr(gpu)).transpose()?.unwrap_or(MaskPtr::NONE)),
                None => None,
            };
            let xp = super::on_gpu(x, gpu, "the batch norm's input")?.ptr();
            let second = match second.as_ref() {
                Some((x2, bn2)) => Some(GradSecond {
                    x: super::on_gpu(*x2, gpu, "the second batch norm's input")?.ptr(),
                    mean: ptr(bn2.save_mean, "save_mean")?,
                    out: StatsOut {
                        part: out.part + 4 * per_bn as u64,
                        mean: ptr(bn2.dbeta, "dbeta")?,
                        m2: ptr(bn2.dgamma, "dgamma")?,
                    },
                }),
                None => None,
            };
            let epi = Epilogue::GradSums { accumulate, x: xp, out, second };
            let p = bn.input(relu).ptrs(gpu)?;
            conv::launch_bnin(gpu, Pass::Dgrad, sh, dy, w, dx, plan, epi, Some(p)).map(|_| ())
        }
    })?;
    let fin_cost = || Cost::bn_grad_finalize(m, c, tiles, relu, two);
    timed(dev, Family::BnBackward, fin_cost, || match dev {
        Device::Cpu => {
            let xs = x.host().ok_or_else(|| invalid!("x is not on the cpu"))?;
            let o = if relu { Some(super::layers::relu_output_host(m, xs, &bn.input(true))?) } else { None };
            let g = dx.host().ok_or_else(|| invalid!("dx is not on the cpu"))?;
            cpu_bn::bn_backward_params(m, xs, o.as_deref(), g, &mut bn.host()?);
            if let Some((x2, bn2)) = second.as_mut() {
                let x2s = x2.host().ok_or_else(|| invalid!("x2 is not on the cpu"))?;
                cpu_bn::bn_backward_params(m, x2s, None, g, &mut bn2.host()?);
            }
            Ok(())
        }
        Device::Gpu(gpu) => {
            let part = super::on_gpu(workspace, gpu, "workspace")?.ptr();
            super::layers::bn_launch_grad_finalize(gpu, tiles, part, bn)?;
            match second.as_mut() {
                Some((_, bn2)) => super::layers::bn_launch_grad_finalize(gpu, tiles, part + 4 * per_bn as u64, bn2),
                None => Ok(()),
            }
        }
    })
}

/// A train-mode conv + batch norm (+ residual) (+ ReLU): `y = conv(x, w)` (kept for the
/// backward), then `out = bn(y)`, plus `residual` if given, then `max(out, 0)` if `relu`;
/// `bn.save_mean` and `bn.save_invstd` as [`crate::ops::layers::bn_forward_train`] keeps
/// them, and `bn`'s running statistics updated. The same values as [`conv::conv2d_fprop`],
/// [`crate::ops::layers::bn_forward_train`] and [`crate::ops::layers::add_relu`] (up to
/// the rounding of one intermediate less), in three launches on a kernel device instead of
/// four or five, reading `y` once. With `bn_in`, the convolution is that of `bn_in(x)`
/// (the previous layer's batch norm applied as it loads x: [`conv2d_fprop_bn_input_stats`]).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_forward_train<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn_in: Option<&BnInput<'_>>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
    residual: Option<&Buf<T>>,
    relu: bool,
    out: &mut Buf<T>,
) -> Result<()> {
    check_len(out, sh.y_len(), "out")?;
    fprop_stats(dev, sh, x, bn_in, w, y, out, bn, None)?;
    let m = sh.n * sh.p() * sh.q();
    bn_apply_saved(dev, m, y, &bn.input(relu), residual, out)
}

/// A convolution's input pass ([`conv2d_fprop_bn_input`], [`conv2d_wgrad_bn_input`])
/// applies a batch norm (+ ReLU) given by its parameters and saved statistics
/// ([`BnInput`], from [`BnLayer::input`]) as it loads x: the conv sees
/// `relu?((x - mean[c]) * (gamma[c] * invstd[c]) + beta[c])`, rounded to the element type,
/// exactly the values [`crate::ops::layers::bn_apply_saved`] (without residual) writes on
/// the same device; padding stays zero.
impl BnInput<'_> {
    /// The kernels' pointers.
    fn ptrs(&self, gpu: &crate::gpu::Gpu) -> Result<conv::BnInPtrs> {
        let ptr = |b: &Buf<f32>, what: &str| super::on_gpu(b, gpu, what).map(|g| g.ptr());
        let p = conv::BnInPtrs {
            mean: ptr(self.mean, "save_mean")?,
            invstd: ptr(self.invstd, "save_invstd")?,
            gamma: ptr(self.gamma, "gamma")?,
            beta: ptr(self.beta, "beta")?,
            relu: self.relu,
        };
        Ok(p)
    }

    /// The BN of host `x` (`[.., c]`) in f32, each value rounded through `T` (the CPU path):
    /// the CPU's [`cpu_bn::bn_apply_by`] (a product, then a sum; the kernels fuse them as
    /// `bn_apply_<T>` does), so on each device the same bits as its unfused apply.
    fn apply_host<T: ConvElem>(&self, x: &Buf<T>) -> Result<Vec<f32>> {
        let bn = self.host()?;
        let xs = x.host().ok_or_else(|| invalid!("x is not on the cpu"))?;
        let mut a = vec![0.0f32; xs.len()];
        let m = xs.len() / bn.c.max(1);
        cpu_bn::bn_apply_by(m, xs, None, &bn, &mut a, (T::to_f32, |v| T::from_f32(v).to_f32()));
        Ok(a)
    }
}

/// `y = conv(bn(x), w)` with `bn` a batch norm (+ ReLU) ([`BnInput`]), applied while the
/// convolution loads x: the same values as [`crate::ops::layers::bn_apply_saved`] into a
/// temporary, then [`conv::conv2d_fprop`] of it (bitwise, with the same tile), without
/// writing or reading the temporary. `x` is the previous conv's raw output (NHWC), `w` KRSC.
pub fn conv2d_fprop_bn_input<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn: &BnInput<'_>,
    w: &Buf<T>,
    y: &mut Buf<T>,
) -> Result<()> {
    conv2d_fprop_bn_input_with(dev, sh, x, bn, w, y, None)
}

/// [`conv2d_fprop_bn_input`] with a given plan on a kernel device (`None`: the default; the
/// CPU ignores it). For tests and benchmarks of every tile.
pub fn conv2d_fprop_bn_input_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn: &BnInput<'_>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    plan: Option<Plan>,
) -> Result<()> {
    conv::prepare(dev, sh, (x, "x", sh.x_len()), (w, "w", sh.w_len()), (&*y, "y", sh.y_len()))?;
    ensure!(bn.c == sh.c, "the batch norm has {} channels, the conv's input {}", bn.c, sh.c);
    bn.check(dev)?;
    let cost = || Cost::conv_bn_input(Pass::Fprop, sh, std::mem::size_of::<T>());
    timed(dev, Family::ConvFprop, cost, || match dev {
        Device::Cpu => {
            let a = bn.apply_host(x)?;
            let wf = conv::host_f32(w);
            conv::with_f32_out(y, sh.y_len(), |o| crate::cpu::conv::fprop(sh, &a, &wf, o));
            Ok(())
        }
        Device::Gpu(gpu) => {
            let p = bn.ptrs(gpu)?;
            conv::launch_bnin(gpu, Pass::Fprop, sh, x, w, y, plan, Epilogue::Store, Some(p)).map(|_| ())
        }
    })
}

/// `dw` = the gradient with respect to w of `<dy, conv(bn(x), w)>`, always f32, with `bn`
/// applied while the pass loads x, as in [`conv2d_fprop_bn_input`]: the values of
/// [`conv::conv2d_wgrad`] on the BN's output, without that output in memory.
pub fn conv2d_wgrad_bn_input<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn: &BnInput<'_>,
    dy: &Buf<T>,
    dw: &mut Buf<f32>,
) -> Result<()> {
    conv2d_wgrad_bn_input_with(dev, sh, x, bn, dy, dw, None)
}

/// [`conv2d_wgrad_bn_input`] with a given plan on a kernel device (see
/// [`conv2d_fprop_bn_input_with`]).
pub fn conv2d_wgrad_bn_input_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    bn: &BnInput<'_>,
    dy: &Buf<T>,
    dw: &mut Buf<f32>,
    plan: Option<Plan>,
) -> Result<()> {
    conv::prepare(dev, sh, (dy, "dy", sh.y_len()), (x, "x", sh.x_len()), (&*dw, "dw", sh.w_len()))?;
    ensure!(bn.c == sh.c, "the batch norm has {} channels, the conv's input {}", bn.c, sh.c);
    bn.check(dev)?;
    let cost = || Cost::conv_bn_input(Pass::Wgrad, sh, std::mem::size_of::<T>());
    timed(dev, Family::ConvWgrad, cost, || match dev {
        Device::Cpu => {
            let a = bn.apply_host(x)?;
            crate::cpu::conv::wgrad(sh, &a, &conv::host_f32(dy), dw.host_mut().expect("checked"));
            Ok(())
        }
        Device::Gpu(gpu) => {
            let p = bn.ptrs(gpu)?;
            conv::launch_bnin(gpu, Pass::Wgrad, sh, dy, x, dw, plan, Epilogue::Store, Some(p)).map(|_| ())
        }
    })
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// A convolution forward whose epilogue also computes batch statistics of y
    /// ([`crate::ops::fused::conv2d_fprop_bn_stats`]): the fprop's count, plus per
    /// channel and row tile one (mean, M2) pair written (8 bytes); y is not read again.
    /// FLOPs: the GEMM's only (the conv families count GEMM FLOPs, which add up to the
    /// model's); the statistics' FLOPs are counted with the BN ([`Cost::bn_finalize_tiles`]).
    pub fn conv_bn_stats(sh: &ConvShape, elem: usize, tiles: usize) -> Cost {
        let c = Cost::conv(Pass::Fprop, sh, elem);
        Cost { flops: c.flops, bytes: c.bytes + 8 * u(tiles) * u(sh.k) }
    }

    /// This dgrad's count with the batch norm backward's sums taken in its epilogue
    /// ([`crate::ops::fused::conv2d_dgrad_bn_sums`]): the BN's input read (x's size), its
    /// four `[c]` f32 vectors (gamma, beta, saved mean and inverse deviation) read, and per
    /// channel and row tile one pair of f32 written (with one tile the two `[c]` buffers).
    /// FLOPs: the GEMM's only; the sums' are counted with the finalize
    /// ([`Cost::bn_grad_finalize`]).
    /// With `second`, the second BN's input, saved mean and pairs too.
    pub fn with_grad_sums(self, sh: &ConvShape, elem: usize, tiles: usize, second: bool) -> Cost {
        let pairs = 8 * u(tiles.max(1)) * u(sh.c);
        let mut extra = u(sh.x_len()) * u(elem) + 4 * u(sh.c) * F32 + pairs;
        if second {
            extra += u(sh.x_len()) * u(elem) + u(sh.c) * F32 + pairs;
        }
        Cost { flops: self.flops, bytes: self.bytes + extra }
    }

    /// The batch norm backward sums of an `[m, c]` gradient taken in a dgrad's epilogue,
    /// merged by `bn_backward_finalize_f32`: reads `tiles` pairs per channel (with one tile
    /// the two `[c]` buffers) and the inverse deviation, writes dbeta and dgamma. FLOPs: 4
    /// per element for the sums (done in the epilogue), 4 more to recompute the ReLU's
    /// output with `relu`, and 2 per pair. With `second`, the second BN's as well (3 per
    /// element: its own difference and product-sum).
    pub fn bn_grad_finalize(m: usize, c: usize, tiles: usize, relu: bool, second: bool) -> Cost {
        let (mc, t) = (u(m) * u(c), u(tiles.max(1)));
        let one = Cost { flops: mc * (4 + 4 * relu as u64) + 2 * t * u(c), bytes: 8 * t * u(c) + 3 * u(c) * F32 };
        if second {
            Cost { flops: one.flops + 3 * mc + 2 * t * u(c), bytes: 2 * one.bytes }
        } else {
            one
        }
    }

    /// A convolution pass (fprop or wgrad) whose x operand is the batch norm (+ ReLU) of the
    /// x it reads, applied as x is loaded ([`crate::ops::fused::conv2d_fprop_bn_input`]):
    /// the pass's count with [`Cost::with_bn_on_load`]. The BN's output is neither written
    /// nor read.
    pub fn conv_bn_input(pass: Pass, sh: &ConvShape, elem: usize) -> Cost {
        Cost::conv(pass, sh, elem).with_bn_on_load(sh)
    }

    /// This conv pass's count with a batch norm (+ ReLU) applied to its x as it loads it:
    /// the BN's four `[c]` f32 vectors (gamma, beta, saved mean and inverse deviation)
    /// read. FLOPs: the GEMM's only, as every conv pass counts them (so that the conv
    /// families add up to the model's GEMM FLOPs); the BN's 2-3 per loaded element are
    /// under 0.1% of a step.
    pub fn with_bn_on_load(self, sh: &ConvShape) -> Cost {
        Cost { flops: self.flops, bytes: self.bytes + 4 * u(sh.c) * F32 }
    }

    /// The BN statistics of an `[m, c]` conv output computed in the conv's epilogue, merged
    /// by `bn_stats_finalize_f32`: reads `tiles` pairs per channel (8 bytes each; with one
    /// tile the two `[c]` buffers), reads and writes the running mean and variance, writes
    /// the saved mean and inverse deviation (6 f32 per channel). FLOPs: 3 per element
    /// (sum, deviation, fused square: done in the epilogue), 10 per pair.
    pub fn bn_finalize_tiles(m: usize, c: usize, tiles: usize) -> Cost {
        Cost { flops: 3 * u(m) * u(c) + 10 * u(tiles) * u(c), bytes: 8 * u(tiles) * u(c) + 6 * u(c) * F32 }
    }
}
