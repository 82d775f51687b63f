//! The prunekit command line: one module per subcommand, each with its arguments (a clap
//! `Args` struct whose doc comment is the command's help) and a `run` that calls the
//! library; the arguments several commands share are in `args`. See `prunekit --help`.

mod args;
mod bench;
mod conv_bench;
mod eval;
mod info;
mod prune;
mod train;
mod transfer;
mod verify;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
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

// The subcommands, in the order `prunekit --help` lists them; each one's help is the doc
// comment of its Args struct.
#[derive(Subcommand)]
enum Cmd {
    Bench(bench::BenchArgs),
    Verify(verify::VerifyArgs),
    Info(info::InfoArgs),
    ConvBench(conv_bench::ConvBenchArgs),
    Prune(prune::PruneArgs),
    Train(train::TrainArgs),
    Transfer(transfer::TransferArgs),
    Eval(eval::EvalArgs),
}

fn run(cli: Cli) -> prunekit::Result<()> {
    match cli.cmd {
        Cmd::Bench(a) => bench::run(a),
        Cmd::Verify(a) => verify::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::ConvBench(a) => conv_bench::run(a),
        Cmd::Prune(a) => prune::run(a),
        Cmd::Train(a) => train::run(a),
        Cmd::Transfer(a) => transfer::run(a),
        Cmd::Eval(a) => eval::run(a),
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    match run(Cli::parse_from(transfer::with_default_run(args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
