//! Pooling on NHWC activations (kernels/pool.cu): max pool 3x3 stride 2 padding 1 and the
//! global average pool, forward and backward.

use super::{aligned16, check_len, dptr, host, host_mut, mul, stride_blocks, LayerElem};
use crate::cpu::layers::pool as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Gpu, Kernel, LaunchConfig};
use crate::ops::params::PoolParams;
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::ops::{check_on, i32_of};
use crate::Result;

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

#[allow(clippy::too_many_arguments)]
fn launch<T: LayerElem>(
    gpu: &Gpu,
    kernel: Kernel,
    (n, h, w, c): (usize, usize, usize, usize),
    (oh, ow): (usize, usize),
    x: u64,
    dy: u64,
    out: u64,
    vec_ptrs: &[u64],
    threads_work: impl Fn(usize) -> usize,
) -> Result<()> {
    let vec = vec_width::<T>(c, vec_ptrs);
    let p = PoolParams {
        x,
        dy,
        out,
        n: i32_of(n, "n")?,
        h: i32_of(h, "h")?,
        w: i32_of(w, "w")?,
        c: i32_of(c, "c")?,
        oh: i32_of(oh, "the output height")?,
        ow: i32_of(ow, "the output width")?,
        vec: vec as i32,
        pad0: 0,
    };
    let work = threads_work(c / vec);
    if work == 0 {
        return Ok(());
    }
    // SAFETY: the callers checked x, dy and out against the shape; each thread touches
    // only elements of its (image, position, channel vector).
    unsafe { gpu.launch(kernel, LaunchConfig::linear(stride_blocks(work, THREADS), THREADS), &p)? };
    Ok(())
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
    let (x_len, y_len) = check_shape(n, h, w, c)?;
    check_len(x, x_len, "x")?;
    check_len(y, y_len, "y")?;
    check_on(x, dev, "x")?;
    check_on(y, dev, "y")?;
    timed(
        dev,
        Family::Pool,
        || Cost::maxpool_forward(x_len, y_len, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::maxpool_forward(n, h, w, c, host(x, "x")?, host_mut(y, "y")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (xp, yp) = (dptr(x, gpu, "x")?, dptr(y, gpu, "y")?);
                let (oh, ow) = (maxpool_out(h), maxpool_out(w));
                launch::<T>(gpu, T::MAXPOOL_FORWARD, (n, h, w, c), (oh, ow), xp, 0, yp, &[xp, yp], |cv| {
                    n * oh * ow * cv
                })
            }
        },
    )
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
                let shape = (n, h, w, c);
                launch::<T>(gpu, T::MAXPOOL_BACKWARD, shape, (oh, ow), xp, dyp, dxp, &[xp, dyp, dxp], |cv| {
                    n * oh * ow * cv
                })
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
                launch::<T>(gpu, T::AVGPOOL_FORWARD, (n, hw, 1, c), (1, 1), xp, 0, yp, &[xp], |cv| n * cv)
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
                launch::<T>(gpu, T::AVGPOOL_BACKWARD, (n, hw, 1, c), (1, 1), 0, dyp, dxp, &[dxp], |cv| n * hw * cv)
            }
        },
    )
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
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
}
