//! `prunekit verify`: checks the training stack on a device against a reference file that
//! PyTorch wrote (kind = model; format in tests/data/README.md).
//!
//! The check has two parts, so that neither ReLU kinks nor ill-conditioning can make a
//! correct run fail or hide a wrong one:
//!
//! 1. **The math**: prunekit's own float64 run of the model on the CPU ([`exact`], an
//!    implementation independent of the training stack) against PyTorch's float64
//!    expectations, held tight ([`MATH`]). In float64 no ReLU or max-pool decision is
//!    decided by rounding (the nearest pre-activations of realistic references are 1e-8
//!    of their scale, eight orders above float64's rounding), so this proves the formulas,
//!    the widths and the wiring, and it sees a 1% error anywhere in the reference.
//! 2. **The precision**: the device's run against prunekit's float64 run made with the
//!    device's own ReLU and max-pool decisions (read off its activations), so a decision
//!    that float32 or bf16 rounding flipped cancels. What is left is rounding, bounded per
//!    element by `atol * scale + rtol * |expected| + K * noise`, where `scale` is the
//!    tensor's largest |expected| and `noise` its largest change when every op of the
//!    float64 run (forced decisions again) is perturbed by a few units of the device's
//!    precision ([`noise_perturbation`]). Where the network amplifies rounding (batch norm
//!    over two values per channel), the bound grows with what any implementation in that
//!    precision must show, and the report names those tensors: errors below their bound
//!    cannot be seen there.
//!
//! The report also says how many ReLU and max-pool decisions the device took otherwise
//! than the float64 model, the smallest |pre-activation| among them, and where.

pub mod exact;

use crate::device::Device;
use crate::model::{BnConfig, Model, PrecisionKind, Sgd, StateDict, Tensor};
use crate::{ensure, invalid, Error, Result};
use exact::{Decision, Decisions, Exact, Forced, Gate, Hyper, Jiggle, Outcome, Perturb};
use std::collections::BTreeMap;
use std::path::Path;

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

/// A tensor whose bound is wider than [`JUDGE_LIMIT`] of its scale.
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
    /// Tensors whose bound is wider than [`JUDGE_LIMIT`] of their scale.
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
    /// The name of the device that ran the model ([`Device::name`]).
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

struct Acc {
    res: GroupResult,
}

impl Acc {
    fn new(group: Group, tolerance: Tolerance) -> Acc {
        Acc {
            res: GroupResult {
                group,
                tensors: 0,
                max_abs: 0.0,
                max_scaled: 0.0,
                max_noise: 0.0,
                worst: "-".into(),
                worst_ratio: 0.0,
                failed: Vec::new(),
                blind: Vec::new(),
                unjudged: Vec::new(),
                tolerance,
            },
        }
    }

