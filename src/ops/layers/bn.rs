//! Batch normalization (kernels/bn.cu): train and eval forward with an optional fused
//! ReLU, and the train-mode backward.

use super::{aligned16, check_len, dptr, host, host_mut, i64_of, mul, LayerElem};
use crate::cpu::layers::bn as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Gpu, Kernel, LaunchConfig};
use crate::ops::params::BnParams;
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::ops::{check_bufs, check_on, i32_of};
use crate::{ensure, Result};

const MODULE: &str = "bn";
/// Threads of a per-channel block (BN_MAX_THREADS).
const THREADS: usize = 256;
/// Blocks the per-channel kernels aim for: about 6 waves of the 5-6 blocks per SM that
/// fit on a 132-SM H100, so that the last, partial wave costs little.
const TARGET_BLOCKS: usize = 4096;
/// Rows each thread handles at least, so that a block's work outweighs its merge.
const MIN_ROWS_PER_THREAD: usize = 4;
/// Threads of a finalize block (one block per channel; BN_FINALIZE_THREADS in bn.cu).
const FINALIZE_THREADS: u32 = 256;

/// The per-channel grid: blocks of (tx channel vectors, ty rows), gx blocks along the
/// channels and `chunks` along the rows.
#[derive(Clone, Copy, Debug)]
struct Grid {
    tx: usize,
    ty: usize,
    gx: usize,
    chunks: usize,
    rows_per_chunk: usize,
}

/// `m >= 1`, `c >= 1`. The number of chunks is limited so that the per-chunk partials
/// (`chunks * c` pairs of f32) fit in the bytes of the `[m, c]` output.
fn grid(m: usize, c: usize, vec: usize, elem_size: usize) -> Grid {
    let cv = c / vec;
    let tx = cv.next_power_of_two().min(32);
    let ty = THREADS / tx;
    let gx = cv.div_ceil(tx);
    let want = TARGET_BLOCKS.div_ceil(gx);
    let by_rows = m.div_ceil(ty * MIN_ROWS_PER_THREAD);
    let by_scratch = m * elem_size / 8;
    let p = want.min(by_rows).min(by_scratch).clamp(1, 65535);
    let rows_per_chunk = m.div_ceil(p);
    Grid { tx, ty, gx, chunks: m.div_ceil(rows_per_chunk), rows_per_chunk }
}

/// Elements per vector access: 16 bytes when `c` is a multiple and the buffers are aligned.
fn vec_width<T: LayerElem>(c: usize, ptrs: &[u64]) -> usize {
    let v = 16 / std::mem::size_of::<T>();
    if c.is_multiple_of(v) && aligned16(ptrs) {
        v
    } else {
        1
    }
}

/// How many row chunks the per-channel kernels split `m` rows of `c` channels into on a
/// kernel device (1 means the block-level merge is the whole reduction). For tests and
/// benches.
pub fn bn_row_chunks<T: LayerElem>(m: usize, c: usize) -> usize {
    if m == 0 || c == 0 {
        return 0;
    }
    grid(m, c, vec_width::<T>(c, &[]), std::mem::size_of::<T>()).chunks
}

impl Grid {
    fn per_channel(&self) -> LaunchConfig {
        LaunchConfig {
            grid: (self.gx as u32, self.chunks as u32, 1),
            block: (self.tx as u32, self.ty as u32, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn finalize_cfg(c: usize) -> LaunchConfig {
    LaunchConfig::linear(c as u32, FINALIZE_THREADS)
}

/// Parameters with the shape filled in and every pointer null.
fn base_params(m: usize, c: usize, vec: usize, g: &Grid) -> Result<BnParams> {
    Ok(BnParams {
        m: i64_of(m, "m")?,
        rows_per_chunk: g.rows_per_chunk as i64,
        c: i32_of(c, "c")?,
        vec: vec as i32,
        chunks: g.chunks as i32,
        ..BnParams::default()
    })
}

/// The buffers of one batch-norm layer on a device, borrowed for one call: see
/// [`crate::cpu::layers::bn::BnLayer`]. Every buffer holds `c` values and lives on the
/// device of the call.
pub type BnLayer<'a> = cpu::BnLayer<'a, Buf<f32>>;

/// A batch norm (+ ReLU) applied from given statistics, on a device: see
/// [`crate::cpu::layers::bn::BnInput`]; [`BnLayer::input`] builds it from a layer's
/// saved statistics.
pub type BnInput<'a> = cpu::BnInput<'a, Buf<f32>>;

impl BnLayer<'_> {
    /// The host slices of every buffer (all must live on the CPU).
    pub(crate) fn host(&mut self) -> Result<cpu::BnLayer<'_>> {
        Ok(cpu::BnLayer {
            c: self.c,
            gamma: host(self.gamma, "gamma")?,
            beta: host(self.beta, "beta")?,
            running_mean: host_mut(self.running_mean, "running_mean")?,
            running_var: host_mut(self.running_var, "running_var")?,
            save_mean: host_mut(self.save_mean, "save_mean")?,
            save_invstd: host_mut(self.save_invstd, "save_invstd")?,
            dgamma: host_mut(self.dgamma, "dgamma")?,
            dbeta: host_mut(self.dbeta, "dbeta")?,
            momentum: self.momentum,
            eps: self.eps,
        })
    }
}

impl BnInput<'_> {
    /// Checks that every buffer holds `c` values and lives on `dev`.
    pub(crate) fn check(&self, dev: &Device) -> Result<()> {
        check_bufs(
            dev,
            self.c,
            &[(self.gamma, "gamma"), (self.beta, "beta"), (self.mean, "save_mean"), (self.invstd, "save_invstd")],
        )
    }

    /// The host slices of every buffer (all must live on the CPU).
    pub(crate) fn host(&self) -> Result<cpu::BnInput<'_>> {
        Ok(cpu::BnInput {
            c: self.c,
            gamma: host(self.gamma, "gamma")?,
            beta: host(self.beta, "beta")?,
            mean: host(self.mean, "save_mean")?,
            invstd: host(self.invstd, "save_invstd")?,
            relu: self.relu,
        })
    }
}

