//! The elementwise layer ops (`prunekit::ops::layers`: add_relu, relu_backward,
//! add_assign, cast) on every device against the f64 oracles of
//! `prunekit::cpu::layers::elementwise`: the CUDA kernels through the host emulation in
//! forward, reverse and shuffled fiber order (outputs start as poison there, so every
//! element must be written), and the CPU fast path; bad inputs. `mod cuda` runs the kernel
//! checks on a real GPU.

use half::bf16;
use prunekit::cpu::layers::elementwise as cew;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers::{self as layers, LayerElem};
use prunekit::Device;

mod common;

use common::layers::{all_devices, check, down, f64s, fresh, rtol, to_t, up};
use common::SplitMix;

const EW_LENS: &[usize] = &[1, 7, 8, 13, 1000, 4099];

/// Random values with special ones sprinkled in: NaN, +-0, +-inf.
fn ew_values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix::for_layers(seed);
    let mut v = r.vec(n, -2.0, 2.0);
    let special = [f32::NAN, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, -1.0, 1e-30];
    for s in special {
        if n > 16 {
            let i = r.below(n);
            v[i] = s;
        }
    }
    v
}

fn check_elementwise<T: LayerElem>(dev: &Device) {
    for (li, &n) in EW_LENS.iter().enumerate() {
        let a = to_t::<T>(&ew_values(n, 10 + li as u64));
        let b = to_t::<T>(&ew_values(n, 20 + li as u64));
        let (a64, b64) = (f64s(&a), f64s(&b));
        let (ab, bb) = (up(dev, a.clone()), up(dev, b.clone()));
        let what = |s: &str| format!("{s} (n = {n}, {})", T::DTYPE);

        let mut out = fresh::<T>(dev, n);
        layers::add_relu(dev, &ab, &bb, &mut out).unwrap();
        let want: Vec<f64> = cew::add_relu_oracle(&a64, &b64);
        check(&what("add_relu"), dev, &down(&out), &want, 0.0, rtol::<T>());

        let mut dx = fresh::<T>(dev, n);
        layers::relu_backward(dev, &ab, &bb, &mut dx).unwrap();
        check(&what("relu_backward"), dev, &down(&dx), &cew::relu_backward_oracle(&a64, &b64), 0.0, 0.0);

        let mut dst = up(dev, a.clone());
        layers::add_assign(dev, &mut dst, &bb).unwrap();
        let want: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x + y).collect();
        check(&what("add_assign"), dev, &down(&dst), &want, 0.0, rtol::<T>());
    }
}

#[test]
fn elementwise_ops_match_oracle_on_every_device() {
    for dev in all_devices() {
        check_elementwise::<f32>(&dev);
        check_elementwise::<bf16>(&dev);
    }
}

#[test]
fn relu_keeps_nan_and_backward_follows_pytorch() {
    for dev in all_devices() {
        let a = up(&dev, vec![f32::NAN, -1.0, 2.0, 0.0, f32::INFINITY]);
        let b = up(&dev, vec![1.0f32, 0.5, -3.0, -0.0, f32::NEG_INFINITY]);
        let mut out = fresh::<f32>(&dev, 5);
        layers::add_relu(&dev, &a, &b, &mut out).unwrap();
        let got = out.to_vec().unwrap();
        assert!(got[0].is_nan() && got[4].is_nan(), "{got:?}");
        assert_eq!(&got[1..4], &[0.0, 0.0, 0.0]);
        // threshold_backward: out <= 0 ? 0 : dy; a NaN output passes dy.
        let out = up(&dev, vec![f32::NAN, -1.0, 2.0, 0.0, -0.0]);
        let dy = up(&dev, vec![5.0f32, 6.0, 7.0, 8.0, 9.0]);
        let mut dx = fresh::<f32>(&dev, 5);
        layers::relu_backward(&dev, &out, &dy, &mut dx).unwrap();
        assert_eq!(dx.to_vec().unwrap(), vec![5.0, 0.0, 7.0, 0.0, 0.0]);
    }
}

fn check_cast(dev: &Device) {
    let mut r = SplitMix::for_layers(77);
    let mut src: Vec<f32> = r.vec(4099, -100.0, 100.0);
    // Ties (the low 16 bits exactly half way), values next to ties, specials.
    for (i, v) in src.iter_mut().enumerate().take(600) {
        let bits = v.to_bits() & 0xffff_0000;
        *v = f32::from_bits(match i % 3 {
            0 => bits | 0x8000,
            1 => bits | 0x7fff,
            _ => bits | 0x8001,
        });
    }
    src[1000] = f32::NAN;
    src[1001] = f32::INFINITY;
    src[1002] = -0.0;
    src[1003] = f32::MAX; // rounds to inf
    src[1004] = 1e-40; // subnormal
    for n in [0, 1, 9, 4099] {
        let s = up(dev, src[..n].to_vec());
        let mut d = fresh::<bf16>(dev, n);
        layers::cast(dev, &s, &mut d).unwrap();
        let got = d.to_vec().unwrap();
        for (i, (g, x)) in got.iter().zip(&src).enumerate() {
            let want = bf16::from_f32(*x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "cast f32 -> bf16 on {}: {x:e} gave {g} (bits {:04x}), expected {want} ({:04x}) at {i}",
                dev.name(),
                g.to_bits(),
                want.to_bits()
            );
        }
        let mut back = fresh::<f32>(dev, n);
        layers::cast(dev, &d, &mut back).unwrap();
        let back = back.to_vec().unwrap();
        for (b, g) in back.iter().zip(&got) {
            assert!(b.to_bits() == g.to_f32().to_bits() || b.is_nan() && g.is_nan(), "bf16 -> f32 is exact");
        }
        let mut copy = fresh::<f32>(dev, n);
        layers::cast(dev, &s, &mut copy).unwrap();
        assert!(copy.to_vec().unwrap().iter().zip(&src).all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut copy16 = fresh::<bf16>(dev, n);
        layers::cast(dev, &d, &mut copy16).unwrap();
        assert_eq!(copy16.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), {
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        });
    }
}

#[test]
fn casts_round_to_nearest_even_on_every_device() {
    for dev in all_devices() {
        check_cast(&dev);
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
        let mut o = b(5);
        assert!(layers::add_relu(dev, &b(5), &b(4), &mut o).is_err());
        assert!(layers::relu_backward(dev, &b(5), &b(5), &mut b(6)).is_err());
        assert!(layers::add_assign(dev, &mut o, &b(6)).is_err());
        assert!(layers::cast(dev, &b(5), &mut fresh::<bf16>(dev, 4)).is_err());
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let bad = |n: usize| up(wrong, vec![1.0f32; n]);
        assert!(layers::add_relu(dev, &ok(4), &bad(4), &mut ok(4)).is_err());
        assert!(layers::relu_backward(dev, &ok(4), &ok(4), &mut bad(4)).is_err());
        assert!(layers::add_assign(dev, &mut ok(4), &bad(4)).is_err());
        assert!(layers::cast(dev, &bad(4), &mut fresh::<bf16>(dev, 4)).is_err());
    }
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_elementwise_and_casts() {
        let d = common::cuda_device();
        check_elementwise::<f32>(&d);
        check_elementwise::<bf16>(&d);
        check_cast(&d);
    }
}
