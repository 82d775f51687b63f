//! `prunekit verify`: the training stack on a device against PyTorch's reference file.

use crate::args::BnFusionArg;
use prunekit::model::PrecisionKind;
use prunekit::{invalid, Device};
use std::path::PathBuf;

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
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A reference file of kind = model (see tests/data/README.md).
    #[arg(long)]
    reference: PathBuf,
    // Not DeviceArgs: verify defaults to the CPU and to f32 on every device.
    /// cpu, emu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    precision: PrecisionKind,
    /// The BN work the device's train step folds into the convolutions (kernel devices;
    /// see `bench --bn-fusion`): none (default), load, dgrad or all.
    #[arg(long, value_enum, default_value_t = BnFusionArg::None)]
    bn_fusion: BnFusionArg,
}

/// Runs `prunekit verify`: prints the report; an error when any tensor is off.
pub fn run(a: VerifyArgs) -> prunekit::Result<()> {
    let dev = Device::parse(&a.device)?;
    let report = prunekit::verify::verify(&a.reference, &dev, a.precision, a.bn_fusion.fusion())?;
    println!(
        "verify {} on {} ({}, --bn-fusion {})",
        a.reference.display(),
        report.device,
        report.precision_kind,
        a.bn_fusion.fusion()
    );
    print!("{report}");
    if report.ok() {
        println!("all checks passed");
        Ok(())
    } else {
        Err(invalid!("{} is off the reference (see above)", a.reference.display()))
    }
}