/// Train-mode forward: normalizes each channel of `x` (`[m, c]`, `c = bn.c`) with its
/// batch mean and biased batch variance, `y = gamma * (x - mean) * invstd + beta` (then
/// `max(y, 0)` if `relu`), updates `running = (1 - momentum) * running + momentum * batch`
/// (the variance unbiased, times `m / (m - 1)`), and keeps `bn.save_mean` and
/// `bn.save_invstd = 1 / sqrt(var + eps)` for [`bn_backward`]. Reads gamma and beta; the
/// gradients are not touched. Needs `m >= 2` (as PyTorch).
///
/// On a kernel device: three launches (statistics per row chunk, a per-channel merge that
/// also updates the running statistics, the normalization). The per-chunk partial
/// statistics are kept in the bytes of `y` until the normalization overwrites it, so no
/// workspace is needed; `y` must therefore not be read until this call's work is done,
/// which stream order guarantees.
pub fn bn_forward_train<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    bn: &mut BnLayer<'_>,
    relu: bool,
    y: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    ensure!(m >= 2, "batch norm in train mode needs more than one value per channel (m = {m})");
    let mc = mul(m, c, "the batch norm input")?;
    check_len(x, mc, "x")?;
    check_len(y, mc, "y")?;
    check_bufs(
        dev,
        c,
        &[
            (bn.gamma, "gamma"),
            (bn.beta, "beta"),
            (&*bn.running_mean, "running_mean"),
            (&*bn.running_var, "running_var"),
            (&*bn.save_mean, "save_mean"),
            (&*bn.save_invstd, "save_invstd"),
        ],
    )?;
    check_on(x, dev, "x")?;
    check_on(y, dev, "y")?;
    if c == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_forward_train(m, c, std::mem::size_of::<T>(), relu);
    timed(dev, Family::BnForward, cost, || match dev {
        Device::Cpu => {
            cpu::bn_forward_train(m, host(x, "x")?, &mut bn.host()?, relu, host_mut(y, "y")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let (xp, yp) = (dptr(x, gpu, "x")?, dptr(y, gpu, "y")?);
            let vec = vec_width::<T>(c, &[xp, yp]);
            let g = grid(m, c, vec, std::mem::size_of::<T>());
            let p = BnParams {
                x: xp,
                out: yp,
                gamma: dptr(bn.gamma, gpu, "gamma")?,
                beta: dptr(bn.beta, gpu, "beta")?,
                mean: dptr(bn.save_mean, gpu, "save_mean")?,
                invstd: dptr(bn.save_invstd, gpu, "save_invstd")?,
                running_mean: dptr(bn.running_mean, gpu, "running_mean")?,
                running_var: dptr(bn.running_var, gpu, "running_var")?,
                relu: relu as i32,
                momentum: bn.momentum,
                eps: bn.eps,
                ..base_params(m, c, vec, &g)?
            };
            // SAFETY: x and y hold m*c elements and every [c] buffer c; the kernels read
            // rows below m and channels below c. The partials take chunks * c float2,
            // which grid() keeps within y's m * c * size_of::<T>() bytes.
            unsafe {
                gpu.launch(T::BN_STATS, g.per_channel(), &p)?;
                gpu.launch(Kernel::new(MODULE, "bn_stats_finalize_f32"), finalize_cfg(c), &p)?;
                gpu.launch(T::BN_APPLY, g.per_channel(), &p)?;
            }
            Ok(())
        }
    })
}

/// Eval-mode forward: `y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta`
/// (then `max(y, 0)` if `relu`), `c = bn.c`. Reads gamma, beta, the running statistics
/// and eps of `bn`, writes nothing of it. One launch on a kernel device.
pub fn bn_forward_eval<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    bn: &mut BnLayer<'_>,
    relu: bool,
    y: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    let mc = mul(m, c, "the batch norm input")?;
    check_len(x, mc, "x")?;
    check_len(y, mc, "y")?;
    check_bufs(
        dev,
        c,
        &[
            (bn.gamma, "gamma"),
            (bn.beta, "beta"),
            (&*bn.running_mean, "running_mean"),
            (&*bn.running_var, "running_var"),
        ],
    )?;
    check_on(x, dev, "x")?;
    check_on(y, dev, "y")?;
    if mc == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_forward_eval(m, c, std::mem::size_of::<T>(), relu);
    timed(dev, Family::BnForward, cost, || match dev {
        Device::Cpu => {
            cpu::bn_forward_eval(m, host(x, "x")?, &bn.host()?, relu, host_mut(y, "y")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let (xp, yp) = (dptr(x, gpu, "x")?, dptr(y, gpu, "y")?);
            let vec = vec_width::<T>(c, &[xp, yp]);
            let g = grid(m, c, vec, std::mem::size_of::<T>());
            let p = BnParams {
                x: xp,
                out: yp,
                gamma: dptr(bn.gamma, gpu, "gamma")?,
                beta: dptr(bn.beta, gpu, "beta")?,
                mean: dptr(bn.running_mean, gpu, "running_mean")?,
                invstd: dptr(bn.running_var, gpu, "running_var")?,
                relu: relu as i32,
                eps: bn.eps,
                eval: 1,
                ..base_params(m, c, vec, &g)?
            };
            // SAFETY: as in bn_forward_train; the apply kernel reads the [c] buffers and
            // x, and writes y, within m rows of c channels.
            unsafe { gpu.launch(T::BN_APPLY, g.per_channel(), &p)? };
            Ok(())
        }
    })
}

/// Train-mode backward from the statistics [`bn_forward_train`] saved in `bn`:
/// `dbeta = sum g`, `dgamma = sum g * xhat`,
/// `dx = gamma * invstd * (g - dbeta / m - xhat * dgamma / m)` with
/// `xhat = (x - save_mean) * save_invstd` and `g = dy`, or, if `relu_out` is the output
/// of a fused ReLU, `g = relu_out > 0 ? dy : 0`. `dx`, `bn.dgamma` and `bn.dbeta` are
/// overwritten; the rest of `bn` is read (gamma, the saved statistics) or not touched.
///
/// On a kernel device: three launches (sums per row chunk, a per-channel merge, dx); the
/// per-chunk partial sums are kept in the bytes of `dx` until the last launch overwrites
/// it.
pub fn bn_backward<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    relu_out: Option<&Buf<T>>,
    dy: &Buf<T>,
    bn: &mut BnLayer<'_>,
    dx: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    let big: Vec<(&Buf<T>, &str)> =
        [(x, "x"), (dy, "dy"), (&*dx, "dx")].into_iter().chain(relu_out.map(|o| (o, "relu_out"))).collect();
    check_backward(dev, m, &big, bn)?;
    if c == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_backward(m, c, std::mem::size_of::<T>(), relu_out.is_some());
    timed(dev, Family::BnBackward, cost, || match dev {
        Device::Cpu => {
            let relu_out = match relu_out {
                Some(o) => Some(host(o, "relu_out")?),
                None => None,
            };
            cpu::bn_backward(m, host(x, "x")?, relu_out, host(dy, "dy")?, &mut bn.host()?, host_mut(dx, "dx")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let (g, p) = backward_params(gpu, m, x, dy, relu_out, dx, bn, &[])?;
            launch_backward(gpu, &g, c, &p, [T::BN_BACKWARD_REDUCE, T::BN_BACKWARD_DX])
        }
    })
}

