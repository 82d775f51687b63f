//! `prunekit prune`: zero-shot pruning of a model file.

use crate::args::{CriterionArg, ModeArg};
use prunekit::model::StateDict;
use prunekit::prune::{prune_owned_state, Mode, Norm, PruneConfig, Sparsity};
use prunekit::{invalid, Device};
use std::path::PathBuf;

/// Prune a model zero-shot by weight magnitude and write the compacted model.
///
/// The output holds the compacted tensors with torchvision's names (loadable into a
/// torchvision ResNet of those widths), one i64 tensor `keep.<group>` per pruned group
/// (the kept indices of the dense model), and the settings as metadata.
#[derive(clap::Args)]
pub struct PruneArgs {
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
    // Not DeviceArgs: pruning has no precision to choose.
    /// cpu, emu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where to write the pruned model (written to a temporary file, then renamed).
    #[arg(long)]
    out: PathBuf,
    /// Image size for the FLOP table.
    #[arg(long, default_value_t = 224)]
    size: usize,
}

/// Runs `prunekit prune`: writes --out, prints the plan's FLOP table and a summary.
pub fn run(a: PruneArgs) -> prunekit::Result<()> {
    let PruneArgs { weights, mode, sparsity, round_to, criterion, device, out, size } = a;
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
    let pruned = prune_owned_state(&dev, sd, &config)?;
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
