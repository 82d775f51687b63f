//! What [`verify`](super::verify()) and [`check_device`](super::check_device()) found: per
//! group of tensors the largest errors against their bounds, the decisions the device took
//! otherwise, and the report's text.

use super::policy::{tolerance, Tolerance, MATH, MAX_FLIP_RUNS, MAX_UNDECIDED, UNJUDGED};
use crate::model::PrecisionKind;

/// The groups of tensors that verify reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// The eval-mode logits (running statistics).
    EvalLogits,
    /// The train-mode logits (batch statistics).
    TrainLogits,
    /// The train-mode loss (mean softmax cross-entropy).
    Loss,
    /// The gradient of every parameter after one backward.
    Gradients,
    /// BN's running statistics after the train forward.
    RunningStats,
    /// Every parameter after one SGD step.
    Step,
}

impl Group {
    /// The group's name in the report, e.g. `train logits`.
    pub fn name(self) -> &'static str {
        match self {
            Group::EvalLogits => "eval logits",
            Group::TrainLogits => "train logits",
            Group::Loss => "loss",
            Group::Gradients => "gradients",
            Group::RunningStats => "BN running statistics",
            Group::Step => "parameters after one SGD step",
        }
    }
}

/// A tensor whose bound is wider than [`JUDGE_LIMIT`](super::JUDGE_LIMIT) of its scale.
#[derive(Clone, Debug)]
pub struct Blind {
    /// The tensor.
    pub name: String,
    /// Its largest bound (without the per-element rtol part), as a fraction of its scale.
    pub bound: f64,
    /// Its noise floor as a fraction of its scale.
    pub noise: f64,
}

/// The result of one group.
#[derive(Clone, Debug)]
pub struct GroupResult {
    /// Which group.
    pub group: Group,
    /// The number of tensors compared.
    pub tensors: usize,
    /// The largest |got - expected| over every element (infinite if any is NaN).
    pub max_abs: f64,
    /// The largest error relative to its tensor's scale (max |got - expected| over a
    /// tensor divided by its largest |expected|).
    pub max_scaled: f64,
    /// The largest noise floor relative to its tensor's scale (0 in the math part).
    pub max_noise: f64,
    /// The tensor with the largest error relative to its tolerance.
    pub worst: String,
    /// The largest error relative to its bound (over 1 fails).
    pub worst_ratio: f64,
    /// Tensors that failed their tolerance, with the failing element's index, value and
    /// expected value.
    pub failed: Vec<String>,
    /// Tensors whose bound is wider than [`JUDGE_LIMIT`](super::JUDGE_LIMIT) of their scale.
    pub blind: Vec<Blind>,
    /// Tensors whose noise floor exceeds [`UNJUDGED`] of their scale: not judged.
    pub unjudged: Vec<Blind>,
    /// The tolerance the group was checked with.
    pub tolerance: Tolerance,
}

impl GroupResult {
    /// True if every tensor of the group passed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The decisions of one gate that differ between the device and the float64 model.
#[derive(Clone, Debug)]
pub struct GateDiff {
    /// The gate (`relu`, `maxpool`, `layerS.I.bn1`, `layerS.I.bn2`, `layerS.I.out`).
    pub gate: String,
    /// How many of its decisions differ.
    pub differ: usize,
    /// How many decisions it took.
    pub total: usize,
    /// ReLU: the smallest |float64 pre-activation| among the differing ones (NaN for
    /// the max pool).
    pub min_pre: f64,
    /// ReLU: the largest |float64 pre-activation| of the gate (its scale).
    pub scale: f64,
}

/// Decisions the device took otherwise than the float64 model, per forward pass.
#[derive(Clone, Debug, Default)]
pub struct DecisionReport {
    /// The eval forward's.
    pub eval: Vec<GateDiff>,
    /// The train forward's.
    pub train: Vec<GateDiff>,
    /// Decisions taken in all (both passes).
    pub total: usize,
}

/// What `verify` found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The math part (prunekit's float64 against PyTorch's), one result per group; empty
    /// when there is no reference (differential checks).
    pub math: Vec<GroupResult>,
    /// The precision part (the device against float64 with its decisions).
    pub precision: Vec<GroupResult>,
    /// Where the device's decisions differ from the float64 model's own.
    pub decisions: DecisionReport,
    /// The name of the device that ran the model ([`Device::name`](crate::Device::name)).
    pub device: String,
    /// The precision the model ran in.
    pub precision_kind: PrecisionKind,
    /// ReLU decisions of the float64 model that the stored input's rounding leaves open.
    pub undecided: Vec<Undecided>,
    /// Those of them that PyTorch's expectations match only when flipped.
    pub flipped: Vec<Undecided>,
}

