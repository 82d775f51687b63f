//! The prunekit command line. Each subcommand parses its arguments here and calls the
//! library; see `prunekit --help`.

use clap::{Parser, Subcommand, ValueEnum};
use prunekit::bench::train::{self as trainbench, BenchMode, BenchOptions};
use prunekit::model::{PrecisionKind, StateDict};
use prunekit::prune::{prune_state, Mode, Norm, PruneConfig, Sparsity};
use prunekit::{invalid, Device};
use std::path::PathBuf;
use std::process::ExitCode;

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
                print!("{}", prunekit::bench::profile::bench_table(&rows));
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
                prunekit::bench::plot::plot(&rows, &path, &title)?;
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
        Cmd::ConvBench { device, batch, size, sparsity, round_to, passes, dtype, iters, json } => {
            use prunekit::bench::conv::{self as conv_bench, BenchOpts, DType};
            use prunekit::ops::conv::Pass;
            let list =
                |s: &str| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect::<Vec<_>>();
            let sparsities = list(&sparsity)
                .iter()
                .map(|x| x.parse::<f64>().map_err(|_| prunekit::invalid!("--sparsity: {x:?} is not a number")))
                .collect::<prunekit::Result<Vec<_>>>()?;
            let passes = list(&passes).iter().map(|p| Pass::parse(p)).collect::<prunekit::Result<Vec<_>>>()?;
            let opts = BenchOpts { batch, size, sparsities, round_to, passes, dtype: DType::parse(&dtype)?, iters };
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
        Cmd::Prune { weights, mode, sparsity, round_to, criterion, device, out, size } => {
            if round_to == 0 {
                return Err(invalid!("--round-to must be at least 1"));
            }
            let mode = match mode {
                ModeArg::Filters => Mode::Filters,
                ModeArg::Channels => Mode::Channels,
            };
            let norm = match criterion {
                CriterionArg::L1 => Norm::L1,
                CriterionArg::L2 => Norm::L2,
            };
            let config = PruneConfig::new(mode, sparsity, round_to, norm)?;
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
