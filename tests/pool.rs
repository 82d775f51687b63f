//! Max and average pooling (`prunekit::ops::layers::{maxpool,avgpool}_*`) on every device
//! against the f64 oracles of `prunekit::cpu::layers::pool`: the CUDA kernels through the
//! host emulation in forward, reverse and shuffled fiber order (outputs start as poison
//! there, so every element must be written), and the CPU fast path; PyTorch's ties, NaN and
//! sizes; the max pool that writes its argmax taps, the backward that reads them and the max
//! pool of a batch norm applied as it loads, bitwise against the plain ops; the oracles'
//! gradients by finite differences; bad inputs. `mod cuda` runs the
//! kernel checks on a real GPU.

use half::bf16;
use prunekit::cpu::layers::pool as cpool;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers::{self as layers, LayerElem};
use prunekit::Device;

mod common;

use common::layers::{all_devices, check, down, f64s, fresh, numeric_grad, rtol, to_t, up};
use common::{d64, SplitMix};

const MAXPOOL_SHAPES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 1, 1), (2, 2, 3, 3), (1, 3, 2, 5), (2, 5, 7, 13), (1, 9, 8, 64), (1, 4, 3, 2048), (3, 6, 5, 8)];

/// Inputs with many ties (few distinct values), a few NaN and -inf.
fn pool_values(n: usize, seed: u64, ties: bool) -> Vec<f32> {
    let mut r = SplitMix::for_layers(seed);
    let mut v: Vec<f32> = (0..n).map(|_| if ties { (r.below(4) as f32) - 1.0 } else { r.uniform(-3.0, 3.0) }).collect();
    if ties && n > 20 {
        for _ in 0..n / 20 {
            let i = r.below(n);
            v[i] = f32::NEG_INFINITY;
        }
        for _ in 0..(n / 50).max(1) {
            let i = r.below(n);
            v[i] = f32::NAN;
        }
    }
    v
}

fn check_maxpool<T: LayerElem>(dev: &Device) {
    for (si, &(n, h, w, c)) in MAXPOOL_SHAPES.iter().enumerate() {
        for ties in [false, true] {
            let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
            let x = to_t::<T>(&pool_values(n * h * w * c, 30 + si as u64, ties));
            let dy = to_t::<T>(&SplitMix::for_layers(40 + si as u64).vec(n * oh * ow * c, -1.0, 1.0));
            let (x64, dy64) = (f64s(&x), f64s(&dy));
            let xb = up(dev, x);
            let mut y = fresh::<T>(dev, n * oh * ow * c);
            layers::maxpool_forward(dev, n, h, w, c, &xb, &mut y).unwrap();
            let what = |s: &str| format!("maxpool {s} ({n}x{h}x{w}x{c}, {}, ties {ties})", T::DTYPE);
            check(&what("forward"), dev, &down(&y), &cpool::maxpool_forward_oracle(n, h, w, c, &x64), 0.0, 0.0);
            let mut dx = fresh::<T>(dev, n * h * w * c);
            layers::maxpool_backward(dev, n, h, w, c, &xb, &up(dev, dy), &mut dx).unwrap();
            let want = cpool::maxpool_backward_oracle(n, h, w, c, &x64, &dy64);
            check(&what("backward"), dev, &down(&dx), &want, 1e-6, rtol::<T>());
        }
    }
}

#[test]
fn maxpool_matches_oracle_on_every_device() {
    for dev in all_devices() {
        check_maxpool::<f32>(&dev);
        check_maxpool::<bf16>(&dev);
    }
}

/// The bytes of a buffer (bitwise comparisons, NaN included).
fn bits<T: prunekit::gpu::Elem>(b: &prunekit::device::Buf<T>) -> Vec<u8> {
    bytemuck::cast_slice(&b.to_vec().unwrap()).to_vec()
}

