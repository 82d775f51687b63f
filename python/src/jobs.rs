//! The CLI's long jobs in-process: `train::train` and `transfer::run_experiment` run on a
//! thread of their own while Python polls them ([`Job::poll`] waits with the GIL released,
//! so Ctrl-C reaches Python between polls), and `train::evaluate`.
//!
//! A job reports the lines its `say` gets, and one event per training step read from its
//! JSON-lines log as the crate writes it. Its interrupt flag is the one
//! `TrainConfig::interrupt` holds: setting it stops the run after the current step, with a
//! checkpoint when one was asked for.

use crate::data::Data;
use crate::state::{prune_config, state_from_py};
use crate::{guarded, panic_text, to_py};
use prunekit::data::{Augment, Loader, LoaderConfig};
use prunekit::model::{Arch, Model, StateDict};
use prunekit::train::{
    self as training, Checkpoint, Head, Length, ModelSource, Outcome, ScheduleKind, Start, TrainConfig,
};
use prunekit::transfer::{self, Experiment, Shard};
use prunekit::Device;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde_json::json;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

enum Msg {
    Line(String),
    Done(Result<String, JobError>),
}

enum JobError {
    Crate(prunekit::Error),
    Panic(String),
}

/// A job running on its own thread.
#[pyclass(module = "prunekit._prunekit", unsendable)]
pub struct Job {
    rx: Receiver<Msg>,
    interrupt: Arc<AtomicBool>,
    log: Option<(PathBuf, u64)>,
    result: Option<Result<String, JobError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Job {
    fn spawn(
        interrupt: Arc<AtomicBool>,
        log: Option<PathBuf>,
        work: impl FnOnce(&mut dyn FnMut(&str)) -> prunekit::Result<String> + Send + 'static,
    ) -> Job {
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || {
            let tx2 = tx.clone();
            let mut say = move |l: &str| {
                let _ = tx2.send(Msg::Line(l.to_string()));
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut say)));
            let r = match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(JobError::Crate(e)),
                Err(p) => Err(JobError::Panic(panic_text(&*p))),
            };
            let _ = tx.send(Msg::Done(r));
        });
        Job { rx, interrupt, log: log.map(|p| (p, 0)), result: None, thread: Some(thread) }
    }

    /// The complete lines the log gained since the last read.
    fn new_log_lines(&mut self) -> Vec<String> {
        let Some((path, offset)) = self.log.as_mut() else { return Vec::new() };
        let Ok(mut f) = std::fs::File::open(&*path) else { return Vec::new() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < *offset {
            *offset = 0; // the log was truncated: a new run
        }
        if f.seek(SeekFrom::Start(*offset)).is_err() {
            return Vec::new();
        }
        let mut text = String::new();
        if f.read_to_string(&mut text).is_err() {
            return Vec::new();
        }
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        *offset += complete as u64;
        text[..complete].lines().map(str::to_string).collect()
    }
}

#[pymethods]
impl Job {
    /// Waits up to `timeout` seconds (GIL released) and returns what happened since the
    /// last poll: `("line", text)` for a message, `("step", json)` for a log record, and
    /// last `("done", "")` once the job ended (then `result()` has its outcome).
    #[pyo3(signature = (timeout=0.05))]
    fn poll(&mut self, py: Python<'_>, timeout: f64) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.result.is_none() {
            let rx = &mut self.rx;
            let wait = Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
            let msgs = py.detach(move || {
                let mut msgs = Vec::new();
                match rx.recv_timeout(wait) {
                    Ok(m) => {
                        msgs.push(m);
                        while let Ok(m) = rx.try_recv() {
                            msgs.push(m);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        msgs.push(Msg::Done(Err(JobError::Panic("the job's thread ended without a result".into()))))
                    }
                }
                msgs
            });
            for m in msgs {
                match m {
                    Msg::Line(l) => out.push(("line".to_string(), l)),
                    Msg::Done(r) => self.result = Some(r),
                }
            }
        }
        out.extend(self.new_log_lines().into_iter().map(|l| ("step".to_string(), l)));
        if self.result.is_some() {
            if let Some(t) = self.thread.take() {
                let _ = py.detach(|| t.join());
            }
            out.push(("done".to_string(), String::new()));
        }
        out
    }

    /// Asks the job to stop after its current step (training writes its checkpoint).
    fn interrupt(&self) {
        self.interrupt.store(true, Ordering::SeqCst);
    }

    /// Whether the job has ended.
    fn finished(&self) -> bool {
        self.result.is_some()
    }

