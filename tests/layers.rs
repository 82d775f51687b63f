//! The layer ops (`prunekit::ops::layers`) on every device against the f64 oracles of
//! `prunekit::cpu::layers`: the CUDA kernels through the host emulation in forward,
//! reverse and shuffled fiber order (outputs start as poison there, so every element must
//! be written), and the CPU fast path. The oracles' gradients are checked by finite
//! differences, the loss and SGD also against values PyTorch wrote (the model reference
//! files of tests/data). `mod cuda` runs the kernel checks on a real GPU.

use half::bf16;
use prunekit::cpu::layers::Real;
use prunekit::cpu::layers::{bn as cbn, elementwise as cew, fc as cfc, loss as closs, pool as cpool, sgd as csgd};
use prunekit::gpu::{Elem, Gpu, Schedule};
use prunekit::model::state::StateDict;
use prunekit::ops::layers::{self as layers, LayerElem};
use prunekit::{Buf, Device};

mod common;

// ---------------------------------------------------------------- helpers

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0123_4567_89AB_CDEF)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn to_t<T: Real>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}
fn f64s<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}
fn up<T: Elem>(dev: &Device, v: Vec<T>) -> Buf<T> {
    dev.upload(v).unwrap()
}
/// A buffer whose contents must be overwritten (poison on emu).
fn fresh<T: Elem>(dev: &Device, n: usize) -> Buf<T> {
    dev.uninit(n).unwrap()
}
fn down<T: Real + Elem>(b: &Buf<T>) -> Vec<f64> {
    f64s(&b.to_vec().unwrap())
}

use common::emu_devices;
fn all_devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(emu_devices());
    d
}

/// Relative tolerance of an output of type T: f32 results within a few 1e-6, bf16 ones
/// within one bf16 ulp (2^-7 relative) of the exact value.
fn rtol<T: LayerElem>() -> f64 {
    if std::mem::size_of::<T>() == 2 {
        1.0 / 128.0
    } else {
        2e-5
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().filter(|x| x.is_finite()).fold(0.0, |a, b| a.max(b.abs()))
}

/// Every element within atol + rtol |want|; NaN exactly where want is NaN, infinities equal.
#[track_caller]
fn check(what: &str, dev: &Device, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what} on {}: length", dev.name());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what} on {}: element {i} is {g}, expected {w} (atol {atol:e}, rtol {rtol:e})", dev.name());
    }
}

// ---------------------------------------------------------------- batch norm

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
    let mut r = Rng::new(seed);
    // Per-channel offsets and scales, so that every channel has its own statistics.
    let off = r.vec(c, mean - 2.0, mean + 2.0);
    let scale = r.vec(c, 0.2, 3.0);
    let x: Vec<f32> = (0..m * c).map(|i| off[i % c] + scale[i % c] * r.uniform(-1.0, 1.0)).collect();
    let x = to_t::<T>(&x).iter().map(|v| v.to_f32()).collect();
    BnCase { x, gamma: r.vec(c, 0.5, 1.5), beta: r.vec(c, -0.5, 0.5), rm: r.vec(c, -1.0, 1.0), rv: r.vec(c, 0.5, 2.0) }
}

fn d64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn check_bn_train<T: LayerElem>(dev: &Device, m: usize, c: usize, relu: bool, seed: u64, mean: f32) {
    let k = bn_case::<T>(m, c, seed, mean);
    let x = up(dev, to_t::<T>(&k.x));
    let (gamma, beta) = (up(dev, k.gamma.clone()), up(dev, k.beta.clone()));
    let (mut rm, mut rv) = (up(dev, k.rm.clone()), up(dev, k.rv.clone()));
    let mut y = fresh::<T>(dev, m * c);
    let (mut sm, mut si) = (fresh::<f32>(dev, c), fresh::<f32>(dev, c));
    layers::bn_forward_train(dev, m, c, &x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5, relu, &mut y, &mut sm, &mut si)
        .unwrap();
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
    check(&what("save_mean"), dev, &down(&sm), &o.mean, 1e-5 * max_abs(&o.mean), 1e-5);
    check(&what("save_invstd"), dev, &down(&si), &o.invstd, 0.0, 2e-5);
    check(&what("running_mean"), dev, &down(&rm), &o.running_mean, 1e-5 * max_abs(&o.running_mean), 1e-5);
    check(&what("running_var"), dev, &down(&rv), &o.running_var, 0.0, 2e-5);
}