/// The taps of the maxima of `x` (f32 values of one layout `[n, h, w, c]`) by PyTorch's
/// rule: the first in-range tap, replaced by every later one that is greater or NaN.
fn taps_oracle(n: usize, h: usize, w: usize, c: usize, x: &[f64]) -> Vec<u8> {
    let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
    let mut t = vec![0u8; n * oh * ow * c];
    for img in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut best: Option<(u8, f64)> = None;
                    for dh in 0..3 {
                        for dw in 0..3 {
                            let (ih, iw) = ((2 * oy + dh) as isize - 1, (2 * ox + dw) as isize - 1);
                            if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                continue;
                            }
                            let v = x[((img * h + ih as usize) * w + iw as usize) * c + ch];
                            if best.is_none_or(|(_, b)| v > b || v.is_nan()) {
                                best = Some(((dh * 3 + dw) as u8, v));
                            }
                        }
                    }
                    t[((img * oh + oy) * ow + ox) * c + ch] = best.unwrap().0;
                }
            }
        }
    }
    t
}

/// The max pool that writes its taps and the backward that reads them: on every device
/// the same y and dx bits as the plain max pool, and taps as PyTorch picks its maxima.
fn check_maxpool_taps<T: LayerElem>(dev: &Device) {
    for (si, &(n, h, w, c)) in MAXPOOL_SHAPES.iter().enumerate() {
        for ties in [false, true] {
            let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
            let x = to_t::<T>(&pool_values(n * h * w * c, 70 + si as u64, ties));
            let dy = up(dev, to_t::<T>(&SplitMix::for_layers(80 + si as u64).vec(n * oh * ow * c, -1.0, 1.0)));
            let x64 = f64s(&x);
            let xb = up(dev, x);
            let what = format!("maxpool taps ({n}x{h}x{w}x{c}, {}, ties {ties}) on {}", T::DTYPE, dev.name());
            let (mut y, mut y_taps) = (fresh::<T>(dev, n * oh * ow * c), fresh::<T>(dev, n * oh * ow * c));
            let mut taps = fresh::<u8>(dev, n * oh * ow * c);
            layers::maxpool_forward(dev, n, h, w, c, &xb, &mut y).unwrap();
            layers::maxpool_forward_bn(dev, n, h, w, c, &xb, None, &mut y_taps, Some(&mut taps)).unwrap();
            assert_eq!(bits(&y_taps), bits(&y), "{what}: y");
            assert_eq!(taps.to_vec().unwrap(), taps_oracle(n, h, w, c, &x64), "{what}: taps");
            let (mut dx, mut dx_taps) = (fresh::<T>(dev, n * h * w * c), fresh::<T>(dev, n * h * w * c));
            layers::maxpool_backward(dev, n, h, w, c, &xb, &dy, &mut dx).unwrap();
            layers::maxpool_backward_taps(dev, n, h, w, c, &taps, &dy, &mut dx_taps).unwrap();
            assert_eq!(bits(&dx_taps), bits(&dx), "{what}: dx");
        }
    }
}

#[test]
fn maxpool_taps_give_the_plain_pools_bits_on_every_device() {
    for dev in all_devices() {
        check_maxpool_taps::<f32>(&dev);
        check_maxpool_taps::<bf16>(&dev);
    }
}

