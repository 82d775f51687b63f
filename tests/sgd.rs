//! SGD (`prunekit::ops::layers::sgd_step`) on every device against the f64 oracle of
//! `prunekit::cpu::layers::sgd`: the CUDA kernel through the host emulation in forward,
//! reverse and shuffled fiber order, and the CPU fast path; known values; one step against
//! the values PyTorch wrote (the model reference files of tests/data); bad inputs.
//! `mod cuda` runs the kernel checks on a real GPU.

use prunekit::cpu::layers::sgd as csgd;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers;
use prunekit::Device;

mod common;

use common::layers::{all_devices, check, down, fresh, references, up};
use common::{d64, SplitMix};

fn check_sgd(dev: &Device) {
    for (si, &n) in [1usize, 3, 4, 5, 1000, 1027].iter().enumerate() {
        for (lr, mom, wd) in [(0.1f32, 0.9f32, 1e-4f32), (0.05, 0.0, 0.01), (0.2, 0.5, 0.0)] {
            let mut r = SplitMix::for_layers(110 + si as u64);
            let p0 = r.vec(n, -1.0, 1.0);
            let mut param = up(dev, p0.clone());
            let mut buf = up(dev, vec![f32::NAN; n]); // the first step must not read it
            let (mut wp, mut wb) = (d64(&p0), vec![f64::NAN; n]);
            for step in 0..3 {
                let g = r.vec(n, -1.0, 1.0);
                layers::sgd_step(
                    dev,
                    &mut param,
                    &up(dev, g.clone()),
                    &mut buf,
                    &layers::SgdStep::new(lr, mom, wd, step == 0),
                )
                .unwrap();
                (wp, wb) = csgd::sgd_step_oracle(&wp, &d64(&g), &wb, lr as f64, mom as f64, wd as f64, step == 0);
                let what = |s: &str| format!("sgd {s} (n = {n}, step {step}, lr {lr}, momentum {mom}, wd {wd})");
                check(&what("param"), dev, &down(&param), &wp, 1e-6, 1e-6);
                check(&what("buf"), dev, &down(&buf), &wb, 1e-6, 1e-6);
            }
        }
    }
}

#[test]
fn sgd_matches_oracle_on_every_device() {
    for dev in all_devices() {
        check_sgd(&dev);
    }
}

#[test]
fn sgd_known_values() {
    // p = 1, lr 0.1, momentum 0.9, wd 0.01. Step 1, g = 0.5: d = 0.51, buf = 0.51,
    // p = 0.949. Step 2, g = -0.2: d = -0.2 + 0.00949 = -0.19051, buf = 0.9 * 0.51 - 0.19051
    // = 0.26849, p = 0.949 - 0.026849 = 0.922151.
    for dev in all_devices() {
        let (mut p, mut b) = (up(&dev, vec![1.0f32]), fresh::<f32>(&dev, 1));
        layers::sgd_step(&dev, &mut p, &up(&dev, vec![0.5f32]), &mut b, &layers::SgdStep::new(0.1, 0.9, 0.01, true))
            .unwrap();
        check("p1", &dev, &down(&p), &[0.949], 0.0, 1e-6);
        check("b1", &dev, &down(&b), &[0.51], 0.0, 1e-6);
        layers::sgd_step(&dev, &mut p, &up(&dev, vec![-0.2f32]), &mut b, &layers::SgdStep::new(0.1, 0.9, 0.01, false))
            .unwrap();
        check("p2", &dev, &down(&p), &[0.922151], 0.0, 1e-6);
        check("b2", &dev, &down(&b), &[0.26849], 0.0, 1e-5);
    }
}
// ---------------------------------------------------------------- PyTorch's values

fn check_against_pytorch(dev: &Device) {
    for r in references() {
        let what = |s: &str| format!("{} {s} vs PyTorch", r.name);
        // One SGD step (the first: the buffer is the gradient).
        for p in ["fc.bias", "fc.weight", "bn1.weight", "bn1.bias", "layer1.0.conv2.weight"] {
            let param0 = r.f32s(p);
            let mut buf = fresh::<f32>(dev, param0.len());
            let mut param = up(dev, param0);
            let grad = up(dev, r.f32s(&format!("expect.grad.{p}")));
            layers::sgd_step(
                dev,
                &mut param,
                &grad,
                &mut buf,
                &layers::SgdStep::new(r.lr, r.momentum, r.weight_decay, true),
            )
            .unwrap();
            let want = d64(&r.f32s(&format!("expect.step.{p}")));
            check(&what(&format!("SGD step of {p}")), dev, &down(&param), &want, 1e-7, 1e-6);
        }
    }
}

#[test]
fn sgd_matches_pytorch_reference_values() {
    for dev in all_devices() {
        check_against_pytorch(&dev);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let emu = Device::Gpu(gpu);
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = Device::Cpu;
    for dev in [&cpu, &emu] {
        let b = |n: usize| fresh::<f32>(dev, n);
        assert!(layers::sgd_step(dev, &mut b(5), &b(5), &mut b(4), &layers::SgdStep::new(0.1, 0.9, 0.0, true)).is_err());
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let bad = |n: usize| up(wrong, vec![1.0f32; n]);
        assert!(layers::sgd_step(dev, &mut ok(3), &ok(3), &mut bad(3), &layers::SgdStep::new(0.1, 0.9, 0.0, false))
            .is_err());
    }
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_sgd() {
        let d = common::cuda_device();
        check_sgd(&d);
        check_against_pytorch(&d);
    }
}