fn check_bn_eval<T: LayerElem>(dev: &Device, m: usize, c: usize, relu: bool, seed: u64) {
    let k = bn_case::<T>(m, c, seed, 0.5);
    let x = up(dev, to_t::<T>(&k.x));
    let mut y = fresh::<T>(dev, m * c);
    layers::bn_forward_eval(
        dev,
        m,
        c,
        &x,
        &up(dev, k.gamma.clone()),
        &up(dev, k.beta.clone()),
        &up(dev, k.rm.clone()),
        &up(dev, k.rv.clone()),
        1e-5,
        relu,
        &mut y,
    )
    .unwrap();
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
    let mut r = Rng::new(seed ^ 0xB4C);
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
    let (mut dx, mut dg, mut db) = (fresh::<T>(dev, m * c), fresh::<f32>(dev, c), fresh::<f32>(dev, c));
    layers::bn_backward(
        dev,
        m,
        c,
        &up(dev, to_t::<T>(&k.x)),
        relu_out.as_ref(),
        &up(dev, to_t::<T>(&dy)),
        &up(dev, k.gamma.clone()),
        &up(dev, mean.clone()),
        &up(dev, invstd.clone()),
        &mut dx,
        &mut dg,
        &mut db,
    )
    .unwrap();
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
    check(&what("dbeta"), dev, &down(&db), &o.dbeta, 2e-6 * sg, 1e-5);
    check(&what("dgamma"), dev, &down(&dg), &o.dgamma, 2e-6 * sgx, 2e-5);
    // dx = gamma invstd (g - mean g - xhat mean(g xhat)) cancels: bound its error by the
    // size of the terms, not of the result.
    let k1 = (0..c).map(|ch| (k.gamma[ch] * invstd[ch]).abs() as f64).fold(0.0, f64::max);
    check(&what("dx"), dev, &down(&dx), &o.dx, 1e-5 * k1 * max_abs(&d64(&dy)), rtol::<T>());
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
    let mut r = Rng::new(77);
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

/// More than 32 row chunks: each lane of the per-channel merge takes several.
fn check_bn_many_chunks(dev: &Device) {
    let (m, c) = (33001, 8);
    assert!(layers::bn_row_chunks::<f32>(m, c) > 32 && layers::bn_row_chunks::<bf16>(m, c) > 32);
    check_bn_train::<f32>(dev, m, c, true, 21, 2.0);
    check_bn_backward::<f32>(dev, m, c, true, 22);
    check_bn_train::<bf16>(dev, m, c, false, 23, 2.0);
    check_bn_backward::<bf16>(dev, m, c, false, 24);
}

#[test]
fn bn_merges_more_chunks_than_a_warp_has_lanes() {
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
        let (mut rm, mut rv) = (up(&dev, vec![0.5f32]), up(&dev, vec![1.0f32]));
        let (mut y, mut sm, mut si) = (fresh::<f32>(&dev, 2), fresh::<f32>(&dev, 1), fresh::<f32>(&dev, 1));
        let (g, b) = (up(&dev, vec![1.0f32]), up(&dev, vec![0.0f32]));
        let x = up(&dev, vec![1.0f32, 3.0]);
        layers::bn_forward_train(&dev, 2, 1, &x, &g, &b, &mut rm, &mut rv, 0.1, 1e-5, false, &mut y, &mut sm, &mut si)
            .unwrap();
        let invstd = 1.0 / (1.0f64 + 1e-5).sqrt();
        check("running_mean", &dev, &down(&rm), &[0.65], 0.0, 1e-6);
        check("running_var", &dev, &down(&rv), &[1.1], 0.0, 1e-6);
        check("save_mean", &dev, &down(&sm), &[2.0], 0.0, 1e-7);
        check("save_invstd", &dev, &down(&si), &[invstd], 0.0, 1e-6);
        check("y", &dev, &down(&y), &[-invstd, invstd], 0.0, 1e-6);
    }
}

