//! `prunekit train`: train a ResNet on image data, from pretrained weights (pruned first
//! or not) or from scratch.

use crate::args::{DataArgs, ModeArg, RecipeArgs};
use clap::ArgGroup;
use prunekit::invalid;
use prunekit::model::StateDict;
use prunekit::prune::Sparsity;
use prunekit::train::{self as training, Checkpoint, Length, ModelSource, Outcome, Start, TrainConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
#[derive(clap::Args)]
#[command(group(ArgGroup::new("length").required(true).args(["budget", "epochs", "steps"])))]
pub struct TrainArgs {
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
}

/// Runs `prunekit train`. An interrupted run (SIGINT, SIGTERM, --stop-after) ends the
/// process with status 130 after its checkpoint is written.
pub fn run(a: TrainArgs) -> prunekit::Result<()> {
    let length = match (a.budget, a.epochs, a.steps) {
        (Some(g), None, None) => Length::Gflops(g),
        (None, Some(e), None) => Length::Epochs(e),
        (None, None, Some(s)) => Length::Steps(s),
        _ => return Err(invalid!("give exactly one of --budget, --epochs and --steps")),
    };
    prunekit::ensure!(
        !a.fresh_head || a.weights.is_some(),
        "--fresh-head needs --weights (a network from scratch has a fresh classifier already)"
    );
    let (dev, base) = a.recipe.config(a.data.normalize, false)?;
    let seed = a.recipe.seed;
    let interrupt = Arc::new(AtomicBool::new(false));
    let cfg = TrainConfig {
        length,
        lr: a.lr,
        eval_every: a.eval_every,
        checkpoint: a.checkpoint,
        checkpoint_every: a.checkpoint_every,
        log: a.log,
        out: a.out,
        progress: true,
        interrupt: Some(interrupt.clone()),
        stop_after: a.stop_after,
        ..base
    };
    cfg.check()?;
    let prune = a.recipe.prune(a.mode, a.sparsity)?;
    let layers = match a.layers {
        None => [3, 4, 6, 3],
        Some(v) => <[usize; 4]>::try_from(v.as_slice())
            .map_err(|_| invalid!("--layers takes four numbers (blocks per stage), not {}", v.len()))?,
    };
    let resume_cp = match &a.resume {
        Some(p) => Some(Checkpoint::read(p)?),
        None => None,
    };
    let ds = a.data.open(seed)?;
    println!("{}", ds.summary());
    let start = match (resume_cp, a.resume) {
        (Some(cp), Some(p)) => {
            if a.weights.is_some() || prune.is_some() {
                println!("note: resuming: the model comes from the checkpoint (--weights, --mode are not used)");
            }
            Start::Resume(Box::new(cp), p)
        }
        _ => {
            let source = match &a.weights {
                Some(w) => ModelSource::Weights(StateDict::read(w)?),
                None => ModelSource::Scratch { layers, width: a.width.unwrap_or(64) },
            };
            let head = if a.fresh_head { training::Head::Fresh } else { training::Head::KeepIfSameClasses };
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