/// [`bn_backward`] through this BN's own ReLU, whose output `relu_out` the train forward
/// wrote (`bn_forward_train` with the ReLU and no residual, same parameters and saved
/// statistics): the kernel devices recompute that output from `x`, exactly as the forward
/// computed it, instead of reading it, which saves two passes over `[m, c]`; the CPU reads
/// it. The results are bitwise those of [`bn_backward`] with `relu_out`.
pub fn bn_backward_through_relu<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    relu_out: &Buf<T>,
    dy: &Buf<T>,
    bn: &mut BnLayer<'_>,
    dx: &mut Buf<T>,
) -> Result<()> {
    let Device::Gpu(gpu) = dev else {
        return bn_backward(dev, m, x, Some(relu_out), dy, bn, dx);
    };
    let c = bn.c;
    check_backward(dev, m, &[(x, "x"), (dy, "dy"), (&*dx, "dx"), (relu_out, "relu_out")], bn)?;
    check_bufs(dev, c, &[(bn.beta, "beta")])?;
    if c == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_backward_through_relu(m, c, std::mem::size_of::<T>());
    timed(dev, Family::BnBackward, cost, || {
        let (g, mut p) = backward_params(gpu, m, x, dy, None, dx, bn, &[])?;
        p.beta = dptr(bn.beta, gpu, "beta")?; // checked: c floats
        launch_backward(gpu, &g, c, &p, [T::BN_BACKWARD_REDUCE_RELU, T::BN_BACKWARD_DX_RELU])
    })
}

/// The backward of a batch norm + ReLU whose output went through the 3x3 stride 2 max pool
/// (the stem): `x` is the BN's input `[n, h, w, c]` (`c = bn.c`), `taps` and `dy` the max
/// pool's argmax taps ([`crate::ops::layers::maxpool_forward_bn`]) and output gradient
/// (`[n, oh, ow, c]`). Bitwise [`crate::ops::layers::maxpool_backward_taps`] followed by
/// [`bn_backward_through_relu`] on the same device; on a kernel device the two passes of
/// the BN backward gather the pool's gradient from `taps` and `dy` as they load it, so the
/// pool's input gradient (as large as `x`) is never stored: four passes over `[m, c]`
/// fewer. The CPU runs the two ops, with the ReLU's output made from `x`.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_through_relu_maxpool<T: LayerElem>(
    dev: &Device,
    (n, h, w): (usize, usize, usize),
    x: &Buf<T>,
    taps: &Buf<u8>,
    dy: &Buf<T>,
    bn: &mut BnLayer<'_>,
    dx: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    ensure!(h >= 1 && w >= 1, "max pool of an empty image ({h}x{w})");
    let m = mul(mul(n, h, "the batch norm input")?, w, "the batch norm input")?;
    check_backward(dev, m, &[(x, "x"), (&*dx, "dx")], bn)?;
    check_bufs(dev, c, &[(bn.beta, "beta")])?;
    let (oh, ow) = (super::maxpool_out(h), super::maxpool_out(w));
    let pooled = mul(mul(mul(n, oh, "the max pool output")?, ow, "the max pool output")?, c, "the max pool output")?;
    check_len(taps, pooled, "taps")?;
    check_len(dy, pooled, "dy")?;
    crate::ops::check_on(taps, dev, "taps")?;
    crate::ops::check_on(dy, dev, "dy")?;
    if c == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_backward_through_relu_maxpool(m, pooled, c, std::mem::size_of::<T>());
    timed(dev, Family::BnBackward, cost, || match dev {
        Device::Cpu => {
            let mut g = vec![T::from_f32(0.0); m * c];
            crate::cpu::layers::pool::maxpool_backward_taps(n, h, w, c, host(taps, "taps")?, host(dy, "dy")?, &mut g);
            let xs = host(x, "x")?;
            let o = relu_output_host(m, xs, &bn.input(true))?;
            cpu::bn_backward(m, xs, Some(&o), &g, &mut bn.host()?, host_mut(dx, "dx")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let tp = dptr(taps, gpu, "taps")?;
            let (g, mut p) = backward_params(gpu, m, x, dy, None, dx, bn, &[tp])?;
            p.beta = dptr(bn.beta, gpu, "beta")?; // checked: c floats
            p.pool_taps = tp;
            p.pool_h = i32_of(h, "h")?;
            p.pool_w = i32_of(w, "w")?;
            launch_backward(gpu, &g, c, &p, [T::BN_BACKWARD_REDUCE_RELU_MAXPOOL, T::BN_BACKWARD_DX_RELU_MAXPOOL])
        }
    })
}

