//! The arguments several commands share, flattened into their `Args` structs: the device
//! and precision ([`DeviceArgs`]), the data ([`DataArgs`]), the fine-tuning recipe
//! ([`RecipeArgs`]), the pruning mode and criterion and the BN fusions as value enums.

use clap::ValueEnum;
use prunekit::data::{Augment, ClassSelection, Dataset, Normalize, OpenOptions};
use prunekit::model::{BnFusion, PrecisionKind};
use prunekit::prune::{Mode, Norm, PruneConfig, Sparsity};
use prunekit::train::{ScheduleKind, TrainConfig};
use prunekit::Device;

/// The device a command runs on and the precision it computes in (`bench`, `train`,
/// `transfer`, `eval`).
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// cpu, emu, cuda, cuda:N or auto (cuda where there is a GPU, else cpu).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32 or bf16 (default: bf16 on cuda, else f32).
    #[arg(long)]
    pub precision: Option<PrecisionKind>,
}

impl DeviceArgs {
    /// The device and the precision; the precision's default follows the device.
    pub fn open(&self) -> prunekit::Result<(Device, PrecisionKind)> {
        self.with(Device::parse(&self.device)?)
    }

    /// As [`DeviceArgs::open`], and also the emulation's counting mode `emu:count`
    /// (`bench`), whose precision defaults to the cuda device's.
    pub fn open_counting(&self) -> prunekit::Result<(Device, PrecisionKind)> {
        self.with(Device::parse_counting(&self.device)?)
    }

    fn with(&self, dev: Device) -> prunekit::Result<(Device, PrecisionKind)> {
        let cuda_like = dev.kind() == "cuda" || dev.counts_only();
        let precision = self.precision.unwrap_or(if cuda_like { PrecisionKind::Bf16 } else { PrecisionKind::F32 });
        Ok((dev, precision))
    }
}

/// `--bn-fusion` (`bench`, `verify`): which of [`BnFusion`]'s switches are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BnFusionArg {
    /// Both fusions.
    All,
    /// The BN applied as the next conv loads.
    Load,
    /// The BN backward sums in the dgrad epilogues.
    Dgrad,
    /// Neither.
    None,
}

impl BnFusionArg {
    /// The switches.
    pub fn fusion(self) -> BnFusion {
        let (on_load, dgrad_sums) = match self {
            BnFusionArg::All => (true, true),
            BnFusionArg::Load => (true, false),
            BnFusionArg::Dgrad => (false, true),
            BnFusionArg::None => (false, false),
        };
        BnFusion { on_load, dgrad_sums }
    }
}

/// The data options of `train`, `transfer` and `eval`, passed through to `prunekit::data`.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Training data: an image folder (ROOT/<class>/<image>; ROOT/train and ROOT/val when
    /// they exist) or idx:IMAGES,LABELS (MNIST-family files, raw or gzip).
    #[arg(long)]
    data: String,
    /// Validation data (same syntax); default: ROOT/val, else a seeded --val-fraction of
    /// each class of --data.
    #[arg(long)]
    val: Option<String>,
    /// Keep these classes, relabelled in index order: 0-4, sandal,shirt, 0,3,7.
    #[arg(long)]
    classes: Option<ClassSelection>,
    /// Keep this many training images per class (seeded).
    #[arg(long)]
    per_class: Option<usize>,
    /// The fraction of each class held out for validation when there is no validation set.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Pixel normalization: imagenet, MEAN,STD, or six numbers (three means, three stds).
    #[arg(long, default_value = "imagenet")]
    pub normalize: Normalize,
    /// Leave out (and count) images that cannot be decoded instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

impl DataArgs {
    /// The data set, its classes and images selected as the options say.
    pub fn open(&self, seed: u64) -> prunekit::Result<Dataset> {
        let opts =
            OpenOptions { val: self.val.clone(), val_fraction: self.val_fraction, seed, skip_bad: self.skip_bad };
        let mut d = Dataset::open(&self.data, &opts)?;
        if let Some(sel) = &self.classes {
            d = d.select(sel)?;
        }
        if let Some(n) = self.per_class {
            d = d.per_class(n, seed)?;
        }
        Ok(d)
    }
}

