//! The verifier's policy: the tolerances of both parts, the perturbations that measure
//! noise floors, and the limits of the search over undecided ReLU decisions.

use super::exact::{Jiggle, Perturb};
use crate::model::PrecisionKind;

/// Tolerances of one comparison: `atol * scale + rtol * |expected| + k * noise`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Absolute tolerance, as a fraction of the tensor's scale (its largest |expected|).
    pub atol: f64,
    /// Relative tolerance, a fraction of each element's |expected|.
    pub rtol: f64,
    /// Multiple of the noise floor (0 for the math part).
    pub k: f64,
}

/// The math part: prunekit's float64 against PyTorch's float64. The expectations are
/// stored in float32 (rtol: twice its rounding), and so is the input PyTorch computed them
/// from in float64: `k` times the tensor's largest change when the input is perturbed by
/// float32's rounding (2^-24) covers that; atol is float64 rounding amplified.
pub const MATH: Tolerance = Tolerance { atol: 1e-9, rtol: 1.2e-7, k: 8.0 };

/// The perturbation of the input that measures the math part's noise floor.
pub const INPUT_ROUNDING: Perturb = Perturb { rel: 5.960464477539063e-8, seed: 0x1u64, what: Jiggle::Input };

/// When the math part fails and ReLU decisions lie within the stored input's rounding of
/// their kink, the likeliest of them (smallest |pre-activation| over its sensitivity, at
/// most this many) are tried on the other side, fewest flips first...
pub const MAX_UNDECIDED: usize = 6;

/// ... in at most this many float64 runs.
pub const MAX_FLIP_RUNS: usize = 24;

/// How many noise floors an element of the device's run may be off.
pub const NOISE_MULTIPLE: f64 = 16.0;

/// A tensor whose bound exceeds this fraction of its scale is named in the report: errors
/// smaller than its bound cannot be seen there.
pub const JUDGE_LIMIT: f64 = 0.02;

/// A tensor whose noise floor exceeds this fraction of its scale is not judged at all:
/// rounding alone moves it by that much, far beyond where rounding errors add up linearly
/// (a reference too ill-conditioned for the precision); the report names it.
pub const UNJUDGED: f64 = 0.25;

/// The precision part's tolerances in `precision`: fixed parts for the rounding of long
/// sums that an op-by-op perturbation does not model, plus [`NOISE_MULTIPLE`] noise floors.
pub fn tolerance(precision: PrecisionKind) -> Tolerance {
    match precision {
        PrecisionKind::F32 => Tolerance { atol: 1e-5, rtol: 1e-4, k: NOISE_MULTIPLE },
        PrecisionKind::Bf16 => Tolerance { atol: 2e-2, rtol: 2e-2, k: NOISE_MULTIPLE },
    }
}

/// The relative perturbation of every op's output that measures the noise floor: four
/// units of rounding of the precision (2^-22 in f32, 2^-7 in bf16, whose convs also read
/// rounded weights).
pub fn noise_perturbation(precision: PrecisionKind) -> Perturb {
    match precision {
        PrecisionKind::F32 => Perturb { rel: (-22f64).exp2(), seed: 0x5eed, what: Jiggle::Ops },
        PrecisionKind::Bf16 => Perturb { rel: (-7f64).exp2(), seed: 0x5eed, what: Jiggle::OpsAndWeights },
    }
}

/// How many perturbed twins measure a noise floor (the largest of their differences is
/// taken: one sample of a scalar such as the loss can come out small by chance).
pub const TWINS: u64 = 3;
