//! Batch norm (`prunekit::ops::layers::bn_*` with a `BnLayer`) on every device against
//! the f64 oracles of `prunekit::cpu::layers::bn`: the CUDA kernels through the host
//! emulation in forward, reverse and shuffled fiber order (outputs start as poison there,
//! so every element must be written), and the CPU fast path; the CPU conv epilogue's
//! moments; the oracles' gradients by finite differences; bad inputs. `mod cuda` runs the
//! kernel checks on a real GPU.

use half::bf16;
use prunekit::cpu::layers::bn as cbn;
use prunekit::cpu::layers::Real;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::layers::{self as layers, BnLayer, LayerElem};
use prunekit::Device;

mod common;

use common::layers::{all_devices, check, down, f64s, fresh, max_abs, numeric_grad, rtol, to_t, up, BnBufs};
use common::{d64, SplitMix};

/// Shapes (m, c) of the BN tests: c = 1, 3, 5, 13, 45, 64, 2048 (45 = 16 + 16 + 8 + 4 + 1:
/// every channel block width of the CPU reductions), m not a multiple of anything.
const BN_SHAPES: &[(usize, usize)] =
    &[(2, 1), (7, 3), (300, 5), (1001, 13), (211, 45), (517, 64), (37, 2048), (3, 2048)];