/// The dx pass of a batch norm backward alone, from the parameter gradients `bn.dbeta` and
/// `bn.dgamma` already computed (by a dgrad's epilogue: see
/// [`crate::ops::fused::conv2d_dgrad_bn_sums`]): `dx = gamma invstd (g - dbeta / m - (x -
/// mean) invstd dgamma / m)` with `g = dy`, or with `relu` the gradient through the BN's
/// own ReLU, whose output is recomputed from `x` as the train forward computed it on this
/// device (as [`bn_backward_through_relu`] does). The same dx as [`bn_backward`] (with that
/// ReLU's output) when `bn.dbeta` and `bn.dgamma` are its. One pass on a kernel device.
pub fn bn_backward_dx<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    dy: &Buf<T>,
    bn: &BnLayer<'_>,
    relu: bool,
    dx: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    check_backward(dev, m, &[(x, "x"), (dy, "dy"), (&*dx, "dx")], bn)?;
    check_bufs(dev, c, &[(bn.beta, "beta")])?;
    if c == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_backward_dx(m, c, std::mem::size_of::<T>(), relu);
    timed(dev, Family::BnBackward, cost, || match dev {
        Device::Cpu => {
            let xs = host(x, "x")?;
            let o = if relu { Some(relu_output_host(m, xs, &bn.input(true))?) } else { None };
            let grads = (host(bn.dbeta, "dbeta")?, host(bn.dgamma, "dgamma")?);
            let norm = bn.input(relu);
            let (dys, bnh) = (host(dy, "dy")?, norm.host()?);
            cpu::bn_backward_dx(m, xs, o.as_deref(), dys, &bnh, grads, host_mut(dx, "dx")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let (g, mut p) = backward_params(gpu, m, x, dy, None, dx, bn, &[])?;
            p.beta = dptr(bn.beta, gpu, "beta")?; // checked: c floats
            let kernel = if relu { T::BN_BACKWARD_DX_RELU } else { T::BN_BACKWARD_DX };
            // SAFETY: x, dy and dx hold m*c elements, the [c] buffers c; the dx pass reads
            // rows below m and channels below c and writes dx only.
            unsafe { gpu.launch(kernel, g.per_channel(), &p)? };
            Ok(())
        }
    })
}

/// The output of a batch norm + ReLU `bn` of host `x` as the CPU's train forward writes it.
pub(crate) fn relu_output_host<T: LayerElem>(m: usize, x: &[T], bn: &BnInput<'_>) -> Result<Vec<T>> {
    let mut o = vec![T::from_f32(0.0); m * bn.c];
    cpu::bn_apply(m, x, &bn.host()?, None, &mut o);
    Ok(o)
}

/// The checks of both backward entry points: the `[m, c]` tensors `big` and the `[c]`
/// tensors gamma, save_mean, save_invstd, dgamma, dbeta of `bn`, all on `dev`.
fn check_backward<T: LayerElem>(dev: &Device, m: usize, big: &[(&Buf<T>, &str)], bn: &BnLayer<'_>) -> Result<()> {
    ensure!(m >= 1, "batch norm backward of an empty batch");
    let mc = mul(m, bn.c, "the batch norm input")?;
    check_bufs(dev, mc, big)?;
    check_bufs(
        dev,
        bn.c,
        &[
            (bn.gamma, "gamma"),
            (&*bn.save_mean, "save_mean"),
            (&*bn.save_invstd, "save_invstd"),
            (&*bn.dgamma, "dgamma"),
            (&*bn.dbeta, "dbeta"),
        ],
    )
}

/// The launch grid and parameters of a backward on a kernel device (`relu_out` null when
/// there is no fused ReLU); vectors only where `also_aligned` are 16-byte aligned too.
#[allow(clippy::too_many_arguments)]
fn backward_params<T: LayerElem>(
    gpu: &Gpu,
    m: usize,
    x: &Buf<T>,
    dy: &Buf<T>,
    relu_out: Option<&Buf<T>>,
    dx: &Buf<T>,
    bn: &BnLayer<'_>,
    also_aligned: &[u64],
) -> Result<(Grid, BnParams)> {
    let c = bn.c;
    let (xp, dyp, dxp) = (dptr(x, gpu, "x")?, dptr(dy, gpu, "dy")?, dptr(dx, gpu, "dx")?);
    let rp = match relu_out {
        Some(o) => dptr(o, gpu, "relu_out")?,
        None => 0,
    };
    let vec = if aligned16(also_aligned) { vec_width::<T>(c, &[xp, dyp, dxp, rp]) } else { 1 };
    let g = grid(m, c, vec, std::mem::size_of::<T>());
    let p = BnParams {
        x: xp,
        dy: dyp,
        relu_out: rp,
        out: dxp,
        gamma: dptr(bn.gamma, gpu, "gamma")?,
        mean: dptr(bn.save_mean, gpu, "save_mean")?,
        invstd: dptr(bn.save_invstd, gpu, "save_invstd")?,
        dgamma: dptr(bn.dgamma, gpu, "dgamma")?,
        dbeta: dptr(bn.dbeta, gpu, "dbeta")?,
        ..base_params(m, c, vec, &g)?
    };
    Ok((g, p))
}

/// The backward's three launches: `reduce_dx` names the reduction and the dx pass (plain,
/// or through the BN's own ReLU).
fn launch_backward(gpu: &Gpu, g: &Grid, c: usize, p: &BnParams, reduce_dx: [Kernel; 2]) -> Result<()> {
    let [reduce, dx] = reduce_dx;
    // SAFETY: x, dy, relu_out (when not null) and dx hold m*c elements, the [c] buffers c
    // (beta too when the ReLU's output is recomputed); the partials (chunks * c float2) fit
    // in dx's bytes (see grid()).
    unsafe {
        gpu.launch(reduce, g.per_channel(), p)?;
        gpu.launch(Kernel::new(MODULE, "bn_backward_finalize_f32"), finalize_cfg(c), p)?;
        gpu.launch(dx, g.per_channel(), p)?;
    }
    Ok(())
}

/// Merges the per-row-tile statistics that a convolution's epilogue wrote (see
/// [`crate::ops::fused`]) into `bn.save_mean` and `bn.save_invstd`, and updates the
/// running statistics: `bn_stats_finalize_f32` on `tiles` chunks of `rows_per_tile` rows.
/// With one tile the epilogue wrote the mean to `save_mean` and M2 to `save_invstd`; with
/// more, the `[c][tiles]` float2 pairs are at `part` (the bytes of a buffer of at least
/// `8 * tiles * c` bytes that the caller owns).
pub(crate) fn bn_launch_finalize_tiles(
    gpu: &Gpu,
    m: usize,
    tiles: usize,
    rows_per_tile: usize,
    part: u64,
    bn: &mut BnLayer<'_>,
) -> Result<()> {
    let c = bn.c;
    ensure!(tiles >= 1 && tiles * rows_per_tile >= m, "internal: {tiles} tiles of {rows_per_tile} rows for {m}");
    let p = BnParams {
        m: i64_of(m, "m")?,
        rows_per_chunk: i64_of(rows_per_tile, "rows per tile")?,
        c: i32_of(c, "c")?,
        vec: 1,
        chunks: i32_of(tiles, "row tiles")?,
        out: part,
        mean: dptr(bn.save_mean, gpu, "save_mean")?,
        invstd: dptr(bn.save_invstd, gpu, "save_invstd")?,
        running_mean: dptr(bn.running_mean, gpu, "running_mean")?,
        running_var: dptr(bn.running_var, gpu, "running_var")?,
        momentum: bn.momentum,
        eps: bn.eps,
        ..BnParams::default()
    };
    // SAFETY: the finalize kernel reads tiles * c pairs at `part` (tiles > 1) or the [c]
    // save buffers (one tile), and writes the four [c] buffers, all checked by the caller.
    unsafe { gpu.launch(Kernel::new(MODULE, "bn_stats_finalize_f32"), finalize_cfg(c), &p)? };
    Ok(())
}