    /// Compares `got` with `want`; `noise` is the tensor's noise floor (None: none).
    fn compare(&mut self, name: &str, got: &[f64], want: &[f64], noise: Option<f64>) -> Result<()> {
        ensure!(got.len() == want.len(), "{name}: {} values, the reference has {}", got.len(), want.len());
        let t = self.res.tolerance;
        let scale = want.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
        let judged = noise.is_some();
        let noise = noise.unwrap_or(0.0);
        if scale > 0.0 {
            self.res.max_noise = self.res.max_noise.max(noise / scale);
            let bound = t.atol * scale + t.k * noise;
            let b = Blind { name: name.into(), bound: bound / scale, noise: noise / scale };
            if judged && noise > UNJUDGED * scale {
                self.res.tensors += 1;
                self.res.unjudged.push(b);
                return Ok(());
            }
            if judged && bound > JUDGE_LIMIT * scale {
                self.res.blind.push(b);
            }
        }
        // err / bound of the worst element; infinite if any element fails (NaN too).
        let mut ratio = 0.0f64;
        let mut worst_err = 0.0f64;
        let mut first_bad = None;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs();
            let bound = t.atol * scale + t.rtol * w.abs() + t.k * noise;
            worst_err = if err.is_nan() { f64::INFINITY } else { worst_err.max(err) };
            if err.is_nan() || err > bound {
                ratio = f64::INFINITY;
                first_bad.get_or_insert((i, g, w, bound));
            } else if bound > 0.0 {
                ratio = ratio.max(err / bound);
            }
        }
        self.res.max_abs = self.res.max_abs.max(worst_err);
        if scale > 0.0 {
            self.res.max_scaled = self.res.max_scaled.max(worst_err / scale);
        }
        self.res.tensors += 1;
        if ratio > self.res.worst_ratio || self.res.worst == "-" {
            self.res.worst_ratio = ratio;
            self.res.worst = name.to_string();
        }
        if let Some((i, g, w, b)) = first_bad {
            self.res.failed.push(format!(
                "{name}: element {i} is {g:.6e}, expected {w:.6e} (error {:.1e} x scale, bound {:.1e} x scale)",
                (g - w).abs() / scale.max(f64::MIN_POSITIVE),
                b / scale.max(f64::MIN_POSITIVE)
            ));
        }
        Ok(())
    }
}

/// What a run of the model produced, in float64 (from f32 on a device), for comparison.
struct Values {
    eval_logits: Vec<f64>,
    logits: Vec<f64>,
    loss: f64,
    grads: BTreeMap<String, Vec<f64>>,
    buffers: BTreeMap<String, Vec<f64>>,
    stepped: BTreeMap<String, Vec<f64>>,
}

impl From<&Outcome> for Values {
    fn from(o: &Outcome) -> Values {
        Values {
            eval_logits: o.eval_logits.clone(),
            logits: o.logits.clone(),
            loss: o.loss,
            grads: o.grads.clone(),
            buffers: o.buffers.clone(),
            stepped: o.stepped.clone(),
        }
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn state_f64(sd: &StateDict) -> Result<BTreeMap<String, Vec<f64>>> {
    sd.tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), f64s(t.as_f32().ok_or_else(|| invalid!("{k} is not F32"))?))))
        .collect()
}

/// The largest |a - b|.
fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x - y).abs()))
}

/// How many perturbed twins measure a noise floor (the largest of their differences is
/// taken: one sample of a scalar such as the loss can come out small by chance).
pub const TWINS: u64 = 3;

/// Compares every group of `got` with `want`; `noise` is a float64 run and its perturbed
/// twins, whose largest difference is each tensor's noise floor.
fn compare_all(
    got: &Values,
    want: &Values,
    noise: Option<(&Values, &[Values])>,
    tol: Tolerance,
) -> Result<Vec<GroupResult>> {
    let floor = |f: &dyn Fn(&Values) -> &[f64]| -> Option<f64> {
        noise.map(|(a, tw)| tw.iter().fold(0.0f64, |m, b| m.max(max_diff(f(a), f(b)))))
    };
    let mut out = Vec::new();
    let mut g = Acc::new(Group::EvalLogits, tol);
    g.compare("eval_logits", &got.eval_logits, &want.eval_logits, floor(&|v| &v.eval_logits))?;
    out.push(g.res);
    let mut g = Acc::new(Group::TrainLogits, tol);
    g.compare("logits", &got.logits, &want.logits, floor(&|v| &v.logits))?;
    out.push(g.res);
    let mut g = Acc::new(Group::Loss, tol);
    g.compare("loss", &[got.loss], &[want.loss], floor(&|v| std::slice::from_ref(&v.loss)))?;
    out.push(g.res);
    for (group, sel) in [
        (Group::Gradients, (|v: &Values| &v.grads) as fn(&Values) -> &BTreeMap<String, Vec<f64>>),
        (Group::RunningStats, |v: &Values| &v.buffers),
        (Group::Step, |v: &Values| &v.stepped),
    ] {
        let mut g = Acc::new(group, tol);
        let (w, gv) = (sel(want), sel(got));
        ensure!(!w.is_empty(), "nothing to compare in {}", group.name());
        // A parameter whose gradient is not judged is not judged after the step either:
        // the step carries the gradient's error beyond where it adds up linearly.
        let unjudged_grads: Vec<String> = match group {
            Group::Step => out
                .iter()
                .filter(|r| r.group == Group::Gradients)
                .flat_map(|r| r.unjudged.iter().map(|b| b.name.clone()))
                .collect(),
            _ => Vec::new(),
        };
        for (name, e) in w {
            let v = gv.get(name).ok_or_else(|| invalid!("{}: {name} names nothing in the model", group.name()))?;
            if let Some(b) =
                out.iter().flat_map(|r| &r.unjudged).find(|b| unjudged_grads.contains(&b.name) && &b.name == name)
            {
                let b = Blind { name: name.clone(), bound: f64::INFINITY, noise: b.noise };
                g.res.tensors += 1;
                g.res.unjudged.push(b);
                continue;
            }
            let nz = match noise {
                Some((a, tw)) => {
                    let x = sel(a).get(name).ok_or_else(|| invalid!("internal: no base of {name}"))?;
                    let mut m = 0.0f64;
                    for b in tw {
                        m = m
                            .max(max_diff(x, sel(b).get(name).ok_or_else(|| invalid!("internal: no twin of {name}"))?));
                    }
                    Some(m)
                }
                None => None,
            };
            g.compare(name, v, e, nz)?;
        }
        out.push(g.res);
    }
    Ok(out)
}

