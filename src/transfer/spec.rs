//! What an experiment compares: model specs (`dense`, `filters:0.5`, `channels:0.25`),
//! budgets, seeds, learning rates, and the shard of the (model, budget) pairs a process runs.

use crate::prune::{Mode, Sparsity};
use crate::train::Length;
use crate::{ensure, invalid, Error, Result};
use std::fmt;
use std::str::FromStr;

/// One model of the comparison: the pretrained network, dense or pruned zero-shot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// `None` for the dense model.
    pub prune: Option<(Mode, Sparsity)>,
}

impl ModelSpec {
    /// The dense model.
    pub const DENSE: ModelSpec = ModelSpec { prune: None };

    /// `dense`, `filters` or `channels`.
    pub fn mode(&self) -> String {
        self.prune.map_or("dense".to_string(), |(m, _)| m.to_string())
    }

    /// The sparsity (0 for dense).
    pub fn sparsity(&self) -> f64 {
        self.prune.map_or(0.0, |(_, s)| s.as_f64())
    }

    /// A name that is safe in a file name: `dense`, `filters-0.5`.
    pub fn file_stem(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prune {
            None => f.write_str("dense"),
            Some((m, s)) => write!(f, "{m}:{s}"),
        }
    }
}

impl FromStr for ModelSpec {
    type Err = Error;
    /// `dense`, or `MODE:SPARSITY` with MODE `filters` or `channels` and SPARSITY in (0, 1).
    fn from_str(s: &str) -> Result<ModelSpec> {
        let t = s.trim();
        if t == "dense" {
            return Ok(ModelSpec::DENSE);
        }
        let (m, sp) = t.split_once(':').ok_or_else(|| {
            invalid!("model '{t}': expected dense, filters:SPARSITY or channels:SPARSITY (e.g. filters:0.5)")
        })?;
        let mode: Mode = m.parse().map_err(|_| invalid!("model '{t}': the mode must be filters or channels"))?;
        let sparsity: Sparsity = sp.parse().map_err(|e| invalid!("model '{t}': {e}"))?;
        ensure!(sparsity != Sparsity::ZERO, "model '{t}': sparsity 0 is the dense model; write dense");
        Ok(ModelSpec { prune: Some((mode, sparsity)) })
    }
}

/// Parses a comma-separated list of model specs; an empty list or a repeated model is an error.
pub fn parse_models(s: &str) -> Result<Vec<ModelSpec>> {
    let models = s.split(',').filter(|t| !t.trim().is_empty()).map(str::parse).collect::<Result<Vec<ModelSpec>>>()?;
    ensure!(!models.is_empty(), "--models names no model");
    for (i, m) in models.iter().enumerate() {
        ensure!(!models[..i].contains(m), "--models names {m} twice");
    }
    Ok(models)
}

/// Parses a comma-separated list of positive, finite, distinct numbers (`flag` names the
/// option in messages).
pub fn parse_positive_list(flag: &str, s: &str) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let x: f64 = t.parse().map_err(|_| invalid!("{flag}: '{t}' is not a number"))?;
        ensure!(x.is_finite() && x > 0.0, "{flag}: {t} must be positive and finite");
        ensure!(!v.contains(&x), "{flag}: {t} is given twice");
        v.push(x);
    }
    ensure!(!v.is_empty(), "{flag} gives no value");
    Ok(v)
}

/// The part of the (model, budget) pairs one process runs: every `count`-th pair from
/// `index` (0-based), so that a scheduler can spread an experiment over machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, in 0..count.
    pub index: usize,
    /// Shards in all.
    pub count: usize,
}

impl Shard {
    /// The whole experiment.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether pair number `pair` (models outer, budgets inner) is this shard's.
    pub fn owns(&self, pair: usize) -> bool {
        pair % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = Error;
    /// `I/N` with 0 <= I < N, e.g. `0/4` (a Slurm array's `$SLURM_ARRAY_TASK_ID/4`).
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || invalid!("--shard '{s}': expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        ensure!(count >= 1 && index < count, "--shard {s}: I must be in 0..N (0-based), and N at least 1");
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What an experiment's budgets count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BudgetUnit {
    /// Training compute in GFLOPs.
    #[default]
    Gflops,
    /// Seconds of training on the device.
    Seconds,
}

impl BudgetUnit {
    /// The run length of budget `b`.
    pub fn length(self, b: f64) -> Length {
        match self {
            BudgetUnit::Gflops => Length::Gflops(b),
            BudgetUnit::Seconds => Length::Seconds(b),
        }
    }

    /// "GFLOPs" or "s", after a number.
    pub fn suffix(self) -> &'static str {
        match self {
            BudgetUnit::Gflops => "GFLOPs",
            BudgetUnit::Seconds => "s",
        }
    }
}

impl std::fmt::Display for BudgetUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BudgetUnit::Gflops => "gflops",
            BudgetUnit::Seconds => "seconds",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_parse_and_print() {
        let m = parse_models("dense, filters:0.5,channels:.25").unwrap();
        assert_eq!(m[0], ModelSpec::DENSE);
        assert_eq!(m[1].to_string(), "filters:0.5");
        assert_eq!(m[2].to_string(), "channels:0.25");
        assert_eq!(m[2].file_stem(), "channels-0.25");
        assert_eq!(m[1].mode(), "filters");
        assert_eq!(m[2].sparsity(), 0.25);
        for bad in ["", "sparse:0.5", "filters", "filters:1", "filters:-0.1", "filters:0", "dense,dense", "filters:x"] {
            assert!(parse_models(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lists_and_shards() {
        assert_eq!(parse_positive_list("--budgets", "50, 100,200").unwrap(), vec![50.0, 100.0, 200.0]);
        for bad in ["", "0", "-1", "1,1", "nan", "inf", "x"] {
            assert!(parse_positive_list("--budgets", bad).is_err(), "{bad}");
        }
        let s: Shard = "1/3".parse().unwrap();
        assert!(s.owns(1) && s.owns(4) && !s.owns(0) && !s.owns(2));
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