    /// The job's outcome as JSON text; raises the job's error.
    fn result(&self) -> PyResult<String> {
        match &self.result {
            None => Err(PyRuntimeError::new_err("the job is still running")),
            Some(Ok(s)) => Ok(s.clone()),
            Some(Err(JobError::Crate(e))) => Err(to_py(clone_error(e))),
            Some(Err(JobError::Panic(p))) => Err(PyRuntimeError::new_err(format!("prunekit failed internally: {p}"))),
        }
    }
}

/// The error again (the crate's Error is not Clone: its I/O source is rebuilt by kind).
fn clone_error(e: &prunekit::Error) -> prunekit::Error {
    use prunekit::Error;
    match e {
        Error::Io { path, source } => {
            Error::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        Error::Invalid(m) => Error::Invalid(m.clone()),
        Error::Format { path, msg } => Error::Format { path: path.clone(), msg: msg.clone() },
        Error::Data { path, msg } => Error::Data { path: path.clone(), msg: msg.clone() },
        other => Error::Invalid(other.to_string()),
    }
}

/// The recipe options `train` and `transfer` share (the CLI's RecipeArgs).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Recipe {
    batch: usize,
    eval_batch: Option<usize>,
    size: usize,
    momentum: f64,
    wd: f64,
    schedule: String,
    warmup: u64,
    label_smoothing: f64,
    augment: String,
    device: String,
    precision: Option<String>,
    seed: u64,
    threads: usize,
}

impl Recipe {
    fn config(&self, data: &Data) -> PyResult<(Device, TrainConfig)> {
        let dev = crate::device(&self.device)?;
        let precision = crate::precision(self.precision.as_deref(), &dev)?;
        let schedule: ScheduleKind = self.schedule.parse().map_err(to_py)?;
        let augment: Augment = self.augment.parse().map_err(to_py)?;
        Ok((
            dev,
            TrainConfig {
                batch: self.batch,
                eval_batch: self.eval_batch,
                size: self.size,
                momentum: self.momentum,
                weight_decay: self.wd,
                schedule,
                warmup: self.warmup,
                label_smoothing: self.label_smoothing,
                precision,
                seed: self.seed,
                augment,
                norm: data.norm,
                threads: self.threads,
                ..TrainConfig::default()
            },
        ))
    }
}

fn summary_json(o: &Outcome) -> String {
    match o {
        Outcome::Finished(s) => json!({
            "finished": true,
            "steps": s.steps,
            "images": s.images,
            "train_gflops": s.train_gflops,
            "gflops_per_image": s.gflops_per_image,
            "wall_s": s.wall_s,
            "eval_s": s.eval_s,
            "last_loss": s.last_loss,
            "eval": s.eval.map(|e| json!({"images": e.images, "error": e.error, "loss": e.loss})),
        }),
        Outcome::Interrupted { step, checkpoint } => json!({
            "finished": false,
            "step": step,
            "checkpoint": checkpoint.as_ref().map(|p| p.display().to_string()),
        }),
    }
    .to_string()
}

/// Starts `prunekit train` in-process. Returns the job, the run's steps and the notes of
/// the model's preparation (pruning, a replaced classifier).
#[pyfunction]
#[pyo3(signature = (data, recipe, *, weights=None, layers=None, width=None, mode=None, sparsity=None, round_to=8,
    criterion="l1", fresh_head=false, steps=None, epochs=None, budget=None, lr=0.1, eval_every=None, out=None,
    log=None, checkpoint=None, checkpoint_every=None, resume=None, stop_after=None))]
