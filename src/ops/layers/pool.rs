//! Pooling on NHWC activations (kernels/pool.cu): max pool 3x3 stride 2 padding 1 and the
//! global average pool, forward and backward.

use super::bn::{relu_output_host, BnInput};
use super::{aligned16, check_len, dptr, host, host_mut, mul, stride_blocks, LayerElem};
use crate::cpu::layers::pool as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Gpu, Kernel, LaunchConfig};
use crate::ops::params::PoolParams;
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::ops::{check_on, i32_of};
use crate::{ensure, Result};

const THREADS: u32 = 256;

/// Output height (or width) of the 3x3 stride 2 padding 1 max pool:
/// `floor((h + 2 - 3) / 2) + 1` (112 -> 56, 7 -> 4, 1 -> 1; 0 for an empty input, which
/// the pooling functions reject).
pub fn maxpool_out(h: usize) -> usize {
    cpu::maxpool_out(h)
}

fn vec_width<T: LayerElem>(c: usize, ptrs: &[u64]) -> usize {
    let v = 16 / std::mem::size_of::<T>();
    if c.is_multiple_of(v) && aligned16(ptrs) {
        v
    } else {
        1
    }
}

/// Launches `kernel` with `p` (its vector width set here from `c` and `vec_ptrs`) on one
/// thread per vector of `threads_work(c / vec)` work items.
fn launch<T: LayerElem>(
    gpu: &Gpu,
    kernel: Kernel,
    mut p: PoolParams,
    vec_ptrs: &[u64],
    threads_work: impl Fn(usize) -> usize,
) -> Result<()> {
    let vec = vec_width::<T>(p.c as usize, vec_ptrs);
    p.vec = vec as i32;
    let work = threads_work(p.c as usize / vec);
    if work == 0 {
        return Ok(());
    }
    // SAFETY: the callers checked every buffer against the shape; each thread touches only
    // elements of its (image, position, channel vector), the BN's [c] buffers and the
    // taps of its positions.
    unsafe { gpu.launch(kernel, LaunchConfig::linear(stride_blocks(work, THREADS), THREADS), &p)? };
    Ok(())
}

/// The parameters of a launch on `[n, h, w, c]` with output `(oh, ow)`; every pointer null.
fn params((n, h, w, c): (usize, usize, usize, usize), (oh, ow): (usize, usize)) -> Result<PoolParams> {
    Ok(PoolParams {
        n: i32_of(n, "n")?,
        h: i32_of(h, "h")?,
        w: i32_of(w, "w")?,
        c: i32_of(c, "c")?,
        oh: i32_of(oh, "the output height")?,
        ow: i32_of(ow, "the output width")?,
        ..PoolParams::default()
    })
}

fn check_shape(n: usize, h: usize, w: usize, c: usize) -> Result<(usize, usize)> {
    crate::ensure!(h >= 1 && w >= 1, "max pool of an empty image ({h}x{w})");
    // The CPU path keeps where each maximum is as a 32-bit pixel index of the image.
    crate::ensure!(
        h.checked_mul(w).is_some_and(|hw| hw <= u32::MAX as usize),
        "max pool of an image of {h}x{w} pixels: at most 2^32 - 1 pixels per image"
    );
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    let x_len = mul(mul(mul(n, h, "the max pool input")?, w, "the max pool input")?, c, "the max pool input")?;
    let y_len = mul(mul(mul(n, oh, "the max pool output")?, ow, "the max pool output")?, c, "the max pool output")?;
    Ok((x_len, y_len))
}

/// Max pool 3x3, stride 2, padding 1 on NHWC `x` (`[n, h, w, c]`) into `y`
/// (`[n, oh, ow, c]`, `oh = maxpool_out(h)`). Padding is -inf; NaN propagates.
pub fn maxpool_forward<T: LayerElem>(
    dev: &Device,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    x: &Buf<T>,
    y: &mut Buf<T>,
) -> Result<()> {
    maxpool_forward_bn(dev, n, h, w, c, x, None, y, None)
}

