//! Softmax cross-entropy (`prunekit::ops::layers::softmax_cross_entropy*`) on every device
//! against the f64 oracles of `prunekit::cpu::layers::loss`: the CUDA kernels through the
//! host emulation in forward, reverse and shuffled fiber order (outputs start as poison
//! there, so every element must be written), and the CPU fast path; known values; the
//! oracles' gradients by finite differences; the loss and its gradient against the values
//! PyTorch wrote (the model reference files of tests/data); bad inputs. `mod cuda` runs the
//! kernel checks on a real GPU.

use prunekit::cpu::layers::loss as closs;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers;
use prunekit::Device;

mod common;

use common::layers::{all_devices, check, down, fresh, numeric_grad, references, up};
use common::{d64, emu_devices, SplitMix};

fn check_loss(dev: &Device) {
    for (si, &(n, classes, scale)) in
        [(1, 1, 1.0f32), (1, 7, 3.0), (3, 10, 1.0), (33, 1000, 5.0), (5, 13, 1e4), (2, 40, 3e4)].iter().enumerate()
    {
        let mut r = SplitMix::for_layers(90 + si as u64);
        let logits: Vec<f32> = r.vec(n * classes, -scale, scale);
        let targets: Vec<i32> = (0..n).map(|_| r.below(classes) as i32).collect();
        let mut loss = fresh::<f32>(dev, 1);
        let mut d = fresh::<f32>(dev, n * classes);
        layers::softmax_cross_entropy(
            dev,
            n,
            classes,
            &up(dev, logits.clone()),
            &up(dev, targets.clone()),
            &mut loss,
            &mut d,
        )
        .unwrap();
        let (wl, wd) = closs::softmax_cross_entropy_oracle(n, classes, &d64(&logits), &targets);
        let what = |s: &str| format!("cross-entropy {s} ({n}x{classes}, logits up to {scale:e})");
        check(&what("loss"), dev, &down(&loss), &[wl], 1e-6, 1e-5);
        check(&what("dlogits"), dev, &down(&d), &wd, 1e-7 / n as f64, 1e-5);
    }
}

#[test]
fn label_smoothing_matches_oracle_on_every_device() {
    // PyTorch's label_smoothing: the CPU fast path and the kernel (through the emulation,
    // in every fiber order) against the f64 oracle, which is checked by finite differences.
    for dev in all_devices() {
        for (si, &(n, classes, scale, e)) in
            [(1, 2, 1.0f32, 0.1f32), (3, 10, 3.0, 0.25), (33, 1000, 5.0, 0.1), (5, 13, 1e4, 0.5)].iter().enumerate()
        {
            let mut r = SplitMix::for_layers(190 + si as u64);
            let logits: Vec<f32> = r.vec(n * classes, -scale, scale);
            let targets: Vec<i32> = (0..n).map(|_| r.below(classes) as i32).collect();
            let (mut loss, mut d) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, n * classes));
            let (z, t) = (up(&dev, logits.clone()), up(&dev, targets.clone()));
            layers::softmax_cross_entropy_smoothed(&dev, n, classes, &z, &t, e, &mut loss, &mut d).unwrap();
            let (wl, wd) = closs::softmax_cross_entropy_smoothed_oracle(n, classes, &d64(&logits), &targets, e as f64);
            let what = |s: &str| format!("smoothed cross-entropy {s} ({n}x{classes}, e {e}, logits up to {scale:e})");
            check(&what("loss"), &dev, &down(&loss), &[wl], 1e-6 * (1.0 + scale as f64), 1e-5);
            check(&what("dlogits"), &dev, &down(&d), &wd, 1e-7 / n as f64, 1e-5);
            // Smoothing 0 is the plain loss, bit for bit.
            let (mut l0, mut d0) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, n * classes));
            let (mut l1, mut d1) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, n * classes));
            layers::softmax_cross_entropy_smoothed(&dev, n, classes, &z, &t, 0.0, &mut l0, &mut d0).unwrap();
            layers::softmax_cross_entropy(&dev, n, classes, &z, &t, &mut l1, &mut d1).unwrap();
            assert_eq!(down(&l0)[0].to_bits(), down(&l1)[0].to_bits());
            assert!(down(&d0).iter().zip(down(&d1)).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let (mut loss, mut d) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, 2));
        let (z, t) = (up(&dev, vec![0.0f32, 0.0]), up(&dev, vec![0]));
        let err = layers::softmax_cross_entropy_smoothed(&dev, 1, 2, &z, &t, 1.0, &mut loss, &mut d).unwrap_err();
        assert!(err.to_string().contains("[0, 1)"), "{err}");
    }
    let (n, classes, e) = (3, 5, 0.2);
    let z = d64(&SplitMix::for_layers(7).vec(n * classes, -3.0, 3.0));
    let t = [4, 0, 2];
    let (_, d) = closs::softmax_cross_entropy_smoothed_oracle(n, classes, &z, &t, e);
    let f = |z: &[f64]| closs::softmax_cross_entropy_smoothed_oracle(n, classes, z, &t, e).0;
    check("fd smoothed cross-entropy", &Device::Cpu, &d, &numeric_grad(&z, &f), 1e-9, 1e-6);
}