impl Report {
    /// The tensors that were not judged (see [`UNJUDGED`]), in either part.
    pub fn unjudged(&self) -> usize {
        self.math.iter().chain(&self.precision).map(|g| g.unjudged.len()).sum()
    }

    /// True if every group of both parts passed (tensors not judged do not fail).
    pub fn ok(&self) -> bool {
        self.math.iter().chain(&self.precision).all(GroupResult::ok)
    }

    /// The groups that failed in either part (each once, in order).
    pub fn failed_groups(&self) -> Vec<Group> {
        let mut v: Vec<Group> = self.math.iter().chain(&self.precision).filter(|g| !g.ok()).map(|g| g.group).collect();
        v.sort();
        v.dedup();
        v
    }
}

fn write_groups(f: &mut std::fmt::Formatter<'_>, groups: &[GroupResult], noise: bool) -> std::fmt::Result {
    for g in groups {
        if g.tensors > 0 && g.unjudged.len() == g.tensors {
            writeln!(
                f,
                "--   {:<30} {:>4} tensors  not judged (noise floor {:.1e} x scale)",
                g.group.name(),
                g.tensors,
                g.max_noise
            )?;
            continue;
        }
        write!(
            f,
            "{:<4} {:<30} {:>4} tensors  max err {:.1e} x scale (abs {:.2e})",
            if g.ok() { "ok" } else { "FAIL" },
            g.group.name(),
            g.tensors,
            g.max_scaled,
            g.max_abs,
        )?;
        if noise {
            write!(f, "  noise floor {:.1e} x scale", g.max_noise)?;
        }
        write!(f, "  worst {} at {:.2} of its bound", g.worst, g.worst_ratio)?;
        if !g.unjudged.is_empty() {
            write!(f, "  ({} not judged)", g.unjudged.len())?;
        }
        writeln!(f)?;
        for t in &g.failed {
            writeln!(f, "     off: {t}")?;
        }
    }
    Ok(())
}

