//! Checkpoints: one safetensors file with the model (`model.<name>`, torchvision's names,
//! `keep.*` included), SGD's momentum buffers (`momentum.<name>`), and as metadata the
//! step, the loader's position, the elapsed time and the settings that fix the run's
//! trajectory (batch, size, seed, schedule, ...). Every random choice of a run comes from
//! the seed and counters (the loader's shuffles and augmentations are seeded by seed,
//! epoch and sample), so the seed and the loader's position are the whole RNG state.
//! Written atomically through [`StateDict::write`].

use crate::data::Position;
use crate::model::{StateDict, Tensor};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

const FORMAT: &str = "prunekit-checkpoint/1";

/// Where a run stands.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    /// Training steps done.
    pub step: u64,
    /// Where the training loader continues.
    pub position: Position,
    /// Seconds of training so far (wall clock, over every part of an interrupted run).
    pub wall_s: f64,
}

/// A run's state between two steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model, torchvision's names (with `keep.*` for a pruned one) and its metadata.
    pub state: StateDict,
    /// SGD's momentum buffers, named and shaped like the parameters.
    pub momentum: StateDict,
    /// Step, loader position and time.
    pub progress: Progress,
    /// The settings that fix the run's trajectory, compared on resume.
    pub settings: BTreeMap<String, String>,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

impl Checkpoint {
    /// Writes the checkpoint (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut sd = StateDict::default();
        for (n, t) in &self.state.tensors {
            sd.tensors.insert(format!("model.{n}"), t.clone());
        }
        for (n, t) in &self.momentum.tensors {
            sd.tensors.insert(format!("momentum.{n}"), t.clone());
        }
        let p = &self.progress;
        let m = &mut sd.metadata;
        m.insert("format".into(), FORMAT.into());
        m.insert("step".into(), p.step.to_string());
        m.insert("epoch".into(), p.position.epoch.to_string());
        m.insert("index".into(), p.position.index.to_string());
        m.insert("wall_s".into(), format!("{:?}", p.wall_s));
        m.insert("settings".into(), serde_json::to_string(&self.settings).expect("strings"));
        m.insert("model_metadata".into(), serde_json::to_string(&self.state.metadata).expect("strings"));
        sd.write(path)
    }

    /// Reads a checkpoint that [`write`](Self::write) wrote.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let mut sd = StateDict::read(path)?;
        let m = &sd.metadata;
        if m.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(path, format!("not a prunekit checkpoint (no metadata format = {FORMAT})")));
        }
        let num = |k: &str| -> Result<u64> {
            m.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(path, format!("checkpoint metadata {k} is missing")))
        };
        let progress = Progress {
            step: num("step")?,
            position: Position { epoch: num("epoch")?, index: num("index")? as usize },
            wall_s: m.get("wall_s").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        };
        let json = |k: &str| -> Result<BTreeMap<String, String>> {
            serde_json::from_str(m.get(k).map_or("{}", String::as_str))
                .map_err(|e| bad(path, format!("checkpoint metadata {k}: {e}")))
        };
        let settings = json("settings")?;
        let model_meta = json("model_metadata")?;
        let mut state = sd.split_prefix("model.");
        state.metadata = model_meta;
        let momentum = sd.split_prefix("momentum.");
        if let Some(n) = sd.tensors.keys().next() {
            return Err(bad(path, format!("unexpected tensor {n} in a checkpoint")));
        }
        Ok(Checkpoint { state, momentum, progress, settings })
    }

    /// The first tensor (model or momentum) with a non-finite value, if any.
    pub fn first_non_finite(&self) -> Option<String> {
        let bad = |t: &Tensor| t.as_f32().is_some_and(|v| v.iter().any(|x| !x.is_finite()));
        self.state.tensors.iter().chain(&self.momentum.tensors).find(|(_, t)| bad(t)).map(|(n, _)| n.clone())
    }
}

/// Compares the settings saved with a checkpoint to those of the run that resumes it;
/// a difference is an error naming every setting that differs.
pub fn check_settings(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>, path: &Path) -> Result<()> {
    let mut diffs = Vec::new();
    for (k, v) in now {
        match saved.get(k) {
            Some(s) if s == v => {}
            Some(s) => diffs.push(format!("{k} {s} (now {v})")),
            None => diffs.push(format!("{k} missing (now {v})")),
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(bad(
            path,
            format!("the checkpoint was made with other settings: {}; resume with the same ones", diffs.join(", ")),
        ))
    }
}