struct BnCase {
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn bn_case<T: Real>(m: usize, c: usize, seed: u64, mean: f32) -> BnCase {
    let mut r = SplitMix::for_layers(seed);
    // Per-channel offsets and scales, so that every channel has its own statistics.
    let off = r.vec(c, mean - 2.0, mean + 2.0);
    let scale = r.vec(c, 0.2, 3.0);
    let x: Vec<f32> = (0..m * c).map(|i| off[i % c] + scale[i % c] * r.uniform(-1.0, 1.0)).collect();
    let x = to_t::<T>(&x).iter().map(|v| v.to_f32()).collect();
    BnCase { x, gamma: r.vec(c, 0.5, 1.5), beta: r.vec(c, -0.5, 0.5), rm: r.vec(c, -1.0, 1.0), rv: r.vec(c, 0.5, 2.0) }
}

fn check_bn_train<T: LayerElem>(dev: &Device, m: usize, c: usize, relu: bool, seed: u64, mean: f32) {
    let k = bn_case::<T>(m, c, seed, mean);
    let x = up(dev, to_t::<T>(&k.x));
    let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
    let mut y = fresh::<T>(dev, m * c);
    layers::bn_forward_train(dev, m, &x, &mut bn.layer(), relu, &mut y).unwrap();
    let o = cbn::bn_forward_train_oracle(
        m,
        c,
        &d64(&k.x),
        &d64(&k.gamma),
        &d64(&k.beta),
        &d64(&k.rm),
        &d64(&k.rv),
        0.1,
        1e-5,
        relu,
    );
    let what = |s: &str| format!("bn train {s} ({m}x{c}, {}, relu {relu})", T::DTYPE);
    // Beyond the output's own rounding: the mean is an f32 (as in PyTorch), off by up to
    // half an ulp, which moves y by that times gamma * invstd.
    let mean_ulp = (0..c).map(|ch| o.mean[ch].abs() * o.invstd[ch] * k.gamma[ch] as f64).fold(0.0, f64::max) * 1.2e-7;
    check(&what("y"), dev, &down(&y), &o.y, 2e-5 * max_abs(&o.y) + mean_ulp, rtol::<T>());
    check(&what("save_mean"), dev, &down(&bn.save_mean), &o.mean, 1e-5 * max_abs(&o.mean), 1e-5);
    check(&what("save_invstd"), dev, &down(&bn.save_invstd), &o.invstd, 0.0, 2e-5);
    let rm = down(&bn.running_mean);
    check(&what("running_mean"), dev, &rm, &o.running_mean, 1e-5 * max_abs(&o.running_mean), 1e-5);
    check(&what("running_var"), dev, &down(&bn.running_var), &o.running_var, 0.0, 2e-5);
}

fn check_bn_eval<T: LayerElem>(dev: &Device, m: usize, c: usize, relu: bool, seed: u64) {
    let k = bn_case::<T>(m, c, seed, 0.5);
    let x = up(dev, to_t::<T>(&k.x));
    let mut y = fresh::<T>(dev, m * c);
    let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
    layers::bn_forward_eval(dev, m, &x, &mut bn.layer(), relu, &mut y).unwrap();
    let want = cbn::bn_forward_eval_oracle(
        m,
        c,
        &d64(&k.x),
        &d64(&k.gamma),
        &d64(&k.beta),
        &d64(&k.rm),
        &d64(&k.rv),
        1e-5,
        relu,
    );
    let what = format!("bn eval y ({m}x{c}, {}, relu {relu})", T::DTYPE);
    check(&what, dev, &down(&y), &want, 2e-5 * max_abs(&want), rtol::<T>());
}

fn check_bn_backward<T: LayerElem>(dev: &Device, m: usize, c: usize, relu: bool, seed: u64) {
    let k = bn_case::<T>(m, c, seed, -1.0);
    let mut r = SplitMix::for_layers(seed ^ 0xB4C);
    let dy: Vec<f32> = to_t::<T>(&r.vec(m * c, -1.0, 1.0)).iter().map(|v| v.to_f32()).collect();
    let fwd = cbn::bn_forward_train_oracle(
        m,
        c,
        &d64(&k.x),
        &d64(&k.gamma),
        &d64(&k.beta),
        &d64(&k.rm),
        &d64(&k.rv),
        0.1,
        1e-5,
        true,
    );
    // What the forward saved, as the f32 (and T) values the backward gets.
    let mean: Vec<f32> = fwd.mean.iter().map(|&v| v as f32).collect();
    let invstd: Vec<f32> = fwd.invstd.iter().map(|&v| v as f32).collect();
    let y_t: Vec<T> = fwd.y.iter().map(|&v| T::from_f32(v as f32)).collect();
    let relu_out = relu.then(|| up(dev, y_t.clone()));
    let mut dx = fresh::<T>(dev, m * c);
    let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
    (bn.save_mean, bn.save_invstd) = (up(dev, mean.clone()), up(dev, invstd.clone()));
    let (x, dyb) = (up(dev, to_t::<T>(&k.x)), up(dev, to_t::<T>(&dy)));
    layers::bn_backward(dev, m, &x, relu_out.as_ref(), &dyb, &mut bn.layer(), &mut dx).unwrap();
    let (dg, db) = (&bn.dgamma, &bn.dbeta);
    let y64 = f64s(&y_t);
    let o = cbn::bn_backward_oracle(
        m,
        c,
        &d64(&k.x),
        relu.then_some(&y64[..]),
        &d64(&dy),
        &d64(&k.gamma),
        &d64(&mean),
        &d64(&invstd),
    );
    // The sums over m rows are f32: bound their error by the sum of the terms' magnitudes.
    let abs_sum = |f: &dyn Fn(usize) -> f64| -> f64 { (0..m * c).map(|i| f(i).abs()).sum::<f64>() / c as f64 };
    let g = |i: usize| if relu && y64[i] <= 0.0 { 0.0 } else { dy[i] as f64 };
    let sg = abs_sum(&|i| g(i));
    let sgx = abs_sum(&|i| g(i) * (k.x[i] as f64 - mean[i % c] as f64) * invstd[i % c] as f64);
    let what = |s: &str| format!("bn backward {s} ({m}x{c}, {}, relu {relu})", T::DTYPE);
    check(&what("dbeta"), dev, &down(db), &o.dbeta, 2e-6 * sg, 1e-5);
    check(&what("dgamma"), dev, &down(dg), &o.dgamma, 2e-6 * sgx, 2e-5);
    // dx = gamma invstd (g - mean g - xhat mean(g xhat)) cancels: bound its error by the
    // size of the terms, not of the result.
    let k1 = (0..c).map(|ch| (k.gamma[ch] * invstd[ch]).abs() as f64).fold(0.0, f64::max);
    check(&what("dx"), dev, &down(&dx), &o.dx, 1e-5 * k1 * max_abs(&d64(&dy)), rtol::<T>());
}

/// The backward through the BN's own ReLU (`bn_backward_through_relu`: the kernel devices
/// recompute the ReLU's output from x) is bitwise the backward that reads that output, on
/// the device's own train forward.
fn check_bn_backward_through_relu<T: LayerElem>(dev: &Device, m: usize, c: usize, seed: u64) {
    // Centred near 0, so that about half of the ReLU's inputs are negative.
    let k = bn_case::<T>(m, c, seed, 0.0);
    let mut r = SplitMix::for_layers(seed ^ 0x2E1);
    let x = up(dev, to_t::<T>(&k.x));
    let dyb = up(dev, to_t::<T>(&r.vec(m * c, -1.0, 1.0)));
    let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
    let mut y = fresh::<T>(dev, m * c);
    layers::bn_forward_train(dev, m, &x, &mut bn.layer(), true, &mut y).unwrap();
    let mut dx_read = fresh::<T>(dev, m * c);
    layers::bn_backward(dev, m, &x, Some(&y), &dyb, &mut bn.layer(), &mut dx_read).unwrap();
    let (dg_read, db_read) = (down(&bn.dgamma), down(&bn.dbeta));
    let mut dx = fresh::<T>(dev, m * c);
    layers::bn_backward_through_relu(dev, m, &x, &y, &dyb, &mut bn.layer(), &mut dx).unwrap();
    let what = format!("{m}x{c} {} on {}", T::DTYPE, dev.name());
    let bits = |v: Vec<f64>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(down(&dx)), bits(down(&dx_read)), "dx, {what}");
    assert_eq!(bits(down(&bn.dgamma)), bits(dg_read), "dgamma, {what}");
    assert_eq!(bits(down(&bn.dbeta)), bits(db_read), "dbeta, {what}");
    let zeros = down(&y).iter().filter(|v| **v == 0.0).count();
    assert!(zeros > 0 && zeros < m * c || m * c < 8, "the ReLU masks some values and keeps others ({what})");
}

#[test]
fn bn_backward_through_relu_is_bitwise_the_one_that_reads_the_relu_output() {
    for dev in all_devices() {
        for (i, &(m, c)) in BN_SHAPES.iter().enumerate() {
            check_bn_backward_through_relu::<f32>(&dev, m, c, 600 + i as u64);
            check_bn_backward_through_relu::<bf16>(&dev, m, c, 700 + i as u64);
        }
    }
}