/// The max pool of a batch norm (+ ReLU) applied as it loads: bitwise `bn_apply_saved` then
/// the max pool on the same device, taps those of the BN's output; negative and zero
/// gammas (which reorder the window), ties after the ReLU, NaN inputs.
fn check_maxpool_bn<T: LayerElem>(dev: &Device) {
    use prunekit::ops::layers::BnInput;
    for (si, &(n, h, w, c)) in MAXPOOL_SHAPES.iter().enumerate() {
        for relu in [true, false] {
            let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
            let mut r = SplitMix::for_layers(90 + si as u64);
            let x = up(dev, to_t::<T>(&pool_values(n * h * w * c, 100 + si as u64, si % 2 == 0)));
            let mut gamma = r.vec(c, -1.5, 1.5);
            if c > 2 {
                gamma[1] = 0.0;
            }
            let (beta, mean, invstd) = (r.vec(c, -0.5, 0.5), r.vec(c, -1.0, 1.0), r.vec(c, 0.2, 3.0));
            let (g, b, m, i) = (up(dev, gamma), up(dev, beta), up(dev, mean), up(dev, invstd));
            let bn = BnInput { c, gamma: &g, beta: &b, mean: &m, invstd: &i, relu };
            let what = format!("maxpool bn ({n}x{h}x{w}x{c}, {}, relu {relu}) on {}", T::DTYPE, dev.name());
            let mut a = fresh::<T>(dev, n * h * w * c);
            layers::bn_apply_saved(dev, n * h * w, &x, &bn, None, &mut a).unwrap();
            let (mut y, mut want_taps) = (fresh::<T>(dev, n * oh * ow * c), fresh::<u8>(dev, n * oh * ow * c));
            layers::maxpool_forward_bn(dev, n, h, w, c, &a, None, &mut y, Some(&mut want_taps)).unwrap();
            let (mut y_bn, mut taps) = (fresh::<T>(dev, n * oh * ow * c), fresh::<u8>(dev, n * oh * ow * c));
            layers::maxpool_forward_bn(dev, n, h, w, c, &x, Some(&bn), &mut y_bn, Some(&mut taps)).unwrap();
            assert_eq!(bits(&y_bn), bits(&y), "{what}: y");
            assert_eq!(taps.to_vec().unwrap(), want_taps.to_vec().unwrap(), "{what}: taps");
            let mut y_only = fresh::<T>(dev, n * oh * ow * c);
            layers::maxpool_forward_bn(dev, n, h, w, c, &x, Some(&bn), &mut y_only, None).unwrap();
            assert_eq!(bits(&y_only), bits(&y), "{what}: y without taps");
        }
    }
}

#[test]
fn maxpool_bn_is_bn_then_maxpool_on_every_device() {
    for dev in all_devices() {
        check_maxpool_bn::<f32>(&dev);
        check_maxpool_bn::<bf16>(&dev);
    }
}

/// Taps that no forward writes (9 and above, or off the image) send no gradient, alike on
/// every device.
#[test]
fn maxpool_backward_ignores_taps_off_the_window() {
    let (n, h, w, c) = (1, 3, 5, 8);
    let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
    let taps: Vec<u8> = (0..n * oh * ow * c).map(|i| [0u8, 4, 8, 9, 200, 255, 1, 3][i % 8] ^ (i as u8 & 1)).collect();
    let dy: Vec<f32> = (0..n * oh * ow * c).map(|i| 1.0 + i as f32).collect();
    let mut want = vec![0.0f64; n * h * w * c];
    for oy in 0..oh {
        for ox in 0..ow {
            for ch in 0..c {
                let e = (oy * ow + ox) * c + ch;
                let t = taps[e] as usize;
                let (ih, iw) = ((2 * oy + t / 3) as isize - 1, (2 * ox + t % 3) as isize - 1);
                if t < 9 && ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < w {
                    want[(ih as usize * w + iw as usize) * c + ch] += dy[e] as f64;
                }
            }
        }
    }
    for dev in all_devices() {
        let mut dx = fresh::<f32>(&dev, n * h * w * c);
        layers::maxpool_backward_taps(&dev, n, h, w, c, &up(&dev, taps.clone()), &up(&dev, dy.clone()), &mut dx)
            .unwrap();
        check("maxpool backward of stray taps", &dev, &down(&dx), &want, 0.0, 0.0);
    }
}

#[test]
fn maxpool_follows_pytorch_on_ties_nan_and_sizes() {
    assert_eq!(
        [0, 1, 2, 3, 4, 7, 56, 112, 113].map(layers::maxpool_out),
        [0, 1, 1, 2, 2, 4, 28, 56, 57],
        "floor((h + 2 - 3) / 2) + 1"
    );
    // One 3x3 image, one channel; output 2x2. Window (0,0) covers rows 0-1, cols 0-1.
    // x = [[5, 5, 1],       window (0,0): max 5, first at (0,0)
    //      [2, 5, NaN],     window (0,1): cols 1-2 -> NaN at (1,2) (NaN wins)
    //      [7, 0, 7]]       window (1,0): rows 1-2, cols 0-1 -> 7 at (2,0)
    //                       window (1,1): rows 1-2, cols 1-2 -> NaN at (1,2)
    let x = vec![5.0f32, 5.0, 1.0, 2.0, 5.0, f32::NAN, 7.0, 0.0, 7.0];
    for dev in all_devices() {
        let xb = up(&dev, x.clone());
        let mut y = fresh::<f32>(&dev, 4);
        layers::maxpool_forward(&dev, 1, 3, 3, 1, &xb, &mut y).unwrap();
        let y = y.to_vec().unwrap();
        assert!(y[0] == 5.0 && y[1].is_nan() && y[2] == 7.0 && y[3].is_nan(), "{y:?}");
        let mut dx = fresh::<f32>(&dev, 9);
        layers::maxpool_backward(&dev, 1, 3, 3, 1, &xb, &up(&dev, vec![1.0f32, 10.0, 100.0, 1000.0]), &mut dx).unwrap();
        assert_eq!(dx.to_vec().unwrap(), vec![1.0, 0.0, 0.0, 0.0, 0.0, 1010.0, 100.0, 0.0, 0.0], "{}", dev.name());
    }
}

