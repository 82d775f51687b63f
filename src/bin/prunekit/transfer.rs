//! `prunekit transfer`: the paper's compute-optimal transfer experiment (`run`, the
//! default subcommand), the assembly of sharded runs (`merge`) and the advisor that
//! predicts the compute-optimal model at a budget from the runs (`advise`).

use crate::args::{DataArgs, RecipeArgs};
use clap::Subcommand;
use prunekit::invalid;
use prunekit::model::StateDict;
use prunekit::train as training;
use prunekit::transfer::{self, Experiment, Report, Shard};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

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
#[derive(clap::Args)]
pub struct TransferArgs {
    #[command(subcommand)]
    cmd: TransferCmd,
}

// Parsed once per process: the size of the larger variant (run's options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum TransferCmd {
    Run(RunArgs),
    Merge(MergeArgs),
    Advise(AdviseArgs),
}

/// Run the experiment (or this process's --shard of it); the default.
#[derive(clap::Args)]
struct RunArgs {
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
    #[arg(long, required_unless_present = "budgets_seconds", conflicts_with = "budgets_seconds")]
    budgets: Option<String>,
    /// Budgets of training time in seconds on the device, comma-separated, instead of
    /// GFLOPs: each run's schedule is fitted to the steps a short timed probe of the step
    /// says fit, and the run stops when its training time reaches the budget.
    #[arg(long)]
    budgets_seconds: Option<String>,
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

/// Assemble the runs that shards wrote into one folder: the table, --json and --plot of
/// the whole experiment.
#[derive(clap::Args)]
struct MergeArgs {
    /// The runs folder.
    #[arg(long)]
    runs: PathBuf,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the plot to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Predict from the runs an experiment has: fit each model's validation error against its
/// budget with a saturating power law e(C) = e_inf + a*C^-b (every seed's error; 90%
/// bootstrap intervals), then print each model's predicted error at --budget, the
/// compute-optimal model there (and those within the seeds' noise of it), and the budgets
/// where the best model crosses another. Each model needs runs at 3 or more budgets.
/// --validate also fits at the budgets up to B/4 and predicts B, for every B, and scores
/// the predictions against the measured errors.
#[derive(clap::Args)]
struct AdviseArgs {
    /// The runs folder (of `prunekit transfer --runs`).
    #[arg(long)]
    runs: PathBuf,
    /// The budget to advise at, in the runs' unit: GFLOPs, or seconds for runs made with
    /// --budgets-seconds.
    #[arg(long)]
    budget: f64,
    /// Also validate the advisor on these runs (fit up to B/4, predict B, for every B).
    #[arg(long)]
    validate: bool,
    /// Write the advice (and the validation) here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the fits beside the measured points to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Runs `prunekit transfer run`, `merge` or `advise`.
pub fn run(a: TransferArgs) -> prunekit::Result<()> {
    match a.cmd {
        TransferCmd::Run(a) => run_experiment(a),
        TransferCmd::Merge(a) => merge(a),
        TransferCmd::Advise(a) => advise(a),
    }
}

fn advise(a: AdviseArgs) -> prunekit::Result<()> {
    if let Some(j) = &a.json {
        prunekit::limits::check_output_path("--json", j)?;
    }
    if let Some(p) = &a.plot {
        transfer::check_plot_path(p)?;
    }
    let report = transfer::merge(&a.runs)?;
    let advice = transfer::advise(&report, a.budget, None)?;
    print!("{}", advice.table());
    let checks = if a.validate {
        let c = transfer::validate(&report)?;
        println!("\nvalidation: fit at the budgets up to B/4, predict B:");
        print!("{}", transfer::validation_table(&c));
        Some(c)
    } else {
        None
    };
    if let Some(j) = &a.json {
        let v = serde_json::json!({ "advice": advice, "validation": checks });
        prunekit::limits::write_atomic(j, &(serde_json::to_string_pretty(&v).expect("plain values") + "\n"))?;
        println!("wrote the advice to {}", j.display());
    }
    if let Some(p) = &a.plot {
        transfer::plot_advice(
            &report,
            &advice,
            p,
            &format!("fitted error against compute; advice at {} GFLOPs", a.budget),
        )?;
        println!("wrote the plot to {}", p.display());
    }
    Ok(())
}

fn merge(a: MergeArgs) -> prunekit::Result<()> {
    check_report_outputs(a.json.as_deref(), a.plot.as_deref())?;
    let report = transfer::merge(&a.runs)?;
    print!("{}", report.table());
    write_report(&report, a.json.as_deref(), a.plot.as_deref())
}

fn run_experiment(a: RunArgs) -> prunekit::Result<()> {
    let (dev, recipe) = a.recipe.config(a.data.normalize, true)?;
    check_report_outputs(a.json.as_deref(), a.plot.as_deref())?;
    let models = transfer::parse_models(&a.models)?;
    let (budgets, unit) = match (&a.budgets, &a.budgets_seconds) {
        (Some(b), None) => (transfer::parse_positive_list("--budgets", b)?, transfer::BudgetUnit::Gflops),
        (None, Some(t)) => (transfer::parse_positive_list("--budgets-seconds", t)?, transfer::BudgetUnit::Seconds),
        _ => return Err(invalid!("give one of --budgets and --budgets-seconds")),
    };
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
    exp.budget_unit = unit;
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

/// Checks --json and --plot before the work starts.
fn check_report_outputs(json: Option<&Path>, plot: Option<&Path>) -> prunekit::Result<()> {
    if let Some(j) = json {
        prunekit::limits::check_output_path("--json", j)?;
    }
    if let Some(p) = plot {
        transfer::check_plot_path(p)?;
    }
    Ok(())
}

/// Writes the report to --json and its plot to --plot, where given.
fn write_report(report: &Report, json: Option<&Path>, plot: Option<&Path>) -> prunekit::Result<()> {
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
pub fn with_default_run(mut args: Vec<OsString>) -> Vec<OsString> {
    if let Some(i) = args.iter().skip(1).position(|a| !a.to_string_lossy().starts_with('-')).map(|i| i + 1) {
        if args[i] == "transfer" {
            let next = args.get(i + 1).map(|a| a.to_string_lossy().into_owned());
            if !matches!(next.as_deref(), Some("run" | "merge" | "advise" | "help")) {
                args.insert(i + 1, "run".into());
            }
        }
    }
    args
}