/// Where the device's decisions differ from the float64 model's own gates.
fn decision_diffs(own: &[Gate], device: &Decisions) -> Result<(Vec<GateDiff>, usize)> {
    ensure!(own.len() == device.gates.len(), "internal: {} gates against {}", own.len(), device.gates.len());
    let mut out = Vec::new();
    let mut total = 0;
    for (g, (name, d)) in own.iter().zip(&device.gates) {
        ensure!(&g.name == name, "internal: gate {} against {name}", g.name);
        let (differ, n, min_pre, scale) = match (&g.decision, d) {
            (Decision::Relu(a), Decision::Relu(b)) => {
                let mut min = f64::INFINITY;
                let mut k = 0;
                for ((x, y), p) in a.iter().zip(b).zip(&g.pre) {
                    if x != y {
                        k += 1;
                        min = min.min(p.abs());
                    }
                }
                (k, a.len(), min, g.pre.iter().fold(0.0f64, |m, v| m.max(v.abs())))
            }
            (Decision::MaxPool(a), Decision::MaxPool(b)) => {
                (a.iter().zip(b).filter(|(x, y)| x != y).count(), a.len(), f64::NAN, f64::NAN)
            }
            _ => return Err(invalid!("internal: gate {name} of another kind")),
        };
        total += n;
        if differ > 0 {
            out.push(GateDiff { gate: name.clone(), differ, total: n, min_pre, scale });
        }
    }
    Ok((out, total))
}

/// One batch and the settings of one training step: what the device and the float64
/// model both run.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// Images, NCHW f32 `[n, 3, h, w]`.
    pub images: &'a [f32],
    /// (n, h, w).
    pub dims: (usize, usize, usize),
    /// The class of each image.
    pub targets: &'a [i64],
    /// The SGD step's settings.
    pub sgd: Sgd,
    /// Batch norm's momentum and epsilon.
    pub bn: BnConfig,
}

