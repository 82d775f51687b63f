//! The ResNet training stack: finite-difference gradient checks of a tiny net on the
//! CPU, the same steps on the CPU and through the kernels, state dict round trips, bad
//! input, and a training step that allocates nothing on a kernel device.

mod common;

use common::Rng;
use prunekit::model::{
    init::torchvision_init, AnyWorkspace, Arch, Block, BnFusion, Model, PrecisionKind, Sgd, StateDict, Tensor,
};
use prunekit::Device;

/// A bottleneck ResNet with one block per stage and odd widths, 3 classes.
fn tiny_arch() -> Arch {
    let b = |stage, cin, w1, w2, cout, stride| Block { stage, index: 0, cin, w1, w2, cout, stride, downsample: true };
    Arch {
        stem: 4,
        classes: 3,
        blocks: vec![b(1, 4, 3, 5, 6, 1), b(2, 6, 4, 3, 5, 2), b(3, 5, 3, 3, 7, 2), b(4, 7, 5, 4, 6, 2)],
    }
}

fn batch(n: usize, size: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(seed);
    let images = rng.vec(n * 3 * size * size);
    let targets = (0..n).map(|_| rng.below(classes as u32) as i64).collect();
    (images, targets)
}

fn loss_and_grads(
    dev: &Device,
    sd: &StateDict,
    images: &[f32],
    targets: &[i64],
    n: usize,
    size: usize,
) -> (f32, StateDict) {
    let mut m = Model::from_state(dev, sd, PrecisionKind::F32).unwrap();
    let mut ws = m.workspace(n, size, size).unwrap();
    m.set_batch(&mut ws, images, Some(targets)).unwrap();
    m.forward(&mut ws, true).unwrap();
    m.backward(&mut ws).unwrap();
    (m.loss(&ws).unwrap(), m.gradients().unwrap())
}

#[test]
fn gradients_match_finite_differences() {
    let arch = tiny_arch();
    let sd = torchvision_init(&arch, 3);
    let (n, size) = (4, 64);
    let (images, targets) = batch(n, size, arch.classes, 1);
    let (_, grads) = loss_and_grads(&Device::Cpu, &sd, &images, &targets, n, size);
    // (tensor, relative tolerance). The stem and layer1 see 32x32 and 16x16 maps through
    // ReLUs and the max pool: many kinks cross the line, so their slopes are rougher
    // (PyTorch's float64 gradients, which verify compares against, pin them exactly).
    let names = [
        ("conv1.weight", 0.1),
        ("bn1.weight", 0.1),
        ("bn1.bias", 0.1),
        ("layer1.0.conv2.weight", 0.1),
        ("layer1.0.bn1.bias", 0.1),
        ("layer1.0.bn3.bias", 0.1),
        ("layer2.0.bn2.weight", 0.05),
        ("layer2.0.downsample.0.weight", 0.03),
        ("layer3.0.bn1.weight", 0.03),
        ("layer3.0.conv2.weight", 0.01),
        ("layer4.0.bn2.weight", 0.01),
        ("layer4.0.conv3.weight", 0.01),
        ("fc.weight", 0.01),
        ("fc.bias", 0.01),
    ];
    // Along each tensor's own gradient direction u = g / |g|, the derivative of the loss
    // is |g|. The whole tensor moves, so the loss changes well above f32's noise and no
    // single ReLU or max-pool kink decides the difference.
    for (name, tol) in names {
        let g = grads.tensors[name].as_f32().unwrap();
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        let wnorm = sd.tensors[name].as_f32().unwrap().iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let h = (2e-3 / norm).min(2e-3 * wnorm.max(1.0));
        let at = |t: f64| -> f64 {
            let mut s = sd.clone();
            if let prunekit::model::Data::F32(v) = &mut s.tensors.get_mut(name).unwrap().data {
                for (w, &gi) in v.iter_mut().zip(g) {
                    *w += (t * gi as f64 / norm) as f32;
                }
            }
            loss_and_grads(&Device::Cpu, &s, &images, &targets, n, size).0 as f64
        };
        // The least-squares slope through 16 points on [-h, h]: the loss along the line is
        // smooth only piecewise (ReLU and max-pool kinks), and the fit averages the kinks.
        let ts: Vec<f64> = (1..=8).flat_map(|i| [i as f64 / 8.0 * h, -(i as f64) / 8.0 * h]).collect();
        let ls: Vec<f64> = ts.iter().map(|&t| at(t)).collect();
        let mean = ls.iter().sum::<f64>() / ls.len() as f64;
        let fd = ts.iter().zip(&ls).map(|(t, l)| t * (l - mean)).sum::<f64>() / ts.iter().map(|t| t * t).sum::<f64>();
        assert!((fd - norm).abs() <= tol * norm, "{name}: |gradient| {norm}, finite-difference slope along it {fd}");
    }
}