/// [`maxpool_forward`] of `bn(x)`, a batch norm (+ ReLU) applied to each element as it is
/// loaded (`None`: of `x`), and, with `taps` (`[n, oh, ow, c]`), where each maximum is:
/// the window's tap `dh * 3 + dw` (row-major in the 3x3 window, whose tap (0, 0) is input
/// (2 oy - 1, 2 ox - 1)), which [`maxpool_backward_taps`] reads. `y` is bitwise
/// [`crate::ops::layers::bn_apply_saved`] followed by [`maxpool_forward`] on the same
/// device, and the BN's output is never written: one pass over `x` on a kernel device
/// (`maxpool_forward_bn_<dtype>`), which the CPU makes as those two.
#[allow(clippy::too_many_arguments)]
pub fn maxpool_forward_bn<T: LayerElem>(
    dev: &Device,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    x: &Buf<T>,
    bn: Option<&BnInput<'_>>,
    y: &mut Buf<T>,
    mut taps: Option<&mut Buf<u8>>,
) -> Result<()> {
    let (x_len, y_len) = check_shape(n, h, w, c)?;
    check_len(x, x_len, "x")?;
    check_len(y, y_len, "y")?;
    check_on(x, dev, "x")?;
    check_on(y, dev, "y")?;
    if let Some(t) = taps.as_deref() {
        check_len(t, y_len, "taps")?;
        check_on(t, dev, "taps")?;
    }
    if let Some(bn) = bn {
        ensure!(bn.c == c, "the max pool's batch norm has {} channels, its input {c}", bn.c);
        bn.check(dev)?;
    }
    let has_taps = taps.is_some();
    let cost = || Cost::maxpool_forward_bn(x_len, y_len, std::mem::size_of::<T>(), bn.is_some(), has_taps);
    timed(dev, Family::Pool, cost, || match dev {
        Device::Cpu => {
            let normed;
            let xs = match bn {
                Some(bn) => {
                    normed = relu_output_host(x_len / c.max(1), host(x, "x")?, bn)?;
                    &normed[..]
                }
                None => host(x, "x")?,
            };
            match taps.as_deref_mut() {
                Some(t) => cpu::maxpool_forward_taps(n, h, w, c, xs, host_mut(y, "y")?, host_mut(t, "taps")?),
                None => cpu::maxpool_forward(n, h, w, c, xs, host_mut(y, "y")?),
            }
            Ok(())
        }
        Device::Gpu(gpu) => {
            let (oh, ow) = (maxpool_out(h), maxpool_out(w));
            let mut p =
                PoolParams { x: dptr(x, gpu, "x")?, out: dptr(y, gpu, "y")?, ..params((n, h, w, c), (oh, ow))? };
            if let Some(t) = taps.as_deref() {
                p.arg = dptr(t, gpu, "taps")?;
            }
            let kernel = match bn {
                Some(bn) => {
                    p.mean = dptr(bn.mean, gpu, "save_mean")?;
                    p.invstd = dptr(bn.invstd, gpu, "save_invstd")?;
                    p.gamma = dptr(bn.gamma, gpu, "gamma")?;
                    p.beta = dptr(bn.beta, gpu, "beta")?;
                    p.relu = bn.relu as i32;
                    T::MAXPOOL_FORWARD_BN
                }
                None => T::MAXPOOL_FORWARD,
            };
            // The taps are stored as 4 or 8 bytes per vector: 16-byte alignment covers them.
            launch::<T>(gpu, kernel, p, &[p.x, p.out, p.arg], |cv| n * oh * ow * cv)
        }
    })
}

/// Max pool backward: `dx` (`[n, h, w, c]`, overwritten) gets each output's gradient at
/// the element its window's maximum came from (the first maximum in row-major window
/// order, or the last NaN, as PyTorch), summed in row-major output order.
#[allow(clippy::too_many_arguments)]
pub fn maxpool_backward<T: LayerElem>(
    dev: &Device,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    x: &Buf<T>,
    dy: &Buf<T>,
    dx: &mut Buf<T>,
) -> Result<()> {
    let (x_len, y_len) = check_shape(n, h, w, c)?;
    check_len(x, x_len, "x")?;
    check_len(dy, y_len, "dy")?;
    check_len(dx, x_len, "dx")?;
    check_on(x, dev, "x")?;
    check_on(dy, dev, "dy")?;
    check_on(dx, dev, "dx")?;
    timed(
        dev,
        Family::Pool,
        || Cost::maxpool_backward(x_len, y_len, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::maxpool_backward(n, h, w, c, host(x, "x")?, host(dy, "dy")?, host_mut(dx, "dx")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (xp, dyp, dxp) = (dptr(x, gpu, "x")?, dptr(dy, gpu, "dy")?, dptr(dx, gpu, "dx")?);
                let (oh, ow) = (maxpool_out(h), maxpool_out(w));
                let p = PoolParams { x: xp, dy: dyp, out: dxp, ..params((n, h, w, c), (oh, ow))? };
                launch::<T>(gpu, T::MAXPOOL_BACKWARD, p, &[xp, dyp, dxp], |cv| n * oh * ow * cv)
            }
        },
    )
}

/// [`maxpool_backward`] from the taps that [`maxpool_forward_bn`] wrote (`[n, oh, ow, c]`)
/// instead of the input: the same bits as [`maxpool_backward`] on the input whose maxima
/// they are, reading one byte per output in place of the windows. A tap that is not an
/// in-range tap of its window (9 or more, or off the image) sends nothing.
#[allow(clippy::too_many_arguments)]
pub fn maxpool_backward_taps<T: LayerElem>(
    dev: &Device,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    taps: &Buf<u8>,
    dy: &Buf<T>,
    dx: &mut Buf<T>,
) -> Result<()> {
    let (x_len, y_len) = check_shape(n, h, w, c)?;
    check_len(taps, y_len, "taps")?;
    check_len(dy, y_len, "dy")?;
    check_len(dx, x_len, "dx")?;
    check_on(taps, dev, "taps")?;
    check_on(dy, dev, "dy")?;
    check_on(dx, dev, "dx")?;
    timed(
        dev,
        Family::Pool,
        || Cost::maxpool_backward_taps(x_len, y_len, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::maxpool_backward_taps(n, h, w, c, host(taps, "taps")?, host(dy, "dy")?, host_mut(dx, "dx")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (tp, dyp, dxp) = (dptr(taps, gpu, "taps")?, dptr(dy, gpu, "dy")?, dptr(dx, gpu, "dx")?);
                let (oh, ow) = (maxpool_out(h), maxpool_out(w));
                let p = PoolParams { arg: tp, dy: dyp, out: dxp, ..params((n, h, w, c), (oh, ow))? };
                launch::<T>(gpu, T::MAXPOOL_BACKWARD_ARG, p, &[tp, dyp, dxp], |cv| n * oh * ow * cv)
            }
        },
    )
}