/// The device's run: the same sequence as [`Exact::run`], with the decisions read off
/// its activations.
fn device_run(
    dev: &Device,
    sd: &StateDict,
    precision: PrecisionKind,
    step: &Step,
) -> Result<(Values, Decisions, Decisions)> {
    let Step { images, dims, targets, sgd, bn } = *step;
    let (n, h, w) = dims;
    let mut model = Model::from_state(dev, sd, precision)?;
    model.set_bn(bn);
    let mut ws = model.workspace(n, h, w)?;
    model.set_batch(&mut ws, images, Some(targets))?;
    model.forward(&mut ws, false)?;
    let eval_logits = f64s(&model.logits(&ws)?);
    let eval_dec = exact::decisions_from_relu_outputs(model.arch(), dims, &model.relu_outputs(&ws)?)?;
    model.forward(&mut ws, true)?;
    let logits = f64s(&model.logits(&ws)?);
    let loss = model.loss(&ws)? as f64;
    let train_dec = exact::decisions_from_relu_outputs(model.arch(), dims, &model.relu_outputs(&ws)?)?;
    model.backward(&mut ws)?;
    let grads = state_f64(&model.gradients()?)?;
    let state = state_f64(&model.to_state()?)?;
    let buffers =
        state.into_iter().filter(|(k, _)| k.ends_with(".running_mean") || k.ends_with(".running_var")).collect();
    model.sgd_step(&sgd)?;
    let stepped = state_f64(&model.to_state()?)?;
    Ok((Values { eval_logits, logits, loss, grads, buffers, stepped }, eval_dec, train_dec))
}

/// The precision part on any model and batch: runs `dev` in `precision`, then prunekit's
/// float64 model with the device's decisions (and a perturbed twin for the noise floor),
/// and compares. `own` is the float64 model's run with its own decisions, for the
/// decision report. This is what [`verify`] does after the math part, and what the
/// differential tests run on random networks.
pub fn check_device(
    exact: &Exact,
    own: &Outcome,
    sd: &StateDict,
    dev: &Device,
    precision: PrecisionKind,
    step: &Step,
) -> Result<Report> {
    let (got, eval_dec, train_dec) = device_run(dev, sd, precision, step)?;
    let Step { images, dims, targets, sgd, bn } = *step;
    // The float64 runs use the device's own settings, rounded to f32 as it got them.
    let hp = Hyper::of(&sgd, &bn);
    let forced = Forced { eval: &eval_dec, train: &train_dec };
    let base = exact.run(images, dims, targets, &hp, Some(forced), None)?;
    let twins = (0..TWINS)
        .map(|i| {
            let p = Perturb { seed: noise_perturbation(precision).seed + i, ..noise_perturbation(precision) };
            Ok(Values::from(&exact.run(images, dims, targets, &hp, Some(forced), Some(p))?))
        })
        .collect::<Result<Vec<_>>>()?;
    let base = Values::from(&base);
    let precision_groups = compare_all(&got, &base, Some((&base, &twins)), tolerance(precision))?;
    let (eval, n1) = decision_diffs(&own.eval_gates, &eval_dec)?;
    let (train, n2) = decision_diffs(&own.train_gates, &train_dec)?;
    Ok(Report {
        math: Vec::new(),
        precision: precision_groups,
        decisions: DecisionReport { eval, train, total: n1 + n2 },
        device: dev.name(),
        precision_kind: precision,
        undecided: Vec::new(),
        flipped: Vec::new(),
    })
}

fn meta<T: std::str::FromStr>(sd: &StateDict, key: &str, path: &str) -> Result<T> {
    let v = sd
        .metadata
        .get(key)
        .ok_or_else(|| Error::Format { path: path.into(), msg: format!("the reference has no metadata {key:?}") })?;
    v.parse().map_err(|_| Error::Format { path: path.into(), msg: format!("metadata {key} = {v:?} is not a number") })
}

fn f32s<'a>(t: &'a Tensor, name: &str) -> Result<&'a [f32]> {
    t.as_f32().ok_or_else(|| invalid!("{name} is not F32"))
}