/// Three train steps of `m` on batches `seed0`, `seed0 + 1`, `seed0 + 2` of `n` images of
/// `size` x `size` (the model's workspace made here): the losses.
fn three_steps(m: &mut Model, arch: &Arch, n: usize, size: usize, seed0: u64, sgd: &Sgd) -> (Vec<f32>, AnyWorkspace) {
    let mut ws = m.workspace(n, size, size).unwrap();
    let mut losses = Vec::new();
    for step in 0..3 {
        let (images, targets) = batch(n, size, arch.classes, seed0 + step);
        m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        m.train_step(&mut ws, sgd).unwrap();
        losses.push(m.loss(&ws).unwrap());
    }
    (losses, ws)
}

#[test]
fn kernels_and_cpu_train_alike() {
    let arch = tiny_arch();
    let sd = torchvision_init(&arch, 5);
    let (n, size) = (2, 40);
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    let mut results = Vec::new();
    for dev in [Device::Cpu, common::emu_devices().remove(1)] {
        let mut m = Model::from_state(&dev, &sd, PrecisionKind::F32).unwrap();
        let (losses, _) = three_steps(&mut m, &arch, n, size, 10, &sgd);
        results.push((losses, m.to_state().unwrap()));
    }
    let ((l0, s0), (l1, s1)) = (&results[0], &results[1]);
    assert_trained_alike("cpu vs emu", (l0, s0), (l1, s1), 2e-3);
}

/// Two runs of the same steps: losses within 1e-4 (relative, at least absolute), every
/// tensor's largest difference within `tol` of its largest magnitude.
fn assert_trained_alike(what: &str, (l0, s0): (&[f32], &StateDict), (l1, s1): (&[f32], &StateDict), tol: f32) {
    for (a, b) in l0.iter().zip(l1) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{what}: losses {l0:?} vs {l1:?}");
    }
    for (name, t) in &s0.tensors {
        let (a, b) = (t.as_f32().unwrap(), s1.tensors[name].as_f32().unwrap());
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= tol * scale, "{what}: {name}: {err} of {scale}");
    }
}

/// On a kernel device every combination of the BN fusions (bn1 and bn2 applied as the
/// next conv loads; the BN backward sums in the dgrad epilogues) trains as the unfused
/// step (the CPU's way): losses and every parameter after three steps alike, and the ReLU
/// outputs made only for the parameters of their forward.
#[test]
fn every_bn_fusion_trains_as_the_unfused_step() {
    let arch = tiny_arch();
    let sd = torchvision_init(&arch, 11);
    let (n, size) = (3, 36);
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    let dev = common::emu_devices().remove(0);
    let mut results = Vec::new();
    for (on_load, dgrad_sums) in [(false, false), (true, true), (true, false), (false, true)] {
        let mut m = Model::from_state(&dev, &sd, PrecisionKind::F32).unwrap();
        m.set_bn_fusion(BnFusion { on_load, dgrad_sums });
        let (losses, mut ws) = three_steps(&mut m, &arch, n, size, 70, &sgd);
        // The stem's BN output is applied as the max pool loads (on a kernel device, with or
        // without the BN fusions), so it is made from the parameters of its forward: not
        // after an SGD step, and again after a forward.
        assert!(m.relu_outputs(&ws).is_err(), "ReLU outputs after an SGD step, on_load {on_load}");
        m.forward(&mut ws, true).unwrap();
        assert_eq!(m.relu_outputs(&ws).unwrap().len(), 1 + 3 * arch.blocks.len());
        results.push(((on_load, dgrad_sums), losses, m.to_state().unwrap()));
    }
    let (_, l0, s0) = &results[0];
    for (f, l1, s1) in &results[1..] {
        assert_trained_alike(&format!("{f:?}"), (l0, s0), (l1, s1), 1e-3);
    }
}

