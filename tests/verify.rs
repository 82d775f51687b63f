//! `prunekit verify` against the model references PyTorch wrote: they pass on the CPU
//! and through the kernels in the emulation, a wrong expectation fails, and a file of
//! another kind is a clear error.

mod common;

use common::data;
use prunekit::model::{PrecisionKind, StateDict};
use prunekit::verify::{verify, Group};
use prunekit::Device;
use std::path::Path;

const MODELS: &[&str] =
    &["model-tiny-irregular.safetensors", "model-tiny-b1-odd.safetensors", "model-resnet50-narrow.safetensors"];

fn check_all(dev: &Device, precision: PrecisionKind) {
    for f in MODELS {
        let r = verify(&data(f), dev, precision).unwrap();
        assert!(r.ok(), "{f} on {} ({precision}):\n{r}", dev.name());
        assert_eq!(r.groups.len(), 6);
    }
}

#[test]
fn references_pass_on_cpu() {
    check_all(&Device::Cpu, PrecisionKind::F32);
}

#[test]
fn references_pass_in_the_emulation() {
    check_all(&common::emu_devices()[0], PrecisionKind::F32);
    let r = verify(&data(MODELS[0]), &common::emu_devices()[1], PrecisionKind::F32).unwrap();
    assert!(r.ok(), "reversed fiber order:\n{r}");
}

#[test]
fn bf16_passes_its_tolerances() {
    let r = verify(&data(MODELS[0]), &Device::Cpu, PrecisionKind::Bf16).unwrap();
    assert!(r.ok(), "{r}");
    let r = verify(&data(MODELS[1]), &common::emu_devices()[0], PrecisionKind::Bf16).unwrap();
    assert!(r.ok(), "{r}");
}

/// Writes `f` with one expectation changed, verifies it, and returns the failing groups.
fn tampered(f: &str, name: &str, change: impl Fn(&mut [f32])) -> Vec<Group> {
    let mut sd = StateDict::read(&data(f)).unwrap();
    let t = sd.tensors.get_mut(name).unwrap_or_else(|| panic!("{name}"));
    match &mut t.data {
        prunekit::model::Data::F32(v) => change(v),
        _ => panic!("{name} is not f32"),
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tampered.safetensors");
    sd.write(&path).unwrap();
    let r = verify(&path, &Device::Cpu, PrecisionKind::F32).unwrap();
    r.groups.iter().filter(|g| !g.ok()).map(|g| g.group).collect()
}

#[test]
fn a_wrong_expectation_fails() {
    let f = MODELS[2];
    assert_eq!(tampered(f, "expect.loss", |v| v[0] *= 1.01), vec![Group::Loss], "1% off the loss");
    assert_eq!(tampered(f, "expect.eval_logits", |v| v[3] += 1e-3), vec![Group::EvalLogits]);
    let scale = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    // On a well-conditioned reference (on the narrow ResNet50 the noise floor of the
    // deep gradients is itself a few percent of their scale).
    assert_eq!(
        tampered(MODELS[1], "expect.grad.layer2.0.conv2.weight", |v| {
            let s = scale(v);
            v[7] += 0.01 * s
        }),
        vec![Group::Gradients],
        "1% of the scale off one gradient element"
    );
    assert_eq!(tampered(f, "expect.buffer.layer3.2.bn1.running_var", |v| v[0] *= 1.01), vec![Group::RunningStats]);
    assert_eq!(tampered(MODELS[0], "expect.step.fc.bias", |v| v[1] += 1e-3), vec![Group::Step]);
    assert_eq!(tampered(MODELS[0], "expect.logits", |v| v[0] *= 1.01), vec![Group::TrainLogits]);
}

#[test]
fn other_files_are_clear_errors() {
    let err = verify(&data("prune-filters-s50-r8-l1.safetensors"), &Device::Cpu, PrecisionKind::F32).unwrap_err();
    assert!(err.to_string().contains("kind = \"model\""), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, b"not a tensor file").unwrap();
    let err = verify(&p, &Device::Cpu, PrecisionKind::F32).unwrap_err();
    assert!(err.to_string().contains("not a valid safetensors file"), "{err}");
    let err = verify(Path::new("/nonexistent/model.safetensors"), &Device::Cpu, PrecisionKind::F32).unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
    // A model reference without one of its expectations.
    let mut sd = StateDict::read(&data(MODELS[1])).unwrap();
    sd.tensors.remove("expect.grad.fc.bias");
    let p = dir.path().join("missing.safetensors");
    sd.write(&p).unwrap();
    let err = verify(&p, &Device::Cpu, PrecisionKind::F32).unwrap_err();
    assert!(err.to_string().contains("gradients"), "{err}");
}

#[test]
fn help_states_the_tolerances_in_use() {
    use prunekit::verify::{tolerance, NOISE_MULTIPLE};
    let bin = std::env::var_os("PRUNEKIT_BIN")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_prunekit")), std::path::PathBuf::from);
    let out = std::process::Command::new(bin).args(["verify", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains(&format!("+ {NOISE_MULTIPLE} * noise")), "{help}");
    let (f32t, bf16t) =
        (tolerance(Group::Gradients, PrecisionKind::F32), tolerance(Group::Gradients, PrecisionKind::Bf16));
    assert!(help.contains(&format!("atol = {:e} and rtol = {:e} in f32", f32t.atol, f32t.rtol)), "{help}");
    assert!(help.contains(&format!("atol = rtol = {:e} in bf16", bf16t.atol)) && bf16t.atol == bf16t.rtol, "{help}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_references_pass() {
    let dev = common::cuda_device();
    check_all(&dev, PrecisionKind::F32);
    for f in &MODELS[..2] {
        let r = verify(&data(f), &dev, PrecisionKind::Bf16).unwrap();
        assert!(r.ok(), "{f} bf16:\n{r}");
    }
}
