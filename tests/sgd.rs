//! SGD (`prunekit::ops::layers::sgd_step`) on every device against the f64 oracle of
//! `prunekit::cpu::layers::sgd`: the CUDA kernel through the host emulation in forward,
//! reverse and shuffled fiber order, and the CPU fast path; known values; one step against
//! the values PyTorch wrote (the model reference files of tests/data); bad inputs. The
//! multi-tensor step (`sgd_step_multi`) bitwise the per-tensor step and cast on odd sizes.
//! `mod cuda` runs the kernel checks on a real GPU.

use half::bf16;
use prunekit::cpu::layers::sgd as csgd;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers::{self, CastElem, SgdTable, SgdTensor};
use prunekit::{Buf, Device};

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
// ---------------------------------------------------------------- multi-tensor

/// Tensor sizes around the kernel's chunk (4096) and float4 boundaries, an empty one, and
/// which have a low-precision copy.
const MULTI: [(usize, bool); 11] = [
    (5, true),
    (0, true),
    (1, false),
    (4096, true),
    (3, true),
    (4097, false),
    (4, true),
    (9003, true),
    (4095, false),
    (8192, true),
    (13, true),
];

/// Param, momentum buffer and low copy (as f32) of each tensor.
type State = Vec<(Vec<f32>, Vec<f32>, Option<Vec<f32>>)>;

/// Three steps (the first, a scaled one, a plain one) over the MULTI tensors, through
/// `sgd_step_multi` or through `sgd_step` and `cast` tensor by tensor.
fn multi_run<L: CastElem>(dev: &Device, multi: bool, lr: f32, mom: f32, wd: f32) -> State {
    let mut r = SplitMix::for_layers(120);
    let mut params: Vec<Buf<f32>> = MULTI.iter().map(|&(n, _)| up(dev, r.vec(n, -1.0, 1.0))).collect();
    // NaN momentum: the first step must not read it.
    let mut bufs: Vec<Buf<f32>> = MULTI.iter().map(|&(n, _)| up(dev, vec![f32::NAN; n])).collect();
    let mut lows: Vec<Option<Buf<L>>> = MULTI.iter().map(|&(n, l)| l.then(|| fresh::<L>(dev, n))).collect();
    let mut table = None;
    for (step, scale) in [(0, 1.0f32), (1, 0.37), (2, 1.0)] {
        let grads: Vec<Buf<f32>> = MULTI.iter().map(|&(n, _)| up(dev, r.vec(n, -1.0, 1.0))).collect();
        let st = layers::SgdStep::new(lr, mom, wd, step == 0).scaled(scale);
        if multi {
            let mut t: Vec<SgdTensor<L>> = params
                .iter_mut()
                .zip(&grads)
                .zip(bufs.iter_mut())
                .zip(lows.iter_mut())
                .map(|(((param, grad), momentum_buf), low)| SgdTensor { param, grad, momentum_buf, low: low.as_mut() })
                .collect();
            // The gradients are new buffers at each step: a new table (as a model keeps one).
            if !table.as_ref().is_some_and(|tab: &SgdTable| tab.matches(dev, &t)) {
                table = Some(SgdTable::new(dev, &t).unwrap());
            }
            layers::sgd_step_multi(dev, table.as_ref().unwrap(), &mut t, &st).unwrap();
        } else {
            for i in 0..MULTI.len() {
                layers::sgd_step(dev, &mut params[i], &grads[i], &mut bufs[i], &st).unwrap();
                if let Some(l) = lows[i].as_mut() {
                    layers::cast(dev, &params[i], l).unwrap();
                }
            }
        }
    }
    let f32s = |b: &Buf<L>| b.to_vec().unwrap().iter().map(|&x| x.to_f32()).collect::<Vec<f32>>();
    (0..MULTI.len())
        .map(|i| (params[i].to_vec().unwrap(), bufs[i].to_vec().unwrap(), lows[i].as_ref().map(f32s)))
        .collect()
}