/// Image shapes (n, h, w, c) of the stem's BN + ReLU + max pool backward: odd and even
/// sides, rows of a thread that cross images (w below the block's row step), one and many
/// row chunks, vector and scalar channels.
const POOL_BN_SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 1),
    (2, 3, 2, 3),
    (3, 5, 7, 8),
    (2, 9, 4, 13),
    (1, 12, 11, 64),
    (4, 7, 6, 16),
    (1, 23, 17, 16),
    (1, 3, 3, 2048),
];

/// The stem's backward through its max pool ([`layers::bn_backward_through_relu_maxpool`]):
/// bitwise the max pool backward from the taps, then the BN backward through the ReLU, on
/// the same device.
fn check_bn_backward_through_relu_maxpool<T: LayerElem>(
    dev: &Device,
    (n, h, w, c): (usize, usize, usize, usize),
    seed: u64,
) {
    let m = n * h * w;
    if m < 2 {
        return; // a batch norm needs two values per channel
    }
    let (oh, ow) = (layers::maxpool_out(h), layers::maxpool_out(w));
    let k = bn_case::<T>(m, c, seed, 0.0);
    let mut r = SplitMix::for_layers(seed ^ 0x9001);
    let x = up(dev, to_t::<T>(&k.x));
    let dy = up(dev, to_t::<T>(&r.vec(n * oh * ow * c, -1.0, 1.0)));
    let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
    let mut a = fresh::<T>(dev, m * c);
    layers::bn_forward_train(dev, m, &x, &mut bn.layer(), true, &mut a).unwrap();
    let (mut pooled, mut taps) = (fresh::<T>(dev, n * oh * ow * c), fresh::<u8>(dev, n * oh * ow * c));
    layers::maxpool_forward_bn(dev, n, h, w, c, &a, None, &mut pooled, Some(&mut taps)).unwrap();
    let mut da = fresh::<T>(dev, m * c);
    layers::maxpool_backward_taps(dev, n, h, w, c, &taps, &dy, &mut da).unwrap();
    let mut dx_two = fresh::<T>(dev, m * c);
    layers::bn_backward_through_relu(dev, m, &x, &a, &da, &mut bn.layer(), &mut dx_two).unwrap();
    let (dg_two, db_two) = (down(&bn.dgamma), down(&bn.dbeta));
    let mut dx = fresh::<T>(dev, m * c);
    layers::bn_backward_through_relu_maxpool(dev, (n, h, w), &x, &taps, &dy, &mut bn.layer(), &mut dx).unwrap();
    let what = format!("{n}x{h}x{w}x{c} {} on {}", T::DTYPE, dev.name());
    let bits = |v: Vec<f64>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(down(&dx)), bits(down(&dx_two)), "dx, {what}");
    assert_eq!(bits(down(&bn.dgamma)), bits(dg_two), "dgamma, {what}");
    assert_eq!(bits(down(&bn.dbeta)), bits(db_two), "dbeta, {what}");
}

#[test]
fn bn_backward_through_relu_maxpool_is_bitwise_the_pool_then_the_bn_backward() {
    // Chunks of 196 rows of 17: a chunk starts mid-row.
    assert!(layers::bn_row_chunks::<f32>(23 * 17, 16) == 2 && layers::bn_row_chunks::<f32>(2 * 3 * 2, 3) == 1);
    for dev in all_devices() {
        for (i, &shape) in POOL_BN_SHAPES.iter().enumerate() {
            check_bn_backward_through_relu_maxpool::<f32>(&dev, shape, 1000 + i as u64);
            check_bn_backward_through_relu_maxpool::<bf16>(&dev, shape, 1100 + i as u64);
        }
    }
}

