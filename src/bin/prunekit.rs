//! The prunekit command line. Each subcommand parses its arguments here and calls the
//! library; see `prunekit --help`.

use clap::{Parser, Subcommand, ValueEnum};
use prunekit::model::StateDict;
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
            use prunekit::conv_bench::{self, BenchOpts, DType};
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