/// Central differences of f at x (step h relative to max(|x_i|, 1)).
fn numeric_grad(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-6 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

#[test]
fn bn_oracle_gradients_match_finite_differences() {
    let (m, c) = (5, 3);
    let k = bn_case::<f32>(m, c, 9, 0.3);
    let r: Vec<f64> = d64(&Rng::new(10).vec(m * c, -1.0, 1.0));
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

// ---------------------------------------------------------------- elementwise

const EW_LENS: &[usize] = &[1, 7, 8, 13, 1000, 4099];

/// Random values with special ones sprinkled in: NaN, +-0, +-inf.
fn ew_values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
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
    let mut r = Rng::new(77);
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

// ---------------------------------------------------------------- pooling

const MAXPOOL_SHAPES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 1, 1), (2, 2, 3, 3), (1, 3, 2, 5), (2, 5, 7, 13), (1, 9, 8, 64), (1, 4, 3, 2048), (3, 6, 5, 8)];

/// Inputs with many ties (few distinct values), a few NaN and -inf.
fn pool_values(n: usize, seed: u64, ties: bool) -> Vec<f32> {
    let mut r = Rng::new(seed);
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
            let dy = to_t::<T>(&Rng::new(40 + si as u64).vec(n * oh * ow * c, -1.0, 1.0));
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
        let r = d64(&Rng::new(3).vec(n * oh * ow * c, -1.0, 1.0));
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
        let x = to_t::<T>(&Rng::new(50 + si as u64).vec(n * hw * c, -2.0, 3.0));
        let x64 = f64s(&x);
        let mut y = fresh::<f32>(dev, n * c);
        layers::avgpool_forward(dev, n, hw, c, &up(dev, x), &mut y).unwrap();
        let want = cpool::avgpool_forward_oracle(n, hw, c, &x64);
        let what = |s: &str| format!("avgpool {s} ({n}x{hw}x{c}, {})", T::DTYPE);
        check(&what("forward"), dev, &down(&y), &want, 3e-7 * 3.0, 1e-5);
        let dy = Rng::new(60 + si as u64).vec(n * c, -1.0, 1.0);
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
    let x = d64(&Rng::new(4).vec(n * hw * c, -1.0, 1.0));
    let r = d64(&Rng::new(5).vec(n * c, -1.0, 1.0));
    let f = |x: &[f64]| -> f64 { cpool::avgpool_forward_oracle(n, hw, c, x).iter().zip(&r).map(|(a, b)| a * b).sum() };
    check("fd avgpool", &Device::Cpu, &cpool::avgpool_backward_oracle(n, hw, c, &r), &numeric_grad(&x, &f), 1e-8, 1e-6);
}

// ---------------------------------------------------------------- fully connected

const FC_SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (2, 3, 5), (3, 70, 13), (65, 130, 67), (4, 33, 129), (1, 515, 37), (64, 517, 1001)];

