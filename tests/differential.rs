//! Differential tests: random bottleneck ResNets (depth up to ResNet50's, irregular and
//! sometimes wide widths, batch 1 to 4, odd image sizes, any number of classes) run
//! forward, backward and one SGD step on the CPU and in the emulation, and every tensor
//! is compared per element with prunekit's float64 model under the device's own ReLU and
//! max-pool decisions (`verify`'s precision part). A planted wiring bug in one of the two
//! implementations fails.
//!
//! A fast slice runs by default; `cargo test --release --test differential -- --ignored`
//! runs the long one (also in the GPU bundle, on cuda).

mod common;

use common::Rng;
use prunekit::model::init::torchvision_init;
use prunekit::model::{Arch, BnConfig, BnFusion, PrecisionKind, Sgd, StateDict};
use prunekit::verify::exact::{Exact, Fault, Hyper};
use prunekit::verify::{check_device, Report, Step};
use prunekit::Device;

/// A random network and batch.
struct Case {
    sd: StateDict,
    images: Vec<f32>,
    dims: (usize, usize, usize),
    targets: Vec<i64>,
    what: String,
}

/// A random bottleneck ResNet: blocks per stage up to `max_layers`, widths irregular
/// (occasionally wide, up to `max_width`), random BN parameters and statistics.
fn random_case(seed: u64, max_layers: [usize; 4], max_width: usize) -> Case {
    let mut rng = Rng::new(seed);
    let mut pick = |lo: usize, hi: usize| lo + rng.below((hi - lo + 1) as u32) as usize;
    let layers = [pick(1, max_layers[0]), pick(1, max_layers[1]), pick(1, max_layers[2]), pick(1, max_layers[3])];
    let classes = pick(2, 23);
    let mut arch = Arch::bottleneck(layers, classes);
    let width = |pick: &mut dyn FnMut(usize, usize) -> usize| {
        if pick(0, 9) == 0 {
            pick(max_width / 2, max_width)
        } else {
            pick(1, 24)
        }
    };
    arch.stem = width(&mut pick);
    let mut cin = arch.stem;
    let mut stream = 0;
    for b in arch.blocks.iter_mut() {
        if b.index == 0 {
            stream = width(&mut pick);
        }
        b.cin = cin;
        b.w1 = width(&mut pick);
        b.w2 = width(&mut pick);
        b.cout = stream;
        b.downsample = b.index == 0;
        cin = stream;
    }
    // Images large enough that layer4's batch norm sees at least two values per channel.
    let n = pick(1, 4);
    let min_size = if n == 1 { 33 } else { 17 };
    let (h, w) = (pick(min_size, 47), pick(min_size, 47));
    let mut sd = torchvision_init(&arch, seed);
    let mut r = Rng::new(seed ^ 0xabcdef);
    for (name, t) in sd.tensors.iter_mut() {
        if let prunekit::model::Data::F32(v) = &mut t.data {
            let f: Option<fn(&mut Rng) -> f32> = if name.starts_with("fc") {
                None
            } else if name.ends_with("running_var") {
                Some(|r| r.uniform().abs() + 0.5)
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                Some(|r| 0.1 * r.uniform())
            } else if name.ends_with(".weight") && t.shape.len() == 1 {
                Some(|r| r.uniform() * 0.5 + 1.0)
            } else {
                None
            };
            if let Some(f) = f {
                v.iter_mut().for_each(|x| *x = f(&mut r));
            }
        }
    }
    let images = r.vec(n * 3 * h * w);
    let targets = (0..n).map(|_| r.below(classes as u32) as i64).collect();
    let what = format!(
        "seed {seed}: layers {layers:?}, stem {}, stage widths {:?}, batch {n}, {h}x{w}, {classes} classes",
        arch.stem,
        arch.blocks.iter().filter(|b| b.index == 0).map(|b| b.cout).collect::<Vec<_>>()
    );
    Case { sd, images, dims: (n, h, w), targets, what }
}

const SGD: Sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4 };

fn run(case: &Case, exact: &Exact, dev: &Device, precision: PrecisionKind, fusion: BnFusion) -> Report {
    let bn = BnConfig::default();
    let hp = Hyper::of(&SGD, &bn);
    let own = exact.run(&case.images, case.dims, &case.targets, &hp, None, None).unwrap();
    let step = Step { images: &case.images, dims: case.dims, targets: &case.targets, sgd: SGD, bn, fusion };
    check_device(exact, &own, &case.sd, dev, precision, &step).unwrap()
}

/// Even seeds run the kernel devices' step with both BN fusions, odd ones with neither.
fn differential(seeds: std::ops::Range<u64>, max_layers: [usize; 4], max_width: usize, devices: &[Device]) {
    for seed in seeds {
        let case = random_case(seed, max_layers, max_width);
        let exact = Exact::from_state(&case.sd).unwrap();
        let fusion = if seed % 2 == 0 { BnFusion::ALL } else { BnFusion::NONE };
        for dev in devices {
            for precision in [PrecisionKind::F32, PrecisionKind::Bf16] {
                let r = run(&case, &exact, dev, precision, fusion);
                assert!(r.ok(), "{} on {} ({precision}, {fusion:?}):\n{r}", case.what, dev.name());
            }
        }
    }
}

#[test]
fn random_networks_agree_on_cpu_and_emu() {
    differential(0..3, [2, 2, 2, 2], 64, &[Device::Cpu, common::emu_devices()[2].clone()]);
}

#[test]
fn a_deep_random_network_agrees_on_cpu() {
    differential(100..101, [3, 4, 6, 3], 96, &[Device::Cpu]);
}

#[test]
#[ignore = "long: many deep and wide random networks on cpu and emu (minutes)"]
fn long_slice() {
    differential(1000..1012, [3, 4, 6, 3], 256, &[Device::Cpu, common::emu_devices()[0].clone()]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_random_networks_agree() {
    differential(2000..2008, [3, 4, 6, 3], 384, &[common::cuda_device()]);
}

/// A wiring bug planted in one implementation (the float64 model here: the other side of
/// the comparison) fails on both devices.
#[test]
fn a_planted_wiring_bug_fails() {
    let case = random_case(7, [2, 2, 2, 3], 32);
    assert!(!Exact::from_state(&case.sd).unwrap().arch().blocks.iter().all(|b| b.downsample), "{}", case.what);
    for fault in [Fault::ChannelOffset, Fault::SwappedBuffers] {
        let mut exact = Exact::from_state(&case.sd).unwrap();
        exact.fault = Some(fault);
        for dev in [Device::Cpu, common::emu_devices()[0].clone()] {
            for fusion in [BnFusion::ALL, BnFusion::NONE] {
                let r = run(&case, &exact, &dev, PrecisionKind::F32, fusion);
                assert!(!r.ok(), "{fault:?} passed on {} ({fusion:?}):\n{r}", dev.name());
            }
        }
    }
}

/// A real kernel bug planted in the emulation fails the differential check.
#[test]
fn a_planted_kernel_bug_fails() {
    let case = random_case(11, [1, 2, 1, 1], 24);
    let exact = Exact::from_state(&case.sd).unwrap();
    for variant in ["conv_fault_skip_last_channel", "bn_fault_drop_row"] {
        let dev = Device::Gpu(prunekit::gpu::Gpu::emu_with_fault(prunekit::gpu::Schedule::Forward, variant).unwrap());
        for fusion in [BnFusion::ALL, BnFusion::NONE] {
            let r = run(&case, &exact, &dev, PrecisionKind::F32, fusion);
            assert!(!r.ok(), "{variant} passed ({fusion:?}):\n{r}");
        }
    }
}
