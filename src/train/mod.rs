//! Training and evaluation on real data: `prunekit train` and `prunekit eval` as a
//! library.
//!
//! A run starts from a state dict ([`prepare_model`]: pretrained weights in torchvision's
//! names, pruned files included, or a fresh bottleneck ResNet with torchvision's
//! initialisation; optionally pruned zero-shot with [`crate::prune`] first; the classifier
//! replaced by a fresh one when the data has another number of classes, or always, see
//! [`Head`]) or from a
//! [`Checkpoint`]. [`train`] then runs SGD on batches of [`crate::data`] for a length
//! given as a compute budget (the paper's count: training FLOPs per image times images
//! seen), epochs or steps, with a per-step learning rate ([`Schedule`]), evaluations on
//! the validation split, a JSON-lines log, atomic checkpoints, and the fine-tuned model
//! written with torchvision's names at the end.
//!
//! ```no_run
//! use prunekit::data::{Dataset, OpenOptions};
//! use prunekit::train::{prepare_model, train, Head, Length, ModelSource, Start, TrainConfig};
//! # fn main() -> prunekit::Result<()> {
//! let dev = prunekit::Device::Cpu;
//! let data = Dataset::open("/data/shapes", &OpenOptions::default())?;
//! let source = ModelSource::Scratch { layers: [1, 1, 1, 1], width: 8 };
//! let prepared = prepare_model(&dev, source, data.classes().len(), None, Head::default(), 0)?;
//! let cfg = TrainConfig { length: Length::Steps(100), batch: 16, size: 32, ..TrainConfig::default() };
//! let outcome = train(&dev, Start::Fresh(prepared.state), &data, &cfg, &mut |line| println!("{line}"))?;
//! println!("{outcome:?}");
//! # Ok(()) }
//! ```

mod budget;
mod checkpoint;
mod eval;
mod log;
mod run;
mod schedule;

pub use budget::{head_step_flops, phase_steps, steps_for, Length};
pub use checkpoint::{check_settings, Checkpoint, Progress};
pub use eval::{evaluate, EvalResult};
pub use log::{Bar, JsonLog, Record};
pub use run::{train, Divergence, Outcome, Start, Summary};
pub use schedule::{Schedule, ScheduleKind};

use crate::data::{Augment, Normalize};
use crate::device::Device;
use crate::model::{init::torchvision_init, Arch, PrecisionKind, StateDict, Tensor};
use crate::prune::{prune_owned_state, PruneConfig};
use crate::{ensure, Result};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Where the model of a fresh run comes from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// Weights of a bottleneck ResNet with torchvision's names (pruned files included).
    Weights(StateDict),
    /// A fresh bottleneck ResNet: blocks per stage and base width (64 is torchvision's),
    /// torchvision's initialisation.
    Scratch {
        /// Blocks per stage (ResNet50: 3, 4, 6, 3).
        layers: [usize; 4],
        /// Stem width and first stage's inner width; stage s has `width << s`.
        width: usize,
    },
}

/// The model a run starts from, and what was done to get it.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The state dict (torchvision's names; `keep.*` and the pruning settings when pruned).
    pub state: StateDict,
    /// Lines that say what was done: pruning, a replaced classifier.
    pub notes: Vec<String>,
}

/// A fresh classifier for `fc_in` features and `classes` outputs, as PyTorch's `Linear`
/// initialises it (weight and bias uniform in +-1/sqrt(fc_in)), seeded.
pub fn fresh_classifier(fc_in: usize, classes: usize, seed: u64) -> (Tensor, Tensor) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xFC0F_C0FC_0FC0_FC0F);
    let b = 1.0 / (fc_in as f32).sqrt();
    let d = rand_distr::Uniform::new(-b, b).expect("non-empty range");
    let w: Vec<f32> = (0..classes * fc_in).map(|_| rng.sample(d)).collect();
    let bias: Vec<f32> = (0..classes).map(|_| rng.sample(d)).collect();
    (Tensor::f32(vec![classes, fc_in], w), Tensor::f32(vec![classes], bias))
}

/// What becomes of the weights' classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Head {
    /// Kept when it has as many outputs as the data has classes, else replaced by a fresh
    /// one (`train`'s default: fine-tuning on the task the weights were trained for).
    #[default]
    KeepIfSameClasses,
    /// Always replaced by a fresh one (transfer to a new task: the paper's protocol, and
    /// `transfer`'s default; a classifier of other classes is no head start).
    Fresh,
}

