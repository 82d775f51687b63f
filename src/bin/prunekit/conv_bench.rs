//! `prunekit conv-bench`: every distinct convolution of ResNet50, each pass, timed (and
//! against cuDNN on cuda).

use prunekit::measure::conv::{self, BenchOpts, DType};
use prunekit::prune::Mode;
use prunekit::shape::Pass;
use prunekit::Device;
use std::path::PathBuf;

/// Time every distinct convolution of ResNet50 (dense and pruned), each pass, against
/// cuDNN on cuda.
#[derive(clap::Args)]
pub struct ConvBenchArgs {
    // Not DeviceArgs: the element type is --dtype, bf16 by default on every device.
    /// cpu, emu, cuda, cuda:N or auto.
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
    /// Whose widths the pruned shapes have: filters (inner widths) or channels (also
    /// the residual stream and the stem).
    #[arg(long, default_value = "filters")]
    mode: String,
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
    json: Option<PathBuf>,
}

/// The non-empty items of a comma-separated list.
fn list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

/// Runs `prunekit conv-bench`: each row to stderr as it is measured, then the table (and
/// --json).
pub fn run(a: ConvBenchArgs) -> prunekit::Result<()> {
    let sparsities = list(&a.sparsity)
        .iter()
        .map(|x| x.parse::<f64>().map_err(|_| prunekit::invalid!("--sparsity: {x:?} is not a number")))
        .collect::<prunekit::Result<Vec<_>>>()?;
    let passes = list(&a.passes).iter().map(|p| Pass::parse(p)).collect::<prunekit::Result<Vec<_>>>()?;
    let mode: Mode = a.mode.parse()?;
    let (batch, size) = (a.batch, a.size);
    let opts = BenchOpts {
        batch,
        size,
        sparsities,
        mode,
        round_to: a.round_to,
        passes,
        dtype: DType::parse(&a.dtype)?,
        iters: a.iters,
    };
    if let Some(p) = &a.json {
        prunekit::limits::check_output_path("--json", p)?;
    }
    let dev = Device::parse(&a.device)?;
    println!("conv-bench on {} ({}, batch {batch}, {size}x{size})", dev.name(), opts.dtype.name());
    let (rows, note) = conv::run(&dev, &opts, |r| {
        eprint!("{}", conv::table(std::slice::from_ref(r)).lines().nth(1).map(|l| format!("{l}\n")).unwrap_or_default())
    })?;
    println!("{}", conv::table(&rows));
    if let Some(n) = &note {
        println!("note: {n}");
    }
    if let Some(path) = a.json {
        let with_cudnn = dev.kind() == "cuda";
        let v: Vec<_> = rows.iter().map(|r| r.to_json(with_cudnn)).collect();
        let text = serde_json::to_string_pretty(&v).expect("plain values");
        std::fs::write(&path, text + "\n")
            .map_err(|e| prunekit::Error::Io { path: path.display().to_string(), source: e })?;
        println!("wrote {} rows to {}", rows.len(), path.display());
    }
    Ok(())
}
