//! SGD with momentum and weight decay (kernels/sgd.cu), as `torch.optim.SGD`.

use super::{aligned16, check_len, dptr, host, host_mut, i64_of, stride_blocks};
use crate::cpu::layers::sgd as cpu;
pub use crate::cpu::layers::sgd::SgdStep;
use crate::device::{Buf, Device};
use crate::gpu::{Kernel, LaunchConfig};
use crate::ops::check_on;
use crate::ops::params::SgdParams;
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::{ensure, Result};

const KERNEL: Kernel = Kernel::new("sgd", "sgd_step_f32");
const THREADS: u32 = 256;

/// One step of `torch.optim.SGD(lr, momentum, weight_decay)` (dampening 0, no Nesterov)
/// on one parameter tensor, in place, with the gradient first multiplied by
/// `step.grad_scale` (as after `torch.nn.utils.clip_grad_norm_`; 1 is the plain step,
/// bitwise): `d = grad_scale * grad + weight_decay * param`; `buf = d` on the first step
/// (`step.first`), else `buf = momentum * buf + d`; `param -= lr * buf`. As PyTorch, a zero
/// weight decay adds nothing and a zero momentum steps with `d` (the buffer is then set to
/// `d`). On the first step the old contents of `momentum_buf` are not read.
pub fn sgd_step(
    dev: &Device,
    param: &mut Buf<f32>,
    grad: &Buf<f32>,
    momentum_buf: &mut Buf<f32>,
    step: &SgdStep,
) -> Result<()> {
    let SgdStep { lr, momentum, weight_decay, first: first_step, grad_scale } = *step;
    ensure!(grad_scale.is_finite(), "the gradient scale must be finite, not {grad_scale}");
    let n = param.len();
    check_len(grad, n, "grad")?;
    check_len(momentum_buf, n, "momentum_buf")?;
    check_on(param, dev, "param")?;
    check_on(grad, dev, "grad")?;
    check_on(momentum_buf, dev, "momentum_buf")?;
    timed(
        dev,
        Family::Sgd,
        || Cost::sgd(n, first_step),
        || match dev {
            Device::Cpu => {
                cpu::sgd_step(
                    host_mut(param, "param")?,
                    host(grad, "grad")?,
                    host_mut(momentum_buf, "momentum_buf")?,
                    step,
                );
                Ok(())
            }
            Device::Gpu(gpu) => {
                if n == 0 {
                    return Ok(());
                }
                let p = SgdParams {
                    param: dptr(param, gpu, "param")?,
                    grad: dptr(grad, gpu, "grad")?,
                    buf: dptr(momentum_buf, gpu, "momentum_buf")?,
                    n: i64_of(n, "the parameter count")?,
                    lr,
                    momentum,
                    weight_decay,
                    first: first_step as i32,
                    grad_scale,
                    pad0: 0,
                };
                ensure!(aligned16(&[p.param, p.grad, p.buf]), "SGD buffers must be 16-byte aligned");
                // SAFETY: param, grad and momentum_buf hold n f32 each, 16-byte aligned as the
                // kernel's float4 accesses need.
                unsafe {
                    gpu.launch(KERNEL, LaunchConfig::linear(stride_blocks(n.div_ceil(4), THREADS), THREADS), &p)?
                };
                Ok(())
            }
        },
    )
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// An SGD step on n f32 parameters: reads param and grad, writes param and the
    /// momentum buffer, and reads the buffer except on the first step; 6 FLOPs per
    /// parameter (weight decay, momentum, update: a multiply and an add each).
    pub fn sgd(n: usize, first_step: bool) -> Cost {
        Cost { flops: 6 * u(n), bytes: u(n) * F32 * (4 + !first_step as u64) }
    }
}