/// Merges the per-row-tile sums of a batch norm backward that a dgrad's epilogue wrote
/// (see [`crate::ops::fused::conv2d_dgrad_bn_sums`]) into `bn.dbeta` and `bn.dgamma`:
/// `bn_backward_finalize_f32` on `tiles` chunks. With one tile the epilogue wrote the sums
/// to `dbeta` and `dgamma`; with more, the `[c][tiles]` float2 pairs are at `part` (at least
/// `8 * tiles * c` bytes that the caller owns).
pub(crate) fn bn_launch_grad_finalize(gpu: &Gpu, tiles: usize, part: u64, bn: &mut BnLayer<'_>) -> Result<()> {
    let c = bn.c;
    ensure!(tiles >= 1, "internal: no row tiles");
    let p = BnParams {
        c: i32_of(c, "c")?,
        vec: 1,
        chunks: i32_of(tiles, "row tiles")?,
        out: part,
        invstd: dptr(bn.save_invstd, gpu, "save_invstd")?,
        dgamma: dptr(bn.dgamma, gpu, "dgamma")?,
        dbeta: dptr(bn.dbeta, gpu, "dbeta")?,
        ..BnParams::default()
    };
    // SAFETY: the finalize kernel reads tiles * c pairs at `part` (tiles > 1) or the [c]
    // gradient buffers (one tile), and writes dbeta and dgamma, all checked by the caller.
    unsafe { gpu.launch(Kernel::new(MODULE, "bn_backward_finalize_f32"), finalize_cfg(c), &p)? };
    Ok(())
}

/// The normalisation of a train-mode forward from statistics already computed (by
/// [`bn_forward_train`]'s first kernels or by a convolution's epilogue, see
/// [`crate::ops::fused`]): `y = gamma * (x - mean) * invstd + beta` with `bn`'s
/// parameters and statistics (`c = bn.c`; [`BnLayer::input`] gives a layer's saved ones),
/// plus `residual` if given (a bottleneck's shortcut, added before the ReLU), then
/// `max(y, 0)` if `bn.relu`. One pass on a kernel device (`bn_apply_<dtype>`): the block's
/// last BN, the residual add and the ReLU read `x` and `residual` and write `y` once.
pub fn bn_apply_saved<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    bn: &BnInput<'_>,
    residual: Option<&Buf<T>>,
    y: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    let mc = mul(m, c, "the batch norm input")?;
    check_len(x, mc, "x")?;
    check_len(y, mc, "y")?;
    check_on(x, dev, "x")?;
    check_on(y, dev, "y")?;
    if let Some(r) = residual {
        check_len(r, mc, "residual")?;
        check_on(r, dev, "residual")?;
    }
    bn.check(dev)?;
    if mc == 0 {
        return Ok(());
    }
    let relu = bn.relu;
    let cost = || Cost::bn_apply(m, c, std::mem::size_of::<T>(), residual.is_some(), relu);
    timed(dev, Family::BnForward, cost, || match dev {
        Device::Cpu => {
            let (xs, ys) = (host(x, "x")?, host_mut(y, "y")?);
            let rs = residual.map(|r| host(r, "residual")).transpose()?;
            cpu::bn_apply(m, xs, &bn.host()?, rs, ys);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let vec = apply_vec(gpu, c, x, residual, y)?;
            apply_on_gpu(gpu, m, vec, x, residual, None, bn, y, None)
        }
    })
}