/// With the warpgroup-MMA convolutions on (every pass of a bf16 model whose widths are
/// multiples of 8, the padded stem's too), three train steps on the emulation train as the
/// mma.sync kernels' steps: the same products summed in f32, in another order only where
/// the tiles differ (wgrad's split of its reduction, the BN statistics' per-tile partial
/// sums of 128 rows instead of 64). The warpgroup kernels ran (the emulation's launch
/// counts), and the mma.sync ones did not. The warp-specialized warpgroup kernels run the
/// same MMAs in the same order as the multistage ones: their step gives the same bits.
#[test]
fn warpgroup_mma_convs_train_as_the_mma_sync_step() {
    let b = |stage, cin, w1, w2, cout, stride| Block { stage, index: 0, cin, w1, w2, cout, stride, downsample: true };
    let arch = Arch {
        stem: 16,
        classes: 3,
        blocks: vec![b(1, 16, 8, 8, 16, 1), b(2, 16, 16, 8, 24, 2), b(3, 24, 8, 16, 32, 2), b(4, 32, 16, 8, 16, 2)],
    };
    let sd = torchvision_init(&arch, 12);
    let (n, size) = (2, 32);
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    let mut results = Vec::new();
    for (wgmma, ws) in [(false, false), (true, false), (true, true)] {
        let mut gpu = prunekit::gpu::Gpu::emu_with(prunekit::gpu::Schedule::Reverse);
        gpu.set_conv_wgmma(wgmma).unwrap();
        gpu.set_conv_wgmma_ws(ws).unwrap();
        let dev = Device::Gpu(gpu.clone());
        let mut m = Model::from_state(&dev, &sd, PrecisionKind::Bf16).unwrap();
        let (losses, _) = three_steps(&mut m, &arch, n, size, 90, &sgd);
        let launches = gpu.emu_launches().unwrap();
        let ran = |prefix: &str| launches.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, c)| c).sum::<u64>();
        for pass in ["fprop", "dgrad", "wgrad"] {
            let (tc, wg) = (ran(&format!("conv2d_{pass}_t")), ran(&format!("conv2d_{pass}_w128")));
            let wsp = ran(&format!("conv2d_{pass}_ws128"));
            let ran_what = [tc > 0, wg > 0, wsp > 0];
            let want = [!wgmma, wgmma && !ws, ws];
            assert_eq!(ran_what, want, "wgmma {wgmma} ws {ws}: {pass} launches mma.sync {tc}, wgmma {wg}, ws {wsp}");
        }
        results.push((losses, m.to_state().unwrap()));
    }
    let ((l0, s0), (l1, s1)) = (&results[0], &results[1]);
    assert_trained_alike("mma.sync vs wgmma", (l0, s0), (l1, s1), 1e-4);
    let (l2, s2) = &results[2];
    assert_eq!(l1, l2, "wgmma vs warp-specialized wgmma: losses");
    for (name, t) in &s1.tensors {
        assert_eq!(t.as_f32().unwrap(), s2.tensors[name].as_f32().unwrap(), "wgmma vs warp-specialized: {name}");
    }
}

