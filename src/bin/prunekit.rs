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