/// The state a fresh run starts from: `source`, pruned zero-shot with `prune` when given
/// (on `dev`, with the pruning pipeline: the state then holds `keep.*` and the settings),
/// its classifier replaced by a fresh one (seeded with `seed`) as `head` says.
pub fn prepare_model(
    dev: &Device,
    source: ModelSource,
    classes: usize,
    prune: Option<&PruneConfig>,
    head: Head,
    seed: u64,
) -> Result<Prepared> {
    ensure!(classes >= 1, "the data has no classes");
    let mut notes = Vec::new();
    // A fresh network's classifier is fresh already.
    let from_weights = matches!(source, ModelSource::Weights(_));
    let mut state = match source {
        ModelSource::Weights(sd) => {
            Arch::from_state(&sd)?;
            sd
        }
        ModelSource::Scratch { layers, width } => {
            ensure!(layers.iter().all(|&l| l >= 1), "--layers needs at least one block per stage, not {layers:?}");
            ensure!((1..=4096).contains(&width), "--width must be in 1..=4096, not {width}");
            let arch = Arch::bottleneck_width(layers, width, classes);
            notes.push(format!(
                "a fresh bottleneck ResNet (layers {layers:?}, width {width}, {classes} classes, {} parameters), \
                 torchvision's initialisation (seed {seed})",
                arch.params()
            ));
            torchvision_init(&arch, seed)
        }
    };
    if let Some(cfg) = prune {
        let before = Arch::from_state(&state)?.params();
        let pruned = prune_owned_state(dev, std::mem::take(&mut state), cfg)?;
        notes.push(format!(
            "pruned zero-shot ({} mode, sparsity {}, round to {}): {} groups, {before} -> {} parameters",
            cfg.mode,
            cfg.sparsity,
            cfg.round_to,
            pruned.keep.len(),
            pruned.plan.after.params()
        ));
        state = pruned.to_file_state();
    }
    let arch = Arch::from_state(&state)?;
    if arch.classes != classes || (head == Head::Fresh && from_weights) {
        let (w, b) = fresh_classifier(arch.fc_in(), classes, seed);
        state.tensors.insert("fc.weight".into(), w);
        state.tensors.insert("fc.bias".into(), b);
        let why = if arch.classes != classes {
            format!("the weights have {} outputs, the data {classes} classes", arch.classes)
        } else {
            "a fresh head was asked for".to_string()
        };
        notes.push(format!(
            "replaced the classifier ({why}): the new fc is [{classes}, {}] with torchvision's initialisation \
             (seed {seed})",
            arch.fc_in()
        ));
    }
    Ok(Prepared { state, notes })
}

