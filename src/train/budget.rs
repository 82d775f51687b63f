//! How long a run is: a compute budget in GFLOPs (the paper's count: training FLOPs per
//! image, [`Arch::flops_train`](crate::model::Arch::flops_train), times images seen), a
//! budget of training time in seconds on the run's device, a number of epochs, or a
//! number of steps; all become a number of steps before the run (a time budget through a
//! short timed probe of the step, see [`Length::Seconds`]).

use crate::model::Arch;
use crate::{ensure, invalid, Result};

/// The length of a run, as the user gives it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Length {
    /// A training compute budget in GFLOPs: the run stops when the next step would exceed it.
    Gflops(f64),
    /// Full passes over the training split (full batches only).
    Epochs(u64),
    /// Training steps.
    Steps(u64),
    /// Seconds of training on the run's device (the steps' wall time, the data loading
    /// they wait for included, evaluations excluded). Before the run a probe times a few
    /// steps of a throwaway copy of the model (one untimed step, then timed steps until 5
    /// are done or 1 s has passed, at least 2; the same for head-only steps when there is
    /// such a phase); the schedule is fitted to the steps the budget then allows, and the
    /// run also stops as soon as its training time reaches the budget (the step that
    /// crosses it is its last).
    Seconds(f64),
}

/// Training FLOPs per image of a head-only step ([`crate::train::TrainConfig::head_only_fraction`]):
/// the forward, and the classifier's backward (its weight and input gradients: the input
/// gradient is computed though nothing uses it).
pub fn head_step_flops(arch: &Arch, h: usize, w: usize) -> f64 {
    arch.flops_forward(h, w) + 4.0 * (arch.fc_in() * arch.classes) as f64
}

/// The steps of a run and how many of them (the first) are head-only: `(total, head)`.
///
/// `head = floor(head_fraction * total)`. A budget (GFLOPs, or seconds with `step_seconds`
/// = the probe's seconds per full and per head-only step) gives the largest total whose
/// cost, head-only steps at their own cost, fits it (with the relative slack of
/// [`steps_for`]); without a head-only phase this is [`steps_for`]'s count. Epochs and
/// steps give the total directly.
pub fn phase_steps(
    length: Length,
    image_flops: f64,
    head_image_flops: f64,
    batch: usize,
    steps_per_epoch: usize,
    head_fraction: f64,
    step_seconds: Option<(f64, f64)>,
) -> Result<(u64, u64)> {
    ensure!((0.0..1.0).contains(&head_fraction), "the head-only fraction must be in [0, 1), not {head_fraction}");
    let head_of = |t: u64| (head_fraction * t as f64).floor() as u64;
    let (budget, full, head) = match length {
        Length::Gflops(g) if head_fraction > 0.0 => {
            // The same checks as without a head-only phase (one full step must fit).
            steps_for(length, image_flops, batch, steps_per_epoch)?;
            (g * 1e9, image_flops * batch as f64, head_image_flops * batch as f64)
        }
        Length::Seconds(s) => {
            ensure!(s.is_finite() && s > 0.0, "a time budget must be a positive number of seconds, not {s}");
            let (full, head) =
                step_seconds.ok_or_else(|| invalid!("internal: a time budget needs the probe's seconds per step"))?;
            ensure!(
                full.is_finite() && full > 0.0 && head.is_finite() && head > 0.0,
                "the probe timed steps of {full} s (head-only {head} s): no basis for a time budget"
            );
            if s < full {
                return Err(invalid!("--budget {s} s is shorter than one training step ({full:.4} s by the probe)"));
            }
            (s, full, if head_fraction > 0.0 { head } else { full })
        }
        _ => {
            let t = steps_for(length, image_flops, batch, steps_per_epoch)?;
            return Ok((t, head_of(t)));
        }
    };
    let cost = |t: u64| {
        let h = head_of(t);
        h as f64 * head + (t - h) as f64 * full
    };
    let limit = budget * (1.0 + 1e-9);
    let mean = head_fraction * head + (1.0 - head_fraction) * full;
    let mut t = ((budget / mean).floor() as u64).max(1);
    while t > 1 && cost(t) > limit {
        t -= 1;
    }
    while cost(t + 1) <= limit {
        t += 1;
    }
    if cost(t) > limit {
        return Err(invalid!("the budget is smaller than one training step"));
    }
    ensure!(t < 1_000_000_000_000_000, "the budget is more than 10^15 steps");
    Ok((t, head_of(t)))
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
        Length::Seconds(_) => return Err(invalid!("internal: a time budget's steps come from phase_steps")),
    };
    Ok(steps)
}
