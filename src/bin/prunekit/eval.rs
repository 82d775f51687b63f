//! `prunekit eval`: a model's top-1 error and mean loss on the validation split.

use crate::args::{DataArgs, DeviceArgs};
use prunekit::data::{Loader, LoaderConfig};
use prunekit::model::{Arch, Model, StateDict};
use prunekit::train as training;
use std::path::PathBuf;

/// Evaluate a model on the validation split of a data set: top-1 error and mean loss
/// (eval-mode batch norm).
#[derive(clap::Args)]
pub struct EvalArgs {
    /// The model (safetensors, torchvision names; pruned and trained files too).
    #[arg(long)]
    weights: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Image height and width.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Seed of the validation split (as in train, when there is no validation set).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `prunekit eval`.
pub fn run(a: EvalArgs) -> prunekit::Result<()> {
    let EvalArgs { weights, data, device, batch, size, seed } = a;
    let (dev, precision) = device.open()?;
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