#[test]
fn maxpool_oracle_gradient_matches_finite_differences() {
    for &(n, h, w, c) in &[(2, 5, 4, 2), (1, 1, 1, 3), (1, 2, 2, 1), (1, 3, 3, 2)] {
        let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
        // Distinct values: the argmax does not move under a small step.
        let mut x: Vec<f64> = (0..n * h * w * c).map(|i| ((i * 37) % 101) as f64 * 0.01).collect();
        x.iter_mut().enumerate().for_each(|(i, v)| *v += i as f64 * 1e-4);
        let r = d64(&SplitMix::for_layers(3).vec(n * oh * ow * c, -1.0, 1.0));
        let f = |x: &[f64]| -> f64 {
            cpool::maxpool_forward_oracle(n, h, w, c, x).iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        let analytic = cpool::maxpool_backward_oracle(n, h, w, c, &x, &r);
        check("fd maxpool", &Device::Cpu, &analytic, &numeric_grad(&x, &f), 1e-7, 1e-6);
    }
}

const AVGPOOL_SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (2, 49, 13), (3, 4, 64), (2, 7, 2048), (1, 9, 5)];

fn check_avgpool<T: LayerElem>(dev: &Device) {
    for (si, &(n, hw, c)) in AVGPOOL_SHAPES.iter().enumerate() {
        let x = to_t::<T>(&SplitMix::for_layers(50 + si as u64).vec(n * hw * c, -2.0, 3.0));
        let x64 = f64s(&x);
        let mut y = fresh::<f32>(dev, n * c);
        layers::avgpool_forward(dev, n, hw, c, &up(dev, x), &mut y).unwrap();
        let want = cpool::avgpool_forward_oracle(n, hw, c, &x64);
        let what = |s: &str| format!("avgpool {s} ({n}x{hw}x{c}, {})", T::DTYPE);
        check(&what("forward"), dev, &down(&y), &want, 3e-7 * 3.0, 1e-5);
        let dy = SplitMix::for_layers(60 + si as u64).vec(n * c, -1.0, 1.0);
        let mut dx = fresh::<T>(dev, n * hw * c);
        layers::avgpool_backward(dev, n, hw, c, &up(dev, dy.clone()), &mut dx).unwrap();
        let want = cpool::avgpool_backward_oracle(n, hw, c, &d64(&dy));
        check(&what("backward"), dev, &down(&dx), &want, 0.0, rtol::<T>());
    }
}

#[test]
fn avgpool_matches_oracle_on_every_device() {
    for dev in all_devices() {
        check_avgpool::<f32>(&dev);
        check_avgpool::<bf16>(&dev);
    }
}

