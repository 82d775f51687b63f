//! `prunekit verify`: checks the training stack on a device against a reference file that
//! PyTorch wrote (kind = model; format in tests/data/README.md).
//!
//! It builds the model the file holds and compares, in order: the eval-mode logits; the
//! train-mode logits and loss; every gradient; BN's running statistics after the train
//! forward; every parameter after one SGD step with the file's lr, momentum and weight
//! decay. A tensor passes when every element satisfies
//! `|got - expected| <= atol * scale + rtol * |expected|`, where `scale` is the largest
//! |expected| of that tensor (so that atol is relative to the tensor's size).

use crate::device::Device;
use crate::model::{BnConfig, Model, PrecisionKind, Sgd, StateDict, Tensor};
use crate::{ensure, invalid, Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Tolerances of one group of tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

/// Tolerances per group and precision. In f32 a 1% error in the loss fails by a factor
/// of 100; bf16 rounds every activation to 8 bits of mantissa, hence its looser bounds.
pub fn tolerance(group: Group, precision: PrecisionKind) -> Tolerance {
    use Group::*;
    match precision {
        PrecisionKind::F32 => match group {
            EvalLogits | TrainLogits | Loss => Tolerance { atol: 1e-5, rtol: 1e-4 },
            RunningStats => Tolerance { atol: 1e-5, rtol: 1e-4 },
            Gradients => Tolerance { atol: 1e-4, rtol: 1e-3 },
            Step => Tolerance { atol: 1e-5, rtol: 1e-4 },
        },
        PrecisionKind::Bf16 => match group {
            EvalLogits | TrainLogits | Loss => Tolerance { atol: 5e-2, rtol: 5e-2 },
            RunningStats => Tolerance { atol: 3e-2, rtol: 3e-2 },
            Gradients => Tolerance { atol: 1e-1, rtol: 1e-1 },
            Step => Tolerance { atol: 1e-2, rtol: 1e-2 },
        },
    }
}

/// The groups of tensors that verify reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    EvalLogits,
    TrainLogits,
    Loss,
    Gradients,
    RunningStats,
    Step,
}

impl Group {
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

/// The result of one group.
#[derive(Clone, Debug)]
pub struct GroupResult {
    pub group: Group,
    pub tensors: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    /// The tensor with the largest error relative to its tolerance.
    pub worst: String,
    /// Tensors that failed their tolerance.
    pub failed: Vec<String>,
    pub tolerance: Tolerance,
}

impl GroupResult {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What `verify` found.
#[derive(Clone, Debug)]
pub struct Report {
    pub groups: Vec<GroupResult>,
    pub device: String,
    pub precision: PrecisionKind,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.groups.iter().all(GroupResult::ok)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for g in &self.groups {
            writeln!(
                f,
                "{:<4} {:<32} {:>4} tensors  max abs err {:.3e}  max rel err {:.3e}  (atol {:.0e} x scale, rtol {:.0e}; worst: {})",
                if g.ok() { "ok" } else { "FAIL" },
                g.group.name(),
                g.tensors,
                g.max_abs,
                g.max_rel,
                g.tolerance.atol,
                g.tolerance.rtol,
                g.worst
            )?;
            for t in &g.failed {
                writeln!(f, "     off: {t}")?;
            }
        }
        Ok(())
    }
}

struct Acc {
    res: GroupResult,
    worst_ratio: f64,
}

impl Acc {
    fn new(group: Group, tolerance: Tolerance) -> Acc {
        Acc {
            res: GroupResult {
                group,
                tensors: 0,
                max_abs: 0.0,
                max_rel: 0.0,
                worst: "-".into(),
                failed: Vec::new(),
                tolerance,
            },
            worst_ratio: -1.0,
        }
    }

    fn compare(&mut self, name: &str, got: &[f32], want: &[f32]) -> Result<()> {
        ensure!(got.len() == want.len(), "{name}: {} values, the reference has {}", got.len(), want.len());
        let t = self.res.tolerance;
        let scale = want.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
        // err / bound of the worst element; infinite if any element fails (NaN too).
        let mut ratio = 0.0f64;
        for (&g, &w) in got.iter().zip(want) {
            let (g, w) = (g as f64, w as f64);
            let err = (g - w).abs();
            let bound = t.atol * scale + t.rtol * w.abs();
            if err.is_nan() {
                self.res.max_abs = f64::INFINITY;
            } else {
                self.res.max_abs = self.res.max_abs.max(err);
            }
            if w != 0.0 {
                self.res.max_rel = self.res.max_rel.max(err / w.abs());
            }
            if !(err <= bound) {
                ratio = f64::INFINITY;
            } else if bound > 0.0 {
                ratio = ratio.max(err / bound);
            }
        }
        self.res.tensors += 1;
        if ratio > self.worst_ratio {
            self.worst_ratio = ratio;
            self.res.worst = name.to_string();
        }
        if ratio.is_infinite() {
            self.res.failed.push(name.to_string());
        }
        Ok(())
    }
}

fn meta<T: std::str::FromStr>(sd: &StateDict, key: &str, path: &str) -> Result<T> {
    let v = sd.metadata.get(key).ok_or_else(|| Error::Format {
        path: path.into(),
        msg: format!("the reference has no metadata {key:?}"),
    })?;
    v.parse().map_err(|_| Error::Format { path: path.into(), msg: format!("metadata {key} = {v:?} is not a number") })
}

fn f32s<'a>(t: &'a Tensor, name: &str) -> Result<&'a [f32]> {
    t.as_f32().ok_or_else(|| invalid!("{name} is not F32"))
}