/// Runs every check of a model reference file on `dev`: the math part once, then the
/// precision part on the device.
pub fn verify(path: &Path, dev: &Device, precision: PrecisionKind) -> Result<Report> {
    let shown = path.display().to_string();
    let mut sd = StateDict::read(path)?;
    let format_err = |msg: String| Error::Format { path: shown.clone(), msg };
    match sd.metadata.get("kind").map(String::as_str) {
        Some("model") => {}
        Some(k) => return Err(format_err(format!("a reference of kind {k:?}; verify reads kind = \"model\""))),
        None => return Err(format_err("not a prunekit reference file (no metadata kind)".into())),
    }
    let expect = sd.split_prefix("expect.");
    let input = sd.tensors.remove("input").ok_or_else(|| format_err("no tensor input".into()))?;
    let target = sd.tensors.remove("target").ok_or_else(|| format_err("no tensor target".into()))?;
    ensure!(input.shape.len() == 4 && input.shape[1] == 3, "input must be [N, 3, H, W], got {:?}", input.shape);
    let dims = (input.shape[0], input.shape[2], input.shape[3]);
    let targets = target.as_i64().ok_or_else(|| format_err("target must be I64".into()))?;
    let hp = Hyper {
        bn_momentum: meta(&sd, "bn_momentum", &shown)?,
        bn_eps: meta(&sd, "bn_eps", &shown)?,
        lr: meta(&sd, "lr", &shown)?,
        momentum: meta(&sd, "momentum", &shown)?,
        weight_decay: meta(&sd, "weight_decay", &shown)?,
    };
    let sgd = Sgd { lr: hp.lr as f32, momentum: hp.momentum as f32, weight_decay: hp.weight_decay as f32 };
    let bn = BnConfig { momentum: hp.bn_momentum as f32, eps: hp.bn_eps as f32 };
    let images = f32s(&input, "input")?;

    // PyTorch's expectations, checked for completeness against the model.
    let want = |name: &str| -> Result<Vec<f64>> {
        let t = expect.tensors.get(name).ok_or_else(|| format_err(format!("no tensor expect.{name}")))?;
        Ok(f64s(f32s(t, name)?))
    };
    let section = |prefix: &str| -> Result<BTreeMap<String, Vec<f64>>> {
        expect
            .tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|p| (p, t)))
            .map(|(p, t)| Ok((p.to_string(), f64s(f32s(t, p)?))))
            .collect()
    };
    let loss = want("loss")?;
    ensure!(loss.len() == 1, "expect.loss must hold one value, it holds {}", loss.len());
    let reference = Values {
        eval_logits: want("eval_logits")?,
        logits: want("logits")?,
        loss: loss[0],
        grads: section("grad.")?,
        buffers: section("buffer.")?,
        stepped: section("step.")?,
    };

    let exact = Exact::from_state(&sd)?;
    let params = exact.arch().tensor_specs().into_iter().filter(|s| s.role.is_param()).count();
    for (what, m) in [("gradients", &reference.grads), ("stepped parameters", &reference.stepped)] {
        ensure!(m.len() == params, "the reference has {} {what}, the model {params}", m.len());
    }
    ensure!(!reference.buffers.is_empty(), "the reference has no expect.buffer.* tensors");
    let own = exact.run(images, dims, targets, &hp, None, None)?;
    let (math, undecided, flipped) = math_part(&exact, &own, &reference, images, dims, targets, &hp)?;
    let step = Step { images, dims, targets, sgd, bn };
    let mut report = check_device(&exact, &own, &sd, dev, precision, &step)?;
    report.math = math;
    report.undecided = undecided;
    report.flipped = flipped;
    Ok(report)
}

/// A ReLU decision of the float64 model that the float32 rounding of the stored input
/// could have decided otherwise for PyTorch: |pre-activation| within [`MATH`]`.k` times its
/// change under [`INPUT_ROUNDING`].
#[derive(Clone, Debug)]
pub struct Undecided {
    /// "eval" or "train".
    pub pass: &'static str,
    /// The gate (see [`exact::Decisions`]).
    pub gate: String,
    /// The element (NHWC index).
    pub element: usize,
    /// Its float64 pre-activation.
    pub pre: f64,
    /// Its change when the input is perturbed by float32's rounding.
    pub sensitivity: f64,
    /// (pass 0 eval / 1 train, gate index) for flipping.
    at: (usize, usize),
}

