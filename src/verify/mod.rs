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

mod compare;
pub mod exact;
mod policy;
mod report;

pub use policy::{
    noise_perturbation, tolerance, Tolerance, INPUT_ROUNDING, JUDGE_LIMIT, MATH, MAX_FLIP_RUNS, MAX_UNDECIDED,
    NOISE_MULTIPLE, TWINS, UNJUDGED,
};
pub use report::{Blind, DecisionReport, GateDiff, Group, GroupResult, Report, Undecided};

use crate::device::Device;
use crate::model::{BnConfig, BnFusion, Model, PrecisionKind, Sgd, StateDict, Tensor};
use crate::{ensure, invalid, Error, Result};
use compare::{compare_all, decision_diffs, f64s, state_f64, Values};
use exact::{Decisions, Exact, Forced, Hyper, Outcome, Perturb};
use std::collections::BTreeMap;
use std::path::Path;

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
    /// The BN fusions of the device's train step (kernel devices).
    pub fusion: BnFusion,
}

/// The device's run: the same sequence as [`Exact::run`], with the decisions read off
/// its activations.
fn device_run(
    dev: &Device,
    sd: &StateDict,
    precision: PrecisionKind,
    step: &Step,
) -> Result<(Values, Decisions, Decisions)> {
    let Step { images, dims, targets, sgd, bn, fusion } = *step;
    let (n, h, w) = dims;
    let mut model = Model::from_state(dev, sd, precision)?;
    model.set_bn(bn);
    model.set_bn_fusion(fusion);
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
    let Step { images, dims, targets, sgd, bn, .. } = *step;
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
/// precision part on the device, whose train step folds `fusion` into its convolutions.
pub fn verify(path: &Path, dev: &Device, precision: PrecisionKind, fusion: BnFusion) -> Result<Report> {
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
    let step = Step { images, dims, targets, sgd, bn, fusion };
    let mut report = check_device(&exact, &own, &sd, dev, precision, &step)?;
    report.math = math;
    report.undecided = undecided;
    report.flipped = flipped;
    Ok(report)
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