/// What a bottleneck's last batch norm adds before its ReLU ([`bn_apply_residual`]).
#[derive(Clone, Copy)]
pub enum Residual<'a, 'b, T: LayerElem> {
    /// The tensor itself (an identity shortcut).
    Plain(&'a Buf<T>),
    /// The tensor through its own batch norm from its saved statistics, without a ReLU (a
    /// downsample shortcut): its output rounded to the element type, as its own apply
    /// would store it, then added.
    Bn(&'a Buf<T>, &'a BnInput<'b>),
}

/// The bytes of the ReLU's bits of `len` outputs ([`bn_apply_residual`]): a bit each, in
/// whole 32-bit words.
pub fn relu_bits_len(len: usize) -> usize {
    4 * len.div_ceil(32)
}

/// A bottleneck's output: `y = relu?(bn(x) + residual)` ([`bn_apply_saved`] with the
/// residual; see [`Residual`] for a shortcut through its own BN), and with `relu_bits`
/// (`bn.relu` set) the ReLU's decisions as bits beside it: bit `i % 8` of byte `i / 8` set
/// where `y` at flat index `i` is > 0 ([`relu_bits_len`] bytes), which the backward's
/// dgrad into this output reads instead of `y`
/// ([`crate::ops::conv::ReluMask::Bits`]). Bitwise [`bn_apply_saved`] of the shortcut into a
/// buffer, then of `x` with that residual. One pass on a kernel device (`bn_apply_<dtype>`,
/// or `bn_apply_bnres_<dtype>` with the shortcut's BN): a downsample shortcut's BN output is
/// never written or read.
pub fn bn_apply_residual<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    bn: &BnInput<'_>,
    residual: Residual<'_, '_, T>,
    y: &mut Buf<T>,
    relu_bits: Option<&mut Buf<u8>>,
) -> Result<()> {
    let c = bn.c;
    let (r, rbn) = match residual {
        Residual::Plain(r) => (r, None),
        Residual::Bn(r, rbn) => (r, Some(rbn)),
    };
    if let Some(rbn) = rbn {
        ensure!(rbn.c == c, "the residual's batch norm has {} channels, the batch norm it is added to {c}", rbn.c);
        ensure!(!rbn.relu, "the residual's batch norm is applied without a ReLU (the ReLU comes after the add)");
        rbn.check(dev)?;
    }
    let mc = mul(m, c, "the batch norm input")?;
    check_bufs(dev, mc, &[(x, "x"), (r, "residual"), (&*y, "y")])?;
    bn.check(dev)?;
    if let Some(bits) = relu_bits.as_deref() {
        ensure!(bn.relu, "the ReLU's bits need the ReLU");
        check_bufs(dev, relu_bits_len(mc), &[(bits, "the ReLU's bits")])?;
    }
    if mc == 0 {
        return Ok(());
    }
    let (relu, elem) = (bn.relu, std::mem::size_of::<T>());
    let vec = match dev {
        Device::Gpu(gpu) => apply_vec(gpu, c, x, Some(r), y)?,
        Device::Cpu => 8,
    };
    // Bytes of bits written: once, twice where they are zeroed first.
    let bit_passes = match relu_bits {
        None => 0,
        Some(_) if bits_zeroed_first(vec) => 2,
        Some(_) => 1,
    };
    let cost = || Cost::bn_apply_residual(m, c, elem, rbn.is_some(), relu, bit_passes);
    timed(dev, Family::BnForward, cost, || match dev {
        Device::Cpu => {
            let (xs, rs, ys) = (host(x, "x")?, host(r, "residual")?, host_mut(y, "y")?);
            match rbn {
                Some(rbn) => cpu::bn_apply_bn_residual(m, xs, &bn.host()?, rs, &rbn.host()?, ys),
                None => cpu::bn_apply(m, xs, &bn.host()?, Some(rs), ys),
            }
            if let Some(bits) = relu_bits {
                let bits = host_mut(bits, "the ReLU's bits")?;
                bits.fill(0);
                for (byte, ys) in bits.iter_mut().zip(ys.chunks(8)) {
                    *byte = ys.iter().enumerate().fold(0u8, |b, (k, v)| b | (((v.to_f32() > 0.0) as u8) << k));
                }
            }
            Ok(())
        }
        Device::Gpu(gpu) => apply_on_gpu(gpu, m, vec, x, Some(r), rbn, bn, y, relu_bits),
    })
}

/// The vector width of the apply kernel on `x`, the residual and `y`.
fn apply_vec<T: LayerElem>(gpu: &Gpu, c: usize, x: &Buf<T>, residual: Option<&Buf<T>>, y: &Buf<T>) -> Result<usize> {
    let rp = residual.map(|r| dptr(r, gpu, "residual")).transpose()?.unwrap_or(0);
    Ok(vec_width::<T>(c, &[dptr(x, gpu, "x")?, rp, dptr(y, gpu, "y")?]))
}

/// Whether the apply kernel at vector width `vec` ORs the ReLU's bits into words that are
/// zeroed first: a thread's vector then covers less than a byte of them. 8-element
/// vectors store whole bytes.
fn bits_zeroed_first(vec: usize) -> bool {
    vec < 8
}

/// The apply kernel on a checked call at vector width `vec` ([`apply_vec`]):
/// `y = relu?(bn(x) + residual)`, the residual through `rbn` when given
/// (`bn_apply_bnres_<T>`), and the ReLU's bits when given.
#[allow(clippy::too_many_arguments)]
fn apply_on_gpu<T: LayerElem>(
    gpu: &Gpu,
    m: usize,
    vec: usize,
    x: &Buf<T>,
    residual: Option<&Buf<T>>,
    rbn: Option<&BnInput<'_>>,
    bn: &BnInput<'_>,
    y: &mut Buf<T>,
    relu_bits: Option<&mut Buf<u8>>,
) -> Result<()> {
    let c = bn.c;
    let (xp, yp) = (dptr(x, gpu, "x")?, dptr(y, gpu, "y")?);
    let rp = residual.map(|r| dptr(r, gpu, "residual")).transpose()?.unwrap_or(0);
    let bits = match relu_bits {
        Some(Buf::Gpu(b)) => {
            if bits_zeroed_first(vec) {
                gpu.fill_zero(b)?;
            }
            b.ptr()
        }
        Some(_) => return Err(crate::invalid!("the ReLU's bits are not on the device")),
        None => 0,
    };
    let g = grid(m, c, vec, std::mem::size_of::<T>());
    let mut p = BnParams {
        x: xp,
        out: yp,
        residual: rp,
        gamma: dptr(bn.gamma, gpu, "gamma")?,
        beta: dptr(bn.beta, gpu, "beta")?,
        mean: dptr(bn.mean, gpu, "save_mean")?,
        invstd: dptr(bn.invstd, gpu, "save_invstd")?,
        relu: bn.relu as i32,
        relu_bits: bits,
        ..base_params(m, c, vec, &g)?
    };
    let kernel = match rbn {
        Some(rbn) => {
            p.gamma2 = dptr(rbn.gamma, gpu, "the residual's gamma")?;
            p.beta2 = dptr(rbn.beta, gpu, "the residual's beta")?;
            p.mean2 = dptr(rbn.mean, gpu, "the residual's save_mean")?;
            p.invstd2 = dptr(rbn.invstd, gpu, "the residual's save_invstd")?;
            T::BN_APPLY_BNRES
        }
        None => T::BN_APPLY,
    };
    // SAFETY: the caller checked that x, the residual (when not null) and y hold m*c
    // elements, the [c] buffers c, the bits (when not null) 4 * ceil(m*c / 32) bytes; the
    // kernel reads and writes rows below m and channels below c, and the bits of those
    // elements.
    unsafe { gpu.launch(kernel, g.per_channel(), &p)? };
    Ok(())
}

/// One of the two batch norms of [`bn_backward_pair`] and [`bn_backward_dx_pair`]: its
/// input `x` (`[m, c]`), its layer, and its input gradient `dx` (written).
pub struct BnSide<'a, 'b, T: LayerElem> {
    /// The batch norm's forward input.
    pub x: &'a Buf<T>,
    /// The layer (its saved statistics; its gradients written or read).
    pub bn: &'a mut BnLayer<'b>,
    /// The input gradient, written.
    pub dx: &'a mut Buf<T>,
}

/// The backward of two batch norms of the same `[m, c]` output gradient `dy` (a downsample
/// block's bn3 and shortcut BN, whose outputs were summed): bitwise [`bn_backward`] of each
/// (no ReLU mask). On a kernel device one reduction reads x, x2 and dy once for both (the
/// sum of g is shared), and one dx pass writes both input gradients: 8 passes over `[m, c]`
/// instead of 10. The partial sums are parked in each dx's bytes, as [`bn_backward`] does.
pub fn bn_backward_pair<T: LayerElem>(
    dev: &Device,
    m: usize,
    dy: &Buf<T>,
    a: BnSide<'_, '_, T>,
    b: BnSide<'_, '_, T>,
) -> Result<()> {
    pair_backward(dev, m, dy, a, b, true)
}

/// The dx passes of [`bn_backward_pair`] alone, from the parameter gradients already in
/// both layers (a dgrad's epilogue: [`crate::ops::fused::conv2d_dgrad_bn_sums`] with its
/// second BN): bitwise [`bn_backward_dx`] of each (no ReLU). One pass on a kernel device
/// reads x, x2 and dy and writes both dx: 5 passes over `[m, c]` instead of 6.
pub fn bn_backward_dx_pair<T: LayerElem>(
    dev: &Device,
    m: usize,
    dy: &Buf<T>,
    a: BnSide<'_, '_, T>,
    b: BnSide<'_, '_, T>,
) -> Result<()> {
    pair_backward(dev, m, dy, a, b, false)
}

fn pair_backward<T: LayerElem>(
    dev: &Device,
    m: usize,
    dy: &Buf<T>,
    a: BnSide<'_, '_, T>,
    b: BnSide<'_, '_, T>,
    reduce: bool,
) -> Result<()> {
    let c = a.bn.c;
    ensure!(b.bn.c == c, "the two batch norms have {c} and {} channels", b.bn.c);
    check_backward(dev, m, &[(a.x, "x"), (dy, "dy"), (&*a.dx, "dx")], a.bn)?;
    check_backward(dev, m, &[(b.x, "x2"), (&*b.dx, "dx2")], b.bn)?;
    if c == 0 {
        return Ok(());
    }
    let elem = std::mem::size_of::<T>();
    // The CPU runs the two backwards one after the other.
    let cost = || match (reduce, dev) {
        (true, Device::Cpu) => {
            let one = Cost::bn_backward(m, c, elem, false);
            Cost { flops: 2 * one.flops, bytes: 2 * one.bytes }
        }
        (false, Device::Cpu) => {
            let one = Cost::bn_backward_dx(m, c, elem, false);
            Cost { flops: 2 * one.flops, bytes: 2 * one.bytes }
        }
        (true, _) => Cost::bn_backward_pair(m, c, elem),
        (false, _) => Cost::bn_backward_dx_pair(m, c, elem),
    };
    timed(dev, Family::BnBackward, cost, || match dev {
        Device::Cpu => {
            let dys = host(dy, "dy")?;
            let side = |s: BnSide<'_, '_, T>| -> Result<()> {
                let (xs, dx) = (host(s.x, "x")?, host_mut(s.dx, "dx")?);
                if reduce {
                    cpu::bn_backward(m, xs, None, dys, &mut s.bn.host()?, dx);
                } else {
                    let grads = (host(s.bn.dbeta, "dbeta")?, host(s.bn.dgamma, "dgamma")?);
                    cpu::bn_backward_dx(m, xs, None, dys, &s.bn.input(false).host()?, grads, dx);
                }
                Ok(())
            };
            side(a)?;
            side(b)
        }
        Device::Gpu(gpu) => {
            let (x2, dx2) = (dptr(b.x, gpu, "x2")?, dptr(b.dx, gpu, "dx2")?);
            let (g, p) = backward_params(gpu, m, a.x, dy, None, a.dx, a.bn, &[x2, dx2])?;
            let p = BnParams {
                x2,
                out2: dx2,
                gamma2: dptr(b.bn.gamma, gpu, "gamma2")?,
                mean2: dptr(b.bn.save_mean, gpu, "save_mean2")?,
                invstd2: dptr(b.bn.save_invstd, gpu, "save_invstd2")?,
                dgamma2: dptr(b.bn.dgamma, gpu, "dgamma2")?,
                dbeta2: dptr(b.bn.dbeta, gpu, "dbeta2")?,
                ..p
            };
            // The second finalize: the second BN's partials (in dx2's bytes) into its
            // gradients.
            let p2 = BnParams { out: p.out2, invstd: p.invstd2, dgamma: p.dgamma2, dbeta: p.dbeta2, ..p };
            let finalize = Kernel::new(MODULE, "bn_backward_finalize_f32");
            // SAFETY: x, x2, dy, dx and dx2 hold m*c elements, the [c] buffers of both
            // layers c; each BN's partials (chunks * c float2) fit in its dx's bytes (see
            // grid()), and the dx pass overwrites both after the finalizes (stream order).
            unsafe {
                if reduce {
                    gpu.launch(T::BN_BACKWARD_REDUCE_PAIR, g.per_channel(), &p)?;
                    gpu.launch(finalize, finalize_cfg(c), &p)?;
                    gpu.launch(finalize, finalize_cfg(c), &p2)?;
                }
                gpu.launch(T::BN_BACKWARD_DX_PAIR, g.per_channel(), &p)?;
            }
            Ok(())
        }
    })
}

/// [`bn_backward`] through a fused ReLU whose masked gradient is also needed elsewhere (a
/// bottleneck's last BN: the gradient of the block's sum feeds the BN and the shortcut):
/// replaces `dy` in place by `g = relu_out > 0 ? dy : 0` and writes the BN's `dx`,
/// `bn.dgamma`, `bn.dbeta` of that `g`. The same values as
/// [`crate::ops::layers::relu_backward`] then [`bn_backward`] without a mask, in one pass
/// less and no extra buffer on a kernel device: the reduction reads x, dy and relu_out and
/// writes g over dy (each element by the thread that read it), the dx pass reads x and g
/// (7 tensor passes instead of 8, and one launch less).
pub fn bn_backward_masking_dy<T: LayerElem>(
    dev: &Device,
    m: usize,
    x: &Buf<T>,
    relu_out: &Buf<T>,
    dy: &mut Buf<T>,
    bn: &mut BnLayer<'_>,
    dx: &mut Buf<T>,
) -> Result<()> {
    let c = bn.c;
    let big = [(x, "x"), (relu_out, "relu_out"), (&*dy, "dy"), (&*dx, "dx")];
    check_backward(dev, m, &big, bn)?;
    if c == 0 {
        return Ok(());
    }
    let cost = || Cost::bn_backward_masking_dy(m, c, std::mem::size_of::<T>());
    timed(dev, Family::BnBackward, cost, || match dev {
        Device::Cpu => {
            let (xs, os) = (host(x, "x")?, host(relu_out, "relu_out")?);
            cpu::bn_backward_masking_dy(m, xs, os, host_mut(dy, "dy")?, &mut bn.host()?, host_mut(dx, "dx")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let (g, p) = backward_params(gpu, m, x, dy, Some(relu_out), dx, bn, &[])?;
            // The reduction writes the masked gradient over dy.
            let p = BnParams { grad_out: p.dy, ..p };
            // The dx pass reads the stored g, unmasked.
            let pdx = BnParams { relu_out: 0, grad_out: 0, ..p };
            // SAFETY: x, dy, relu_out and dx hold m*c elements, the [c] buffers c; the
            // partials (chunks * c float2) fit in dx's bytes (see grid()); the reduction
            // writes g over dy element by element in the thread that read it, and the dx
            // pass reads it after (stream order).
            unsafe {
                gpu.launch(T::BN_BACKWARD_REDUCE, g.per_channel(), &p)?;
                gpu.launch(Kernel::new(MODULE, "bn_backward_finalize_f32"), finalize_cfg(c), &p)?;
                gpu.launch(T::BN_BACKWARD_DX, g.per_channel(), &pdx)?;
            }
            Ok(())
        }
    })
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// Batch norm train forward over `[m, c]`: a statistics pass reads x, the apply pass
    /// reads x and writes y; per channel gamma and beta are read, the running mean and
    /// variance read and written, the saved mean and inverse deviation written (8 f32).
    /// FLOPs per element: 3 for the statistics (sum, fused square-sum), 2 to apply
    /// (`x * scale + shift`), 1 for a fused ReLU.
    pub fn bn_forward_train(m: usize, c: usize, elem: usize, relu: bool) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * (5 + relu as u64), bytes: 3 * mc * u(elem) + 8 * u(c) * F32 }
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

    /// A bottleneck's output ([`crate::ops::layers::bn_apply_residual`]): reads x and the
    /// residual, writes y (and the ReLU's bits in `bit_passes`: 1, or 2 where they are
    /// zeroed first); per channel 4 f32,
    /// 8 with the residual's own BN. FLOPs per element: 2, +2 for the residual's BN, +1 for
    /// the add, +1 for the ReLU.
    pub fn bn_apply_residual(m: usize, c: usize, elem: usize, residual_bn: bool, relu: bool, bit_passes: u64) -> Cost {
        let mc = u(m) * u(c);
        let (rb, l) = (residual_bn as u64, relu as u64);
        let bits = bit_passes * 4 * mc.div_ceil(32);
        Cost { flops: mc * (3 + 2 * rb + l), bytes: 3 * mc * u(elem) + bits + (4 + 4 * rb) * u(c) * F32 }
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

    /// Two batch norms' backward from one dy ([`crate::ops::layers::bn_backward_pair`]):
    /// the reduction reads x, x2 and dy, the dx pass reads them again and writes dx and
    /// dx2; per channel 5 f32 for each BN. FLOPs per element: twice [`Cost::bn_backward`]'s
    /// 11 less the shared sum of g.
    pub fn bn_backward_pair(m: usize, c: usize, elem: usize) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * 21, bytes: 8 * mc * u(elem) + 10 * u(c) * F32 }
    }