/// A downsample block's two batch norms side by side (bn3 of x and the shortcut's of x2,
/// the same [m, c]): the apply with the residual through its BN
/// ([`layers::bn_apply_residual`], with the ReLU's bits where they apply) is bitwise the shortcut's apply into a buffer
/// and then bn3's with that residual; the pair backward ([`layers::bn_backward_pair`],
/// [`layers::bn_backward_dx_pair`]) bitwise the two backwards from the same dy, on the
/// same device.
fn check_bn_pair<T: LayerElem>(dev: &Device, m: usize, c: usize, seed: u64) {
    let (k, k2) = (bn_case::<T>(m, c, seed, 0.0), bn_case::<T>(m, c, seed ^ 0x5A5A, 1.5));
    let mut r = SplitMix::for_layers(seed ^ 0x77);
    let (x, x2) = (up(dev, to_t::<T>(&k.x)), up(dev, to_t::<T>(&k2.x)));
    let dy = up(dev, to_t::<T>(&r.vec(m * c, -1.0, 1.0)));
    let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
    // The shortcut's gamma: some negative and zero, so that signs and zeros go through.
    let mut gamma2 = k2.gamma.clone();
    gamma2.iter_mut().step_by(3).for_each(|g| *g = -*g);
    gamma2.iter_mut().skip(1).step_by(5).for_each(|g| *g = 0.0);
    let mut bn2 = BnBufs::new(dev, gamma2, k2.beta.clone(), k2.rm.clone(), k2.rv.clone());
    let (mut y, mut y2) = (fresh::<T>(dev, m * c), fresh::<T>(dev, m * c));
    layers::bn_forward_train(dev, m, &x, &mut bn.layer(), false, &mut y).unwrap();
    layers::bn_forward_train(dev, m, &x2, &mut bn2.layer(), false, &mut y2).unwrap();
    let what = format!("{m}x{c} {} on {}", T::DTYPE, dev.name());
    let bits = |v: Vec<f64>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for relu in [false, true] {
        let (mut short, mut want, mut got) = (fresh::<T>(dev, m * c), fresh::<T>(dev, m * c), fresh::<T>(dev, m * c));
        let (l, l2) = (bn.layer(), bn2.layer());
        layers::bn_apply_saved(dev, m, &x2, &l2.input(false), None, &mut short).unwrap();
        layers::bn_apply_saved(dev, m, &x, &l.input(relu), Some(&short), &mut want).unwrap();
        let want_y = down(&want);
        let want_bits: Vec<u8> = want_y
            .chunks(8)
            .map(|v| v.iter().enumerate().fold(0u8, |b, (k, v)| b | (((*v > 0.0) as u8) << k)))
            .collect();
        // With the ReLU, its decisions as bits (the bytes past the last element are not
        // read by anyone).
        for residual in [layers::Residual::Bn(&x2, &l2.input(false)), layers::Residual::Plain(&short)] {
            let mut relu_bits = fresh::<u8>(dev, layers::relu_bits_len(m * c));
            let b = relu.then_some(&mut relu_bits);
            layers::bn_apply_residual(dev, m, &x, &l.input(relu), residual, &mut got, b).unwrap();
            assert_eq!(bits(down(&got)), bits(want_y.clone()), "apply with the residual, relu {relu}, {what}");
            if relu {
                let b = relu_bits.to_vec().unwrap();
                assert_eq!(b[..want_bits.len()], want_bits[..], "the ReLU's bits, {what}");
            }
        }
    }
    // The backward: each BN on its own, then the pair.
    let (mut dx, mut dx2) = (fresh::<T>(dev, m * c), fresh::<T>(dev, m * c));
    layers::bn_backward(dev, m, &x, None, &dy, &mut bn.layer(), &mut dx).unwrap();
    layers::bn_backward(dev, m, &x2, None, &dy, &mut bn2.layer(), &mut dx2).unwrap();
    let want = [down(&dx), down(&bn.dgamma), down(&bn.dbeta), down(&dx2), down(&bn2.dgamma), down(&bn2.dbeta)];
    for b in [&mut bn.dgamma, &mut bn.dbeta, &mut bn2.dgamma, &mut bn2.dbeta] {
        *b = fresh::<f32>(dev, c);
    }
    let (mut px, mut px2) = (fresh::<T>(dev, m * c), fresh::<T>(dev, m * c));
    {
        let (mut l, mut l2) = (bn.layer(), bn2.layer());
        let a = layers::BnSide { x: &x, bn: &mut l, dx: &mut px };
        let b = layers::BnSide { x: &x2, bn: &mut l2, dx: &mut px2 };
        layers::bn_backward_pair(dev, m, &dy, a, b).unwrap();
    }
    let got = [down(&px), down(&bn.dgamma), down(&bn.dbeta), down(&px2), down(&bn2.dgamma), down(&bn2.dbeta)];
    let names = ["dx", "dgamma", "dbeta", "dx2", "dgamma2", "dbeta2"];
    for ((g, w), name) in got.into_iter().zip(want).zip(names) {
        assert_eq!(bits(g), bits(w), "pair backward {name}, {what}");
    }
    // The dx passes alone, from other parameter gradients (as a dgrad epilogue leaves them).
    let mut grads = |dev: &Device| up(dev, r.vec(c, -2.0, 2.0));
    (bn.dgamma, bn.dbeta, bn2.dgamma, bn2.dbeta) = (grads(dev), grads(dev), grads(dev), grads(dev));
    layers::bn_backward_dx(dev, m, &x, &dy, &bn.layer(), false, &mut dx).unwrap();
    layers::bn_backward_dx(dev, m, &x2, &dy, &bn2.layer(), false, &mut dx2).unwrap();
    let (mut px, mut px2) = (fresh::<T>(dev, m * c), fresh::<T>(dev, m * c));
    {
        let (mut l, mut l2) = (bn.layer(), bn2.layer());
        let a = layers::BnSide { x: &x, bn: &mut l, dx: &mut px };
        let b = layers::BnSide { x: &x2, bn: &mut l2, dx: &mut px2 };
        layers::bn_backward_dx_pair(dev, m, &dy, a, b).unwrap();
    }
    assert_eq!(bits(down(&px)), bits(down(&dx)), "pair dx pass dx, {what}");
    assert_eq!(bits(down(&px2)), bits(down(&dx2)), "pair dx pass dx2, {what}");
}