#[test]
fn cross_entropy_matches_oracle_on_every_device() {
    for dev in all_devices() {
        check_loss(&dev);
    }
}

#[test]
fn cross_entropy_known_values() {
    // Two equal logits: loss ln 2, gradient (1/2 - 1, 1/2) / 1. Huge logits: the loss is
    // the margin, exactly, and the gradient vanishes where softmax saturates.
    for dev in all_devices() {
        let mut loss = fresh::<f32>(&dev, 1);
        let mut d = fresh::<f32>(&dev, 4);
        let logits = up(&dev, vec![3.0f32, 3.0, 1e4, 1e4 - 30.0]);
        layers::softmax_cross_entropy(&dev, 2, 2, &logits, &up(&dev, vec![0, 1]), &mut loss, &mut d).unwrap();
        // Row 1: log(1 + e^-30) + 30 = 30 + 9.4e-14.
        let want = (std::f64::consts::LN_2 + 30.0) / 2.0;
        check("loss", &dev, &down(&loss), &[want], 0.0, 1e-6);
        let e = (-30.0f64).exp();
        check(
            "dlogits",
            &dev,
            &down(&d),
            &[-0.25, 0.25, (1.0 / (1.0 + e)) / 2.0, (e / (1.0 + e) - 1.0) / 2.0],
            1e-9,
            1e-6,
        );
    }
}

#[test]
fn cross_entropy_keeps_small_losses_of_large_logits() {
    // The target is the maximum of logits near 1e4, where an f32 ulp is 1e-3: the loss
    // log(1 + e^-10) = 4.54e-5 must not be lost by forming max + log(sum) first.
    for dev in all_devices() {
        let (mut loss, mut d) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, 2));
        let logits = up(&dev, vec![1e4f32, 1e4 - 10.0]);
        layers::softmax_cross_entropy(&dev, 1, 2, &logits, &up(&dev, vec![0]), &mut loss, &mut d).unwrap();
        check("loss", &dev, &down(&loss), &[(-10.0f64).exp().ln_1p()], 0.0, 1e-5);
    }
}

#[test]
fn cross_entropy_oracle_gradient_matches_finite_differences() {
    let (n, classes) = (3, 5);
    let z = d64(&SplitMix::for_layers(6).vec(n * classes, -3.0, 3.0));
    let t = [4, 0, 2];
    let (_, d) = closs::softmax_cross_entropy_oracle(n, classes, &z, &t);
    let f = |z: &[f64]| closs::softmax_cross_entropy_oracle(n, classes, z, &t).0;
    check("fd cross-entropy", &Device::Cpu, &d, &numeric_grad(&z, &f), 1e-9, 1e-6);
}