/// A bf16 model on a kernel device runs its stem with the three input channels padded to 8
/// (padded images, a padded weight copy refreshed after each SGD step, the padded gradient
/// cut back); the CPU runs it unpadded. After two train steps, a third batch's loss and the
/// stem's weight gradient agree but for the order of the f32 sums (seen: 3e-7 relative L2
/// error; allowed: 1e-3), on images
/// whose channels differ in scale, so that a channel dropped, moved or doubled shows.
#[test]
fn the_padded_stem_computes_what_the_unpadded_one_does() {
    let arch = tiny_arch();
    let sd = torchvision_init(&arch, 9);
    let (n, size) = (2, 36);
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    let mut out = Vec::new();
    for dev in [Device::Cpu, common::emu_devices().remove(2)] {
        let mut m = Model::from_state(&dev, &sd, PrecisionKind::Bf16).unwrap();
        let mut ws = m.workspace(n, size, size).unwrap();
        for step in 0..3 {
            let (mut images, targets) = batch(n, size, arch.classes, 40 + step);
            for (i, v) in images.iter_mut().enumerate() {
                *v *= [1.0, 3.0, -2.0][i / (size * size) % 3];
            }
            m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
            if step < 2 {
                m.train_step(&mut ws, &sgd).unwrap();
            } else {
                m.forward(&mut ws, true).unwrap();
                m.backward(&mut ws).unwrap();
            }
        }
        let g = m.gradients().unwrap().tensors["conv1.weight"].as_f32().unwrap().to_vec();
        out.push((m.loss(&ws).unwrap(), g));
    }
    let ((l0, g0), (l1, g1)) = (&out[0], &out[1]);
    assert!((l0 - l1).abs() <= 1e-4 * l0.abs(), "loss {l0} (cpu) vs {l1} (emu)");
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = g0.iter().zip(g1).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(g0);
    assert!(norm(g0) > 0.0 && rel <= 1e-3, "conv1.weight's gradient: relative error {rel}");
}

/// A kernel device's train step never writes bn1's and bn2's outputs (the next conv
/// applies the BN as it loads); relu_outputs makes them, the same as the CPU's within f32
/// rounding, and refuses once an SGD step has moved the parameters they come from.
#[test]
fn relu_outputs_after_a_train_forward_with_the_bn_on_load() {
    let arch = tiny_arch();
    let sd = torchvision_init(&arch, 6);
    let (n, size) = (2, 40);
    let (images, targets) = batch(n, size, arch.classes, 3);
    let mut outs = Vec::new();
    for dev in [Device::Cpu, common::emu_devices().remove(0)] {
        let mut m = Model::from_state(&dev, &sd, PrecisionKind::F32).unwrap();
        m.set_bn_fusion(BnFusion::ALL);
        let mut ws = m.workspace(n, size, size).unwrap();
        m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        m.forward(&mut ws, true).unwrap();
        outs.push(m.relu_outputs(&ws).unwrap());
        m.backward(&mut ws).unwrap();
        m.sgd_step(&Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }).unwrap();
        let after = m.relu_outputs(&ws);
        if matches!(dev, Device::Cpu) {
            assert!(after.is_ok(), "the CPU keeps the outputs it wrote");
        } else {
            assert!(after.unwrap_err().to_string().contains("SGD step"));
            m.forward(&mut ws, false).unwrap();
            assert!(m.relu_outputs(&ws).is_ok(), "an eval forward writes them");
        }
    }
    assert_eq!(outs[0].len(), outs[1].len());
    for ((name, a), (name1, b)) in outs[0].iter().zip(&outs[1]) {
        assert_eq!(name, name1);
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-4 * scale, "{name}: {err} of {scale}");
    }
}

#[test]
fn state_dict_round_trips() {
    let arch = tiny_arch();
    let sd = torchvision_init(&arch, 7);
    for dev in [Device::Cpu, common::emu_devices().remove(0)] {
        for p in [PrecisionKind::F32, PrecisionKind::Bf16] {
            let m = Model::from_state(&dev, &sd, p).unwrap();
            assert_eq!(m.to_state().unwrap(), sd, "{} {p}", dev.name());
        }
    }
}

#[test]
fn a_training_step_allocates_nothing_on_a_kernel_device() {
    let dev = common::emu_devices().remove(0);
    let gpu = dev.gpu().unwrap().clone();
    for p in [PrecisionKind::F32, PrecisionKind::Bf16] {
        let arch = tiny_arch();
        let mut m = Model::new(&dev, &arch, 1, p).unwrap();
        let mut ws = m.workspace(2, 32, 32).unwrap();
        let (images, targets) = batch(2, 32, arch.classes, 2);
        m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        let sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 0.0 };
        let before = gpu.allocations();
        for _ in 0..2 {
            m.train_step(&mut ws, &sgd).unwrap();
            m.forward(&mut ws, false).unwrap();
        }
        assert_eq!(gpu.allocations(), before, "{p}: a step allocated device memory");
        assert!(m.loss(&ws).unwrap().is_finite());
    }
}