#[test]
fn bn_pairs_are_bitwise_the_two_batch_norms_apart() {
    for dev in all_devices() {
        for (i, &(m, c)) in BN_SHAPES.iter().enumerate() {
            check_bn_pair::<f32>(&dev, m, c, 1400 + i as u64);
            check_bn_pair::<bf16>(&dev, m, c, 1500 + i as u64);
        }
    }
}

fn run_bn<T: LayerElem>(dev: &Device) {
    for (i, &(m, c)) in BN_SHAPES.iter().enumerate() {
        let relu = i % 2 == 1;
        check_bn_train::<T>(dev, m, c, relu, 100 + i as u64, 0.7);
        check_bn_train::<T>(dev, m, c, !relu, 200 + i as u64, -3.0);
        check_bn_eval::<T>(dev, m, c, relu, 300 + i as u64);
        check_bn_backward::<T>(dev, m, c, relu, 400 + i as u64);
        check_bn_backward::<T>(dev, m, c, !relu, 500 + i as u64);
    }
}

#[test]
fn bn_shapes_cover_one_and_many_row_chunks() {
    // The multi-chunk path (partials parked in y / dx, merged per channel) and the
    // single-chunk one are both exercised by BN_SHAPES.
    assert_eq!(layers::bn_row_chunks::<f32>(7, 3), 1);
    assert_eq!(layers::bn_row_chunks::<f32>(2, 1), 1);
    for (m, c) in [(300, 5), (1001, 13), (517, 64), (37, 2048)] {
        assert!(layers::bn_row_chunks::<f32>(m, c) > 1, "{m}x{c}");
        assert!(layers::bn_row_chunks::<bf16>(m, c) > 1, "{m}x{c}");
    }
    // At ResNet50 sizes the statistics use many blocks.
    assert!(layers::bn_row_chunks::<bf16>(256 * 112 * 112, 64) >= 512);
    assert!(layers::bn_row_chunks::<bf16>(256 * 7 * 7, 2048) * 2048 / 8 / 32 >= 512);
}

#[test]
fn bn_f32_matches_oracle_on_every_device() {
    for dev in all_devices() {
        run_bn::<f32>(&dev);
    }
}

#[test]
fn bn_bf16_matches_oracle_on_every_device() {
    for dev in all_devices() {
        run_bn::<bf16>(&dev);
    }
}

#[test]
fn bn_variance_is_sound_for_large_means() {
    // Mean 1000, spread 1: a one-pass sum of squares in f32 would lose most digits of the
    // variance; Welford + Chan keep it within f32 rounding.
    for dev in all_devices() {
        check_bn_train::<f32>(&dev, 4099, 8, false, 7, 1000.0);
    }
}

/// The CPU conv epilogue's statistics: the moments of blocks of rows (of any sizes, one
/// row included), merged in row order, against the f64 oracle's mean and variance, with a
/// mean far from 0 (1000, spread 1) so that a cancelling formula would show.
#[test]
fn block_moments_merge_to_the_batch_statistics() {
    let mut r = SplitMix::for_layers(77);
    for (m, c, cuts) in [
        (1usize, 3usize, vec![]),
        (2, 45, vec![1]),
        (300, 13, vec![1, 2, 150, 299]),
        (4099, 37, vec![64, 1000, 1001, 4000]),
        (517, 64, vec![256]),
    ] {
        let x: Vec<f32> = r.vec(m * c, 999.0, 1001.0);
        let mut bounds = vec![0];
        bounds.extend(&cuts);
        bounds.push(m);
        let blocks: Vec<cbn::Moments> =
            bounds.windows(2).map(|b| cbn::block_moments(c, &x[b[0] * c..b[1] * c])).collect();
        let (mean, var) = cbn::merge_moments(c, &blocks);
        let o = cbn::bn_forward_train_oracle(
            m,
            c,
            &d64(&x),
            &vec![1.0; c],
            &vec![0.0; c],
            &vec![0.0; c],
            &vec![1.0; c],
            0.0,
            0.0,
            false,
        );
        for ch in 0..c {
            assert!((mean[ch] - o.mean[ch]).abs() <= 1e-12 * o.mean[ch].abs(), "{m}x{c} ch {ch}: mean");
            // invstd with eps 0 is 1 / std: compare the variance.
            let want = 1.0 / (o.invstd[ch] * o.invstd[ch]);
            let want = if want.is_finite() { want } else { 0.0 };
            assert!((var[ch] - want).abs() <= 1e-9 * want.max(1e-3), "{m}x{c} ch {ch}: var {} vs {want}", var[ch]);
        }
    }
}

/// More than 32 row chunks (several per warp lane), and more than the 2048 that a finalize
/// block loads in one batch (256 threads x 8): each thread of the merge takes several
/// batches, the last partial.
fn check_bn_many_chunks(dev: &Device) {
    let (m, c) = (33001, 8);
    assert!(layers::bn_row_chunks::<f32>(m, c) > 32 && layers::bn_row_chunks::<bf16>(m, c) > 32);
    check_bn_train::<f32>(dev, m, c, true, 21, 2.0);
    check_bn_backward::<f32>(dev, m, c, true, 22);
    check_bn_train::<bf16>(dev, m, c, false, 23, 2.0);
    check_bn_backward::<bf16>(dev, m, c, false, 24);
    let (m, c) = (700_001, 3);
    for chunks in [layers::bn_row_chunks::<f32>(m, c), layers::bn_row_chunks::<bf16>(m, c)] {
        assert!(chunks > 2048 && !chunks.is_multiple_of(256), "{chunks} chunks");
    }
    check_bn_train::<f32>(dev, m, c, true, 25, 2.0);
    check_bn_backward::<f32>(dev, m, c, true, 26);
    check_bn_train::<bf16>(dev, m, c, false, 27, 2.0);
}

