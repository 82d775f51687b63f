//! `prunekit bench`: the main job, the training step of pruned ResNet50s against their
//! FLOP-ideal speedups.

use crate::args::{BnFusionArg, DeviceArgs};
use prunekit::invalid;
use prunekit::measure::roofline::Roofline;
use prunekit::measure::step::{self, BenchMode, BenchOptions};
use prunekit::measure::{plot, profile_table, roofline};
use prunekit::model::StateDict;
use prunekit::prune::Sparsity;
use std::path::PathBuf;

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
///
/// `--device emu:count` runs no kernel: it counts the FLOPs and bytes of one step per row
/// (256 x 224x224 bf16 by default, as cuda) and prints them per op family against the
/// roofline of a GPU (`--roofline`, default h200), with the roofline-ideal speedups, on any
/// machine and in seconds.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Dense weights to prune (safetensors, torchvision names); default: random ResNet50.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Comma-separated: filters, channels, masked.
    #[arg(long, value_delimiter = ',', default_value = "filters,channels,masked")]
    mode: Vec<BenchMode>,
    /// Comma-separated sparsities in [0, 1).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75")]
    sparsity: Vec<Sparsity>,
    /// Round kept widths up to a multiple of this.
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
    /// The GPU whose peak FLOP/s and bandwidth the profile is set against (h200, h100,
    /// a100): per family and step the least time its FLOPs and bytes allow, and the
    /// roofline-ideal speedups. Default: the cuda device's, if known; h200 with emu:count.
    #[arg(long)]
    roofline: Option<String>,
    /// Time the training step captured as one CUDA graph and replayed (cuda; elsewhere the
    /// plain step). The profiled step is never graphed: it times each op.
    #[arg(long)]
    graph: bool,
    /// The BN work a step on a kernel device folds into the convolutions: `none` (default:
    /// every BN output written, every BN backward its own passes, as on the CPU), `load`
    /// (bn1 and bn2 applied as the next conv's fprop and wgrad load their inputs, their
    /// outputs never written), `dgrad` (the BN backward sums taken in the epilogues of the
    /// dgrads that store their output gradients) or `all`. The same results up to rounding;
    /// the fusions move fewer bytes but, with the present conv kernels, take longer.
    #[arg(long, value_enum, default_value_t = BnFusionArg::None)]
    bn_fusion: BnFusionArg,
}

/// Runs `prunekit bench`: the rows as a table (and the profile table with --profile), then
/// --json and --plot.
pub fn run(a: BenchArgs) -> prunekit::Result<()> {
    if let Some(p) = &a.json {
        prunekit::limits::check_output_path("--json", p)?;
    }
    if let Some(p) = &a.plot {
        plot::check_path(p)?;
    }
    let (dev, precision) = a.device.open_counting()?;
    let counting = dev.counts_only();
    if counting && a.plot.is_some() {
        return Err(invalid!("--plot draws measured speedups, and emu:count measures no time: leave out --plot"));
    }
    let roof = match &a.roofline {
        Some(name) => Some(Roofline::named(name)?),
        None if counting => Some(Roofline::named("h200")?),
        None => Roofline::of_device(&dev.name()),
    };
    let mut o = BenchOptions::defaults(&dev);
    if let Some(w) = &a.weights {
        o.weights = Some(StateDict::read(w)?);
    }
    o.modes = a.mode;
    o.sparsities = a.sparsity;
    o.round_to = a.round_to;
    o.batch = a.batch.unwrap_or(o.batch);
    o.size = a.size.unwrap_or(o.size);
    o.steps = a.steps.unwrap_or(o.steps);
    o.warmup = a.warmup.unwrap_or(o.warmup);
    o.precision = precision;
    o.profile = a.profile || counting;
    o.graph = a.graph;
    o.bn_fusion = a.bn_fusion.fusion();
    let plan = step::bench_plan(&o);
    println!(
        "prunekit bench on {}: batch {}, {}x{}, {}, {} warm-up + {} timed{} steps per row, {} rows{}",
        dev.name(),
        o.batch,
        o.size,
        o.size,
        o.precision,
        o.warmup_steps(),
        o.steps,
        if o.graph { " graphed" } else { "" },
        plan.len(),
        match a.bn_fusion {
            BnFusionArg::All => " (BN fused: on load and dgrad sums)",
            BnFusionArg::Load => " (BN fused: on load)",
            BnFusionArg::Dgrad => " (BN fused: dgrad sums)",
            BnFusionArg::None => "",
        }
    );
    let per_row = o.warmup_steps() + o.steps + usize::from(o.profile);
    let bar = indicatif::ProgressBar::new((per_row * plan.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} elapsed, ~{eta} left")
            .expect("valid template"),
    );
    let rows = step::run(&dev, &o, &mut || bar.inc(1));
    bar.finish_and_clear();
    let mut rows = rows?;
    if counting {
        // Nothing ran: no time, no loss.
        for r in &mut rows {
            (r.step_ms, r.images_per_s, r.speedup, r.efficiency, r.loss) =
                (f64::NAN, f64::NAN, f64::NAN, f64::NAN, f32::NAN);
        }
    } else {
        print!("{}", step::table(&rows));
        if o.profile {
            println!("\nper-op profile of one training step per row ({}):", dev.kind());
            print!("{}", profile_table::bench_table(&rows));
        }
    }
    if let (true, Some(r)) = (o.profile, roof) {
        println!();
        print!("{}", roofline::table(&rows, &r, o.precision, !counting));
    }
    if !counting && rows.iter().any(|r| !r.loss.is_finite()) {
        println!("note: the loss became non-finite in some rows (synthetic data); the timings stand");
    }
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| invalid!("JSON: {e}"))?;
        std::fs::write(&path, text + "\n")
            .map_err(|e| prunekit::Error::Io { path: path.display().to_string(), source: e })?;
        println!("rows written to {}", path.display());
    }
    if let Some(path) = a.plot {
        let title = format!("ResNet50 training step, {} on {}", o.precision, dev.name());
        plot::plot(&rows, &path, &title)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}