/// The fine-tuning recipe that `train` and `transfer` share.
#[derive(clap::Args)]
pub struct RecipeArgs {
    /// Round kept widths up to a multiple of this (pruning).
    #[arg(long, default_value_t = 8)]
    pub round_to: usize,
    /// Filter score for pruning.
    #[arg(long, value_enum, default_value_t = CriterionArg::L1)]
    pub criterion: CriterionArg,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Images per evaluation batch (default: --batch); a larger one evaluates faster, at the
    /// cost of a second workspace.
    #[arg(long)]
    eval_batch: Option<usize>,
    /// Image height and width.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    wd: f64,
    /// cosine (fitted to the run's steps) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: ScheduleKind,
    /// Steps of linear learning-rate warm-up (default 0; transfer: see --warmup-fraction).
    #[arg(long)]
    warmup: Option<u64>,
    /// Linear warm-up over this fraction of each run's steps (of each phase's with
    /// --head-only-fraction); wins over --warmup when both are given. Default: none for
    /// train; 0.1 for transfer unless --warmup is given.
    #[arg(long)]
    warmup_fraction: Option<f64>,
    /// Clip the gradients to this global L2 norm before each step (as
    /// torch.nn.utils.clip_grad_norm_); 0: no clipping. Default: 0 for train, 1 for transfer.
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Train only the classifier for this fraction of the steps first (on the eval-mode
    /// backbone; LP-FT), then everything. Default: 0 for train, 0.1 for transfer.
    #[arg(long)]
    head_only_fraction: Option<f64>,
    /// Label smoothing of the training loss, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Training augmentation: none, flip or crop-flip.
    #[arg(long, default_value = "crop-flip")]
    augment: Augment,
    #[command(flatten)]
    device: DeviceArgs,
    /// Seed of the data order, augmentation, validation split and fresh weights (transfer:
    /// the first seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl RecipeArgs {
    /// The device and a training config with this recipe (the precision's default follows
    /// the device); the caller sets length, lr and outputs. `stable`: transfer's defaults
    /// for the options not given (warm-up over 10% of the steps unless --warmup is given,
    /// gradients clipped to norm 1, the first 10% of the steps head-only).
    pub fn config(&self, norm: Normalize, stable: bool) -> prunekit::Result<(Device, TrainConfig)> {
        let (dev, precision) = self.device.open()?;
        let cfg = TrainConfig {
            batch: self.batch,
            eval_batch: self.eval_batch,
            size: self.size,
            momentum: self.momentum,
            weight_decay: self.wd,
            schedule: self.schedule,
            warmup: self.warmup.unwrap_or(0),
            warmup_fraction: self.warmup_fraction.or((stable && self.warmup.is_none()).then_some(0.1)),
            clip_grad_norm: self.clip_grad_norm.or(stable.then_some(1.0)).filter(|&c| c != 0.0),
            head_only_fraction: self.head_only_fraction.unwrap_or(if stable { 0.1 } else { 0.0 }),
            label_smoothing: self.label_smoothing,
            precision,
            seed: self.seed,
            augment: self.augment,
            norm,
            threads: self.threads,
            ..TrainConfig::default()
        };
        Ok((dev, cfg))
    }

    /// The pruning config of `mode` and `sparsity` with this recipe's rounding and
    /// criterion; None unless both are given.
    pub fn prune(&self, mode: Option<ModeArg>, sparsity: Option<Sparsity>) -> prunekit::Result<Option<PruneConfig>> {
        match (mode, sparsity) {
            (Some(m), Some(s)) => Ok(Some(PruneConfig::new(m.into(), s, self.round_to, self.criterion.into())?)),
            _ => Ok(None),
        }
    }
}

/// `--mode` of `prune` and `train`.
#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Filters,
    Channels,
}

/// `--criterion` of `prune`, `train` and `transfer`.
#[derive(Clone, Copy, ValueEnum)]
pub enum CriterionArg {
    L1,
    L2,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Filters => Mode::Filters,
            ModeArg::Channels => Mode::Channels,
        }
    }
}

impl From<CriterionArg> for Norm {
    fn from(c: CriterionArg) -> Norm {
        match c {
            CriterionArg::L1 => Norm::L1,
            CriterionArg::L2 => Norm::L2,
        }
    }
}
