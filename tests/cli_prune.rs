//! `prunekit prune` end to end: the output matches PyTorch's reference, and bad input
//! gets a clear message, a non-zero exit and no output file.

mod common;

use common::cli::prunekit;
use common::data;
use prunekit::model::{Model, PrecisionKind, StateDict, Tensor};
use prunekit::Device;
use std::path::{Path, PathBuf};

/// The dense model of a prune reference file, written alone to `dir`.
fn dense_model(dir: &Path, reference: &str) -> (PathBuf, StateDict) {
    let mut sd = StateDict::read(&data(reference)).unwrap();
    let expect = sd.split_prefix("expect.");
    sd.metadata.clear();
    let path = dir.join("dense.safetensors");
    sd.write(&path).unwrap();
    (path, expect)
}

#[test]
fn prune_cli_matches_reference_and_writes_keep_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, expect) = dense_model(dir.path(), "prune-channels-s30-r1-l2.safetensors");
    let out = dir.path().join("pruned.safetensors");
    for device in ["cpu", "emu"] {
        let o = prunekit(&[
            "prune",
            "--weights",
            dense.to_str().unwrap(),
            "--mode",
            "channels",
            "--sparsity",
            "0.3",
            "--round-to",
            "1",
            "--criterion",
            "l2",
            "--device",
            device,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = StateDict::read(&out).unwrap();
        assert_eq!(got.tensors.len(), expect.tensors.len());
        for (name, t) in &expect.tensors {
            assert_eq!(got.tensors.get(name), Some(t), "{device}: {name}");
        }
        assert_eq!(got.metadata["mode"], "channels");
        assert_eq!(got.metadata["sparsity"], "0.3");
        assert_eq!(got.metadata["round_to"], "1");
        assert_eq!(got.metadata["criterion"], "l2");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("GFLOPs forward per image"), "{stdout}");
        // The output loads into the training stack as it is (keep.* beside the model).
        let model = Model::from_state(&Device::Cpu, &got, PrecisionKind::F32).unwrap();
        assert_eq!(model.arch().fc_in(), got.tensors["fc.weight"].shape[1]);
    }
}

fn assert_refused(args: &[&str], out: &Path, needle: &str) {
    let o = prunekit(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted {args:?}");
    assert!(stderr.to_lowercase().contains(&needle.to_lowercase()), "{args:?}: expected {needle:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "{args:?} left an output file");
}

#[test]
fn prune_cli_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, _) = dense_model(dir.path(), "prune-filters-s50-r8-l1.safetensors");
    let out = dir.path().join("out.safetensors");
    let o = out.to_str().unwrap();
    let d = dense.to_str().unwrap();
    let base = |s: &'static str| vec!["prune", "--weights", d, "--mode", "filters", "--sparsity", s, "--out", o];
    assert_refused(&base("1"), &out, "below 1");
    assert_refused(&base("1.5"), &out, "below 1");
    assert_refused(&base("-0.1"), &out, "sparsity");
    assert_refused(&base("abc"), &out, "not a decimal");
    assert_refused(&base("nan"), &out, "not a decimal");
    let mut a = base("0.5");
    a.extend(["--round-to", "0"]);
    assert_refused(&a, &out, "round-to");
    let mut a = base("0.5");
    a[4] = "weights";
    assert_refused(&a, &out, "invalid value 'weights'");
    let mut a = base("0.5");
    a.extend(["--device", "tpu"]);
    assert_refused(&a, &out, "unknown device");

    let missing = dir.path().join("missing.safetensors");
    let mut a = base("0.5");
    a[2] = missing.to_str().unwrap();
    assert_refused(&a, &out, "No such file");

    let bytes = std::fs::read(&dense).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut a = base("0.5");
    a[2] = truncated.to_str().unwrap();
    assert_refused(&a, &out, "not a valid safetensors file");

    let text = dir.path().join("text.safetensors");
    std::fs::write(&text, "hello, this is not a model\n").unwrap();
    let mut a = base("0.5");
    a[2] = text.to_str().unwrap();
    assert_refused(&a, &out, "not a valid safetensors file");

    let mut other = StateDict::default();
    other.tensors.insert("encoder.weight".into(), Tensor::f32(vec![2, 2], vec![1.0; 4]));
    let not_resnet = dir.path().join("other.safetensors");
    other.write(&not_resnet).unwrap();
    let mut a = base("0.5");
    a[2] = not_resnet.to_str().unwrap();
    assert_refused(&a, &out, "not a bottleneck ResNet");

    // A tensor of the wrong shape is named.
    let mut sd = StateDict::read(&dense).unwrap();
    sd.tensors.insert("layer2.1.bn2.weight".into(), Tensor::f32(vec![3], vec![1.0; 3]));
    let bad_shape = dir.path().join("bad-shape.safetensors");
    sd.write(&bad_shape).unwrap();
    let mut a = base("0.5");
    a[2] = bad_shape.to_str().unwrap();
    assert_refused(&a, &out, "layer2.1.bn2.weight");
}