/// Runs every check of a model reference file on `dev`.
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
    let (n, h, w) = (input.shape[0], input.shape[2], input.shape[3]);
    let targets = target.as_i64().ok_or_else(|| format_err("target must be I64".into()))?;
    let sgd = Sgd {
        lr: meta(&sd, "lr", &shown)?,
        momentum: meta(&sd, "momentum", &shown)?,
        weight_decay: meta(&sd, "weight_decay", &shown)?,
    };
    let bn = BnConfig { momentum: meta(&sd, "bn_momentum", &shown)?, eps: meta(&sd, "bn_eps", &shown)? };

    let mut model = Model::from_state(dev, &sd, precision)?;
    model.set_bn(bn);
    let mut ws = model.workspace(n, h, w)?;
    model.set_batch(&mut ws, f32s(&input, "input")?, Some(targets))?;
    let want = |name: &str| -> Result<&[f32]> {
        let t = expect.tensors.get(name).ok_or_else(|| format_err(format!("no tensor expect.{name}")))?;
        f32s(t, name)
    };
    let acc = |g: Group| Acc::new(g, tolerance(g, precision));

    let mut groups = Vec::new();
    model.forward(&mut ws, false)?;
    let mut a = acc(Group::EvalLogits);
    a.compare("eval_logits", &model.logits(&ws)?, want("eval_logits")?)?;
    groups.push(a.res);

    model.forward(&mut ws, true)?;
    let mut a = acc(Group::TrainLogits);
    a.compare("logits", &model.logits(&ws)?, want("logits")?)?;
    groups.push(a.res);
    let mut a = acc(Group::Loss);
    a.compare("loss", &[model.loss(&ws)?], want("loss")?)?;
    groups.push(a.res);

    model.backward(&mut ws)?;
    let grads = model.gradients()?;
    let mut a = acc(Group::Gradients);
    let mut expected_grads: BTreeMap<&str, &Tensor> = BTreeMap::new();
    for (k, t) in &expect.tensors {
        if let Some(p) = k.strip_prefix("grad.") {
            expected_grads.insert(p, t);
        }
    }
    ensure!(
        expected_grads.len() == grads.tensors.len(),
        "the reference has {} gradients, the model {}",
        expected_grads.len(),
        grads.tensors.len()
    );
    for (name, t) in &grads.tensors {
        let e = expected_grads.get(name.as_str()).ok_or_else(|| format_err(format!("no tensor expect.grad.{name}")))?;
        a.compare(name, f32s(t, name)?, f32s(e, name)?)?;
    }
    groups.push(a.res);

    let state = model.to_state()?;
    let mut a = acc(Group::RunningStats);
    let mut count = 0;
    for (k, t) in &expect.tensors {
        if let Some(b) = k.strip_prefix("buffer.") {
            let got = state.get(b).map_err(|_| format_err(format!("expect.{k} names no buffer of the model")))?;
            a.compare(b, f32s(got, b)?, f32s(t, k)?)?;
            count += 1;
        }
    }
    ensure!(count > 0, "the reference has no expect.buffer.* tensors");
    groups.push(a.res);

    model.sgd_step(&sgd)?;
    let state = model.to_state()?;
    let mut a = acc(Group::Step);
    let mut count = 0;
    for (k, t) in &expect.tensors {
        if let Some(p) = k.strip_prefix("step.") {
            let got = state.get(p).map_err(|_| format_err(format!("expect.{k} names no parameter of the model")))?;
            a.compare(p, f32s(got, p)?, f32s(t, k)?)?;
            count += 1;
        }
    }
    ensure!(count == grads.tensors.len(), "the reference has {count} stepped parameters, the model {}", grads.tensors.len());
    groups.push(a.res);

    Ok(Report { groups, device: dev.name(), precision })
}
