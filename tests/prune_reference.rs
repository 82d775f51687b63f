//! `prune_state` against the files PyTorch wrote (tests/data/prune-*.safetensors): the
//! kept indices of every group and every tensor of the compacted model match exactly,
//! on the CPU and through the kernels (emulated, in forward and reversed fiber order).

mod common;

use prunekit::cpu::prune::Norm;
use prunekit::model::StateDict;
use prunekit::prune::{prune_state, Mode, PruneConfig};
use prunekit::Device;
use std::path::Path;

fn load(name: &str) -> (StateDict, StateDict, PruneConfig) {
    let mut sd = StateDict::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)).unwrap();
    assert_eq!(sd.metadata["kind"], "prune");
    let expect = sd.split_prefix("expect.");
    let m = &sd.metadata;
    let cfg = PruneConfig::new(
        m["mode"].parse::<Mode>().unwrap(),
        m["sparsity"].parse().unwrap(),
        m["round_to"].parse().unwrap(),
        match m["criterion"].as_str() {
            "l1" => Norm::L1,
            "l2" => Norm::L2,
            c => panic!("criterion {c}"),
        },
    )
    .unwrap();
    (sd, expect, cfg)
}

fn check(dev: &Device, file: &str) {
    let (sd, expect, cfg) = load(file);
    let pruned = prune_state(dev, &sd, &cfg).unwrap();
    let mut groups = 0;
    for (name, t) in &expect.tensors {
        if let Some(g) = name.strip_prefix("keep.") {
            let got = pruned.keep.get(g).unwrap_or_else(|| panic!("{file}: no group {g}"));
            assert_eq!(got.as_slice(), t.as_i64().unwrap(), "{file} on {}: kept indices of {g}", dev.name());
            groups += 1;
        } else {
            let got = pruned.state.tensors.get(name).unwrap_or_else(|| panic!("{file}: no tensor {name}"));
            assert_eq!(got, t, "{file} on {}: tensor {name}", dev.name());
        }
    }
    assert_eq!(groups, pruned.keep.len(), "{file}: the reference and the plan have different groups");
    let model_tensors = expect.tensors.keys().filter(|k| !k.starts_with("keep.")).count();
    assert_eq!(model_tensors, pruned.state.tensors.len(), "{file}: tensor count");
}

#[test]
fn filters_mode_matches_pytorch_reference() {
    check(&Device::Cpu, "prune-filters-s50-r8-l1.safetensors");
    for dev in common::emu_devices().iter().take(2) {
        check(dev, "prune-filters-s50-r8-l1.safetensors");
    }
}

#[test]
fn channels_mode_matches_pytorch_reference() {
    check(&Device::Cpu, "prune-channels-s30-r1-l2.safetensors");
    for dev in common::emu_devices().iter().take(2) {
        check(dev, "prune-channels-s30-r1-l2.safetensors");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_pytorch_reference() {
    let dev = common::cuda_device();
    check(&dev, "prune-filters-s50-r8-l1.safetensors");
    check(&dev, "prune-channels-s30-r1-l2.safetensors");
}