#[test]
fn bad_input_is_refused() {
    let arch = tiny_arch();
    let dev = Device::Cpu;
    let mut m = Model::new(&dev, &arch, 1, PrecisionKind::F32).unwrap();
    assert!(m.workspace(0, 32, 32).is_err());
    let err = m.workspace(1, 4, 4).err().expect("too small an image");
    assert!(err.to_string().contains("batch norm"), "{err}");
    let mut ws = m.workspace(2, 32, 32).unwrap();
    let (images, targets) = batch(2, 32, arch.classes, 3);
    assert!(m.set_batch(&mut ws, &images[1..], Some(&targets)).is_err());
    assert!(m.set_batch(&mut ws, &images, Some(&targets[..1])).is_err());
    let err = m.set_batch(&mut ws, &images, Some(&[0, 3])).unwrap_err();
    assert!(err.to_string().contains("outside the 3 classes"), "{err}");
    assert!(m.set_batch(&mut ws, &images, Some(&[0, -1])).is_err());
    assert!(m.forward(&mut ws, true).is_err(), "a train forward without targets");
    m.set_batch(&mut ws, &images, None).unwrap();
    m.forward(&mut ws, false).unwrap();
    assert_eq!(m.logits(&ws).unwrap().len(), 2 * 3);
    // A workspace of another precision.
    let other = Model::new(&dev, &arch, 1, PrecisionKind::Bf16).unwrap();
    let mut ws16 = other.workspace(2, 32, 32).unwrap();
    assert!(m.forward(&mut ws16, false).is_err());
    // A state dict that is not a bottleneck ResNet.
    let mut sd = torchvision_init(&arch, 1);
    sd.tensors.insert("extra".into(), Tensor::f32(vec![1], vec![0.0]));
    let err = Model::from_state(&dev, &sd, PrecisionKind::F32).err().unwrap();
    assert!(err.to_string().contains("unexpected tensor extra"), "{err}");
}

#[test]
fn bf16_trains() {
    let arch = tiny_arch();
    for dev in [Device::Cpu, common::emu_devices().remove(2)] {
        let mut m = Model::new(&dev, &arch, 4, PrecisionKind::Bf16).unwrap();
        let mut ws = m.workspace(4, 32, 32).unwrap();
        let (images, targets) = batch(4, 32, arch.classes, 4);
        m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0 };
        let mut losses = Vec::new();
        for _ in 0..6 {
            m.train_step(&mut ws, &sgd).unwrap();
            losses.push(m.loss(&ws).unwrap());
        }
        // The same batch six times: the loss must come down.
        assert!(losses[5] < losses[0], "{}: {losses:?}", dev.name());
    }
}

#[test]
fn a_training_run_is_pruned_with_its_optimizer_state() {
    use prunekit::prune::{prune_state_with, Mode, Norm, PruneConfig};
    let arch = tiny_arch();
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    for dev in [Device::Cpu, common::emu_devices().remove(0)] {
        let mut m = Model::new(&dev, &arch, 8, PrecisionKind::F32).unwrap();
        let mut ws = m.workspace(2, 32, 32).unwrap();
        let (images, targets) = batch(2, 32, arch.classes, 8);
        m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        for _ in 0..2 {
            m.train_step(&mut ws, &sgd).unwrap();
        }
        let (state, momentum) = (m.to_state().unwrap(), m.momentum_state().unwrap());
        let cfg = PruneConfig::new(Mode::Channels, "0.5".parse().unwrap(), 1, Norm::L1).unwrap();
        let pruned = prune_state_with(&dev, &state, Some(&momentum), &cfg).unwrap();
        let pruned_momentum = pruned.optimizer.unwrap();
        let mut p = Model::from_state(&dev, &pruned.state, PrecisionKind::F32).unwrap();
        p.set_momentum_state(&pruned_momentum, 2).unwrap();
        assert_eq!(p.momentum_state().unwrap(), pruned_momentum, "momentum round trip");
        let mut ws = p.workspace(2, 32, 32).unwrap();
        p.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        p.train_step(&mut ws, &sgd).unwrap();
        assert!(p.loss(&ws).unwrap().is_finite());
        // Momentum of another model's shape is refused.
        assert!(p.set_momentum_state(&momentum, 2).is_err());
    }
}
