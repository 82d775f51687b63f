//! The run files: one JSON file per finished fine-tuning run ([`RunRecord`]), with the plan
//! of the experiment that made it ([`Plan`]).

use super::spec::{BudgetUnit, ModelSpec};
use crate::{ensure, invalid, Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Format version of the run files (3: the stable recipe's settings, the search over
/// every seed, divergence and the steps done in each record).
pub(super) const RUN_FORMAT: u32 = 3;

/// What an experiment runs: its models, budgets and seeds. Run files record the plan they
/// were made under; [`merge`](super::merge) expects the union of the plans it finds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The model specs, in the table's order.
    pub models: Vec<String>,
    /// The budgets in GFLOPs.
    pub budgets: Vec<f64>,
    /// The seeds of the final runs.
    pub seeds: Vec<u64>,
}

impl Plan {
    /// Adds what `other` has and this plan lacks: models in order, budgets and seeds sorted.
    pub fn extend(&mut self, other: &Plan) {
        for m in &other.models {
            if !self.models.contains(m) {
                self.models.push(m.clone());
            }
        }
        for &b in &other.budgets {
            if !self.budgets.contains(&b) {
                self.budgets.push(b);
            }
        }
        for &s in &other.seeds {
            if !self.seeds.contains(&s) {
                self.seeds.push(s);
            }
        }
        self.budgets.sort_by(f64::total_cmp);
        self.seeds.sort_unstable();
    }
}

/// What a fine-tuning run is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// A learning-rate search run: trained on the search split, evaluated on the held-out part.
    Search,
    /// A fine-tuning run on the target's training data, evaluated on its validation split.
    Final,
}

/// One finished fine-tuning run: the file the runs folder holds for it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Format version.
    pub format: u32,
    /// Search or final.
    pub kind: RunKind,
    /// The model spec (`dense`, `filters:0.5`).
    pub model: String,
    /// `dense`, `filters` or `channels`.
    pub mode: String,
    /// The sparsity (0 for dense).
    pub sparsity: f64,
    /// The budget in GFLOPs (NaN, written "NaN", for a time budget).
    #[serde(with = "lossy_f64")]
    pub budget_gflops: f64,
    /// The budget in seconds of training time (a time budget only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<f64>,
    /// The seed.
    pub seed: u64,
    /// The peak learning rate.
    pub lr: f64,
    /// Steps the budget allowed (the schedule's length).
    pub steps: u64,
    /// Steps run: `steps`, or fewer when the run diverged.
    pub steps_done: u64,
    /// The first `head_steps` steps trained the classifier only.
    pub head_steps: u64,
    /// Training compute spent, in GFLOPs (at most the budget).
    pub train_gflops: f64,
    /// Training FLOPs per image of this model, in GFLOPs.
    pub train_gflops_per_image: f64,
    /// Training FLOPs per image of a head-only step (the forward and the classifier's
    /// backward), in GFLOPs.
    pub head_gflops_per_image: f64,
    /// Parameters of the model.
    pub params: usize,
    /// Top-1 error on the evaluation split (the held-out part for a search run).
    pub val_error: f64,
    /// Mean cross-entropy there (not finite for some diverged runs: written as a string).
    #[serde(with = "lossy_f64")]
    pub val_loss: f64,
    /// Images evaluated.
    pub val_images: usize,
    /// The loss of the last training step applied.
    #[serde(with = "lossy_f64")]
    pub last_train_loss: f64,
    /// The loss of the first training step.
    #[serde(with = "lossy_f64")]
    pub first_train_loss: f64,
    /// Why the run diverged (its training loss not finite, or above the divergence factor
    /// times its first loss): it stopped at that step and was evaluated there. None: it
    /// did not.
    pub diverged: Option<String>,
    /// Seconds of training (steps only; evaluation excluded).
    pub wall_s: f64,
    /// Seconds of the final evaluation.
    pub eval_s: f64,
    /// Seconds of the probe that timed the steps of a time budget (0 for GFLOPs).
    pub probe_s: f64,
    /// The device.
    pub device: String,
    /// The experiment's settings (see [`Experiment::settings`](super::Experiment::settings)).
    pub settings: BTreeMap<String, String>,
    /// The plan of the experiment that made the run.
    pub plan: Plan,
}

impl RunRecord {
    /// The record's file name in a runs folder (`b` then the budget in GFLOPs, or `t` then
    /// the budget in seconds).
    pub fn file_name(kind: RunKind, model: &ModelSpec, budget: f64, unit: BudgetUnit, seed: u64, lr: f64) -> String {
        let kind = match kind {
            RunKind::Search => "search",
            RunKind::Final => "final",
        };
        let b = match unit {
            BudgetUnit::Gflops => "b",
            BudgetUnit::Seconds => "t",
        };
        format!("{}-{b}{budget:?}-s{seed}-lr{lr:?}-{kind}.json", model.file_stem())
    }

    /// The budget in the experiment's unit: seconds for a time budget, else GFLOPs.
    pub fn budget(&self) -> f64 {
        self.budget_seconds.unwrap_or(self.budget_gflops)
    }

    /// Reads a run file.
    pub fn read(path: &Path) -> Result<RunRecord> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
        let not_ours = |e: &dyn std::fmt::Display| {
            invalid!("{shown}: not a prunekit transfer run file ({e}); move it out of the runs folder")
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| not_ours(&e))?;
        let format = v.get("format").and_then(|f| f.as_u64()).ok_or_else(|| not_ours(&"no format"))?;
        ensure!(
            format == RUN_FORMAT as u64,
            "{shown}: a run file of format {format}; this prunekit reads format {RUN_FORMAT}{}",
            if format < RUN_FORMAT as u64 {
                " (older runs were made without the stable fine-tuning recipe, the search over every seed and the \
                 divergence record: run the experiment again into another --runs folder)"
            } else {
                " (made by a newer prunekit)"
            }
        );
        serde_json::from_value(v).map_err(|e| not_ours(&e))
    }

    /// Writes the file atomically (a temporary file in the same folder, then a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::limits::write_atomic(path, &(serde_json::to_string_pretty(self).expect("plain values") + "\n"))
    }
}

/// Serde for an f64 that may not be finite: JSON has no NaN or infinity, so those are
/// written as the strings "NaN", "inf" and "-inf" (and read back).
mod lossy_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_str(&x.to_string())
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
        match Num::deserialize(d)? {
            Num::F(x) => Ok(x),
            Num::S(t) => t.parse().map_err(|_| serde::de::Error::custom(format!("not a number: {t:?}"))),
        }
    }
}