#[test]
fn avgpool_oracle_gradient_matches_finite_differences() {
    let (n, hw, c) = (2, 5, 3);
    let x = d64(&SplitMix::for_layers(4).vec(n * hw * c, -1.0, 1.0));
    let r = d64(&SplitMix::for_layers(5).vec(n * c, -1.0, 1.0));
    let f = |x: &[f64]| -> f64 { cpool::avgpool_forward_oracle(n, hw, c, x).iter().zip(&r).map(|(a, b)| a * b).sum() };
    check("fd avgpool", &Device::Cpu, &cpool::avgpool_backward_oracle(n, hw, c, &r), &numeric_grad(&x, &f), 1e-8, 1e-6);
}
#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let emu = Device::Gpu(gpu);
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = Device::Cpu;
    for dev in [&cpu, &emu] {
        let b = |n: usize| fresh::<f32>(dev, n);
        // Max pool: empty image, wrong lengths.
        assert!(layers::maxpool_forward(dev, 1, 0, 3, 1, &b(0), &mut b(0)).is_err());
        assert!(layers::maxpool_forward(dev, 1, 3, 3, 2, &b(18), &mut b(7)).is_err());
        assert!(layers::maxpool_backward(dev, 1, 3, 3, 2, &b(18), &b(7), &mut b(18)).is_err());
        let t = |n: usize| fresh::<u8>(dev, n);
        assert!(layers::maxpool_forward_bn(dev, 1, 3, 3, 2, &b(18), None, &mut b(8), Some(&mut t(7))).is_err());
        assert!(layers::maxpool_backward_taps(dev, 1, 3, 3, 2, &t(7), &b(8), &mut b(18)).is_err());
        assert!(layers::maxpool_backward_taps(dev, 1, 3, 3, 2, &t(8), &b(8), &mut b(17)).is_err());
        let (g, bb, m, i) = (b(3), b(3), b(3), b(3));
        let bn3 = prunekit::ops::layers::BnInput { c: 3, gamma: &g, beta: &bb, mean: &m, invstd: &i, relu: true };
        assert!(layers::maxpool_forward_bn(dev, 1, 3, 3, 2, &b(18), Some(&bn3), &mut b(8), None).is_err());
        let short = b(1);
        let bn2 = prunekit::ops::layers::BnInput { c: 2, gamma: &short, beta: &bb, mean: &m, invstd: &i, relu: true };
        assert!(layers::maxpool_forward_bn(dev, 1, 3, 3, 2, &b(18), Some(&bn2), &mut b(8), None).is_err());
        assert!(layers::avgpool_forward(dev, 2, 0, 3, &b(0), &mut b(6)).is_err());
        assert!(layers::avgpool_forward(dev, 2, 4, 3, &b(24), &mut b(5)).is_err());
        assert!(layers::avgpool_backward(dev, 2, 4, 3, &b(6), &mut b(23)).is_err());
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let bad = |n: usize| up(wrong, vec![1.0f32; n]);
        assert!(layers::maxpool_forward(dev, 1, 2, 2, 1, &bad(4), &mut ok(1)).is_err());
        assert!(layers::maxpool_backward(dev, 1, 2, 2, 1, &ok(4), &bad(1), &mut ok(4)).is_err());
        let (ok_t, bad_t) = (up(dev, vec![0u8; 1]), up(wrong, vec![0u8; 1]));
        assert!(layers::maxpool_forward_bn(dev, 1, 2, 2, 1, &ok(4), None, &mut ok(1), Some(&mut up(wrong, vec![0u8])))
            .is_err());
        assert!(layers::maxpool_backward_taps(dev, 1, 2, 2, 1, &bad_t, &ok(1), &mut ok(4)).is_err());
        assert!(layers::maxpool_backward_taps(dev, 1, 2, 2, 1, &ok_t, &ok(1), &mut bad(4)).is_err());
        let (c1, w1) = (ok(1), bad(1));
        let bn = prunekit::ops::layers::BnInput { c: 1, gamma: &c1, beta: &c1, mean: &w1, invstd: &c1, relu: false };
        assert!(layers::maxpool_forward_bn(dev, 1, 2, 2, 1, &ok(4), Some(&bn), &mut ok(1), None).is_err());
        assert!(layers::avgpool_forward(dev, 1, 4, 1, &ok(4), &mut bad(1)).is_err());
        assert!(layers::avgpool_backward(dev, 1, 4, 1, &bad(1), &mut ok(4)).is_err());
    }
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_pooling() {
        let d = common::cuda_device();
        check_maxpool::<f32>(&d);
        check_maxpool::<bf16>(&d);
        check_maxpool_taps::<f32>(&d);
        check_maxpool_taps::<bf16>(&d);
        check_maxpool_bn::<f32>(&d);
        check_maxpool_bn::<bf16>(&d);
        check_avgpool::<f32>(&d);
        check_avgpool::<bf16>(&d);
    }
}
