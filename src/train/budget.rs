//! How long a run is: a compute budget in GFLOPs (the paper's count: training FLOPs per
//! image, [`Arch::flops_train`](crate::model::Arch::flops_train), times images seen), a
//! number of epochs, or a number of steps; all become a number of steps before the run.

use crate::{ensure, Result};

/// The length of a run, as the user gives it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Length {
    /// A training compute budget in GFLOPs: the run stops when the next step would exceed it.
    Gflops(f64),
    /// Full passes over the training split (full batches only).
    Epochs(u64),
    /// Training steps.
    Steps(u64),
}

/// The steps a run of `length` takes, with `image_flops` training FLOPs per image, `batch`
/// images per step and `steps_per_epoch` full batches per epoch.
///
/// A budget gives the largest k with `k * step_flops <= budget` (a relative slack of 1e-9
/// absorbs the rounding of a budget written as a decimal multiple of a step); a budget
/// smaller than one step, zero epochs or zero steps are errors.
pub fn steps_for(length: Length, image_flops: f64, batch: usize, steps_per_epoch: usize) -> Result<u64> {
    let step_flops = image_flops * batch as f64;
    let steps = match length {
        Length::Gflops(g) => {
            ensure!(g.is_finite() && g > 0.0, "--budget must be a positive number of GFLOPs, not {g}");
            ensure!(step_flops.is_finite() && step_flops > 0.0, "a training step without FLOPs");
            let k = (g * 1e9 / step_flops * (1.0 + 1e-9)).floor();
            ensure!(
                k.is_finite() && k >= 1.0,
                "--budget {g} GFLOPs is smaller than one training step ({:.6} GFLOPs: {batch} images of {:.6} \
                 GFLOPs each)",
                step_flops / 1e9,
                image_flops / 1e9
            );
            ensure!(k.is_finite() && k < 1e15, "--budget {g} GFLOPs is more than 10^15 steps");
            k as u64
        }
        Length::Epochs(e) => {
            ensure!(e >= 1, "--epochs must be at least 1");
            e.checked_mul(steps_per_epoch as u64).ok_or_else(|| crate::invalid!("--epochs {e} is too many steps"))?
        }
        Length::Steps(s) => {
            ensure!(s >= 1, "--steps must be at least 1");
            s
        }
    };
    Ok(steps)
}