#[test]
fn bn_merges_more_chunks_than_a_finalize_block_loads_at_once() {
    for dev in all_devices() {
        check_bn_many_chunks(&dev);
    }
}

#[test]
fn bn_updates_running_stats_with_unbiased_variance() {
    // Hand-computed: one channel, x = [1, 3]: mean 2, biased var 1, unbiased var 2.
    // running_mean = 0.9 * 0.5 + 0.1 * 2 = 0.65; running_var = 0.9 * 1 + 0.1 * 2 = 1.1;
    // invstd = 1 / sqrt(1 + 1e-5); y = (x - 2) * invstd = -+0.999995.
    for dev in all_devices() {
        let mut bn = BnBufs::new(&dev, vec![1.0], vec![0.0], vec![0.5], vec![1.0]);
        let mut y = fresh::<f32>(&dev, 2);
        let x = up(&dev, vec![1.0f32, 3.0]);
        layers::bn_forward_train(&dev, 2, &x, &mut bn.layer(), false, &mut y).unwrap();
        let invstd = 1.0 / (1.0f64 + 1e-5).sqrt();
        check("running_mean", &dev, &down(&bn.running_mean), &[0.65], 0.0, 1e-6);
        check("running_var", &dev, &down(&bn.running_var), &[1.1], 0.0, 1e-6);
        check("save_mean", &dev, &down(&bn.save_mean), &[2.0], 0.0, 1e-7);
        check("save_invstd", &dev, &down(&bn.save_invstd), &[invstd], 0.0, 1e-6);
        check("y", &dev, &down(&y), &[-invstd, invstd], 0.0, 1e-6);
    }
}

#[test]
fn bn_oracle_gradients_match_finite_differences() {
    let (m, c) = (5, 3);
    let k = bn_case::<f32>(m, c, 9, 0.3);
    let r: Vec<f64> = d64(&SplitMix::for_layers(10).vec(m * c, -1.0, 1.0));
    let (x, gamma, beta) = (d64(&k.x), d64(&k.gamma), d64(&k.beta));
    let (rm, rv) = (d64(&k.rm), d64(&k.rv));
    let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
        let o = cbn::bn_forward_train_oracle(m, c, x, g, b, &rm, &rv, 0.1, 1e-5, false);
        o.y.iter().zip(&r).map(|(y, r)| y * r).sum()
    };
    let fwd = cbn::bn_forward_train_oracle(m, c, &x, &gamma, &beta, &rm, &rv, 0.1, 1e-5, false);
    let grads = cbn::bn_backward_oracle(m, c, &x, None, &r, &gamma, &fwd.mean, &fwd.invstd);
    let dev = Device::Cpu;
    check("fd dx", &dev, &grads.dx, &numeric_grad(&x, &|x| loss(x, &gamma, &beta)), 1e-7, 1e-5);
    check("fd dgamma", &dev, &grads.dgamma, &numeric_grad(&gamma, &|g| loss(&x, g, &beta)), 1e-7, 1e-5);
    check("fd dbeta", &dev, &grads.dbeta, &numeric_grad(&beta, &|b| loss(&x, &gamma, b)), 1e-7, 1e-5);
    // With the fused ReLU, away from its kink: the loss through relu(bn(x)).
    let fwd = cbn::bn_forward_train_oracle(m, c, &x, &gamma, &beta, &rm, &rv, 0.1, 1e-5, true);
    let grads = cbn::bn_backward_oracle(m, c, &x, Some(&fwd.y), &r, &gamma, &fwd.mean, &fwd.invstd);
    let loss_relu = |x: &[f64]| -> f64 {
        let o = cbn::bn_forward_train_oracle(m, c, x, &gamma, &beta, &rm, &rv, 0.1, 1e-5, true);
        o.y.iter().zip(&r).map(|(y, r)| y * r).sum()
    };
    check("fd dx (relu)", &dev, &grads.dx, &numeric_grad(&x, &loss_relu), 1e-7, 1e-5);
}

