//! `prune_state` against the files PyTorch wrote (tests/data/prune-*.safetensors): the
//! kept indices of every group and every tensor of the compacted model match exactly,
//! on the CPU and through the kernels (emulated, in forward and reversed fiber order).

mod common;

use prunekit::cpu::prune::Norm;
use prunekit::model::StateDict;
use prunekit::prune::{prune_owned_state, prune_state, Mode, PruneConfig, Pruned};
use prunekit::Device;

fn load(name: &str) -> (StateDict, StateDict, PruneConfig) {
    let mut sd = StateDict::read(&common::data(name)).unwrap();
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

/// Both entry points (the state borrowed, and taken) against the reference.
fn check(dev: &Device, file: &str) {
    let (sd, expect, cfg) = load(file);
    check_pruned(dev, file, &expect, prune_state(dev, &sd, &cfg).unwrap());
    check_pruned(dev, file, &expect, prune_owned_state(dev, sd, &cfg).unwrap());
}

fn check_pruned(dev: &Device, file: &str, expect: &StateDict, pruned: Pruned) {
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

#[test]
fn optimizer_state_is_compacted_like_its_parameters() {
    use prunekit::model::{Data, Tensor};
    use prunekit::prune::prune_state_with;
    let (sd, _, cfg) = load("prune-channels-s30-r1-l2.safetensors");
    // A momentum buffer per parameter: twice the parameter, so its compaction is known.
    let mut opt = StateDict::default();
    for (n, t) in &sd.tensors {
        if let Data::F32(v) = &t.data {
            if !n.ends_with("running_mean") && !n.ends_with("running_var") {
                opt.tensors.insert(n.clone(), Tensor::f32(t.shape.clone(), v.iter().map(|x| 2.0 * x).collect()));
            }
        }
    }
    for dev in [Device::Cpu, common::emu_devices().remove(1)] {
        let p = prune_state_with(&dev, &sd, Some(&opt), &cfg).unwrap();
        let o = p.optimizer.as_ref().unwrap();
        assert_eq!(o.tensors.len(), opt.tensors.len());
        for (n, t) in &o.tensors {
            let param = &p.state.tensors[n];
            assert_eq!(t.shape, param.shape, "{n}");
            let want: Vec<f32> = param.as_f32().unwrap().iter().map(|x| 2.0 * x).collect();
            assert_eq!(t.as_f32().unwrap(), want.as_slice(), "{n}");
        }
    }
    // Optimizer state that does not fit the model is refused.
    let mut bad = StateDict::default();
    bad.tensors.insert("fc.weight".into(), Tensor::f32(vec![1], vec![0.0]));
    assert!(prune_state_with(&Device::Cpu, &sd, Some(&bad), &cfg).is_err());
    let mut bad = StateDict::default();
    bad.tensors.insert("nope".into(), Tensor::f32(vec![1], vec![0.0]));
    assert!(prune_state_with(&Device::Cpu, &sd, Some(&bad), &cfg).is_err());
}