fn check_multi<L: CastElem>(dev: &Device) {
    for (lr, mom, wd) in [(0.1f32, 0.9f32, 1e-4f32), (0.05, 0.0, 0.01), (0.2, 0.5, 0.0)] {
        let (a, b) = (multi_run::<L>(dev, true, lr, mom, wd), multi_run::<L>(dev, false, lr, mom, wd));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            let what = format!(
                "{} tensor {i} of {} (lr {lr}, momentum {mom}, wd {wd}) on {}",
                L::DTYPE,
                MULTI[i].0,
                dev.name()
            );
            assert_eq!(bits(&x.0), bits(&y.0), "param of {what}");
            assert_eq!(bits(&x.1), bits(&y.1), "momentum of {what}");
            assert_eq!(x.2.as_deref().map(bits), y.2.as_deref().map(bits), "low copy of {what}");
        }
    }
}

#[test]
fn multi_tensor_step_is_the_step_and_cast_of_each_tensor() {
    for dev in all_devices() {
        check_multi::<bf16>(&dev);
        check_multi::<f32>(&dev);
    }
}

#[test]
fn multi_tensor_bad_inputs_are_errors() {
    let emu = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let st = layers::SgdStep::new(0.1, 0.9, 0.0, true);
    for dev in [&Device::Cpu, &emu] {
        let b = |n: usize| up(dev, vec![0.5f32; n]);
        let (mut p, g, mut m, mut l) = (b(8), b(8), b(8), up(dev, vec![bf16::ZERO; 8]));
        // Lengths: the gradient, the momentum, the low copy.
        for (gl, ml, ll) in [(7, 8, 8), (8, 9, 8), (8, 8, 7)] {
            let (g2, mut m2, mut l2) = (b(gl), b(ml), up(dev, vec![bf16::ZERO; ll]));
            let t = vec![SgdTensor { param: &mut p, grad: &g2, momentum_buf: &mut m2, low: Some(&mut l2) }];
            assert!(SgdTable::new(dev, &t).is_err(), "{gl} {ml} {ll} on {}", dev.name());
            let mut t = t;
            let tab = SgdTable::default();
            assert!(layers::sgd_step_multi(dev, &tab, &mut t, &st).is_err(), "{gl} {ml} {ll} on {}", dev.name());
        }
        // A non-finite gradient scale.
        let mut t = vec![SgdTensor { param: &mut p, grad: &g, momentum_buf: &mut m, low: Some(&mut l) }];
        let tab = SgdTable::new(dev, &t).unwrap();
        assert!(layers::sgd_step_multi(dev, &tab, &mut t, &st.scaled(f32::NAN)).is_err());
    }
    // A table of other buffers, or of another device; buffers of another device.
    let b = |d: &Device, n: usize| up(d, vec![0.5f32; n]);
    let (mut p, g, mut m) = (b(&emu, 8), b(&emu, 8), b(&emu, 8));
    let (mut p2, g2, mut m2) = (b(&emu, 8), b(&emu, 8), b(&emu, 8));
    let t2: Vec<SgdTensor<f32>> = vec![SgdTensor { param: &mut p2, grad: &g2, momentum_buf: &mut m2, low: None }];
    let other_table = SgdTable::new(&emu, &t2).unwrap();
    let mut t = vec![SgdTensor::<f32> { param: &mut p, grad: &g, momentum_buf: &mut m, low: None }];
    assert!(layers::sgd_step_multi(&emu, &other_table, &mut t, &st).is_err(), "another tensor's table");
    assert!(layers::sgd_step_multi(&emu, &SgdTable::default(), &mut t, &st).is_err(), "an empty table");
    assert!(layers::sgd_step_multi(&Device::Cpu, &other_table, &mut t, &st).is_err(), "buffers of emu on the CPU");
    assert!(SgdTable::new(&other, &t).is_err(), "buffers of another emulated device");
    let tab = SgdTable::new(&emu, &t).unwrap();
    assert!(layers::sgd_step_multi(&other, &tab, &mut t, &st).is_err(), "another device");
    layers::sgd_step_multi(&emu, &tab, &mut t, &st).unwrap();
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
        check_multi::<bf16>(&d);
        check_multi::<f32>(&d);
    }
}