#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let emu = Device::Gpu(gpu);
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = Device::Cpu;
    for dev in [&cpu, &emu] {
        let b = |n: usize| fresh::<f32>(dev, n);
        let (m, c) = (6, 4);
        let x = up(dev, vec![1.0f32; m * c]);
        let mut bn = BnBufs::new(dev, vec![1.0; c], vec![0.0; c], vec![0.0; c], vec![0.0; c]);
        (bn.running_mean, bn.running_var) = (b(c), b(c));
        // Wrong lengths.
        let mut y = b(m * c - 1);
        assert!(layers::bn_forward_train(dev, m, &x, &mut bn.layer(), false, &mut y).is_err());
        let mut y = b(m * c);
        let mut short = b(c - 1);
        let bad = &mut BnLayer { save_mean: &mut short, ..bn.layer() };
        assert!(layers::bn_forward_train(dev, m, &x, bad, false, &mut y).is_err());
        // m = 1 in train mode (PyTorch: "Expected more than 1 value per channel").
        let x1 = up(dev, vec![1.0f32; c]);
        let mut y1 = b(c);
        let err = layers::bn_forward_train(dev, 1, &x1, &mut bn.layer(), false, &mut y1).unwrap_err();
        assert!(err.to_string().contains("more than one value"), "{err}");
        // Shapes whose element count overflows.
        let mut bn3 = BnBufs::new(dev, vec![1.0; 3], vec![0.0; 3], vec![1.0; 3], vec![1.0; 3]);
        assert!(layers::bn_forward_eval(dev, usize::MAX / 2, &x, &mut bn3.layer(), false, &mut y).is_err());
        // The good call works.
        layers::bn_forward_train(dev, m, &x, &mut bn.layer(), true, &mut y).unwrap();
        let mut dx = b(m * c);
        assert!(layers::bn_backward(dev, m, &x, Some(&x1), &x, &mut bn.layer(), &mut dx).is_err());
        assert!(layers::bn_backward(dev, m, &x, None, &x1, &mut bn.layer(), &mut dx).is_err());
        assert!(layers::bn_backward(dev, 0, &x1, None, &x1, &mut bn.layer(), &mut dx).is_err());
        layers::bn_backward(dev, m, &x, Some(&y), &x, &mut bn.layer(), &mut dx).unwrap();
        // Through a max pool: x is [1, 2, 3, 4] (m = 6), the pool's output [1, 1, 2, 4].
        let (taps, dyp) = (up(dev, vec![4u8; 8]), b(8));
        let through = |hw: (usize, usize), x: &prunekit::Buf<f32>, t: &prunekit::Buf<u8>, dy: &prunekit::Buf<f32>| {
            let mut bn = BnBufs::new(dev, vec![1.0; c], vec![0.0; c], vec![0.0; c], vec![0.0; c]);
            let mut dx = b(m * c);
            layers::bn_backward_through_relu_maxpool(dev, (1, hw.0, hw.1), x, t, dy, &mut bn.layer(), &mut dx)
        };
        through((2, 3), &x, &taps, &dyp).unwrap();
        assert!(through((3, 3), &x, &taps, &dyp).is_err(), "x holds 6 rows, not 9");
        assert!(through((2, 3), &x, &up(dev, vec![4u8; 7]), &dyp).is_err(), "taps");
        assert!(through((2, 3), &x, &taps, &b(9)).is_err(), "dy");
        assert!(through((0, 3), &x, &taps, &dyp).is_err(), "empty image");
        // Two batch norms side by side: channels that differ, a ReLU on the residual's
        // BN, and tensors of the wrong length.
        let mut bn2 = BnBufs::new(dev, vec![1.0; c], vec![0.0; c], vec![0.0; c], vec![1.0; c]);
        let mut bn5 = BnBufs::new(dev, vec![1.0; 5], vec![0.0; 5], vec![0.0; 5], vec![1.0; 5]);
        {
            let (l, l2, l5) = (bn.layer(), bn2.layer(), bn5.layer());
            let apply = |r: &prunekit::Buf<f32>, rbn: &layers::BnInput<'_>, y: &mut prunekit::Buf<f32>| {
                layers::bn_apply_residual(dev, m, &x, &l.input(true), layers::Residual::Bn(r, rbn), y, None)
            };
            let err = apply(&x, &l5.input(false), &mut b(m * c)).unwrap_err();
            assert!(err.to_string().contains("channels"), "{err}");
            let err = apply(&x, &l2.input(true), &mut b(m * c)).unwrap_err();
            assert!(err.to_string().contains("without a ReLU"), "{err}");
            assert!(apply(&b(m * c - 1), &l2.input(false), &mut b(m * c)).is_err(), "residual length");
            assert!(apply(&x, &l2.input(false), &mut b(m * c + 1)).is_err(), "y length");
            apply(&x, &l2.input(false), &mut b(m * c)).unwrap();
            // The ReLU's bits: whole 32-bit words of them (24 elements: 4 bytes).
            let plain = layers::Residual::Plain(&x);
            let mut bits = fresh::<u8>(dev, 3);
            let e = layers::bn_apply_residual(dev, m, &x, &l.input(true), plain, &mut b(m * c), Some(&mut bits));
            assert!(e.unwrap_err().to_string().contains("bits"));
            let mut bits = fresh::<u8>(dev, 4);
            layers::bn_apply_residual(dev, m, &x, &l.input(true), plain, &mut b(m * c), Some(&mut bits)).unwrap();
            assert_eq!(bits.to_vec().unwrap()[..3], [0xFF; 3], "1 + 1 > 0 everywhere");
        }
        {
            let (xb, mut yb) = (up(dev, vec![bf16::ONE; 8 * 3]), fresh::<bf16>(dev, 8 * 3));
            let mut bn8 = BnBufs::new(dev, vec![1.0; 8], vec![0.0; 8], vec![0.0; 8], vec![1.0; 8]);
            (bn8.save_mean, bn8.save_invstd) = (up(dev, vec![0.0; 8]), up(dev, vec![1.0; 8]));
            let l8 = bn8.layer();
            let pb = layers::Residual::Plain(&xb);
            let mut run = |relu: bool, n_bits: usize| {
                let mut bb = fresh::<u8>(dev, n_bits);
                layers::bn_apply_residual(dev, 3, &xb, &l8.input(relu), pb, &mut yb, Some(&mut bb)).map(|_| bb)
            };
            assert!(run(false, 4).unwrap_err().to_string().contains("need the ReLU"));
            assert!(run(true, 3).is_err(), "too few bytes of bits");
            assert_eq!(run(true, 4).unwrap().to_vec().unwrap()[..3], [0xFF; 3], "1 + 1 > 0 everywhere");
        }
        let mut pair =
            |x2: &prunekit::Buf<f32>, dy: &prunekit::Buf<f32>, other: &mut BnBufs, n2: usize, reduce: bool| {
                let (mut d1, mut d2) = (b(m * c), b(n2));
                let (mut l1, mut lo) = (bn.layer(), other.layer());
                let a = layers::BnSide { x: &x, bn: &mut l1, dx: &mut d1 };
                let s = layers::BnSide { x: x2, bn: &mut lo, dx: &mut d2 };
                if reduce {
                    layers::bn_backward_pair(dev, m, dy, a, s)
                } else {
                    layers::bn_backward_dx_pair(dev, m, dy, a, s)
                }
            };
        for reduce in [true, false] {
            let mut bn2 = BnBufs::new(dev, vec![1.0; c], vec![0.0; c], vec![0.0; c], vec![1.0; c]);
            (bn2.save_mean, bn2.save_invstd) = (up(dev, vec![0.0; c]), up(dev, vec![1.0; c]));
            let err = pair(&x, &x, &mut bn5, m * c, reduce).unwrap_err();
            assert!(err.to_string().contains("channels"), "{err}");
            assert!(pair(&b(m * c - 1), &x, &mut bn2, m * c, reduce).is_err(), "x2 length");
            assert!(pair(&x, &b(m * c + 1), &mut bn2, m * c, reduce).is_err(), "dy length");
            assert!(pair(&x, &x, &mut bn2, m * c - 2, reduce).is_err(), "dx2 length");
            pair(&x, &x, &mut bn2, m * c, reduce).unwrap();
        }
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let (m, c) = (4, 2);
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let bad = |n: usize| up(wrong, vec![1.0f32; n]);
        let mut bn = BnBufs::new(dev, vec![1.0; c], vec![1.0; c], vec![1.0; c], vec![1.0; c]);
        (bn.save_mean, bn.save_invstd) = (ok(c), ok(c));
        let mut y = ok(m * c);
        let err = layers::bn_forward_train(dev, m, &bad(m * c), &mut bn.layer(), false, &mut y).unwrap_err();
        assert!(err.to_string().contains("not on the device"), "{err}");
        let mut bad_y = bad(m * c);
        assert!(layers::bn_forward_eval(dev, m, &ok(m * c), &mut bn.layer(), false, &mut bad_y).is_err());
        let mut bad_mean = bad(2);
        let bad_layer = &mut BnLayer { save_mean: &mut bad_mean, ..bn.layer() };
        assert!(layers::bn_backward(dev, m, &ok(8), None, &ok(8), bad_layer, &mut y).is_err());
        // Through a max pool of [1, 2, 2, 2]: pooled [1, 1, 1, 2].
        let (taps, bad_taps) = (up(dev, vec![0u8; 2]), up(wrong, vec![0u8; 2]));
        let layer = &mut bn.layer();
        assert!(
            layers::bn_backward_through_relu_maxpool(dev, (1, 2, 2), &ok(8), &bad_taps, &ok(2), layer, &mut y).is_err()
        );
        assert!(
            layers::bn_backward_through_relu_maxpool(dev, (1, 2, 2), &ok(8), &taps, &bad(2), layer, &mut y).is_err()
        );
        layers::bn_backward_through_relu_maxpool(dev, (1, 2, 2), &ok(8), &taps, &ok(2), layer, &mut y).unwrap();
    }
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_bn() {
        let d = common::cuda_device();
        run_bn::<f32>(&d);
        run_bn::<bf16>(&d);
        check_bn_train::<f32>(&d, 4099, 8, false, 7, 1000.0);
        check_bn_many_chunks(&d);
        for (i, &(m, c)) in BN_SHAPES.iter().enumerate() {
            check_bn_backward_through_relu::<f32>(&d, m, c, 800 + i as u64);
            check_bn_backward_through_relu::<bf16>(&d, m, c, 900 + i as u64);
        }
        for (i, &shape) in POOL_BN_SHAPES.iter().enumerate() {
            check_bn_backward_through_relu_maxpool::<f32>(&d, shape, 1200 + i as u64);
            check_bn_backward_through_relu_maxpool::<bf16>(&d, shape, 1300 + i as u64);
        }
        for (i, &(m, c)) in BN_SHAPES.iter().enumerate() {
            check_bn_pair::<f32>(&d, m, c, 1600 + i as u64);
            check_bn_pair::<bf16>(&d, m, c, 1700 + i as u64);
        }
    }
}