fn write_gates(f: &mut std::fmt::Formatter<'_>, pass: &str, diffs: &[GateDiff]) -> std::fmt::Result {
    if diffs.is_empty() {
        return writeln!(f, "  {pass} forward: every ReLU and max-pool decision as in float64");
    }
    let n: usize = diffs.iter().map(|d| d.differ).sum();
    let relu_min = diffs.iter().filter(|d| !d.min_pre.is_nan()).min_by(|a, b| a.min_pre.total_cmp(&b.min_pre));
    write!(f, "  {pass} forward: {n} decisions differ at {} gates", diffs.len())?;
    if let Some(d) = relu_min {
        write!(f, "; smallest |pre-activation| {:.1e} ({:.1e} of {}'s scale)", d.min_pre, d.min_pre / d.scale, d.gate)?;
    }
    writeln!(f)?;
    for d in diffs {
        if d.min_pre.is_nan() {
            writeln!(f, "     {}: {} of {} maxima", d.gate, d.differ, d.total)?;
        } else {
            writeln!(
                f,
                "     {}: {} of {} ReLU decisions, |pre-activation| >= {:.1e}",
                d.gate, d.differ, d.total, d.min_pre
            )?;
        }
    }
    Ok(())
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.math.is_empty() {
            writeln!(
                f,
                "the math: prunekit's float64 model against PyTorch's float64 (|err| <= {:e} * scale + {:e} * |expected|)",
                MATH.atol, MATH.rtol
            )?;
            write_groups(f, &self.math, true)?;
            if !self.undecided.is_empty() {
                write!(
                    f,
                    "  {} ReLU decisions lie within the float32 input's rounding of their kink (PyTorch computed from the float64 input): ",
                    self.undecided.len()
                )?;
                if !self.flipped.is_empty() {
                    let names: Vec<String> = self
                        .flipped
                        .iter()
                        .map(|u| format!("{} {}[{}] (pre-activation {:.1e})", u.pass, u.gate, u.element, u.pre))
                        .collect();
                    writeln!(
                        f,
                        "PyTorch's expectations match with {} of them on the other side: {}",
                        names.len(),
                        names.join(", ")
                    )?;
                } else if self.math.iter().all(GroupResult::ok) {
                    writeln!(f, "PyTorch's expectations match prunekit's own decisions")?;
                } else {
                    writeln!(
                        f,
                        "no flip of the {} likeliest (in {MAX_FLIP_RUNS} runs at most) matches PyTorch's expectations either",
                        self.undecided.len().min(MAX_UNDECIDED)
                    )?;
                }
            }
        }
        let t = self.precision.first().map_or(tolerance(self.precision_kind), |g| g.tolerance);
        writeln!(
            f,
            "the precision: {} in {} against float64 with the device's own decisions (|err| <= {:e} * scale + {:e} * |expected| + {} * noise)",
            self.device, self.precision_kind, t.atol, t.rtol, t.k
        )?;
        write_groups(f, &self.precision, true)?;
        writeln!(f, "decisions: the device's against the float64 model's own ({} in all)", self.decisions.total)?;
        write_gates(f, "eval", &self.decisions.eval)?;
        write_gates(f, "train", &self.decisions.train)?;
        if self.decisions.train.iter().chain(&self.decisions.eval).any(|d| d.differ > 0) {
            writeln!(
                f,
                "  (a flipped decision changes the values after it and the gradients before it: the precision part compares with float64 under the same decisions)"
            )?;
        }
        let blind: Vec<&Blind> = self.math.iter().chain(&self.precision).flat_map(|g| &g.blind).collect();
        if !blind.is_empty() {
            writeln!(
                f,
                "cannot judge finely: in {} tensors rounding alone moves values by so much (the network is ill-conditioned there) that an error below the bound is invisible:",
                blind.len()
            )?;
            for b in blind.iter().take(12) {
                writeln!(
                    f,
                    "     {}: bound {:.1}% of its scale (noise {:.2}%)",
                    b.name,
                    100.0 * b.bound,
                    100.0 * b.noise
                )?;
            }
            if blind.len() > 12 {
                writeln!(f, "     ... and {} more", blind.len() - 12)?;
            }
        }
        let unjudged: Vec<&Blind> = self.math.iter().chain(&self.precision).flat_map(|g| &g.unjudged).collect();
        if !unjudged.is_empty() {
            writeln!(
                f,
                "NOT JUDGED: {} tensors, which rounding alone moves by more than {}% of their scale (a reference too ill-conditioned for {}):",
                unjudged.len(),
                100.0 * UNJUDGED,
                self.precision_kind
            )?;
            for b in unjudged.iter().take(12) {
                writeln!(f, "     {}: noise {:.1}% of its scale", b.name, 100.0 * b.noise)?;
            }
            if unjudged.len() > 12 {
                writeln!(f, "     ... and {} more", unjudged.len() - 12)?;
            }
        }
        writeln!(f, "{}", if self.ok() { "PASS" } else { "FAIL" })
    }
}

/// A ReLU decision of the float64 model that the float32 rounding of the stored input
/// could have decided otherwise for PyTorch: |pre-activation| within [`MATH`]`.k` times its
/// change under [`INPUT_ROUNDING`](super::INPUT_ROUNDING).
#[derive(Clone, Debug)]
pub struct Undecided {
    /// "eval" or "train".
    pub pass: &'static str,
    /// The gate (see [`exact::Decisions`](super::exact::Decisions)).
    pub gate: String,
    /// The element (NHWC index).
    pub element: usize,
    /// Its float64 pre-activation.
    pub pre: f64,
    /// Its change when the input is perturbed by float32's rounding.
    pub sensitivity: f64,
    /// (pass 0 eval / 1 train, gate index) for flipping.
    pub(super) at: (usize, usize),
}