#[test]
fn out_of_range_targets_are_reported() {
    let logits = vec![0.5f32; 6];
    for bad in [vec![0, 3], vec![-1, 0]] {
        let dev = Device::Cpu;
        let (mut loss, mut d) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, 6));
        let err = layers::softmax_cross_entropy(
            &dev,
            2,
            3,
            &up(&dev, logits.clone()),
            &up(&dev, bad.clone()),
            &mut loss,
            &mut d,
        )
        .unwrap_err();
        assert!(err.to_string().contains("outside the 3 classes"), "{err}");
        assert!(layers::check_targets(&bad, 3).is_err());
        // A kernel device does not read the targets on the host: the loss says NaN.
        for dev in emu_devices() {
            let (mut loss, mut d) = (fresh::<f32>(&dev, 1), fresh::<f32>(&dev, 6));
            layers::softmax_cross_entropy(
                &dev,
                2,
                3,
                &up(&dev, logits.clone()),
                &up(&dev, bad.clone()),
                &mut loss,
                &mut d,
            )
            .unwrap();
            assert!(loss.to_vec().unwrap()[0].is_nan());
            let d = d.to_vec().unwrap();
            let bad_row = if bad[0] == 0 { 1 } else { 0 };
            assert!(d[bad_row * 3..bad_row * 3 + 3].iter().all(|v| v.is_nan()));
            assert!(d[(1 - bad_row) * 3..(1 - bad_row) * 3 + 3].iter().all(|v| v.is_finite()));
        }
    }
    assert!(layers::check_targets(&[0, 1, 2], 3).is_ok());
}
// ---------------------------------------------------------------- PyTorch's values

fn check_against_pytorch(dev: &Device) {
    for r in references() {
        let logits = &r.f32s("expect.logits");
        let targets: Vec<i32> = r.sd.get("target").unwrap().as_i64().unwrap().iter().map(|&t| t as i32).collect();
        let (n, classes) = (targets.len(), logits.len() / targets.len());
        let (mut loss, mut d) = (fresh::<f32>(dev, 1), fresh::<f32>(dev, logits.len()));
        layers::softmax_cross_entropy(dev, n, classes, &up(dev, logits.clone()), &up(dev, targets), &mut loss, &mut d)
            .unwrap();
        let what = |s: &str| format!("{} {s} vs PyTorch", r.name);
        check(&what("loss"), dev, &down(&loss), &d64(&r.f32s("expect.loss")), 0.0, 2e-6);
        // PyTorch's fc.bias gradient is the batch sum of dlogits.
        let mut db = fresh::<f32>(dev, classes);
        let (mut dx, mut dw) = (fresh::<f32>(dev, n), fresh::<f32>(dev, classes));
        let ones = up(dev, vec![1.0f32; n]);
        let w = up(dev, vec![0.0f32; classes]);
        layers::fc_backward(dev, n, 1, classes, &ones, &w, &d, &mut dx, &mut dw, &mut db).unwrap();
        check(&what("fc.bias grad"), dev, &down(&db), &d64(&r.f32s("expect.grad.fc.bias")), 1e-7, 1e-5);
        check(
            &what("fc.weight grad of a ones input"),
            dev,
            &down(&dw),
            &d64(&r.f32s("expect.grad.fc.bias")),
            1e-7,
            1e-5,
        );
    }
}

#[test]
fn loss_matches_pytorch_reference_values() {
    for dev in all_devices() {
        check_against_pytorch(&dev);
    }
}
#[test]
fn a_one_percent_loss_error_fails_the_pytorch_check() {
    let r = &references()[0];
    let want = r.f32s("expect.loss")[0] as f64;
    let result = std::panic::catch_unwind(|| check("loss", &Device::Cpu, &[want * 1.01], &[want], 0.0, 2e-6));
    assert!(result.is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let emu = Device::Gpu(gpu);
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = Device::Cpu;
    for dev in [&cpu, &emu] {
        let b = |n: usize| fresh::<f32>(dev, n);
        let t = up(dev, vec![0i32, 1]);
        assert!(layers::softmax_cross_entropy(dev, 2, 3, &b(6), &t, &mut b(2), &mut b(6)).is_err());
        assert!(layers::softmax_cross_entropy(dev, 0, 3, &b(0), &up(dev, vec![]), &mut b(1), &mut b(0)).is_err());
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let t = up(wrong, vec![0i32]);
        assert!(layers::softmax_cross_entropy(dev, 1, 2, &ok(2), &t, &mut ok(1), &mut ok(2)).is_err());
    }
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_loss() {
        let d = common::cuda_device();
        check_loss(&d);
        check_against_pytorch(&d);
    }
}