/// The math part: prunekit's float64 run against PyTorch's expectations. Decisions that
/// the stored input's rounding leaves open are tried both ways (at most [`MAX_UNDECIDED`]).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn math_part(
    exact: &Exact,
    own: &Outcome,
    reference: &Values,
    images: &[f32],
    dims: (usize, usize, usize),
    targets: &[i64],
    hp: &Hyper,
) -> Result<(Vec<GroupResult>, Vec<Undecided>, Vec<Undecided>)> {
    let decided = [Decisions::from(own.eval_gates.as_slice()), Decisions::from(own.train_gates.as_slice())];
    let forced = Forced { eval: &decided[0], train: &decided[1] };
    let twins = (0..TWINS)
        .map(|i| {
            exact.run(
                images,
                dims,
                targets,
                hp,
                Some(forced),
                Some(Perturb { seed: INPUT_ROUNDING.seed + i, ..INPUT_ROUNDING }),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut undecided = Vec::new();
    for (pass, gates) in [&own.eval_gates, &own.train_gates].into_iter().enumerate() {
        for (gi, g) in gates.iter().enumerate() {
            for (i, &p) in g.pre.iter().enumerate() {
                let sens = twins.iter().fold(0.0f64, |m, t| {
                    let tg = if pass == 0 { &t.eval_gates } else { &t.train_gates };
                    m.max((p - tg[gi].pre[i]).abs())
                });
                if p.abs() <= MATH.k * sens {
                    undecided.push(Undecided {
                        pass: if pass == 0 { "eval" } else { "train" },
                        gate: g.name.clone(),
                        element: i,
                        pre: p,
                        sensitivity: sens,
                        at: (pass, gi),
                    });
                }
            }
        }
    }
    let values = |o: &Outcome| {
        let mut v = Values::from(o);
        v.stepped.retain(|k, _| reference.stepped.contains_key(k));
        v
    };
    let own_v = values(own);
    let twin_v: Vec<Values> = twins.iter().map(values).collect();
    let groups = compare_all(&own_v, reference, Some((&own_v, &twin_v)), MATH)?;
    if groups.iter().all(GroupResult::ok) || undecided.is_empty() {
        return Ok((groups, undecided, Vec::new()));
    }
    // Try the other side of the likeliest open decisions, fewest flips first.
    let mut likely: Vec<&Undecided> = undecided.iter().collect();
    likely.sort_by(|a, b| (a.pre.abs() / a.sensitivity).total_cmp(&(b.pre.abs() / b.sensitivity)));
    likely.truncate(MAX_UNDECIDED);
    let mut subsets: Vec<u32> = (1..1u32 << likely.len()).collect();
    subsets.sort_by_key(|m| m.count_ones());
    for m in subsets.into_iter().take(MAX_FLIP_RUNS) {
        let pick: Vec<&Undecided> =
            likely.iter().enumerate().filter(|(i, _)| m >> i & 1 == 1).map(|(_, u)| *u).collect();
        let flips = |pass: usize| -> Vec<(usize, usize)> {
            pick.iter().filter(|u| u.at.0 == pass).map(|u| (u.at.1, u.element)).collect()
        };
        let (e, t) = (decided[0].flipped(&flips(0)), decided[1].flipped(&flips(1)));
        let alt = exact.run(images, dims, targets, hp, Some(Forced { eval: &e, train: &t }), None)?;
        let alt_v = values(&alt);
        let g = compare_all(&alt_v, reference, Some((&own_v, &twin_v)), MATH)?;
        if g.iter().all(GroupResult::ok) {
            return Ok((g, undecided.clone(), pick.into_iter().cloned().collect()));
        }
    }
    Ok((groups, undecided, Vec::new()))
}
