//! Opens a data set with prunekit's data module, carves a task, and times the training
//! loader: the smoke check on real data (e.g. Debian's dataset-fashion-mnist).
//!
//!   cargo run --release --example data -- SPEC [--val SPEC] [--classes SEL] [--per-class N]
//!       [--size 32] [--batch 256] [--augment crop-flip] [--epochs 2] [--threads 0]
//!
//! SPEC is `idx:IMAGES,LABELS` or an image folder.

use std::time::Instant;

use prunekit::data::{Dataset, Loader, LoaderConfig, OpenOptions, Position};

fn main() -> prunekit::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, default: usize| -> prunekit::Result<usize> {
        arg(name).map_or(Ok(default), |v| v.parse().map_err(|_| prunekit::invalid!("{name} {v}: not a number")))
    };
    let spec =
        args.get(1).filter(|a| !a.starts_with("--")).ok_or_else(|| prunekit::invalid!("usage: data SPEC ..."))?;
    let mut data = Dataset::open(spec, &OpenOptions { val: arg("--val"), ..OpenOptions::default() })?;
    if let Some(sel) = arg("--classes") {
        data = data.select(&sel.parse()?)?;
    }
    if let Some(n) = arg("--per-class") {
        data = data.per_class(n.parse().map_err(|_| prunekit::invalid!("--per-class {n}: not a number"))?, 0)?;
    }
    println!("{}", data.summary());
    println!("train per class {:?}, val per class {:?}", data.train.class_counts(), data.val.class_counts());

    let cfg = LoaderConfig {
        batch: num("--batch", 256)?,
        size: num("--size", 32)?,
        augment: arg("--augment").map_or(Ok(Default::default()), |a| a.parse())?,
        threads: num("--threads", 0)?,
        ..LoaderConfig::default()
    };
    let mut train = Loader::train(&data.train, &cfg, Position::default())?;
    let mut batch = train.new_batch();
    for epoch in 0..num("--epochs", 2)? {
        let t = Instant::now();
        let steps = train.steps_per_epoch();
        let mut sum = 0.0f64;
        for _ in 0..steps {
            train.next(&mut batch)?;
            sum += batch.images.iter().map(|&v| v as f64).sum::<f64>();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "epoch {epoch}: {steps} batches of {}, {:.0} img/s, mean value {:.4}; {}",
            cfg.batch,
            (steps * cfg.batch) as f64 / s,
            sum / (steps * batch.images.len()) as f64,
            train.cache_report()
        );
    }
    let mut val = Loader::eval(&data.val, &cfg)?;
    let (mut n, mut hist) = (0, vec![0usize; data.classes().len()]);
    while val.next(&mut batch)? {
        n += batch.valid;
        for &t in &batch.targets[..batch.valid] {
            hist[t as usize] += 1;
        }
    }
    println!("val pass: {n} images, per class {hist:?}");
    Ok(())
}