#[allow(clippy::too_many_arguments)]
fn train_start(
    py: Python<'_>,
    data: &Data,
    recipe: Recipe,
    weights: Option<&Bound<'_, PyAny>>,
    layers: Option<[usize; 4]>,
    width: Option<usize>,
    mode: Option<&str>,
    sparsity: Option<&Bound<'_, PyAny>>,
    round_to: usize,
    criterion: &str,
    fresh_head: bool,
    steps: Option<u64>,
    epochs: Option<u64>,
    budget: Option<f64>,
    lr: f64,
    eval_every: Option<f64>,
    out: Option<PathBuf>,
    log: Option<PathBuf>,
    checkpoint: Option<PathBuf>,
    checkpoint_every: Option<u64>,
    resume: Option<PathBuf>,
    stop_after: Option<u64>,
) -> PyResult<(Job, u64, Vec<String>)> {
    crate::catch(|| {
        let length = match (budget, epochs, steps) {
            (Some(g), None, None) => Length::Gflops(g),
            (None, Some(e), None) => Length::Epochs(e),
            (None, None, Some(s)) => Length::Steps(s),
            _ => return Err(PyValueError::new_err("give exactly one of steps, epochs and budget")),
        };
        if fresh_head && weights.is_none() {
            return Err(PyValueError::new_err(
                "fresh_head needs weights (a network from scratch has a fresh classifier already)",
            ));
        }
        if weights.is_some() && (layers.is_some() || width.is_some()) {
            return Err(PyValueError::new_err("layers and width make a network from scratch: not with weights"));
        }
        let prune = match (mode, sparsity) {
            (Some(m), Some(s)) => Some(prune_config(m, s, round_to, criterion)?),
            (None, None) => None,
            _ => return Err(PyValueError::new_err("mode and sparsity go together")),
        };
        let (dev, base) = recipe.config(data)?;
        let interrupt = Arc::new(AtomicBool::new(false));
        let cfg = TrainConfig {
            length,
            lr,
            eval_every,
            checkpoint,
            checkpoint_every,
            log: log.clone(),
            out,
            progress: false,
            interrupt: Some(interrupt.clone()),
            stop_after,
            ..base
        };
        cfg.check().map_err(to_py)?;
        let source = match weights {
            Some(w) => Some(state_from_py(py, w)?),
            None => None,
        };
        let ds = data.ds.clone();
        let seed = recipe.seed;
        let head = if fresh_head { Head::Fresh } else { Head::KeepIfSameClasses };
        let (start, notes, total) = guarded(py, || {
            let (start, notes) = match resume {
                Some(p) => (Start::Resume(Box::new(Checkpoint::read(&p)?), p), Vec::new()),
                None => {
                    let src = match source {
                        Some(sd) => ModelSource::Weights(sd),
                        None => {
                            ModelSource::Scratch { layers: layers.unwrap_or([3, 4, 6, 3]), width: width.unwrap_or(64) }
                        }
                    };
                    let prep = training::prepare_model(&dev, src, ds.classes().len(), prune.as_ref(), head, seed)?;
                    (Start::Fresh(prep.state), prep.notes)
                }
            };
            let state = match &start {
                Start::Fresh(s) => s,
                Start::Resume(c, _) => &c.state,
            };
            let arch = Arch::from_state(state)?;
            let per_epoch = ds.train.len() / cfg.batch.max(1);
            let total = training::steps_for(cfg.length, arch.flops_train(cfg.size, cfg.size), cfg.batch, per_epoch)?;
            Ok((start, notes, total))
        })?;
        let ds = data.ds.clone();
        let job = Job::spawn(interrupt, log, move |say| {
            let o = training::train(&dev, start, &ds, &cfg, say)?;
            Ok(summary_json(&o))
        });
        Ok((job, total, notes))
    })
}

/// `prunekit eval` in-process: top-1 error and mean loss on the validation split
/// (eval-mode batch norm). Returns `(error, loss, images)`.
#[pyfunction]
#[pyo3(signature = (weights, data, batch=64, size=32, device="cpu", precision=None, seed=0))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    data: &Data,
    batch: usize,
    size: usize,
    device: &str,
    precision: Option<&str>,
    seed: u64,
) -> PyResult<(f64, f64, usize)> {
    crate::catch(|| {
        let dev = crate::device(device)?;
        let prec = crate::precision(precision, &dev)?;
        let sd: StateDict = state_from_py(py, weights)?;
        let ds = data.ds.clone();
        let norm = data.norm;
        guarded(py, move || {
            let arch = Arch::from_state(&sd)?;
            prunekit::ensure!(
                arch.classes == ds.classes().len(),
                "the model has {} outputs and the data {} classes",
                arch.classes,
                ds.classes().len()
            );
            prunekit::ensure!(batch >= 1 && size >= 1, "batch and size must be at least 1");
            let lc = LoaderConfig { batch, size, norm, seed, ..LoaderConfig::default() };
            let host = (lc.prefetch + 3) as f64 * (batch * 3 * size * size * 4) as f64;
            prunekit::limits::check_training_memory(&dev, &arch, prec, batch, size, host)?;
            let mut model = Model::from_state(&dev, &sd, prec)?;
            let mut ws = model.workspace(batch, size, size)?;
            let mut loader = Loader::eval(&ds.val, &lc)?;
            let mut b = loader.new_batch();
            let r = training::evaluate(&mut model, &mut ws, &mut loader, &mut b)?;
            Ok((r.error, r.loss, r.images))
        })
    })
}

