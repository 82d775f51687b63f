//! Elementwise layers (kernels/elementwise.cu): residual add + ReLU, ReLU backward,
//! gradient accumulation and casts.

use super::{aligned16, check_len, dptr, host, host_mut, i64_of, stride_blocks, CastElem, LayerElem};
use crate::cpu::layers::elementwise as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Gpu, Kernel, LaunchConfig};
use crate::ops::check_on;
use crate::ops::params::ElementwiseParams;
use crate::ops::profile::{timed, u, Cost, Family};
use crate::{invalid, Result};

const THREADS: u32 = 256;
/// Elements per vector access (EW_VEC).
const VEC: usize = 8;

/// One launch of `kernel` over `n` elements: out = f(a, b).
fn launch(gpu: &Gpu, kernel: Kernel, a: u64, b: u64, out: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let p = ElementwiseParams {
        a,
        b,
        out,
        n: i64_of(n, "the element count")?,
        vec: if aligned16(&[a, b, out]) { VEC as i32 } else { 1 },
        pad0: 0,
    };
    let cfg = LaunchConfig::linear(stride_blocks(n.div_ceil(VEC), THREADS), THREADS);
    // SAFETY: the callers checked that every buffer holds n elements of the kernel's types
    // (b is null for casts, which do not read it).
    unsafe { gpu.launch(kernel, cfg, &p)? };
    Ok(())
}

/// `out = max(a + b, 0)`: the residual add of a bottleneck block and its ReLU (NaN is
/// kept, as `torch.relu`).
pub fn add_relu<T: LayerElem>(dev: &Device, a: &Buf<T>, b: &Buf<T>, out: &mut Buf<T>) -> Result<()> {
    let n = a.len();
    check_len(b, n, "b")?;
    check_len(out, n, "out")?;
    check_on(a, dev, "a")?;
    check_on(b, dev, "b")?;
    check_on(out, dev, "out")?;
    timed(
        dev,
        Family::ReluAdd,
        || Cost::add_relu(n, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::add_relu(host(a, "a")?, host(b, "b")?, host_mut(out, "out")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                launch(gpu, T::ADD_RELU, dptr(a, gpu, "a")?, dptr(b, gpu, "b")?, dptr(out, gpu, "out")?, n)
            }
        },
    )
}

/// `dx = out > 0 ? dy : 0`, the gradient through a ReLU whose output was `out` (as
/// PyTorch's `threshold_backward`: a NaN output passes the gradient).
pub fn relu_backward<T: LayerElem>(dev: &Device, out: &Buf<T>, dy: &Buf<T>, dx: &mut Buf<T>) -> Result<()> {
    let n = out.len();
    check_len(dy, n, "dy")?;
    check_len(dx, n, "dx")?;
    check_on(out, dev, "out")?;
    check_on(dy, dev, "dy")?;
    check_on(dx, dev, "dx")?;
    timed(
        dev,
        Family::ReluAdd,
        || Cost::relu_backward(n, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::relu_backward(host(out, "out")?, host(dy, "dy")?, host_mut(dx, "dx")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                launch(gpu, T::RELU_BACKWARD, dptr(out, gpu, "out")?, dptr(dy, gpu, "dy")?, dptr(dx, gpu, "dx")?, n)
            }
        },
    )
}

/// `dst += src` (in the element type: bf16 sums are rounded once, from f32).
pub fn add_assign<T: LayerElem>(dev: &Device, dst: &mut Buf<T>, src: &Buf<T>) -> Result<()> {
    let n = dst.len();
    check_len(src, n, "src")?;
    check_on(dst, dev, "dst")?;
    check_on(src, dev, "src")?;
    timed(
        dev,
        Family::ReluAdd,
        || Cost::add_assign(n, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                cpu::add_assign(host_mut(dst, "dst")?, host(src, "src")?);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let d = dptr(dst, gpu, "dst")?;
                launch(gpu, T::ADD_ASSIGN, d, dptr(src, gpu, "src")?, d, n)
            }
        },
    )
}

fn cast_kernel(a: &str, b: &str) -> Option<Kernel> {
    let name = match (a, b) {
        ("f32", "bf16") => "cast_f32_bf16",
        ("bf16", "f32") => "cast_bf16_f32",
        ("f32", "f32") => "cast_f32_f32",
        ("bf16", "bf16") => "cast_bf16_bf16",
        _ => return None,
    };
    Some(Kernel::new("elementwise", name))
}

/// `dst = src` converted: f32 to bf16 rounds to nearest even (NaN stays NaN), bf16 to
/// f32 is exact, and a cast to the same type copies.
pub fn cast<A: CastElem, B: CastElem>(dev: &Device, src: &Buf<A>, dst: &mut Buf<B>) -> Result<()> {
    let n = src.len();
    check_len(dst, n, "dst")?;
    check_on(src, dev, "src")?;
    check_on(dst, dev, "dst")?;
    let cost = || Cost::cast(n, std::mem::size_of::<A>(), std::mem::size_of::<B>());
    timed(dev, Family::Cast, cost, || match dev {
        Device::Cpu => {
            cpu::cast(host(src, "src")?, host_mut(dst, "dst")?);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let k =
                cast_kernel(A::DTYPE, B::DTYPE).ok_or_else(|| invalid!("no cast from {} to {}", A::DTYPE, B::DTYPE))?;
            launch(gpu, k, dptr(src, gpu, "src")?, 0, dptr(dst, gpu, "dst")?, n)
        }
    })
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
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
}
