//! The prunekit command line. Each subcommand parses its arguments here and calls the
//! library; see `prunekit --help`.

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use prunekit::data::{Augment, ClassSelection, Dataset, Loader, LoaderConfig, Normalize, OpenOptions};
use prunekit::measure::step::{self as trainbench, BenchMode, BenchOptions};
use prunekit::model::{Arch, Model, PrecisionKind, StateDict};
use prunekit::prune::{prune_state, Mode, Norm, PruneConfig, Sparsity};
use prunekit::train::{self as training, Checkpoint, Length, ModelSource, Outcome, ScheduleKind, Start, TrainConfig};
use prunekit::transfer::{self, Experiment, Report, Shard};
use prunekit::{invalid, Device};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The data options of `train` and `eval`, passed through to `prunekit::data`.
#[derive(clap::Args)]
struct DataArgs {
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
    normalize: Normalize,
    /// Leave out (and count) images that cannot be decoded instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

impl DataArgs {
    fn open(&self, seed: u64) -> prunekit::Result<Dataset> {
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
struct RecipeArgs {
    /// Round kept widths up to a multiple of this (pruning).
    #[arg(long, default_value_t = 8)]
    round_to: usize,
    /// Filter score for pruning.
    #[arg(long, value_enum, default_value_t = CriterionArg::L1)]
    criterion: CriterionArg,
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
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Label smoothing of the training loss, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Training augmentation: none, flip or crop-flip.
    #[arg(long, default_value = "crop-flip")]
    augment: Augment,
    /// cpu, emu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32 or bf16 (default: bf16 on cuda, else f32).
    #[arg(long)]
    precision: Option<PrecisionKind>,
    /// Seed of the data order, augmentation, validation split and fresh weights (transfer:
    /// the first seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl RecipeArgs {
    /// The device, the precision (its default follows the device) and a training config
    /// with this recipe; the caller sets length, lr and outputs.
    fn config(&self, norm: Normalize) -> prunekit::Result<(Device, TrainConfig)> {
        let dev = Device::parse(&self.device)?;
        let precision =
            self.precision.unwrap_or(if dev.kind() == "cuda" { PrecisionKind::Bf16 } else { PrecisionKind::F32 });
        let cfg = TrainConfig {
            batch: self.batch,
            eval_batch: self.eval_batch,
            size: self.size,
            momentum: self.momentum,
            weight_decay: self.wd,
            schedule: self.schedule,
            warmup: self.warmup,
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

    fn prune(&self, mode: Option<ModeArg>, sparsity: Option<Sparsity>) -> prunekit::Result<Option<PruneConfig>> {
        match (mode, sparsity) {
            (Some(m), Some(s)) => Ok(Some(PruneConfig::new(m.into(), s, self.round_to, self.criterion.into())?)),
            _ => Ok(None),
        }
    }
}

/// `prunekit transfer`'s options (without the `merge` subcommand).
#[derive(clap::Args)]
struct TransferArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    recipe: RecipeArgs,
    /// The pretrained weights (safetensors, torchvision names).
    #[arg(long)]
    weights: PathBuf,
    /// The models: dense, filters:S, channels:S (S the sparsity), comma-separated.
    #[arg(long, default_value = "dense,filters:0.25,filters:0.5,filters:0.75,channels:0.5")]
    models: String,
    /// Training-compute budgets in GFLOPs, comma-separated.
    #[arg(long)]
    budgets: String,
    /// Fine-tuning runs per (model, budget): seeds --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Peak learning rate (without --lrs).
    #[arg(long, default_value_t = 0.1, conflicts_with = "lrs")]
    lr: f64,
    /// Learning rates to pick from per (model, budget), on a split of the training data.
    #[arg(long)]
    lrs: Option<String>,
    /// Fraction of each training class held out to pick the learning rate (with --lrs).
    #[arg(long, default_value_t = 0.2)]
    search_fraction: f64,
    /// Write the report (settings, rows, optima, every run) here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw val error against training compute and against time to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Run only every N-th (model, budget) pair, from the I-th (0-based): I/N.
    #[arg(long)]
    shard: Option<Shard>,
    /// Keep each finished run as a JSON file in this folder (created if missing); a re-run
    /// skips the runs it finds there.
    #[arg(long)]
    runs: Option<PathBuf>,
    /// Keep the weights' classifier where it has as many outputs as the target has classes
    /// (default: every run fine-tunes a fresh classifier, seeded with its seed).
    #[arg(long)]
    keep_head: bool,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)]
enum TransferCmd {
    /// Run the experiment (or this process's --shard of it); the default.
    Run(TransferArgs),
    /// Assemble the runs that shards wrote into one folder: the table, --json and --plot of
    /// the whole experiment.
    Merge {
        /// The runs folder.
        #[arg(long)]
        runs: PathBuf,
        /// Write the report here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw the plot to this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

#[derive(Parser)]
#[command(
    name = "prunekit",
    version,
    about = "Zero-shot structured pruning of ResNet50 with hand-written CUDA kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant (train's options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// The main job: train pruned ResNet50s and compare measured speedups with FLOP-ideal ones.
    ///
    /// Builds ResNet50 (random weights with torchvision's initialisation, or --weights),
    /// prunes it for each mode and sparsity, trains --steps steps on synthetic data after a
    /// warm-up, and prints per row: mode, sparsity, parameters, GFLOPs forward and train per
    /// image, step time, images per second, measured speedup over the dense model,
    /// FLOP-ideal speedup (dense train FLOPs over pruned train FLOPs) and efficiency
    /// (measured over ideal). `masked` is the control: the dense model with the pruned
    /// filters zeroed, which executes every dense FLOP.
    ///
    /// Defaults depend on the device: cuda 256 x 224x224 bf16, 20 steps; cpu 8 x 224x224 f32,
    /// 2 steps (about a minute on two cores); emu 2 x 32x32 f32, 1 step.
    Bench {
        /// cuda, cuda:N, cpu, emu, or auto (cuda where there is a GPU, else cpu).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Dense weights to prune (safetensors, torchvision names); default: random ResNet50.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Comma-separated: filters, channels, masked.
        #[arg(long, value_delimiter = ',', default_value = "filters,channels,masked")]
        mode: Vec<BenchMode>,
        /// Comma-separated sparsities in [0, 1).
        #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75")]
        sparsity: Vec<Sparsity>,
        #[arg(long, default_value_t = 8)]
        round_to: usize,
        /// Images per step (default: per device).
        #[arg(long)]
        batch: Option<usize>,
        /// Image height and width (default: per device).
        #[arg(long)]
        size: Option<usize>,
        /// Timed training steps per row (default: per device).
        #[arg(long)]
        steps: Option<usize>,
        /// Untimed steps before timing (default: per device).
        #[arg(long)]
        warmup: Option<usize>,
        /// f32 or bf16 (default: bf16 on cuda, else f32).
        #[arg(long)]
        precision: Option<PrecisionKind>,
        /// Write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw measured and FLOP-ideal speedup against sparsity to this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Also profile one training step per row (after the timed ones) and print, per op
        /// family (conv fprop/dgrad/wgrad, BN forward/backward, ReLU/add, pooling, fc, loss,
        /// SGD, casts, layout conversions) and model: calls, time, share of the step, GFLOP,
        /// MB moved (counted from the shapes, the same on every device), achieved GFLOP/s
        /// and GB/s, and time, FLOPs and bytes relative to the dense model. Times are CUDA
        /// events per op on a GPU, the wall clock on cpu and emu. With --json each row gets
        /// a "profile" object.
        #[arg(long)]
        profile: bool,
    },
    /// Check the training stack on a device against a reference file written by PyTorch.
    ///
    /// Compares eval logits; train-mode logits and loss; every gradient; BN running
    /// statistics after the train forward; every parameter after one SGD step, in two parts.
    ///
    /// The math: prunekit's own float64 model (an implementation independent of the
    /// training stack) against PyTorch's float64 expectations, every element within
    ///   |got - expected| <= 1e-9 * scale + 1.2e-7 * |expected| + 8 * noise,
    /// scale being the tensor's largest |expected| and noise its largest change when the
    /// input is perturbed by float32's rounding (PyTorch computed from a float64 input that
    /// the file stores in float32). ReLU decisions that this rounding leaves open are tried
    /// both ways.
    ///
    /// The precision: the device against the float64 model run with the device's own ReLU
    /// and max-pool decisions (so a kink that rounding flipped cancels), every element within
    ///   |got - expected| <= atol * scale + rtol * |expected| + 16 * noise,
    /// noise being the tensor's largest change when every op of that float64 run is
    /// perturbed by 2^-22 (f32) or 2^-7 (bf16, weights too). atol = 1e-5 and rtol = 1e-4 in
    /// f32, atol = rtol = 2e-2 in bf16.
    ///
    /// The report counts the decisions the device took otherwise than float64 (with the
    /// smallest |pre-activation| among them) and names the tensors whose bound is wider than
    /// 2% of their scale (ill-conditioned: errors below the bound are invisible there). A
    /// tensor whose noise exceeds 25% of its scale is not judged at all and named as such
    /// (a reference too ill-conditioned for the precision).
    /// Exits non-zero if any tensor is off in either part.
    Verify {
        /// A reference file of kind = model (see tests/data/README.md).
        #[arg(long)]
        reference: PathBuf,
        /// cpu, emu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: PrecisionKind,
    },
    /// Show the devices and how the kernels were built (nvcc version, ptxas resource report).
    Info {
        /// Print ptxas' per-kernel report (registers, spills, shared memory).
        #[arg(long)]
        report: bool,
    },
    /// Time every distinct convolution of ResNet50 (dense and pruned), each pass, against
    /// cuDNN on cuda.
    ConvBench {
        /// cpu, emu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Image height and width.
        #[arg(long, default_value_t = 224)]
        size: usize,
        /// Comma-separated sparsities in [0, 1).
        #[arg(long, default_value = "0,0.25,0.5,0.75")]
        sparsity: String,
        /// Round pruned widths up to a multiple of this.
        #[arg(long, default_value_t = 8)]
        round_to: usize,
        /// Whose widths the pruned shapes have: filters (inner widths) or channels (also
        /// the residual stream and the stem).
        #[arg(long, default_value = "filters")]
        mode: String,
        /// Comma-separated passes: fprop, dgrad, wgrad.
        #[arg(long, default_value = "fprop,dgrad,wgrad")]
        passes: String,
        /// f32 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Timed calls per measurement (default: 20 on cuda, 3 on cpu, 1 on emu).
        #[arg(long)]
        iters: Option<usize>,
        /// Write the rows as a JSON list to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Prune a model zero-shot by weight magnitude and write the compacted model.
    ///
    /// The output holds the compacted tensors with torchvision's names (loadable into a
    /// torchvision ResNet of those widths), one i64 tensor `keep.<group>` per pruned group
    /// (the kept indices of the dense model), and the settings as metadata.
    Prune {
        /// Weights of a bottleneck ResNet (safetensors, torchvision names, F32).
        #[arg(long)]
        weights: PathBuf,
        /// filters: each block's conv1/conv2 outputs; channels: also the residual streams and the stem.
        #[arg(long)]
        mode: ModeArg,
        /// Fraction of each pruned width to remove, in [0, 1).
        #[arg(long)]
        sparsity: Sparsity,
        /// Round kept widths up to a multiple of this.
        #[arg(long, default_value_t = 8)]
        round_to: usize,
        /// Filter score.
        #[arg(long, value_enum, default_value_t = CriterionArg::L1)]
        criterion: CriterionArg,
        /// cpu, emu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Where to write the pruned model (written to a temporary file, then renamed).
        #[arg(long)]
        out: PathBuf,
        /// Image size for the FLOP table.
        #[arg(long, default_value_t = 224)]
        size: usize,
    },
    /// Train a ResNet on image data: from pretrained weights (pruned zero-shot first with
    /// --mode/--sparsity) or from scratch, for a compute budget, epochs or steps.
    ///
    /// Compute is counted the paper's way: training FLOPs per image times images seen;
    /// --budget stops when the next step would exceed it, and the cosine schedule is fitted
    /// to the steps that fit. The log (--log, JSON lines) holds per step: step, images,
    /// train_gflops, wall_s, lr, loss; at evaluation points (--eval-every and the end) also
    /// val_error and val_loss. Checkpoints (--checkpoint) hold the model, the optimizer, the
    /// step and the loader's position; they are written every --checkpoint-every steps, at
    /// the end, and on SIGINT/SIGTERM (then the process exits with status 130); --resume
    /// continues with the same settings to bit-identical weights (on the CPU).
    #[command(group(ArgGroup::new("length").required(true).args(["budget", "epochs", "steps"])))]
    Train {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Start from these weights (safetensors, torchvision names; pruned files too).
        #[arg(long, conflicts_with_all = ["layers", "width"])]
        weights: Option<PathBuf>,
        /// Prune zero-shot before training: filters or channels (with --sparsity).
        #[arg(long, requires = "sparsity")]
        mode: Option<ModeArg>,
        /// Fraction of each pruned width to remove, in [0, 1) (with --mode).
        #[arg(long, requires = "mode")]
        sparsity: Option<Sparsity>,
        /// Training compute budget in GFLOPs.
        #[arg(long)]
        budget: Option<f64>,
        /// Epochs (full batches of the training split).
        #[arg(long)]
        epochs: Option<u64>,
        /// Training steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Peak learning rate.
        #[arg(long, default_value_t = 0.1)]
        lr: f64,
        /// Evaluate on the validation split every this many training GFLOPs (and at the end).
        #[arg(long)]
        eval_every: Option<f64>,
        /// From scratch: blocks per stage (default 3,4,6,3: ResNet50).
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// From scratch: base width (default 64: ResNet50).
        #[arg(long)]
        width: Option<usize>,
        /// With --weights: replace the classifier by a fresh one (seeded with --seed) even
        /// where it has as many outputs as the data has classes (a new task with as many
        /// classes); without it the classifier is replaced only when the counts differ.
        #[arg(long)]
        fresh_head: bool,
        /// Write the trained model here (torchvision names, keep.* when pruned).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write one JSON line per step here.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Write checkpoints here (atomically).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Write a checkpoint every N steps.
        #[arg(long)]
        checkpoint_every: Option<u64>,
        /// Continue the run saved in this checkpoint (give the same settings).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Test hook: stop as if interrupted once this many steps are done.
        #[arg(long, hide = true)]
        stop_after: Option<u64>,
    },
    /// Compute-optimal transfer (the paper's experiment): for each model (the pretrained
    /// weights dense, or pruned zero-shot) and each training-compute budget, fine-tune with
    /// the schedule fitted to the budget and evaluate; report the error reached per budget,
    /// the compute-optimal model per budget, and the relative error reduction of the best
    /// pruned model over dense.
    ///
    /// Each (model, budget) runs --seeds fine-tunings (mean and spread of the error). With
    /// several --lrs, each pair first picks its rate on --search-fraction of each training
    /// class held out (never the validation split); that search's compute is reported beside
    /// the budget. Every finished run is one JSON file under --runs (a re-run skips it);
    /// --shard I/N runs every N-th pair so that a scheduler can spread the work, and
    /// `prunekit transfer merge --runs DIR` assembles the results.
    ///
    /// `prunekit transfer ARGS` is `prunekit transfer run ARGS`.
    Transfer {
        #[command(subcommand)]
        cmd: TransferCmd,
    },
    /// Evaluate a model on the validation split of a data set: top-1 error and mean loss
    /// (eval-mode batch norm).
    Eval {
        /// The model (safetensors, torchvision names; pruned and trained files too).
        #[arg(long)]
        weights: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// cpu, emu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Images per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Image height and width.
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// f32 or bf16 (default: bf16 on cuda, else f32).
        #[arg(long)]
        precision: Option<PrecisionKind>,
        /// Seed of the validation split (as in train, when there is no validation set).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Filters,
    Channels,
}

#[derive(Clone, Copy, ValueEnum)]
enum CriterionArg {
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

fn run(cli: Cli) -> prunekit::Result<()> {
    match cli.cmd {
        Cmd::Bench {
            device,
            weights,
            mode,
            sparsity,
            round_to,
            batch,
            size,
            steps,
            warmup,
            precision,
            json,
            plot,
            profile,
        } => {
            if let Some(p) = &json {
                prunekit::limits::check_output_path("--json", p)?;
            }
            if let Some(p) = &plot {
                prunekit::measure::plot::check_path(p)?;
            }
            let dev = Device::parse(&device)?;
            let mut o = BenchOptions::defaults(&dev);
            if let Some(w) = &weights {
                o.weights = Some(StateDict::read(w)?);
            }
            o.modes = mode;
            o.sparsities = sparsity;
            o.round_to = round_to;
            o.batch = batch.unwrap_or(o.batch);
            o.size = size.unwrap_or(o.size);
            o.steps = steps.unwrap_or(o.steps);
            o.warmup = warmup.unwrap_or(o.warmup);
            o.precision = precision.unwrap_or(o.precision);
            o.profile = profile;
            let plan = trainbench::bench_plan(&o);
            println!(
                "prunekit bench on {}: batch {}, {}x{}, {}, {} warm-up + {} timed steps per row, {} rows",
                dev.name(),
                o.batch,
                o.size,
                o.size,
                o.precision,
                o.warmup,
                o.steps,
                plan.len()
            );
            let per_row = o.warmup + o.steps + usize::from(o.profile);
            let bar = indicatif::ProgressBar::new((per_row * plan.len()) as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} elapsed, ~{eta} left")
                    .expect("valid template"),
            );
            let rows = trainbench::run(&dev, &o, &mut || bar.inc(1));
            bar.finish_and_clear();
            let rows = rows?;
            print!("{}", trainbench::table(&rows));
            if o.profile {
                println!("\nper-op profile of one training step per row ({}):", dev.kind());
                print!("{}", prunekit::measure::profile_table::bench_table(&rows));
            }
            if rows.iter().any(|r| !r.loss.is_finite()) {
                println!("note: the loss became non-finite in some rows (synthetic data); the timings stand");
            }
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&rows).map_err(|e| invalid!("JSON: {e}"))?;
                std::fs::write(&path, text + "\n")
                    .map_err(|e| prunekit::Error::Io { path: path.display().to_string(), source: e })?;
                println!("rows written to {}", path.display());
            }
            if let Some(path) = plot {
                let title = format!("ResNet50 training step, {} on {}", o.precision, dev.name());
                prunekit::measure::plot::plot(&rows, &path, &title)?;
                println!("plot written to {}", path.display());
            }
            Ok(())
        }
        Cmd::Verify { reference, device, precision } => {
            let dev = Device::parse(&device)?;
            let report = prunekit::verify::verify(&reference, &dev, precision)?;
            println!("verify {} on {} ({})", reference.display(), report.device, report.precision_kind);
            print!("{report}");
            if report.ok() {
                println!("all checks passed");
                Ok(())
            } else {
                Err(invalid!("{} is off the reference (see above)", reference.display()))
            }
        }
        Cmd::Info { report } => {
            println!("prunekit {}", env!("CARGO_PKG_VERSION"));
            match prunekit::gpu::nvcc_version() {
                Some(v) => println!("CUDA kernels: compiled by nvcc {v}"),
                None => println!("CUDA kernels: not compiled (no nvcc at build time); cpu and emu work"),
            }
            match prunekit::gpu::Gpu::cuda(0) {
                Ok(g) => println!("cuda: {}", g.name()),
                Err(e) => println!("cuda: unavailable: {e}"),
            }
            println!("cpu: {}", Device::Cpu.name());
            if report {
                println!("\n{}", prunekit::gpu::resource_report());
            }
            Ok(())
        }
        Cmd::ConvBench { device, batch, size, sparsity, round_to, mode, passes, dtype, iters, json } => {
            use prunekit::measure::conv::{self as conv_bench, BenchOpts, DType};
            use prunekit::ops::conv::Pass;
            let list =
                |s: &str| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect::<Vec<_>>();
            let sparsities = list(&sparsity)
                .iter()
                .map(|x| x.parse::<f64>().map_err(|_| prunekit::invalid!("--sparsity: {x:?} is not a number")))
                .collect::<prunekit::Result<Vec<_>>>()?;
            let passes = list(&passes).iter().map(|p| Pass::parse(p)).collect::<prunekit::Result<Vec<_>>>()?;
            let mode: prunekit::prune::Mode = mode.parse()?;
            let opts =
                BenchOpts { batch, size, sparsities, mode, round_to, passes, dtype: DType::parse(&dtype)?, iters };
            if let Some(p) = &json {
                prunekit::limits::check_output_path("--json", p)?;
            }
            let dev = Device::parse(&device)?;
            println!("conv-bench on {} ({}, batch {batch}, {size}x{size})", dev.name(), opts.dtype.name());
            let (rows, note) = conv_bench::run(&dev, &opts, |r| {
                eprint!(
                    "{}",
                    conv_bench::table(std::slice::from_ref(r))
                        .lines()
                        .nth(1)
                        .map(|l| format!("{l}\n"))
                        .unwrap_or_default()
                )
            })?;
            println!("{}", conv_bench::table(&rows));
            if let Some(n) = &note {
                println!("note: {n}");
            }
            if let Some(path) = json {
                let with_cudnn = dev.kind() == "cuda";
                let v: Vec<_> = rows.iter().map(|r| r.to_json(with_cudnn)).collect();
                let text = serde_json::to_string_pretty(&v).expect("plain values");
                std::fs::write(&path, text + "\n")
                    .map_err(|e| prunekit::Error::Io { path: path.display().to_string(), source: e })?;
                println!("wrote {} rows to {}", rows.len(), path.display());
            }
            Ok(())
        }
        Cmd::Train {
            data,
            recipe,
            weights,
            mode,
            sparsity,
            budget,
            epochs,
            steps,
            lr,
            eval_every,
            layers,
            width,
            fresh_head,
            out,
            log,
            checkpoint,
            checkpoint_every,
            resume,
            stop_after,
        } => {
            let length = match (budget, epochs, steps) {
                (Some(g), None, None) => Length::Gflops(g),
                (None, Some(e), None) => Length::Epochs(e),
                (None, None, Some(s)) => Length::Steps(s),
                _ => return Err(invalid!("give exactly one of --budget, --epochs and --steps")),
            };
            prunekit::ensure!(
                !fresh_head || weights.is_some(),
                "--fresh-head needs --weights (a network from scratch has a fresh classifier already)"
            );
            let (dev, base) = recipe.config(data.normalize)?;
            let seed = recipe.seed;
            let interrupt = Arc::new(AtomicBool::new(false));
            let cfg = TrainConfig {
                length,
                lr,
                eval_every,
                checkpoint,
                checkpoint_every,
                log,
                out,
                progress: true,
                interrupt: Some(interrupt.clone()),
                stop_after,
                ..base
            };
            cfg.check()?;
            let prune = recipe.prune(mode, sparsity)?;
            let layers = match layers {
                None => [3, 4, 6, 3],
                Some(v) => <[usize; 4]>::try_from(v.as_slice())
                    .map_err(|_| invalid!("--layers takes four numbers (blocks per stage), not {}", v.len()))?,
            };
            let resume_cp = match &resume {
                Some(p) => Some(Checkpoint::read(p)?),
                None => None,
            };
            let ds = data.open(seed)?;
            println!("{}", ds.summary());
            let start = match (resume_cp, resume) {
                (Some(cp), Some(p)) => {
                    if weights.is_some() || prune.is_some() {
                        println!(
                            "note: resuming: the model comes from the checkpoint (--weights, --mode are not used)"
                        );
                    }
                    Start::Resume(Box::new(cp), p)
                }
                _ => {
                    let source = match &weights {
                        Some(w) => ModelSource::Weights(StateDict::read(w)?),
                        None => ModelSource::Scratch { layers, width: width.unwrap_or(64) },
                    };
                    let head = if fresh_head { training::Head::Fresh } else { training::Head::KeepIfSameClasses };
                    let prep = training::prepare_model(&dev, source, ds.classes().len(), prune.as_ref(), head, seed)?;
                    for n in &prep.notes {
                        println!("{n}");
                    }
                    Start::Fresh(prep.state)
                }
            };
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                // A second signal while the first is being handled ends the process at once.
                signal_hook::flag::register_conditional_shutdown(sig, 130, interrupt.clone())
                    .and_then(|_| signal_hook::flag::register(sig, interrupt.clone()))
                    .map_err(|e| invalid!("cannot install the signal handler: {e}"))?;
            }
            match training::train(&dev, start, &ds, &cfg, &mut |l| println!("{l}"))? {
                Outcome::Finished(s) => {
                    let eval = match s.eval {
                        Some(e) => format!(", val error {:.4}, val loss {:.4} on {} images", e.error, e.loss, e.images),
                        None => String::new(),
                    };
                    println!(
                        "done: {} steps, {} images, {:.2} training GFLOPs in {:.1} s; last train loss {:.4}{eval}",
                        s.steps, s.images, s.train_gflops, s.wall_s, s.last_loss
                    );
                    Ok(())
                }
                Outcome::Interrupted { step, checkpoint } => {
                    match checkpoint {
                        Some(p) => println!(
                            "interrupted after step {step}: checkpoint written to {} (continue with --resume {})",
                            p.display(),
                            p.display()
                        ),
                        None => println!("interrupted after step {step}: no --checkpoint, nothing saved"),
                    }
                    std::process::exit(130);
                }
            }
        }
        Cmd::Transfer { cmd: TransferCmd::Merge { runs, json, plot } } => {
            check_report_outputs(json.as_deref(), plot.as_deref())?;
            let report = transfer::merge(&runs)?;
            print!("{}", report.table());
            write_report(&report, json.as_deref(), plot.as_deref())
        }
        Cmd::Transfer { cmd: TransferCmd::Run(a) } => {
            let (dev, recipe) = a.recipe.config(a.data.normalize)?;
            check_report_outputs(a.json.as_deref(), a.plot.as_deref())?;
            let models = transfer::parse_models(&a.models)?;
            let budgets = transfer::parse_positive_list("--budgets", &a.budgets)?;
            let lrs = match &a.lrs {
                Some(l) => transfer::parse_positive_list("--lrs", l)?,
                None => vec![a.lr],
            };
            let shard = a.shard.unwrap_or(Shard::ALL);
            if shard.count > 1 && a.runs.is_none() {
                return Err(invalid!("--shard needs --runs DIR: a shard's runs are merged from there"));
            }
            let weights = StateDict::read(&a.weights)?;
            let mut exp = Experiment::new(weights, &transfer::weights_identity(&a.weights)?, models, budgets);
            exp.seeds = a.seeds;
            exp.lrs = lrs;
            exp.search_fraction = a.search_fraction;
            exp.round_to = a.recipe.round_to;
            exp.criterion = a.recipe.criterion.into();
            exp.recipe = recipe;
            exp.shard = shard;
            exp.runs = a.runs.clone();
            exp.head = if a.keep_head { training::Head::KeepIfSameClasses } else { training::Head::Fresh };
            exp.check()?;
            let ds = a.data.open(a.recipe.seed)?;
            println!("{}", ds.summary());
            let report = transfer::run_experiment(&dev, &exp, &ds, &mut |l| println!("{l}"))?;
            print!("{}", report.table());
            if shard.count > 1 {
                println!(
                    "shard {shard} done; when every shard is done: prunekit transfer merge --runs {}",
                    a.runs.as_ref().expect("checked").display()
                );
            }
            write_report(&report, a.json.as_deref(), a.plot.as_deref())
        }
        Cmd::Eval { weights, data, device, batch, size, precision, seed } => {
            let dev = Device::parse(&device)?;
            let precision =
                precision.unwrap_or(if dev.kind() == "cuda" { PrecisionKind::Bf16 } else { PrecisionKind::F32 });
            let sd = StateDict::read(&weights)?;
            let arch = Arch::from_state(&sd)?;
            let ds = data.open(seed)?;
            println!("{}", ds.summary());
            prunekit::ensure!(
                arch.classes == ds.classes().len(),
                "{} has {} outputs and the data {} classes",
                weights.display(),
                arch.classes,
                ds.classes().len()
            );
            prunekit::ensure!(batch >= 1 && size >= 1, "--batch and --size must be at least 1");
            let lc = LoaderConfig { batch, size, norm: data.normalize, seed, ..LoaderConfig::default() };
            let host = (lc.prefetch + 3) as f64 * (batch * 3 * size * size * 4) as f64;
            prunekit::limits::check_training_memory(&dev, &arch, precision, batch, size, host)?;
            let mut model = Model::from_state(&dev, &sd, precision)?;
            let mut ws = model.workspace(batch, size, size)?;
            let mut loader = Loader::eval(&ds.val, &lc)?;
            let mut b = loader.new_batch();
            let r = training::evaluate(&mut model, &mut ws, &mut loader, &mut b)?;
            println!(
                "{}: top-1 error {:.4}, mean loss {:.4} on {} val images ({size}x{size}, {} on {})",
                weights.display(),
                r.error,
                r.loss,
                r.images,
                precision,
                dev.name()
            );
            Ok(())
        }
        Cmd::Prune { weights, mode, sparsity, round_to, criterion, device, out, size } => {
            if round_to == 0 {
                return Err(invalid!("--round-to must be at least 1"));
            }
            let mode: Mode = mode.into();
            let norm: Norm = criterion.into();
            let config = PruneConfig::new(mode, sparsity, round_to, norm)?;
            prunekit::limits::check_output_path("--out", &out)?;
            let dev = Device::parse(&device)?;
            let sd = StateDict::read(&weights)?;
            let t = std::time::Instant::now();
            let pruned = prune_state(&dev, &sd, &config)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            pruned.to_file_state().write(&out)?;
            print!("{}", pruned.plan.table(size, size));
            println!(
                "pruned {} ({mode} mode, sparsity {sparsity}, round to {round_to}) on {} in {ms:.1} ms: {} groups -> {}",
                weights.display(),
                dev.name(),
                pruned.keep.len(),
                out.display()
            );
            Ok(())
        }
    }
}

fn check_report_outputs(json: Option<&std::path::Path>, plot: Option<&std::path::Path>) -> prunekit::Result<()> {
    if let Some(j) = json {
        prunekit::limits::check_output_path("--json", j)?;
    }
    if let Some(p) = plot {
        transfer::check_plot_path(p)?;
    }
    Ok(())
}

fn write_report(
    report: &Report,
    json: Option<&std::path::Path>,
    plot: Option<&std::path::Path>,
) -> prunekit::Result<()> {
    if let Some(j) = json {
        report.write_json(j)?;
        println!("wrote the report to {}", j.display());
    }
    if let Some(p) = plot {
        let title = match &report.settings {
            Some(s) => format!(
                "transfer to {} classes ({}): {} training images, {} validation images",
                s.get("classes").map_or(0, |c| c.split(',').count()),
                s.get("classes").map_or("", String::as_str),
                s.get("train_images").map_or("?", String::as_str),
                s.get("val_images").map_or("?", String::as_str)
            ),
            None => "transfer".to_string(),
        };
        transfer::plot(report, p, &title)?;
        println!("wrote the plot to {}", p.display());
    }
    Ok(())
}

/// The command line with `run` inserted after `transfer` when no subcommand of it follows,
/// so that `prunekit transfer --weights ...` means `prunekit transfer run --weights ...`.
fn with_default_transfer_run(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if let Some(i) = args.iter().skip(1).position(|a| !a.to_string_lossy().starts_with('-')).map(|i| i + 1) {
        if args[i] == "transfer" {
            let next = args.get(i + 1).map(|a| a.to_string_lossy().into_owned());
            if !matches!(next.as_deref(), Some("run" | "merge" | "help")) {
                args.insert(i + 1, "run".into());
            }
        }
    }
    args
}

fn main() -> ExitCode {
    match run(Cli::parse_from(with_default_transfer_run(std::env::args_os().collect()))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