/// Starts `prunekit transfer` in-process; the job's result is the report as JSON (with
/// its table under `"table"`); `json` and `plot` are written as the CLI writes them.
#[pyfunction]
#[pyo3(signature = (data, recipe, *, weights, budgets, models="dense,filters:0.25,filters:0.5,filters:0.75,channels:0.5",
    seeds=1, lrs=None, search_fraction=0.2, round_to=8, criterion="l1", json=None, plot=None, shard=None, runs=None,
    keep_head=false))]
#[allow(clippy::too_many_arguments)]
fn transfer_start(
    py: Python<'_>,
    data: &Data,
    recipe: Recipe,
    weights: &Bound<'_, PyAny>,
    budgets: Vec<f64>,
    models: &str,
    seeds: usize,
    lrs: Option<Vec<f64>>,
    search_fraction: f64,
    round_to: usize,
    criterion: &str,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    shard: Option<&str>,
    runs: Option<PathBuf>,
    keep_head: bool,
) -> PyResult<Job> {
    crate::catch(|| {
        let (dev, mut cfg) = recipe.config(data)?;
        let interrupt = Arc::new(AtomicBool::new(false));
        cfg.interrupt = Some(interrupt.clone());
        let crit = prune_config("filters", &0.0f64.into_pyobject(py)?.into_any(), round_to, criterion)?.criterion;
        let models = transfer::parse_models(models).map_err(to_py)?;
        let shard: Shard = shard.map(str::parse).transpose().map_err(to_py)?.unwrap_or(Shard::ALL);
        if shard.count > 1 && runs.is_none() {
            return Err(PyValueError::new_err("shard needs runs=DIR: a shard's runs are merged from there"));
        }
        let lrs = lrs.unwrap_or_else(|| vec![0.1]);
        let (sd, id) = if weights.is_instance_of::<pyo3::types::PyString>() || weights.hasattr("__fspath__")? {
            let p: PathBuf = weights.extract()?;
            let id = guarded(py, || transfer::weights_identity(&p))?;
            (state_from_py(py, weights)?, id)
        } else {
            let sd = state_from_py(py, weights)?;
            let id = state_identity(&sd);
            (sd, id)
        };
        let mut exp = Experiment::new(sd, &id, models, budgets);
        exp.seeds = seeds;
        exp.lrs = lrs;
        exp.search_fraction = search_fraction;
        exp.round_to = round_to;
        exp.criterion = crit;
        exp.recipe = cfg;
        exp.shard = shard;
        exp.runs = runs;
        exp.head = if keep_head { Head::KeepIfSameClasses } else { Head::Fresh };
        guarded(py, || {
            exp.check()?;
            if let Some(j) = &json {
                prunekit::limits::check_output_path("json", j)?;
            }
            if let Some(p) = &plot {
                transfer::check_plot_path(p)?;
            }
            Ok(())
        })?;
        let ds = data.ds.clone();
        Ok(Job::spawn(interrupt, None, move |say| {
            let report = transfer::run_experiment(&dev, &exp, &ds, say)?;
            if let Some(j) = &json {
                report.write_json(j)?;
            }
            if let Some(p) = &plot {
                let classes = ds.classes().join(",");
                let title = format!(
                    "transfer to {} classes ({classes}): {} training images, {} validation images",
                    ds.classes().len(),
                    ds.train.len(),
                    ds.val.len()
                );
                transfer::plot(&report, p, &title)?;
            }
            let mut v = report.to_json();
            v["table"] = serde_json::Value::String(report.table());
            Ok(v.to_string())
        }))
    })
}

/// `in-memory state dict (N tensors, fnv1a64 HASH)`: names weights given from Python by
/// their content, as `transfer::weights_identity` names a file.
fn state_identity(sd: &StateDict) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (n, t) in &sd.tensors {
        eat(n.as_bytes());
        for d in &t.shape {
            eat(&(*d as u64).to_le_bytes());
        }
        match &t.data {
            prunekit::model::Data::F32(v) => v.iter().for_each(|x| eat(&x.to_le_bytes())),
            prunekit::model::Data::I64(v) => v.iter().for_each(|x| eat(&x.to_le_bytes())),
        }
    }
    format!("in-memory state dict ({} tensors, fnv1a64 {h:016x})", sd.tensors.len())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Job>()?;
    m.add_function(wrap_pyfunction!(train_start, m)?)?;
    m.add_function(wrap_pyfunction!(transfer_start, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    Ok(())
}
