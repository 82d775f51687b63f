//! The prunekit command line. Each subcommand parses its arguments here and calls the
//! library; see `prunekit --help`.

use clap::{Parser, Subcommand};
use prunekit::Device;
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