    /// The dx pass of [`Cost::bn_backward_pair`] alone
    /// ([`crate::ops::layers::bn_backward_dx_pair`]): reads x, x2 and dy, writes dx and
    /// dx2; per channel 5 f32 for each BN. FLOPs per element: 6 for each dx.
    pub fn bn_backward_dx_pair(m: usize, c: usize, elem: usize) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * 12, bytes: 5 * mc * u(elem) + 10 * u(c) * F32 }
    }

    /// Batch norm backward through its own ReLU, whose output is recomputed from x
    /// ([`crate::ops::layers::bn_backward_through_relu`] on a kernel device): the reduction
    /// reads x and dy, the dx pass reads them again and writes dx; per channel the 5 f32 of
    /// [`Cost::bn_backward`] and beta. FLOPs per element: 11 as without a ReLU, and 4 per
    /// pass to recompute the ReLU's output (subtract, fma, max, compare).
    pub fn bn_backward_through_relu(m: usize, c: usize, elem: usize) -> Cost {
        let mc = u(m) * u(c);
        Cost { flops: mc * 19, bytes: 5 * mc * u(elem) + 6 * u(c) * F32 }
    }

    /// [`Cost::bn_backward_through_relu`] of `m` rows with the gradient gathered from a max
    /// pool's `pooled` output gradients and taps
    /// ([`crate::ops::layers::bn_backward_through_relu_maxpool`]): each pass reads x, dy and
    /// the taps (a byte per pooled element), and the dx pass writes dx; FLOPs as there, and
    /// the pool's adds (1 per pooled element and pass).
    pub fn bn_backward_through_relu_maxpool(m: usize, pooled: usize, c: usize, elem: usize) -> Cost {
        let (mc, pe) = (u(m) * u(c), u(pooled));
        Cost { flops: mc * 19 + 2 * pe, bytes: (3 * mc + 2 * pe) * u(elem) + 2 * pe + 6 * u(c) * F32 }
    }

    /// The dx pass of a batch norm backward alone ([`crate::ops::layers::bn_backward_dx`]):
    /// reads x and dy, writes dx; per channel gamma, the saved statistics, dgamma and dbeta
    /// (and beta with the ReLU) read. FLOPs per element: 6, and 4 to recompute the ReLU's
    /// output.
    pub fn bn_backward_dx(m: usize, c: usize, elem: usize, relu: bool) -> Cost {
        let (mc, r) = (u(m) * u(c), relu as u64);
        Cost { flops: mc * (6 + 4 * r), bytes: 3 * mc * u(elem) + (5 + r) * u(c) * F32 }
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
}
