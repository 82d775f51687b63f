//! A trainer that embeds prunekit: load torchvision weights (or make a fresh model),
//! prune them, train on its own batches, save the result.
//!
//!   cargo run --release --example embed -- [--device cpu|emu|cuda] [--weights FILE] [--out FILE]

use prunekit::model::{init::torchvision_init, Arch, Model, PrecisionKind, Sgd, StateDict};
use prunekit::prune::{prune_state, Mode, Norm, PruneConfig};
use prunekit::Device;

/// The trainer's own data: here a few synthetic images, NCHW f32, and their classes.
fn my_batch(step: usize, n: usize, size: usize, classes: usize) -> (Vec<f32>, Vec<i64>) {
    let images = (0..n * 3 * size * size).map(|i| ((i * 7 + step * 13) % 29) as f32 / 29.0 - 0.5).collect();
    let targets = (0..n).map(|i| ((i + step) % classes) as i64).collect();
    (images, targets)
}

fn main() -> prunekit::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let dev = Device::parse(&arg("--device").unwrap_or_else(|| "cpu".into()))?;

    // 1. Weights with torchvision's names (here a small fresh bottleneck ResNet).
    let dense = match arg("--weights") {
        Some(path) => StateDict::read(path.as_ref())?,
        None => torchvision_init(&Arch::bottleneck([1, 1, 1, 1], 10), 0),
    };

    // 2. Plan and apply a pruning: half the filters of every block's conv1 and conv2.
    let config = PruneConfig::new(Mode::Filters, "0.5".parse()?, 8, Norm::L1)?;
    let pruned = prune_state(&dev, &dense, &config)?;
    print!("{}", pruned.plan.table(32, 32));

    // 3. Train the compacted model on the caller's batches.
    let mut model = Model::from_state(&dev, &pruned.state, PrecisionKind::F32)?;
    let (batch, size, classes) = (4, 32, model.arch().classes);
    let mut ws = model.workspace(batch, size, size)?;
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    for step in 0..3 {
        let (images, targets) = my_batch(step, batch, size, classes);
        model.set_batch(&mut ws, &images, Some(&targets))?;
        model.train_step(&mut ws, &sgd)?;
        println!("step {step}: loss {:.4} on {}", model.loss(&ws)?, dev.name());
    }

    // 4. Save it with torchvision's names.
    let out =
        arg("--out").unwrap_or_else(|| std::env::temp_dir().join("prunekit-embed.safetensors").display().to_string());
    model.to_state()?.write(out.as_ref())?;
    println!("saved {out}");
    Ok(())
}
