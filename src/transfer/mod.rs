//! Compute-optimal transfer (`prunekit transfer`): the paper's experiment. For each model
//! (the pretrained network dense, or pruned zero-shot in a mode and sparsity) and each
//! training-compute budget, fine-tune on the target task with the schedule fitted to that
//! budget, evaluate, and compare the error reached per budget.
//!
//! - Every (model, budget) pair runs `seeds` fine-tunings (seeds `seed`, `seed + 1`, ...:
//!   the data order differs, and a replaced classifier's initialisation); a row reports the
//!   mean and the spread of their validation error.
//! - With several learning rates, each pair first picks its rate on a split carved from the
//!   target's *training* data (`search_fraction` of each class held out, seeded with the
//!   first seed; never the validation split): one run per rate and seed, on the rest, for
//!   the same budget; the rate with the lowest mean held-out error over the seeds wins
//!   (a rate with a diverged run loses to every rate without one: [`chosen_lr`]). The
//!   search's compute is reported beside the budget (the Nevis protocol charges
//!   hyperparameter search to the learner).
//! - The fine-tuning recipe's defaults keep runs stable across budgets and seeds
//!   ([`Experiment::new`]): a linear warm-up over a tenth of each run's steps, gradients
//!   clipped to a global L2 norm of 1, and a head-only phase over the first tenth of the
//!   steps (linear probing, then fine-tuning: LP-FT, Kumar et al. 2022). A run whose
//!   training loss is not finite or above 10x its first loss stops there and is reported
//!   as diverged (its record's `diverged`, the row's count); a row's mean leaves diverged
//!   runs out and says how many there were.
//! - Every finished training run is one JSON file in the runs folder (written atomically);
//!   a re-run skips the runs it finds, and [`merge`] assembles a folder that several
//!   shards ([`Shard`]) filled.
//!
//! On a Slurm cluster, a job array runs the shards and a dependent job merges them. Slurm
//! numbers the array's tasks as `--array` says, so let it count from 0 to N - 1 (with
//! `--array=1-4`, pass `$((SLURM_ARRAY_TASK_ID - 1))/4` instead); a shard killed (a
//! preempted or timed-out task) keeps its finished runs, and its rerun skips them:
//!
//! ```text
//! # shards.sbatch
//! #SBATCH --array=0-3
//! prunekit transfer --weights pre.safetensors --data ... --budgets 3,6,12 --seeds 3 \
//!     --runs runs/ --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
//!
//! $ jid=$(sbatch --parsable shards.sbatch)
//! $ sbatch --dependency=afterok:$jid --wrap "prunekit transfer merge --runs runs/ --json transfer.json"
//! ```
//!
//! (`afterok` on an array job waits for every task to succeed; every shard must pass the
//! same options, or the merge refuses the runs of another experiment.)
//!
//! ```no_run
//! # fn main() -> prunekit::Result<()> {
//! use prunekit::transfer::{run_experiment, Experiment, ModelSpec};
//! # let (dev, data, weights): (prunekit::Device, prunekit::data::Dataset, prunekit::model::StateDict) = todo!();
//! let exp = Experiment::new(weights, "pretrained.safetensors", vec![ModelSpec::DENSE, "filters:0.5".parse()?], vec![50.0, 100.0]);
//! let report = run_experiment(&dev, &exp, &data, &mut |line| println!("{line}"))?;
//! print!("{}", report.table());
//! # Ok(()) }
//! ```

mod advise;
mod plot;
mod record;
mod report;
mod spec;

pub use advise::{advise, fit, validate, validation_table, Advice, Check, Crossover, Law, ModelFit, MIN_BUDGETS};
pub use plot::{check_plot_path, plot, plot_advice};
pub use report::{chosen_lr, merge, Optimum, Report, Row};

pub use record::{Plan, RunKind, RunRecord};
pub use spec::{parse_models, parse_positive_list, BudgetUnit, ModelSpec, Shard};

use record::RUN_FORMAT;

