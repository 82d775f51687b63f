//! `prunekit verify`: checks the training stack on a device against a reference file that
//! PyTorch wrote (kind = model; format in tests/data/README.md).
//!
//! It builds the model the file holds and compares, in order: the eval-mode logits; the
//! train-mode logits and loss; every gradient; BN's running statistics after the train
//! forward; every parameter after one SGD step with the file's lr, momentum and weight
//! decay. A tensor passes when every element satisfies
//! `|got - expected| <= atol * scale + rtol * |expected| + K * noise`, where `scale` is
//! the largest |expected| of that tensor and `noise` its floating-point noise floor: the
//! largest difference between two runs of the same model whose inputs differ by rounding
//! noise (a relative 2^-21 in f32, 2^-8 in bf16). A well-conditioned tensor has a noise
//! floor near the last bits of its precision, so its bound stays tight; where the network
//! amplifies rounding (batch norm over two values per channel, as in the narrow ResNet50
//! reference's last stage, where PyTorch's own float32 is off by 9% of the gradients'
//! scale), the bound grows with what any implementation in that precision must show.
//! The eval logits (no batch statistics, well conditioned) use the fixed part only.
//! In f32 the loss's noise floor is a few ulps, so a 1% error in the loss fails by far.

use crate::device::Device;
use crate::model::{BnConfig, Model, PrecisionKind, Sgd, StateDict, Tensor};
use crate::{ensure, invalid, Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Tolerances of one group of tensors: `atol * scale + rtol * |expected| + k * noise`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Absolute tolerance, as a fraction of the tensor's scale (its largest |expected|).
    pub atol: f64,
    /// Relative tolerance, a fraction of each element's |expected|.
    pub rtol: f64,
    /// Multiple of the noise floor (0 for groups checked without one).
    pub k: f64,
}

/// Tolerances per group and precision. In f32 a 1% error in the loss fails by a factor
/// of 100; bf16 rounds every activation to 8 bits of mantissa, hence its looser bounds.
pub fn tolerance(group: Group, precision: PrecisionKind) -> Tolerance {
    use Group::*;
    let (atol, rtol) = match precision {
        PrecisionKind::F32 => (1e-5, 1e-4),
        PrecisionKind::Bf16 => (2e-2, 2e-2),
    };
    match group {
        EvalLogits => Tolerance { atol, rtol, k: 0.0 },
        TrainLogits | Loss | Gradients | RunningStats | Step => Tolerance { atol, rtol, k: NOISE_MULTIPLE },
    }
}

/// How many noise floors an element may be off.
pub const NOISE_MULTIPLE: f64 = 25.0;

/// The relative perturbation of the input that measures the noise floor.
fn perturbation(precision: PrecisionKind) -> f32 {
    match precision {
        PrecisionKind::F32 => 1.0 / (1 << 21) as f32,
        PrecisionKind::Bf16 => 1.0 / (1 << 8) as f32,
    }
}

/// The groups of tensors that verify reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// The eval-mode logits (running statistics); checked without a noise floor.
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

/// The result of one group.
#[derive(Clone, Debug)]
pub struct GroupResult {
    /// Which group.
    pub group: Group,
    /// The number of tensors compared.
    pub tensors: usize,
    /// The largest |got - expected| over every element (infinite if any is NaN).
    pub max_abs: f64,
    /// The largest |got - expected| / |expected| over the elements whose expected value is
    /// not zero.
    pub max_rel: f64,
    /// The largest error relative to its tensor's scale (max |got - expected| over a
    /// tensor divided by its largest |expected|).
    pub max_scaled: f64,
    /// The largest noise floor relative to its tensor's scale.
    pub max_noise: f64,
    /// The tensor with the largest error relative to its tolerance.
    pub worst: String,
    /// Tensors that failed their tolerance.
    pub failed: Vec<String>,
    /// The tolerance the group was checked with.
    pub tolerance: Tolerance,
}

impl GroupResult {
    /// True if every tensor of the group passed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What `verify` found.
#[derive(Clone, Debug)]
pub struct Report {
    /// One result per group, in the order of [`Group`].
    pub groups: Vec<GroupResult>,
    /// The name of the device that ran the model ([`Device::name`]).
    pub device: String,
    /// The precision the model ran in.
    pub precision: PrecisionKind,
}

impl Report {
    /// True if every group passed.
    pub fn ok(&self) -> bool {
        self.groups.iter().all(GroupResult::ok)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for g in &self.groups {
            writeln!(
                f,
                "{:<4} {:<30} {:>4} tensors  max abs err {:.2e}  max rel err {:.2e}  max err {:.1e} x scale  noise floor {:.1e} x scale  (worst: {})",
                if g.ok() { "ok" } else { "FAIL" },
                g.group.name(),
                g.tensors,
                g.max_abs,
                g.max_rel,
                g.max_scaled,
                g.max_noise,
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
                max_scaled: 0.0,
                max_noise: 0.0,
                worst: "-".into(),
                failed: Vec::new(),
                tolerance,
            },
            worst_ratio: -1.0,
        }
    }