/// Global average pool: `y[n, c] = mean over i of x[n, i, c]` (`x` is `[n, hw, c]`, `y`
/// f32 `[n, c]`).
pub fn avgpool_forward<T: LayerElem>(
    dev: &Device,
    n: usize,
    hw: usize,
    c: usize,
    x: &Buf<T>,
    y: &mut Buf<f32>,
) -> Result<()> {
    crate::ensure!(hw >= 1, "average pool over no positions");
    let x_len = mul(mul(n, hw, "the average pool input")?, c, "the average pool input")?;
    check_len(x, x_len, "x")?;
    check_len(y, n * c, "y")?;
    check_on(x, dev, "x")?;
    check_on(y, dev, "y")?;
    timed(
        dev,
        Family::Pool,
        || Cost::avgpool_forward(n, hw, c, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::avgpool_forward(n, hw, c, host(x, "x")?, host_mut(y, "y")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (xp, yp) = (dptr(x, gpu, "x")?, dptr(y, gpu, "y")?);
                let p = PoolParams { x: xp, out: yp, ..params((n, hw, 1, c), (1, 1))? };
                launch::<T>(gpu, T::AVGPOOL_FORWARD, p, &[xp], |cv| n * cv)
            }
        },
    )
}

/// Global average pool backward: `dx[n, i, c] = dy[n, c] / hw` (`dx` overwritten).
pub fn avgpool_backward<T: LayerElem>(
    dev: &Device,
    n: usize,
    hw: usize,
    c: usize,
    dy: &Buf<f32>,
    dx: &mut Buf<T>,
) -> Result<()> {
    crate::ensure!(hw >= 1, "average pool over no positions");
    let x_len = mul(mul(n, hw, "the average pool input")?, c, "the average pool input")?;
    check_len(dy, n * c, "dy")?;
    check_len(dx, x_len, "dx")?;
    check_on(dy, dev, "dy")?;
    check_on(dx, dev, "dx")?;
    timed(
        dev,
        Family::Pool,
        || Cost::avgpool_backward(n, hw, c, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::avgpool_backward(n, hw, c, host(dy, "dy")?, host_mut(dx, "dx")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (dyp, dxp) = (dptr(dy, gpu, "dy")?, dptr(dx, gpu, "dx")?);
                let p = PoolParams { dy: dyp, out: dxp, ..params((n, hw, 1, c), (1, 1))? };
                launch::<T>(gpu, T::AVGPOOL_BACKWARD, p, &[dxp], |cv| n * hw * cv)
            }
        },
    )
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// Max pool 3x3 forward from `inputs` to `outputs` elements: reads x, writes y; 9
    /// comparisons per output.
    pub fn maxpool_forward(inputs: usize, outputs: usize, elem: usize) -> Cost {
        Cost::maxpool_forward_bn(inputs, outputs, elem, false, false)
    }

    /// [`Cost::maxpool_forward`] with a batch norm (+ ReLU) applied as x is loaded (3
    /// operations per input, and the `[c]` parameters, which are not counted), and with
    /// the taps written (one byte per output).
    pub fn maxpool_forward_bn(inputs: usize, outputs: usize, elem: usize, bn: bool, taps: bool) -> Cost {
        let flops = 9 * u(outputs) + if bn { 3 * u(inputs) } else { 0 };
        Cost { flops, bytes: (u(inputs) + u(outputs)) * u(elem) + if taps { u(outputs) } else { 0 } }
    }

    /// Max pool 3x3 backward: reads x and dy, writes dx; per output 9 comparisons to find
    /// its maximum and 1 add.
    pub fn maxpool_backward(inputs: usize, outputs: usize, elem: usize) -> Cost {
        Cost { flops: 10 * u(outputs), bytes: (2 * u(inputs) + u(outputs)) * u(elem) }
    }

    /// Max pool 3x3 backward from the taps: reads the taps (a byte per output) and dy,
    /// writes dx; 1 add per output.
    pub fn maxpool_backward_taps(inputs: usize, outputs: usize, elem: usize) -> Cost {
        Cost { flops: u(outputs), bytes: (u(inputs) + u(outputs)) * u(elem) + u(outputs) }
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
}