use crate::data::Dataset;
use crate::device::Device;
use crate::model::{Arch, StateDict};
use crate::prune::{Norm, PruneConfig};
use crate::train::{prepare_model, steps_for, train, Head, Length, ModelSource, Outcome, Start, TrainConfig};
use crate::{ensure, invalid, Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An experiment: what to compare and how to fine-tune.
#[derive(Clone, Debug)]
pub struct Experiment {
    /// The pretrained weights (torchvision names).
    pub weights: StateDict,
    /// Where they came from, with a checksum (see [`weights_identity`]): recorded in every
    /// run so that runs of other weights are never mixed in.
    pub weights_id: String,
    /// The models, in the order of the table.
    pub models: Vec<ModelSpec>,
    /// Training budgets, in GFLOPs or in seconds (`budget_unit`).
    pub budgets: Vec<f64>,
    /// What the budgets count: training GFLOPs (the paper's count, the default) or seconds
    /// of training time on the device ([`Length::Seconds`]: each run's schedule is fitted
    /// to the steps a timed probe says the budget allows, and the run stops when its
    /// training time reaches the budget).
    pub budget_unit: BudgetUnit,
    /// Fine-tuning runs per (model, budget).
    pub seeds: usize,
    /// Learning rates to choose from (one: no search; `recipe.lr` is ignored).
    pub lrs: Vec<f64>,
    /// Fraction of each training class held out for the learning-rate search.
    pub search_fraction: f64,
    /// Pruning: kept widths rounded up to a multiple of this.
    pub round_to: usize,
    /// Pruning: the filter score.
    pub criterion: Norm,
    /// Everything else of a fine-tuning run (batch, size, momentum, schedule, ...). Its
    /// `length`, `lr`, `seed` and output paths are set per run; `seed` is the first seed.
    pub recipe: TrainConfig,
    /// The (model, budget) pairs this process runs.
    pub shard: Shard,
    /// Where each finished run is written (and found again by a re-run).
    pub runs: Option<PathBuf>,
    /// The classifier: a fresh one per run (the default, seeded with the run's seed), or
    /// the weights' own where it has as many outputs as the target has classes.
    pub head: Head,
}

impl Experiment {
    /// An experiment with one seed, the recipe's default learning rate, no search, the
    /// default pruning settings, the whole plan and no runs folder; the recipe is
    /// [`TrainConfig::default`] with the stable fine-tuning defaults: warm-up over 10% of
    /// each phase's steps, gradients clipped to norm 1, the first 10% of the steps
    /// head-only, and a run that diverges stops there and is reported so.
    pub fn new(weights: StateDict, weights_id: &str, models: Vec<ModelSpec>, budgets: Vec<f64>) -> Experiment {
        let recipe = TrainConfig {
            warmup_fraction: Some(0.1),
            clip_grad_norm: Some(1.0),
            head_only_fraction: 0.1,
            stop_on_divergence: true,
            ..TrainConfig::default()
        };
        Experiment {
            weights,
            weights_id: weights_id.to_string(),
            models,
            budgets,
            budget_unit: BudgetUnit::Gflops,
            seeds: 1,
            lrs: vec![recipe.lr],
            search_fraction: 0.2,
            round_to: 8,
            criterion: Norm::L1,
            recipe,
            shard: Shard::ALL,
            runs: None,
            head: Head::Fresh,
        }
    }

    /// Checks the settings that need no data: numbers in range, writable output folders.
    pub fn check(&self) -> Result<()> {
        ensure!(!self.models.is_empty(), "no model to compare");
        ensure!(!self.budgets.is_empty(), "no budget");
        ensure!(self.budgets.iter().all(|b| b.is_finite() && *b > 0.0), "budgets must be positive and finite");
        ensure!(self.seeds >= 1, "--seeds must be at least 1");
        ensure!(!self.lrs.is_empty(), "no learning rate");
        ensure!(self.lrs.iter().all(|l| l.is_finite() && *l > 0.0), "learning rates must be positive and finite");
        ensure!(
            self.lrs.len() == 1 || (self.search_fraction > 0.0 && self.search_fraction < 1.0),
            "--search-fraction must be in (0, 1), not {}",
            self.search_fraction
        );
        ensure!(self.round_to >= 1, "--round-to must be at least 1");
        ensure!(self.shard.count >= 1 && self.shard.index < self.shard.count, "bad shard {}", self.shard);
        let mut r = self.recipe.clone();
        (r.out, r.log, r.checkpoint, r.checkpoint_every) = (None, None, None, None);
        r.check()?;
        if let Some(dir) = &self.runs {
            check_runs_dir(dir)?;
        }
        Ok(())
    }

    /// The settings every run of the experiment shares (everything but the plan: models,
    /// budgets and seeds); run files record them and a re-run or a merge refuses files whose
    /// settings differ. A plan may grow (more budgets, models or seeds) over the same runs.
    pub fn settings(&self, data: &Dataset) -> BTreeMap<String, String> {
        let r = &self.recipe;
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("weights", self.weights_id.clone());
        put("head", format!("{:?}", self.head));
        put("lrs", self.lrs.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(","));
        put("search_fraction", format!("{:?}", self.search_fraction));
        put("search_seed", r.seed.to_string());
        put("round_to", self.round_to.to_string());
        put("criterion", format!("{:?}", self.criterion));
        put("data", data.origin.clone());
        put("classes", data.classes().join(","));
        put("train_images", data.train.len().to_string());
        put("val_images", data.val.len().to_string());
        put("batch", r.batch.to_string());
        put("size", r.size.to_string());
        put("momentum", format!("{:?}", r.momentum));
        put("wd", format!("{:?}", r.weight_decay));
        put("schedule", r.schedule.to_string());
        put("warmup", r.warmup.to_string());
        put("warmup_fraction", r.warmup_fraction.map_or("none".into(), |f| format!("{f:?}")));
        put("clip_grad_norm", r.clip_grad_norm.map_or("none".into(), |c| format!("{c:?}")));
        put("head_only_fraction", format!("{:?}", r.head_only_fraction));
        put("diverge_factor", format!("{:?}", r.diverge_factor));
        put("search_seeds", "all".into());
        put("budget_unit", self.budget_unit.to_string());
        put("label_smoothing", format!("{:?}", r.label_smoothing));
        put("augment", r.augment.to_string());
        put("normalize", format!("{:?}", r.norm));
        put("precision", r.precision.to_string());
        m
    }

    /// The plan: models, budgets and seeds.
    pub fn plan(&self) -> Plan {
        Plan {
            models: self.models.iter().map(|m| m.to_string()).collect(),
            budgets: self.budgets.clone(),
            seeds: self.seed_list(),
        }
    }

    /// The seeds of the fine-tuning runs.
    pub fn seed_list(&self) -> Vec<u64> {
        (0..self.seeds as u64).map(|i| self.recipe.seed + i).collect()
    }

    fn prune_config(&self, m: &ModelSpec) -> Result<Option<PruneConfig>> {
        m.prune.map(|(mode, s)| PruneConfig::new(mode, s, self.round_to, self.criterion)).transpose()
    }
}

/// `PATH (N bytes, fnv1a64 HASH)`: names a weights file by its content, so that run files
/// made from other weights are recognised.
pub fn weights_identity(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(format!("{name} ({} bytes, fnv1a64 {h:016x})", bytes.len()))
}

/// Refuses a runs folder that cannot be made or written: it may exist (runs in it are
/// reused), or be missing in a folder that exists.
pub fn check_runs_dir(dir: &Path) -> Result<()> {
    let shown = dir.display();
    if dir.exists() {
        ensure!(dir.is_dir(), "--runs {shown}: exists and is not a folder");
        crate::limits::check_output_path("--runs", &dir.join("probe.json"))
    } else {
        crate::limits::check_output_path("--runs", dir)
    }
}

/// Splits off the learning-rate search's data: `fraction` of each class of the training
/// split (seeded) becomes its evaluation part; nothing of the validation split is used.
pub fn search_split(data: &Dataset, fraction: f64, seed: u64) -> Result<Dataset> {
    ensure!(fraction > 0.0 && fraction < 1.0, "--search-fraction must be in (0, 1), not {fraction}");
    let (train, held) = data.train.split_off(fraction, seed ^ 0x005E_A2C4);
    ensure!(
        !held.is_empty(),
        "--search-fraction {fraction} holds out no image of the {} training images: give a larger fraction or more \
         data",
        data.train.len()
    );
    Ok(Dataset {
        train,
        val: held,
        skipped: data.skipped.clone(),
        origin: format!("{} (learning-rate search split)", data.origin),
    })
}

/// Runs the experiment's shard: every (model, budget) pair it owns, search runs first, runs
/// found in the runs folder reused. Returns the report of the pairs that ran here.
///
/// Before any training it checks the settings, that every model fits in memory, that every
/// budget allows at least one step of every model, and that the search split (when there is
/// a search) has a batch of images.
pub fn run_experiment(dev: &Device, exp: &Experiment, data: &Dataset, say: &mut dyn FnMut(&str)) -> Result<Report> {
    exp.check()?;
    ensure!(!data.val.is_empty(), "the validation split is empty: the experiment needs one to compare models");
    let classes = data.classes().len();
    let r = &exp.recipe;
    ensure!(
        data.train.len() >= r.batch,
        "the training split has {} images, fewer than one batch of {}",
        data.train.len(),
        r.batch
    );
    let search = if exp.lrs.len() > 1 { Some(search_split(data, exp.search_fraction, r.seed)?) } else { None };
    if let Some(s) = &search {
        ensure!(
            s.train.len() >= r.batch,
            "the learning-rate search trains on {} images (--search-fraction {} held out {}), fewer than one batch \
             of {}",
            s.train.len(),
            exp.search_fraction,
            s.val.len(),
            r.batch
        );
    }
    // Every model, pruned once here: checked (memory, budgets) before any run, and kept
    // for the runs, which only give it its classifier.
    let source_classes = Arch::from_state(&exp.weights)?.classes;
    let mut pruned = Vec::new();
    for m in &exp.models {
        let prune = exp.prune_config(m)?;
        let state = match prune {
            None => exp.weights.clone(),
            Some(cfg) => {
                let src = ModelSource::Weights(exp.weights.clone());
                prepare_model(dev, src, source_classes, Some(&cfg), Head::KeepIfSameClasses, 0)?.state
            }
        };
        // The architecture the runs train: the target's classifier.
        let arch = Arch { classes, ..Arch::from_state(&state)? };
        let loader_bytes = 2.0 * 7.0 * (r.batch * 3 * r.size * r.size * 4) as f64;
        crate::limits::check_training_memory(dev, &arch, r.precision, r.batch, r.size, loader_bytes)
            .map_err(|e| invalid!("{m}: {e}"))?;
        let image_flops = arch.flops_train(r.size, r.size);
        if exp.budget_unit == BudgetUnit::Gflops {
            for &b in &exp.budgets {
                steps_for(Length::Gflops(b), image_flops, r.batch, 1).map_err(|e| invalid!("{m}, budget {b}: {e}"))?;
            }
        }
        pruned.push(state);
    }
    let settings = exp.settings(data);
    if let Some(dir) = &exp.runs {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    }
    let pairs: Vec<(usize, usize)> =
        (0..exp.models.len()).flat_map(|m| (0..exp.budgets.len()).map(move |b| (m, b))).collect();
    let mine: Vec<(usize, usize)> =
        pairs.iter().enumerate().filter(|(i, _)| exp.shard.owns(*i)).map(|(_, &p)| p).collect();
    let per_pair = exp.seeds + if search.is_some() { exp.lrs.len() * exp.seeds } else { 0 };
    let total = mine.len() * per_pair;
    say(&format!(
        "transfer: {} models x {} budgets = {} pairs{}; {} training runs ({} seeds{}) on {}, {}",
        exp.models.len(),
        exp.budgets.len(),
        pairs.len(),
        if exp.shard.count > 1 { format!(", shard {} runs {} of them", exp.shard, mine.len()) } else { String::new() },
        total,
        exp.seeds,
        if search.is_some() {
            format!(", and {} learning rates searched per pair with every seed", exp.lrs.len())
        } else {
            String::new()
        },
        dev.name(),
        r.precision
    ));
    let mut records = Vec::new();
    let mut done = 0usize;
    for (mi, bi) in mine {
        let (model, budget) = (&exp.models[mi], exp.budgets[bi]);
        let lr = match &search {
            None => exp.lrs[0],
            Some(split) => {
                let mut searched = Vec::new();
                for &lr in &exp.lrs {
                    for seed in exp.seed_list() {
                        done += 1;
                        searched.push(one_run(
                            dev,
                            exp,
                            &pruned[mi],
                            &settings,
                            split,
                            RunKind::Search,
                            model,
                            budget,
                            seed,
                            lr,
                            done,
                            total,
                            say,
                        )?);
                    }
                }
                let lr = report::chosen_lr(&searched, &exp.lrs).expect("at least one learning rate");
                records.extend(searched);
                lr
            }
        };
        for seed in exp.seed_list() {
            done += 1;
            records.push(one_run(
                dev,
                exp,
                &pruned[mi],
                &settings,
                data,
                RunKind::Final,
                model,
                budget,
                seed,
                lr,
                done,
                total,
                say,
            )?);
        }
    }
    Report::from_records(records, &exp.models, &exp.budgets, Some(&settings), Some(&exp.plan()))
}

/// One fine-tuning run of `model` (`state`: the weights pruned as it says), or its record
/// from the runs folder.
#[allow(clippy::too_many_arguments)]
fn one_run(
    dev: &Device,
    exp: &Experiment,
    state: &StateDict,
    settings: &BTreeMap<String, String>,
    data: &Dataset,
    kind: RunKind,
    model: &ModelSpec,
    budget: f64,
    seed: u64,
    lr: f64,
    n: usize,
    total: usize,
    say: &mut dyn FnMut(&str),
) -> Result<RunRecord> {
    let what = format!(
        "[{n}/{total}] {model}, budget {budget} {}, seed {seed}, lr {lr}{}",
        exp.budget_unit.suffix(),
        if kind == RunKind::Search { " (learning-rate search)" } else { "" }
    );
    let path = exp.runs.as_ref().map(|d| d.join(RunRecord::file_name(kind, model, budget, exp.budget_unit, seed, lr)));
    if let Some(p) = path.as_ref().filter(|p| p.exists()) {
        let rec = RunRecord::read(p)?;
        ensure!(
            rec.settings == *settings,
            "{}: a run of another experiment ({}); use another --runs folder or move it out",
            p.display(),
            settings_diff(&rec.settings, settings)
        );
        say(&format!("{what}: done before ({}), val error {:.4}", p.display(), rec.val_error));
        return Ok(rec);
    }
    let prep = prepare_model(dev, ModelSource::Weights(state.clone()), data.classes().len(), None, exp.head, seed)?;
    let arch = Arch::from_state(&prep.state)?;
    let params = arch.params();
    let cfg = TrainConfig {
        length: exp.budget_unit.length(budget),
        lr,
        seed,
        out: None,
        log: None,
        checkpoint: None,
        checkpoint_every: None,
        eval_every: None,
        progress: false,
        stop_after: None,
        stop_on_divergence: true,
        ..exp.recipe.clone()
    };
    let outcome = train(dev, Start::Fresh(prep.state), data, &cfg, &mut |_| {}).map_err(|e| invalid!("{what}: {e}"))?;
    let s = match outcome {
        Outcome::Finished(s) => s,
        Outcome::Interrupted { step, .. } => {
            return Err(invalid!(
                "{what}: interrupted after step {step}; the finished runs are kept, run again to continue"
            ))
        }
    };
    let eval = s.eval.ok_or_else(|| invalid!("{what}: no evaluation (empty validation split)"))?;
    let rec = RunRecord {
        format: RUN_FORMAT,
        kind,
        model: model.to_string(),
        mode: model.mode(),
        sparsity: model.sparsity(),
        budget_gflops: if exp.budget_unit == BudgetUnit::Gflops { budget } else { f64::NAN },
        budget_seconds: (exp.budget_unit == BudgetUnit::Seconds).then_some(budget),
        seed,
        lr,
        steps: s.planned_steps,
        steps_done: s.steps,
        head_steps: s.head_steps,
        train_gflops: s.train_gflops,
        train_gflops_per_image: s.gflops_per_image,
        head_gflops_per_image: s.head_gflops_per_image,
        params,
        val_error: eval.error,
        val_loss: eval.loss,
        val_images: eval.images,
        last_train_loss: s.last_loss,
        first_train_loss: s.first_loss,
        diverged: s.diverged.as_ref().map(|d| d.to_string()),
        wall_s: s.train_s,
        probe_s: s.probe_s,
        eval_s: s.eval_s,
        device: dev.name(),
        settings: settings.clone(),
        plan: exp.plan(),
    };
    say(&format!(
        "{what}: {} steps, {:.1} GFLOPs, val error {:.4}, val loss {:.4} ({:.1} s + {:.1} s eval){}",
        rec.steps_done,
        rec.train_gflops,
        rec.val_error,
        rec.val_loss,
        rec.wall_s,
        rec.eval_s,
        rec.diverged.as_ref().map_or(String::new(), |d| format!("; DIVERGED: {d}"))
    ));
    if let Some(p) = &path {
        rec.write(p)?;
    }
    Ok(rec)
}

/// The first few settings in which two experiments differ, for messages.
pub(crate) fn settings_diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .take(3)
        .map(|k| {
            format!(
                "{k}: {} vs {}",
                a.get(k).map_or("(none)", String::as_str),
                b.get(k).map_or("(none)", String::as_str)
            )
        })
        .collect();
    diffs.join("; ")
}