fn check_fc(dev: &Device) {
    for (si, &(n, cin, cout)) in FC_SHAPES.iter().enumerate() {
        let mut r = Rng::new(70 + si as u64);
        let (x, w, b, dy) = (
            r.vec(n * cin, -1.0, 1.0),
            r.vec(cout * cin, -1.0, 1.0),
            r.vec(cout, -1.0, 1.0),
            r.vec(n * cout, -1.0, 1.0),
        );
        let (xb, wb) = (up(dev, x.clone()), up(dev, w.clone()));
        let mut y = fresh::<f32>(dev, n * cout);
        layers::fc_forward(dev, n, cin, cout, &xb, &wb, &up(dev, b.clone()), &mut y).unwrap();
        let want = cfc::fc_forward_oracle(n, cin, cout, &d64(&x), &d64(&w), &d64(&b));
        // f32 sums of cin products of magnitude <= 1.
        let what = |s: &str| format!("fc {s} ({n}x{cin}x{cout})");
        check(&what("forward"), dev, &down(&y), &want, 1e-6 * (cin as f64 + 1.0), 1e-6);
        let (mut dx, mut dw, mut db) = (fresh::<f32>(dev, n * cin), fresh(dev, cout * cin), fresh(dev, cout));
        layers::fc_backward(dev, n, cin, cout, &xb, &wb, &up(dev, dy.clone()), &mut dx, &mut dw, &mut db).unwrap();
        let (wdx, wdw, wdb) = cfc::fc_backward_oracle(n, cin, cout, &d64(&x), &d64(&w), &d64(&dy));
        check(&what("dx"), dev, &down(&dx), &wdx, 1e-6 * cout as f64, 1e-6);
        check(&what("dw"), dev, &down(&dw), &wdw, 1e-6 * n as f64, 1e-6);
        check(&what("db"), dev, &down(&db), &wdb, 1e-6 * n as f64, 1e-6);
    }
}

#[test]
fn fc_matches_oracle_on_every_device() {
    for dev in all_devices() {
        check_fc(&dev);
    }
}

#[test]
fn fc_oracle_gradients_match_finite_differences() {
    let (n, cin, cout) = (3, 4, 5);
    let mut r = Rng::new(8);
    let (x, w, b, g) =
        (d64(&r.vec(n * cin, -1.0, 1.0)), d64(&r.vec(cout * cin, -1.0, 1.0)), d64(&r.vec(cout, -1.0, 1.0)), {
            d64(&r.vec(n * cout, -1.0, 1.0))
        });
    let f = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        cfc::fc_forward_oracle(n, cin, cout, x, w, b).iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let (dx, dw, db) = cfc::fc_backward_oracle(n, cin, cout, &x, &w, &g);
    let dev = Device::Cpu;
    check("fd fc dx", &dev, &dx, &numeric_grad(&x, &|x| f(x, &w, &b)), 1e-8, 1e-6);
    check("fd fc dw", &dev, &dw, &numeric_grad(&w, &|w| f(&x, w, &b)), 1e-8, 1e-6);
    check("fd fc db", &dev, &db, &numeric_grad(&b, &|b| f(&x, &w, b)), 1e-8, 1e-6);
}

// ---------------------------------------------------------------- loss