/// How a run trains: length, batches, optimizer, schedule, evaluation, outputs.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// How long: a budget in GFLOPs, epochs or steps.
    pub length: Length,
    /// Images per step.
    pub batch: usize,
    /// Images per evaluation batch (`None`: the training batch). A different size gets its
    /// own workspace: a larger one evaluates faster where small batches leave the device
    /// (or the CPU's GEMMs) underused; eval-mode results do not depend on it.
    pub eval_batch: Option<usize>,
    /// Side of the square training and evaluation images.
    pub size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Learning-rate shape after the warm-up.
    pub schedule: ScheduleKind,
    /// Steps of linear warm-up (ignored when `warmup_fraction` is set).
    pub warmup: u64,
    /// Linear warm-up over this fraction of the run's steps (of each phase's, with a
    /// head-only phase), rounded up and kept shorter than the phase: a warm-up that fits
    /// every budget. When set it wins over `warmup`.
    pub warmup_fraction: Option<f64>,
    /// Clip the gradients to this global L2 norm before each SGD step, as
    /// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the norm over every parameter's
    /// gradient, the gradients multiplied by `max_norm / (norm + 1e-6)` when that is below 1
    /// (the weight decay and the momentum then act as PyTorch's SGD after clipping).
    pub clip_grad_norm: Option<f64>,
    /// The first `floor(head_only_fraction * steps)` steps train only the classifier
    /// (linear probing, then fine-tuning: LP-FT, Kumar et al. 2022): an eval-mode forward
    /// (BN on its running statistics), the loss, the classifier's backward and SGD step;
    /// the backbone (weights, BN statistics, momentum) is not written. Each phase has its own
    /// schedule (warm-up and decay) fitted to its steps. Such a step is charged the FLOPs
    /// it computes ([`head_step_flops`]): the forward and the classifier's backward. 0: none.
    pub head_only_fraction: f64,
    /// A run whose training loss is not finite, or above this many times the first step's
    /// loss, has diverged ([`Divergence`]).
    pub diverge_factor: f64,
    /// On divergence, stop the run there (the step's update is not applied), evaluate, and
    /// report it in [`Summary::diverged`]. Without it a non-finite loss is an error, and a
    /// loss above the factor is reported (a line, and [`Summary::diverged`]) while the run
    /// goes on.
    pub stop_on_divergence: bool,
    /// Label smoothing of the training loss, in [0, 1) (PyTorch's `label_smoothing`; the
    /// validation loss is always plain cross-entropy).
    pub label_smoothing: f64,
    /// Evaluate every this many training GFLOPs (and always at the end).
    pub eval_every: Option<f64>,
    /// The precision the model trains in.
    pub precision: PrecisionKind,
    /// Seed of the data order and augmentation (and, for a fresh model, its weights).
    pub seed: u64,
    /// Training augmentation.
    pub augment: Augment,
    /// Pixel normalization.
    pub norm: Normalize,
    /// Data loader threads (0: one per core).
    pub threads: usize,
    /// Where to write checkpoints.
    pub checkpoint: Option<PathBuf>,
    /// Write a checkpoint every this many steps (and on interruption and at the end).
    pub checkpoint_every: Option<u64>,
    /// The JSON-lines log.
    pub log: Option<PathBuf>,
    /// Where to write the trained model (torchvision's names, `keep.*` when pruned).
    pub out: Option<PathBuf>,
    /// Show a progress bar on stderr (when it is a terminal); evaluation lines are printed
    /// above it. Without it they go to the run's `say`.
    pub progress: bool,
    /// Set (e.g. by a SIGINT/SIGTERM handler) to stop after the current step with a
    /// checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Behave as if interrupted once this many steps are done (for tests).
    pub stop_after: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            length: Length::Steps(100),
            batch: 32,
            eval_batch: None,
            size: 32,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: ScheduleKind::Cosine,
            warmup: 0,
            warmup_fraction: None,
            clip_grad_norm: None,
            head_only_fraction: 0.0,
            diverge_factor: 10.0,
            stop_on_divergence: false,
            label_smoothing: 0.0,
            eval_every: None,
            precision: PrecisionKind::F32,
            seed: 0,
            augment: Augment::CropFlip,
            norm: Normalize::IMAGENET,
            threads: 0,
            checkpoint: None,
            checkpoint_every: None,
            log: None,
            out: None,
            progress: false,
            interrupt: None,
            stop_after: None,
        }
    }
}

impl TrainConfig {
    /// Checks the settings that need no data or model: numbers in range and output paths
    /// that can be written (so a long run is not refused at its end).
    pub fn check(&self) -> Result<()> {
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(self.eval_batch != Some(0), "--eval-batch must be at least 1");
        ensure!(self.size >= 1, "--size must be at least 1");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be finite and positive, not {}", self.lr);
        ensure!(
            self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum),
            "--momentum must be in [0, 1), not {}",
            self.momentum
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--wd must be finite and non-negative, not {}",
            self.weight_decay
        );
        ensure!(
            (0.0..1.0).contains(&self.label_smoothing),
            "--label-smoothing must be in [0, 1), not {}",
            self.label_smoothing
        );
        if let Some(f) = self.warmup_fraction {
            ensure!((0.0..1.0).contains(&f), "--warmup-fraction must be in [0, 1), not {f}");
        }
        if let Some(c) = self.clip_grad_norm {
            ensure!(c.is_finite() && c > 0.0, "--clip-grad-norm must be finite and positive, not {c}");
        }
        ensure!(
            (0.0..1.0).contains(&self.head_only_fraction),
            "--head-only-fraction must be in [0, 1), not {}",
            self.head_only_fraction
        );
        ensure!(
            self.diverge_factor.is_finite() && self.diverge_factor > 1.0,
            "the divergence factor must be finite and above 1, not {}",
            self.diverge_factor
        );
        if let Some(e) = self.eval_every {
            ensure!(e.is_finite() && e > 0.0, "--eval-every must be a positive number of GFLOPs, not {e}");
        }
        if let Some(n) = self.checkpoint_every {
            ensure!(n >= 1, "--checkpoint-every must be at least 1");
            ensure!(self.checkpoint.is_some(), "--checkpoint-every needs --checkpoint FILE");
        }
        self.norm.check()?;
        for (flag, p) in [("--out", &self.out), ("--log", &self.log), ("--checkpoint", &self.checkpoint)] {
            if let Some(p) = p {
                crate::limits::check_output_path(flag, p)?;
            }
        }
        Ok(())
    }
}