    /// Compares `got` with `want`; `twin` is the same tensor from the perturbed run
    /// (None: no noise floor).
    fn compare(&mut self, name: &str, got: &[f32], want: &[f32], twin: Option<&[f32]>) -> Result<()> {
        ensure!(got.len() == want.len(), "{name}: {} values, the reference has {}", got.len(), want.len());
        let t = self.res.tolerance;
        let scale = want.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
        let noise = match twin {
            Some(b) => got.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())),
            None => 0.0,
        };
        if scale > 0.0 {
            self.res.max_noise = self.res.max_noise.max(noise / scale);
        }
        // err / bound of the worst element; infinite if any element fails (NaN too).
        let mut ratio = 0.0f64;
        let mut worst_err = 0.0f64;
        for (&g, &w) in got.iter().zip(want) {
            let (g, w) = (g as f64, w as f64);
            let err = (g - w).abs();
            let bound = t.atol * scale + t.rtol * w.abs() + t.k * noise;
            if err.is_nan() {
                self.res.max_abs = f64::INFINITY;
                worst_err = f64::INFINITY;
            } else {
                self.res.max_abs = self.res.max_abs.max(err);
                worst_err = worst_err.max(err);
            }
            if w != 0.0 {
                self.res.max_rel = self.res.max_rel.max(err / w.abs());
            }
            let within = err <= bound; // false for NaN
            if !within {
                ratio = f64::INFINITY;
            } else if bound > 0.0 {
                ratio = ratio.max(err / bound);
            }
        }
        if scale > 0.0 {
            self.res.max_scaled = self.res.max_scaled.max(worst_err / scale);
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
    let v = sd
        .metadata
        .get(key)
        .ok_or_else(|| Error::Format { path: path.into(), msg: format!("the reference has no metadata {key:?}") })?;
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

    let images = f32s(&input, "input")?;
    let want = |name: &str| -> Result<&[f32]> {
        let t = expect.tensors.get(name).ok_or_else(|| format_err(format!("no tensor expect.{name}")))?;
        f32s(t, name)
    };
    let acc = |g: Group| Acc::new(g, tolerance(g, precision));

    // The checked run, and its twin on an input perturbed by rounding noise.
    let eps = perturbation(precision);
    let twin_images: Vec<f32> = images
        .iter()
        .enumerate()
        .map(|(i, &v)| v * (1.0 + if (i.wrapping_mul(2654435761) >> 7) & 1 == 1 { eps } else { -eps }))
        .collect();
    let run = |images: &[f32], eval_first: bool| -> Result<Run> {
        let mut model = Model::from_state(dev, &sd, precision)?;
        model.set_bn(bn);
        let mut ws = model.workspace(n, h, w)?;
        model.set_batch(&mut ws, images, Some(targets))?;
        let eval_logits = if eval_first {
            model.forward(&mut ws, false)?;
            model.logits(&ws)?
        } else {
            Vec::new()
        };
        model.forward(&mut ws, true)?;
        let logits = model.logits(&ws)?;
        let loss = model.loss(&ws)?;
        model.backward(&mut ws)?;
        let grads = model.gradients()?;
        let buffers = model.to_state()?;
        model.sgd_step(&sgd)?;
        let stepped = model.to_state()?;
        Ok(Run { eval_logits, logits, loss, grads, buffers, stepped })
    };
    let a = run(images, true)?;
    let b = run(&twin_images, false)?;

    let mut groups = Vec::new();
    let mut g = acc(Group::EvalLogits);
    g.compare("eval_logits", &a.eval_logits, want("eval_logits")?, None)?;
    groups.push(g.res);
    let mut g = acc(Group::TrainLogits);
    g.compare("logits", &a.logits, want("logits")?, Some(&b.logits))?;
    groups.push(g.res);
    let mut g = acc(Group::Loss);
    g.compare("loss", &[a.loss], want("loss")?, Some(&[b.loss]))?;
    groups.push(g.res);

    let mut g = acc(Group::Gradients);
    let expected_grads: BTreeMap<&str, &Tensor> =
        expect.tensors.iter().filter_map(|(k, t)| k.strip_prefix("grad.").map(|p| (p, t))).collect();
    ensure!(
        expected_grads.len() == a.grads.tensors.len(),
        "the reference has {} gradients, the model {}",
        expected_grads.len(),
        a.grads.tensors.len()
    );
    for (name, t) in &a.grads.tensors {
        let e = expected_grads.get(name.as_str()).ok_or_else(|| format_err(format!("no tensor expect.grad.{name}")))?;
        g.compare(name, f32s(t, name)?, f32s(e, name)?, Some(f32s(b.grads.get(name)?, name)?))?;
    }
    groups.push(g.res);

    for (group, prefix, state, twin) in
        [(Group::RunningStats, "buffer.", &a.buffers, &b.buffers), (Group::Step, "step.", &a.stepped, &b.stepped)]
    {
        let mut g = acc(group);
        let mut count = 0;
        for (k, t) in &expect.tensors {
            if let Some(p) = k.strip_prefix(prefix) {
                let got = state.get(p).map_err(|_| format_err(format!("expect.{k} names nothing in the model")))?;
                g.compare(p, f32s(got, p)?, f32s(t, k)?, Some(f32s(twin.get(p)?, p)?))?;
                count += 1;
            }
        }
        ensure!(count > 0, "the reference has no expect.{prefix}* tensors");
        if group == Group::Step {
            ensure!(
                count == a.grads.tensors.len(),
                "the reference has {count} stepped parameters, the model {}",
                a.grads.tensors.len()
            );
        }
        groups.push(g.res);
    }
    Ok(Report { groups, device: dev.name(), precision })
}

/// What one run of the model produced.
struct Run {
    eval_logits: Vec<f32>,
    logits: Vec<f32>,
    loss: f32,
    grads: StateDict,
    buffers: StateDict,
    stepped: StateDict,
}