fn check_loss(dev: &Device) {
    for (si, &(n, classes, scale)) in
        [(1, 1, 1.0f32), (1, 7, 3.0), (3, 10, 1.0), (33, 1000, 5.0), (5, 13, 1e4), (2, 40, 3e4)].iter().enumerate()
    {
        let mut r = Rng::new(90 + si as u64);
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
            let mut r = Rng::new(190 + si as u64);
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
    let z = d64(&Rng::new(7).vec(n * classes, -3.0, 3.0));
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
    let z = d64(&Rng::new(6).vec(n * classes, -3.0, 3.0));
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

// ---------------------------------------------------------------- SGD

fn check_sgd(dev: &Device) {
    for (si, &n) in [1usize, 3, 4, 5, 1000, 1027].iter().enumerate() {
        for (lr, mom, wd) in [(0.1f32, 0.9f32, 1e-4f32), (0.05, 0.0, 0.01), (0.2, 0.5, 0.0)] {
            let mut r = Rng::new(110 + si as u64);
            let p0 = r.vec(n, -1.0, 1.0);
            let mut param = up(dev, p0.clone());
            let mut buf = up(dev, vec![f32::NAN; n]); // the first step must not read it
            let (mut wp, mut wb) = (d64(&p0), vec![f64::NAN; n]);
            for step in 0..3 {
                let g = r.vec(n, -1.0, 1.0);
                layers::sgd_step(dev, &mut param, &up(dev, g.clone()), &mut buf, lr, mom, wd, step == 0).unwrap();
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
        layers::sgd_step(&dev, &mut p, &up(&dev, vec![0.5f32]), &mut b, 0.1, 0.9, 0.01, true).unwrap();
        check("p1", &dev, &down(&p), &[0.949], 0.0, 1e-6);
        check("b1", &dev, &down(&b), &[0.51], 0.0, 1e-6);
        layers::sgd_step(&dev, &mut p, &up(&dev, vec![-0.2f32]), &mut b, 0.1, 0.9, 0.01, false).unwrap();
        check("p2", &dev, &down(&p), &[0.922151], 0.0, 1e-6);
        check("b2", &dev, &down(&b), &[0.26849], 0.0, 1e-5);
    }
}

// ---------------------------------------------------------------- PyTorch's values

/// A model reference file PyTorch wrote (tests/data/README.md): its train logits, loss
/// and gradients and the parameters after one SGD step.
struct Reference {
    name: &'static str,
    sd: StateDict,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
}

impl Reference {
    fn f32s(&self, name: &str) -> Vec<f32> {
        self.sd.get(name).unwrap().as_f32().unwrap().to_vec()
    }
}

fn references() -> Vec<Reference> {
    ["model-tiny-irregular", "model-resnet50-narrow", "model-tiny-b1-odd"]
        .into_iter()
        .map(|name| {
            let sd = StateDict::read(&common::data(&format!("{name}.safetensors"))).unwrap();
            let meta = |k: &str| -> f32 { sd.metadata[k].parse().unwrap() };
            let (lr, momentum, weight_decay) = (meta("lr"), meta("momentum"), meta("weight_decay"));
            Reference { name, sd, lr, momentum, weight_decay }
        })
        .collect()
}

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
        // One SGD step (the first: the buffer is the gradient).
        for p in ["fc.bias", "fc.weight", "bn1.weight", "bn1.bias", "layer1.0.conv2.weight"] {
            let param0 = r.f32s(p);
            let mut buf = fresh::<f32>(dev, param0.len());
            let mut param = up(dev, param0);
            let grad = up(dev, r.f32s(&format!("expect.grad.{p}")));
            layers::sgd_step(dev, &mut param, &grad, &mut buf, r.lr, r.momentum, r.weight_decay, true).unwrap();
            let want = d64(&r.f32s(&format!("expect.step.{p}")));
            check(&what(&format!("SGD step of {p}")), dev, &down(&param), &want, 1e-7, 1e-6);
        }
    }
}

#[test]
fn loss_and_sgd_match_pytorch_reference_values() {
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

// ---------------------------------------------------------------- bad input

#[test]
fn bad_inputs_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let emu = Device::Gpu(gpu);
    let other = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = Device::Cpu;
    for dev in [&cpu, &emu] {
        let b = |n: usize| fresh::<f32>(dev, n);
        let (m, c) = (6, 4);
        let (x, g, bt) = (up(dev, vec![1.0f32; m * c]), up(dev, vec![1.0f32; c]), up(dev, vec![0.0f32; c]));
        let (mut rm, mut rv, mut sm, mut si) = (b(c), b(c), b(c), b(c));
        // Wrong lengths.
        let mut y = b(m * c - 1);
        assert!(layers::bn_forward_train(
            dev, m, c, &x, &g, &bt, &mut rm, &mut rv, 0.1, 1e-5, false, &mut y, &mut sm, &mut si
        )
        .is_err());
        let mut y = b(m * c);
        let mut short = b(c - 1);
        assert!(layers::bn_forward_train(
            dev, m, c, &x, &g, &bt, &mut rm, &mut rv, 0.1, 1e-5, false, &mut y, &mut short, &mut si
        )
        .is_err());
        // m = 1 in train mode (PyTorch: "Expected more than 1 value per channel").
        let x1 = up(dev, vec![1.0f32; c]);
        let mut y1 = b(c);
        let err = layers::bn_forward_train(
            dev, 1, c, &x1, &g, &bt, &mut rm, &mut rv, 0.1, 1e-5, false, &mut y1, &mut sm, &mut si,
        )
        .unwrap_err();
        assert!(err.to_string().contains("more than one value"), "{err}");
        // Shapes whose element count overflows.
        assert!(layers::bn_forward_eval(dev, usize::MAX / 2, 3, &x, &g, &bt, &g, &g, 1e-5, false, &mut y).is_err());
        // The good call works.
        layers::bn_forward_train(dev, m, c, &x, &g, &bt, &mut rm, &mut rv, 0.1, 1e-5, true, &mut y, &mut sm, &mut si)
            .unwrap();
        let (mut dx, mut dg, mut db) = (b(m * c), b(c), b(c));
        assert!(layers::bn_backward(dev, m, c, &x, Some(&x1), &x, &g, &sm, &si, &mut dx, &mut dg, &mut db).is_err());
        assert!(layers::bn_backward(dev, m, c, &x, None, &x1, &g, &sm, &si, &mut dx, &mut dg, &mut db).is_err());
        assert!(layers::bn_backward(dev, 0, c, &x1, None, &x1, &g, &sm, &si, &mut dx, &mut dg, &mut db).is_err());
        layers::bn_backward(dev, m, c, &x, Some(&y), &x, &g, &sm, &si, &mut dx, &mut dg, &mut db).unwrap();

        let mut o = b(5);
        assert!(layers::add_relu(dev, &b(5), &b(4), &mut o).is_err());
        assert!(layers::relu_backward(dev, &b(5), &b(5), &mut b(6)).is_err());
        assert!(layers::add_assign(dev, &mut o, &b(6)).is_err());
        assert!(layers::cast(dev, &b(5), &mut fresh::<bf16>(dev, 4)).is_err());
        // Max pool: empty image, wrong lengths.
        assert!(layers::maxpool_forward(dev, 1, 0, 3, 1, &b(0), &mut b(0)).is_err());
        assert!(layers::maxpool_forward(dev, 1, 3, 3, 2, &b(18), &mut b(7)).is_err());
        assert!(layers::maxpool_backward(dev, 1, 3, 3, 2, &b(18), &b(7), &mut b(18)).is_err());
        assert!(layers::avgpool_forward(dev, 2, 0, 3, &b(0), &mut b(6)).is_err());
        assert!(layers::avgpool_forward(dev, 2, 4, 3, &b(24), &mut b(5)).is_err());
        assert!(layers::avgpool_backward(dev, 2, 4, 3, &b(6), &mut b(23)).is_err());
        assert!(layers::fc_forward(dev, 2, 3, 4, &b(6), &b(11), &b(4), &mut b(8)).is_err());
        assert!(layers::fc_backward(dev, 2, 3, 4, &b(6), &b(12), &b(8), &mut b(6), &mut b(12), &mut b(3)).is_err());
        let t = up(dev, vec![0i32, 1]);
        assert!(layers::softmax_cross_entropy(dev, 2, 3, &b(6), &t, &mut b(2), &mut b(6)).is_err());
        assert!(layers::softmax_cross_entropy(dev, 0, 3, &b(0), &up(dev, vec![]), &mut b(1), &mut b(0)).is_err());
        assert!(layers::sgd_step(dev, &mut b(5), &b(5), &mut b(4), 0.1, 0.9, 0.0, true).is_err());
    }
    // Buffers on the wrong device: host buffers on emu, emu buffers on the CPU, buffers
    // of another emu instance.
    for (dev, wrong) in [(&emu, &cpu), (&cpu, &emu), (&emu, &other)] {
        let (m, c) = (4, 2);
        let ok = |n: usize| up(dev, vec![1.0f32; n]);
        let bad = |n: usize| up(wrong, vec![1.0f32; n]);
        let (mut rm, mut rv, mut sm, mut si) = (ok(c), ok(c), ok(c), ok(c));
        let mut y = ok(m * c);
        let err = layers::bn_forward_train(
            dev,
            m,
            c,
            &bad(m * c),
            &ok(c),
            &ok(c),
            &mut rm,
            &mut rv,
            0.1,
            1e-5,
            false,
            &mut y,
            &mut sm,
            &mut si,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not on the device"), "{err}");
        let mut bad_y = bad(m * c);
        assert!(layers::bn_forward_eval(
            dev,
            m,
            c,
            &ok(m * c),
            &ok(c),
            &ok(c),
            &ok(c),
            &ok(c),
            1e-5,
            false,
            &mut bad_y
        )
        .is_err());
        assert!(layers::bn_backward(
            dev,
            m,
            c,
            &ok(8),
            None,
            &ok(8),
            &ok(2),
            &bad(2),
            &ok(2),
            &mut y,
            &mut sm,
            &mut si
        )
        .is_err());
        assert!(layers::add_relu(dev, &ok(4), &bad(4), &mut ok(4)).is_err());
        assert!(layers::relu_backward(dev, &ok(4), &ok(4), &mut bad(4)).is_err());
        assert!(layers::add_assign(dev, &mut ok(4), &bad(4)).is_err());
        assert!(layers::cast(dev, &bad(4), &mut fresh::<bf16>(dev, 4)).is_err());
        assert!(layers::maxpool_forward(dev, 1, 2, 2, 1, &bad(4), &mut ok(1)).is_err());
        assert!(layers::maxpool_backward(dev, 1, 2, 2, 1, &ok(4), &bad(1), &mut ok(4)).is_err());
        assert!(layers::avgpool_forward(dev, 1, 4, 1, &ok(4), &mut bad(1)).is_err());
        assert!(layers::avgpool_backward(dev, 1, 4, 1, &bad(1), &mut ok(4)).is_err());
        assert!(layers::fc_forward(dev, 1, 2, 2, &ok(2), &bad(4), &ok(2), &mut ok(2)).is_err());
        assert!(layers::fc_backward(dev, 1, 2, 2, &ok(2), &ok(4), &ok(2), &mut ok(2), &mut ok(4), &mut bad(2)).is_err());
        let t = up(wrong, vec![0i32]);
        assert!(layers::softmax_cross_entropy(dev, 1, 2, &ok(2), &t, &mut ok(1), &mut ok(2)).is_err());
        assert!(layers::sgd_step(dev, &mut ok(3), &ok(3), &mut bad(3), 0.1, 0.9, 0.0, false).is_err());
    }
}

// ---------------------------------------------------------------- on a real GPU

mod cuda {
    use super::*;

    fn dev() -> Device {
        common::cuda_device()
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_bn() {
        let d = dev();
        run_bn::<f32>(&d);
        run_bn::<bf16>(&d);
        check_bn_train::<f32>(&d, 4099, 8, false, 7, 1000.0);
        check_bn_many_chunks(&d);
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_elementwise_and_casts() {
        let d = dev();
        check_elementwise::<f32>(&d);
        check_elementwise::<bf16>(&d);
        check_cast(&d);
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_pooling() {
        let d = dev();
        check_maxpool::<f32>(&d);
        check_maxpool::<bf16>(&d);
        check_avgpool::<f32>(&d);
        check_avgpool::<bf16>(&d);
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_fc_loss_sgd() {
        let d = dev();
        check_fc(&d);
        check_loss(&d);
        check_sgd(&d);
        check_against_pytorch(&d);
    }
}
