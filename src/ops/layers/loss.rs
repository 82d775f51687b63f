//! Softmax cross-entropy (kernels/loss.cu).

use super::{check_len, dptr, host, host_mut, mul};
use crate::cpu::layers::loss as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Kernel, LaunchConfig};
use crate::ops::params::LossParams;
use crate::ops::profile::{timed, u, Cost, Family, F32};
use crate::ops::{check_on, i32_of};
use crate::{ensure, Result};

const KERNEL: Kernel = Kernel::new("loss", "softmax_cross_entropy_f32");

/// Checks that every target is a class index in `[0, classes)`: call it on the host
/// where the targets come from (before they are uploaded).
pub fn check_targets(targets: &[i32], classes: usize) -> Result<()> {
    match targets.iter().position(|&t| t < 0 || t as usize >= classes) {
        None => Ok(()),
        Some(i) => Err(crate::invalid!("target {i} is {}, outside the {classes} classes", targets[i])),
    }
}

/// Softmax cross-entropy, mean over the batch, as `F.cross_entropy(logits, targets)`:
/// `loss[0] = mean_n (logsumexp(z_n) - z_n[t_n])` and
/// `dlogits = (softmax(z) - onehot(t)) / n`, both written on the device (no host sync).
/// Stable for any finite logits (the row maximum is subtracted before exp).
///
/// Targets outside `[0, classes)` are an error. On the CPU they are checked here; on a
/// kernel device they are not read by the host (that would wait for the device): an
/// out-of-range target makes its row of `dlogits` and the loss NaN, which the caller
/// sees when it reads the loss. Use [`check_targets`] on the host copy to get the error
/// before the upload. One single-block launch (deterministic, fixed summation order).
pub fn softmax_cross_entropy(
    dev: &Device,
    n: usize,
    classes: usize,
    logits: &Buf<f32>,
    targets: &Buf<i32>,
    loss: &mut Buf<f32>,
    dlogits: &mut Buf<f32>,
) -> Result<()> {
    softmax_cross_entropy_smoothed(dev, n, classes, logits, targets, 0.0, loss, dlogits)
}

/// [`softmax_cross_entropy`] with label smoothing `smoothing` in [0, 1), as
/// `F.cross_entropy(logits, targets, label_smoothing=smoothing)`: the target distribution
/// is `(1 - smoothing) onehot(t) + smoothing / classes`; 0 is the plain loss, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy_smoothed(
    dev: &Device,
    n: usize,
    classes: usize,
    logits: &Buf<f32>,
    targets: &Buf<i32>,
    smoothing: f32,
    loss: &mut Buf<f32>,
    dlogits: &mut Buf<f32>,
) -> Result<()> {
    ensure!((0.0..1.0).contains(&smoothing), "label smoothing must be in [0, 1), not {smoothing}");
    ensure!(n >= 1, "cross-entropy of an empty batch");
    ensure!(classes >= 1, "cross-entropy over no classes");
    let len = mul(n, classes, "the logits")?;
    i32_of(n, "n")?;
    i32_of(classes, "classes")?;
    check_len(logits, len, "logits")?;
    check_len(targets, n, "targets")?;
    check_len(loss, 1, "loss")?;
    check_len(dlogits, len, "dlogits")?;
    check_on(logits, dev, "logits")?;
    check_on(targets, dev, "targets")?;
    check_on(loss, dev, "loss")?;
    check_on(dlogits, dev, "dlogits")?;
    timed(
        dev,
        Family::Loss,
        || Cost::softmax_cross_entropy(n, classes),
        || match dev {
            Device::Cpu => {
                let t = host(targets, "targets")?;
                check_targets(t, classes)?;
                let (z, d) = (host(logits, "logits")?, host_mut(dlogits, "dlogits")?);
                let l = cpu::softmax_cross_entropy_smoothed(n, classes, z, t, smoothing, d);
                host_mut(loss, "loss")?[0] = l;
                Ok(())
            }
            Device::Gpu(gpu) => {
                let p = LossParams {
                    logits: dptr(logits, gpu, "logits")?,
                    targets: dptr(targets, gpu, "targets")?,
                    loss: dptr(loss, gpu, "loss")?,
                    dlogits: dptr(dlogits, gpu, "dlogits")?,
                    n: n as i32,
                    classes: classes as i32,
                    smoothing,
                    pad0: 0,
                };
                let warps = n.min(32) as u32;
                // SAFETY: logits and dlogits hold n * classes elements, targets n, loss 1; the
                // kernel reads logits[row, t] only for t in [0, classes).
                unsafe { gpu.launch(KERNEL, LaunchConfig::linear(1, 32 * warps), &p)? };
                Ok(())
            }
        },
    )
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// Softmax cross-entropy of `[n, classes]` logits: reads logits and targets (i32),
    /// writes dlogits and the loss; 5 FLOPs per logit (max, subtract, exp, sum, scale).
    pub fn softmax_cross_entropy(n: usize, classes: usize) -> Cost {
        let nc = u(n) * u(classes);
        Cost { flops: 5 * nc, bytes: (2 * nc + u(n) + 1) * F32 }
    }
}
