//! Convolutions whose x operand is a batch norm (+ ReLU) applied while the conv loads it
//! (`prunekit::ops::fused::conv2d_fprop_bn_input`, `conv2d_wgrad_bn_input`, and
//! `conv2d_fprop_bn_input_stats` with the next BN's statistics in its epilogue), on the
//! emulation (forward, reversed and shuffled fiber order) and the CPU device:
//! - on every tile that runs the shape (SIMT f32, tensor-core bf16 and f16, vector and
//!   scalar loads), the output is bitwise the unfused sequence's on the same device and
//!   tile: the BN applied on the host (bn_apply_saved's formula), uploaded, then the plain
//!   conv pass (for f32 and bf16 also bn_apply_saved on the device itself; the kernels
//!   use bn_apply_<T>'s fmaf, the CPU its bn_apply's product and sum);
//! - against an f64 oracle of conv(bn(x)) with atol = 1e-5 * sum|a*w| (f32 accumulation)
//!   and the output's rounding (bf16, f16) as rtol;
//! - padding stays zero after the BN: a shift of +40 on every channel would move every
//!   border output by 40 * |w| if padding went through the BN (a mutant of conv.cu that
//!   transforms every chunk of the fprop operand, in bounds or not, fails the four emu
//!   fprop tests; checked on 2026-11-30);
//! - odd widths (3, 5, 7, 13, 67), batch 1, 1x1, 3x3 and 7x7 with padding, stride 2, row
//!   and column tiles, wgrad with split-K;
//! - bad inputs are errors. `mod cuda` runs the kernel checks on a real GPU.

use half::{bf16, f16};
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::conv::{self, ConvElem, Plan, Tile};
use prunekit::ops::fused;
use prunekit::ops::layers::BnInput;
use prunekit::shape::{ConvShape, Pass};
use prunekit::{Buf, Device};

mod common;

use common::layers::BnBufs;
use common::{square_conv as shape, to_t, SplitMix as Rng};

/// Odd channels, batch 1, 1x1, 3x3 and 7x7 with padding, stride 2, several row tiles
/// (m > 128) and column tiles (K = 67), vector (C % 8 == 0) and scalar loads.
fn shapes() -> Vec<ConvShape> {
    vec![
        shape(1, 9, 7, 13, 7, 3, 1, 1),    // C = 13, K = 7, 3x3 pad 1, batch 1, m = 63
        shape(2, 7, 9, 5, 67, 1, 2, 0),    // 1x1 stride 2, C = 5, K = 67, m = 40
        shape(1, 13, 11, 3, 8, 7, 2, 3),   // the stem: C = 3, 7x7 stride 2 pad 3
        shape(2, 13, 13, 16, 64, 3, 1, 1), // m = 338: several row tiles, vector loads
        shape(1, 11, 11, 24, 16, 3, 2, 1), // 3x3 stride 2 pad 1, batch 1, vector loads
        shape(3, 9, 9, 8, 67, 1, 1, 0),    // a plain GEMM, K = 67: row and column tiles
        shape(2, 6, 5, 40, 24, 3, 1, 1),   // C = 40: tiles straddle filter taps (BK = 32)
    ]
}

/// Every tile of `T` that runs `pass` on `sh` (one split), or the default plan on the CPU.
fn tiles<T: ConvElem>(dev: &Device, pass: Pass, sh: &ConvShape) -> Vec<Option<Plan>> {
    if matches!(dev, Device::Cpu) {
        return vec![None];
    }
    let all: &[Tile] = if T::TENSOR_CORES {
        &[Tile::T128x128, Tile::T128x64, Tile::T64x64, Tile::T64x64Scalar]
    } else {
        &[Tile::T128x128, Tile::T64x64]
    };
    all.iter()
        .filter(|t| !(T::TENSOR_CORES && t.vector() && !conv::vector_ok(pass, sh)))
        .map(|&tile| Some(Plan { tile, splits: 1 }))
        .collect()
}

fn rounded<T: ConvElem>(v: Vec<f32>) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}
fn bits<T: ConvElem>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// One case: x (a conv output, centred away from 0), w, dy, and the BN that x goes through.
struct Case {
    x: Vec<f32>,
    w: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

fn case<T: ConvElem>(sh: &ConvShape, seed: u64, shift: f32) -> Case {
    let mut r = Rng::new(seed);
    let c = sh.c;
    Case {
        x: rounded::<T>(r.vec(sh.x_len(), -1.0, 3.0)),
        w: rounded::<T>(r.vec(sh.w_len(), -1.0, 1.0)),
        dy: rounded::<T>(r.vec(sh.y_len(), -1.0, 1.0)),
        gamma: r.vec(c, 0.5, 1.5),
        beta: r.vec(c, -0.5, 0.5).iter().map(|b| b + shift).collect(),
        mean: r.vec(c, 0.5, 1.5),
        invstd: r.vec(c, 0.5, 2.0),
    }
}

/// The BN's output as bn_apply_saved computes it on `dev`, rounded to T: the kernels fuse
/// the product and the sum (fmaf), the CPU rounds each.
fn bn_host<T: ConvElem>(dev: &Device, k: &Case, c: usize, relu: bool) -> Vec<f32> {
    let fma = !matches!(dev, Device::Cpu);
    k.x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = i % c;
            let (d, s) = (v - k.mean[ch], k.gamma[ch] * k.invstd[ch]);
            let y = if fma { d.mul_add(s, k.beta[ch]) } else { d * s + k.beta[ch] };
            T::from_f32(if relu && y < 0.0 { 0.0 } else { y }).to_f32()
        })
        .collect()
}

/// f64 fprop and |a|*|w| sums of it (NHWC, KRSC).
fn fprop_oracle(sh: &ConvShape, a: &[f32], w: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (p, q) = (sh.p(), sh.q());
    let mut y = vec![0.0; sh.y_len()];
    let mut s = vec![0.0; sh.y_len()];
    for n in 0..sh.n {
        for pp in 0..p {
            for qq in 0..q {
                for k in 0..sh.k {
                    let (mut acc, mut abs) = (0.0f64, 0.0f64);
                    for r in 0..sh.r {
                        for t in 0..sh.s {
                            let h = (pp * sh.stride + r) as isize - sh.pad as isize;
                            let wi = (qq * sh.stride + t) as isize - sh.pad as isize;
                            if h < 0 || wi < 0 || h >= sh.h as isize || wi >= sh.w as isize {
                                continue;
                            }
                            for c in 0..sh.c {
                                let av = a[((n * sh.h + h as usize) * sh.w + wi as usize) * sh.c + c] as f64;
                                let wv = w[((k * sh.r + r) * sh.s + t) * sh.c + c] as f64;
                                acc += av * wv;
                                abs += (av * wv).abs();
                            }
                        }
                    }
                    let o = ((n * p + pp) * q + qq) * sh.k + k;
                    y[o] = acc;
                    s[o] = abs;
                }
            }
        }
    }
    (y, s)
}

/// f64 wgrad and |dy|*|a| sums of it.
fn wgrad_oracle(sh: &ConvShape, a: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (p, q) = (sh.p(), sh.q());
    let mut dw = vec![0.0; sh.w_len()];
    let mut s = vec![0.0; sh.w_len()];
    for n in 0..sh.n {
        for pp in 0..p {
            for qq in 0..q {
                for k in 0..sh.k {
                    let d = dy[((n * p + pp) * q + qq) * sh.k + k] as f64;
                    for r in 0..sh.r {
                        for t in 0..sh.s {
                            let h = (pp * sh.stride + r) as isize - sh.pad as isize;
                            let wi = (qq * sh.stride + t) as isize - sh.pad as isize;
                            if h < 0 || wi < 0 || h >= sh.h as isize || wi >= sh.w as isize {
                                continue;
                            }
                            for c in 0..sh.c {
                                let av = a[((n * sh.h + h as usize) * sh.w + wi as usize) * sh.c + c] as f64;
                                let o = ((k * sh.r + r) * sh.s + t) * sh.c + c;
                                dw[o] += d * av;
                                s[o] += (d * av).abs();
                            }
                        }
                    }
                }
            }
        }
    }
    (dw, s)
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f64], abs: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &a)) in got.iter().zip(want).zip(abs).enumerate() {
        let tol = 1e-5 * a + 1e-30 + rtol * w.abs();
        assert!((g as f64 - w).abs() <= tol, "{what}: element {i} is {g}, expected {w} (tolerance {tol:e})");
    }
}

/// Output rounding of T.
fn out_rtol<T: ConvElem>() -> f64 {
    match T::NAME {
        "bf16" => 1.0 / 256.0,
        "f16" => 1.0 / 2048.0,
        _ => 0.0,
    }
}

struct Bn {
    gamma: Buf<f32>,
    beta: Buf<f32>,
    mean: Buf<f32>,
    invstd: Buf<f32>,
}
impl Bn {
    fn new(dev: &Device, k: &Case) -> Bn {
        let up = |v: &Vec<f32>| dev.upload(v.clone()).unwrap();
        Bn { gamma: up(&k.gamma), beta: up(&k.beta), mean: up(&k.mean), invstd: up(&k.invstd) }
    }
    fn input(&self, relu: bool) -> BnInput<'_> {
        BnInput {
            c: self.gamma.len(),
            gamma: &self.gamma,
            beta: &self.beta,
            mean: &self.mean,
            invstd: &self.invstd,
            relu,
        }
    }
}

/// fprop with the BN on its input, every tile, every shape, with and without the ReLU.
fn check_fprop<T: ConvElem>(dev: &Device, shift: f32) {
    for (i, sh) in shapes().iter().enumerate() {
        let k = case::<T>(sh, 100 + i as u64, shift);
        let bn = Bn::new(dev, &k);
        let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
        let (x, w) = (up(&k.x), up(&k.w));
        for relu in [true, false] {
            let a = bn_host::<T>(dev, &k, sh.c, relu);
            let (want, abs) = fprop_oracle(sh, &a, &k.w);
            let a_dev = up(&a);
            for plan in tiles::<T>(dev, Pass::Fprop, sh) {
                let what = format!("{} {} fprop relu {relu} shift {shift} {plan:?} {sh:?}", dev.name(), T::NAME);
                let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
                fused::conv2d_fprop_bn_input_with(dev, sh, &x, &bn.input(relu), &w, &mut y, plan).unwrap();
                let yv = y.to_vec().unwrap();
                let mut yref = dev.uninit::<T>(sh.y_len()).unwrap();
                conv::conv2d_fprop_with(dev, sh, &a_dev, &w, &mut yref, plan).unwrap();
                assert!(bits(&yv) == bits(&yref.to_vec().unwrap()), "{what}: differs from bn, then the plain conv");
                let got: Vec<f32> = yv.iter().map(|v| v.to_f32()).collect();
                check(&what, &got, &want, &abs, out_rtol::<T>());
            }
        }
    }
}

/// wgrad with the BN on its x, every tile, every shape; split-K on the default plan.
fn check_wgrad<T: ConvElem>(dev: &Device, shift: f32) {
    for (i, sh) in shapes().iter().enumerate() {
        let k = case::<T>(sh, 200 + i as u64, shift);
        let bn = Bn::new(dev, &k);
        let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
        let (x, dy) = (up(&k.x), up(&k.dy));
        for relu in [true, false] {
            let a = bn_host::<T>(dev, &k, sh.c, relu);
            let (want, abs) = wgrad_oracle(sh, &a, &k.dy);
            let a_dev = up(&a);
            let mut plans = tiles::<T>(dev, Pass::Wgrad, sh);
            if !matches!(dev, Device::Cpu) {
                let p = conv::plan::<T>(Pass::Wgrad, sh);
                plans.push(Some(Plan { tile: p.tile, splits: 3 }));
            }
            for plan in plans {
                let what = format!("{} {} wgrad relu {relu} shift {shift} {plan:?} {sh:?}", dev.name(), T::NAME);
                let mut dw = dev.uninit::<f32>(sh.w_len()).unwrap();
                fused::conv2d_wgrad_bn_input_with(dev, sh, &x, &bn.input(relu), &dy, &mut dw, plan).unwrap();
                let got = dw.to_vec().unwrap();
                if plan.is_none_or(|p| p.splits == 1) {
                    // One split: no atomics, so the same bits as the unfused pass.
                    let mut dref = dev.uninit::<f32>(sh.w_len()).unwrap();
                    conv::conv2d_wgrad_with(dev, sh, &a_dev, &dy, &mut dref, plan).unwrap();
                    let (g, r): (Vec<u32>, Vec<u32>) = (
                        got.iter().map(|v| v.to_bits()).collect(),
                        dref.to_vec().unwrap().iter().map(|v| v.to_bits()).collect(),
                    );
                    assert!(g == r, "{what}: differs from bn, then the plain wgrad");
                }
                check(&what, &got, &want, &abs, 0.0);
            }
        }
    }
}

fn emu(schedule: Schedule) -> Device {
    Device::Gpu(Gpu::emu_with(schedule))
}

#[test]
fn emu_fprop_bn_input_f32_every_tile() {
    check_fprop::<f32>(&emu(Schedule::Forward), 0.0);
}

#[test]
fn emu_fprop_bn_input_bf16_every_tile() {
    check_fprop::<bf16>(&emu(Schedule::Reverse), 0.0);
}

#[test]
fn emu_fprop_bn_input_f16_every_tile() {
    check_fprop::<f16>(&emu(Schedule::Shuffle(0x5eed)), 0.0);
}

/// beta + 40: padding that went through the BN would add about 40 * sum|w| at the borders.
#[test]
fn emu_fprop_bn_input_keeps_padding_zero() {
    check_fprop::<f32>(&emu(Schedule::Reverse), 40.0);
    check_fprop::<bf16>(&emu(Schedule::Forward), 40.0);
}

#[test]
fn emu_wgrad_bn_input_f32_every_tile() {
    check_wgrad::<f32>(&emu(Schedule::Reverse), 0.0);
}

#[test]
fn emu_wgrad_bn_input_bf16_every_tile() {
    check_wgrad::<bf16>(&emu(Schedule::Shuffle(0x5eed)), 0.0);
    check_wgrad::<bf16>(&emu(Schedule::Forward), 40.0);
}

#[test]
fn emu_wgrad_bn_input_f16_every_tile() {
    check_wgrad::<f16>(&emu(Schedule::Forward), 0.0);
}

#[test]
fn cpu_bn_input_matches_oracle() {
    check_fprop::<f32>(&Device::Cpu, 0.0);
    check_fprop::<bf16>(&Device::Cpu, 40.0);
    check_wgrad::<f32>(&Device::Cpu, 40.0);
    check_wgrad::<bf16>(&Device::Cpu, 0.0);
}

/// The fused fprop is bitwise bn_apply_saved on the device, then the plain conv.
#[test]
fn emu_fprop_bn_input_is_bn_apply_saved_then_conv() {
    fn run<T: ConvElem + prunekit::ops::layers::LayerElem>(dev: &Device) {
        let sh = shape(2, 13, 13, 16, 64, 3, 1, 1);
        let k = case::<T>(&sh, 9, 0.0);
        let bn = Bn::new(dev, &k);
        let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
        let (x, w) = (up(&k.x), up(&k.w));
        let m = sh.n * sh.h * sh.w;
        let mut a = dev.uninit::<T>(sh.x_len()).unwrap();
        prunekit::ops::layers::bn_apply_saved(dev, m, &x, &bn.input(true), None, &mut a).unwrap();
        let (mut y, mut yref) = (dev.uninit::<T>(sh.y_len()).unwrap(), dev.uninit::<T>(sh.y_len()).unwrap());
        conv::conv2d_fprop(dev, &sh, &a, &w, &mut yref).unwrap();
        fused::conv2d_fprop_bn_input(dev, &sh, &x, &bn.input(true), &w, &mut y).unwrap();
        assert!(bits(&y.to_vec().unwrap()) == bits(&yref.to_vec().unwrap()), "{} {}", dev.name(), T::NAME);
    }
    for dev in common::emu_devices().iter().chain([&Device::Cpu]) {
        run::<f32>(dev);
        run::<bf16>(dev);
    }
}

/// The fprop with the BN on its input and the statistics epilogue of the next BN (what a
/// train step runs for conv2 and conv3): on every tile, y is bitwise
/// conv2d_fprop_bn_input's and the statistics bitwise those conv2d_fprop_bn_stats takes of
/// the conv of the BN's output written out.
fn check_fprop_stats<T: ConvElem + prunekit::ops::layers::LayerElem>(dev: &Device) {
    for (i, sh) in shapes().iter().enumerate() {
        let k = case::<T>(sh, 300 + i as u64, 0.0);
        let bn_in = Bn::new(dev, &k);
        let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
        let (x, w) = (up(&k.x), up(&k.w));
        let mut a = dev.uninit::<T>(sh.x_len()).unwrap();
        let m_in = sh.n * sh.h * sh.w;
        prunekit::ops::layers::bn_apply_saved(dev, m_in, &x, &bn_in.input(true), None, &mut a).unwrap();
        for plan in tiles::<T>(dev, Pass::Fprop, sh) {
            let what = format!("{} {} fprop + stats {plan:?} {sh:?}", dev.name(), T::NAME);
            let run = |fused_input: bool| {
                let mut bn = BnBufs::new(dev, vec![1.0; sh.k], vec![0.0; sh.k], vec![0.5; sh.k], vec![2.0; sh.k]);
                let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
                let mut ws = dev.uninit::<T>(sh.y_len()).unwrap();
                if fused_input {
                    let i = bn_in.input(true);
                    fused::conv2d_fprop_bn_input_stats_with(dev, sh, &x, &i, &w, &mut y, &mut ws, &mut bn.layer(), plan)
                } else {
                    fused::conv2d_fprop_bn_stats_with(dev, sh, &a, &w, &mut y, &mut ws, &mut bn.layer(), plan)
                }
                .unwrap();
                let f = |b: &Buf<f32>| b.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
                let stats = [f(&bn.save_mean), f(&bn.save_invstd), f(&bn.running_mean), f(&bn.running_var)];
                (bits(&y.to_vec().unwrap()), stats)
            };
            let (fused_run, unfused_run) = (run(true), run(false));
            let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
            fused::conv2d_fprop_bn_input_with(dev, sh, &x, &bn_in.input(true), &w, &mut y, plan).unwrap();
            assert!(fused_run.0 == bits(&y.to_vec().unwrap()), "{what}: y differs from conv2d_fprop_bn_input's");
            assert!(fused_run == unfused_run, "{what}: differs from the BN written out, then conv + statistics");
        }
    }
}

#[test]
fn emu_fprop_bn_input_with_statistics_is_bitwise_the_unfused_sequence() {
    check_fprop_stats::<f32>(&emu(Schedule::Shuffle(0xb0b)));
    check_fprop_stats::<bf16>(&emu(Schedule::Reverse));
    check_fprop_stats::<bf16>(&emu(Schedule::Forward));
    check_fprop_stats::<f32>(&Device::Cpu);
    check_fprop_stats::<bf16>(&Device::Cpu);
}

#[test]
fn bad_inputs_are_errors() {
    let dev = emu(Schedule::Forward);
    let sh = shape(1, 5, 5, 8, 8, 3, 1, 1);
    let k = case::<f32>(&sh, 1, 0.0);
    let bn = Bn::new(&dev, &k);
    let up = |v: &[f32]| dev.upload(v.to_vec()).unwrap();
    let (x, w, dy) = (up(&k.x), up(&k.w), up(&k.dy));
    let mut y = dev.uninit::<f32>(sh.y_len()).unwrap();
    let short = dev.upload(vec![1.0f32; 7]).unwrap();
    let bad = BnInput { gamma: &short, ..bn.input(true) };
    assert!(fused::conv2d_fprop_bn_input(&dev, &sh, &x, &bad, &w, &mut y).is_err());
    let mut dw = dev.uninit::<f32>(sh.w_len()).unwrap();
    assert!(fused::conv2d_wgrad_bn_input(&dev, &sh, &x, &bad, &dy, &mut dw).is_err());
    let host = Buf::Host(vec![1.0f32; 8]);
    let bad = BnInput { invstd: &host, ..bn.input(false) };
    assert!(fused::conv2d_fprop_bn_input(&dev, &sh, &x, &bad, &w, &mut y).is_err());
    let mut stats = BnBufs::new(&dev, vec![1.0; 8], vec![0.0; 8], vec![0.0; 8], vec![1.0; 8]);
    let mut ws = dev.uninit::<f32>(sh.y_len()).unwrap();
    let r = fused::conv2d_fprop_bn_input_stats(&dev, &sh, &x, &bad, &w, &mut y, &mut ws, &mut stats.layer());
    assert!(r.is_err(), "a BN input on the host");
    let short_in = BnInput { c: 7, ..bn.input(true) };
    let r = fused::conv2d_fprop_bn_input_stats(&dev, &sh, &x, &short_in, &w, &mut y, &mut ws, &mut stats.layer());
    assert!(r.unwrap_err().to_string().contains("channels"));
    let mut y_short = dev.uninit::<f32>(sh.y_len() - 1).unwrap();
    assert!(fused::conv2d_fprop_bn_input(&dev, &sh, &x, &bn.input(true), &w, &mut y_short).is_err());
    // A vector tile on a width that is not a multiple of 8.
    let odd = shape(1, 5, 5, 5, 8, 1, 1, 0);
    let kb = case::<bf16>(&odd, 2, 0.0);
    let bnb = Bn::new(&dev, &kb);
    let (xb, wb) = (dev.upload(to_t::<bf16>(&kb.x)).unwrap(), dev.upload(to_t::<bf16>(&kb.w)).unwrap());
    let mut yb = dev.uninit::<bf16>(odd.y_len()).unwrap();
    let plan = Some(Plan { tile: Tile::T64x64, splits: 1 });
    assert!(fused::conv2d_fprop_bn_input_with(&dev, &odd, &xb, &bnb.input(true), &wb, &mut yb, plan).is_err());
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_bn_input_every_tile() {
        let dev = common::cuda_device();
        check_fprop::<f32>(&dev, 0.0);
        check_fprop::<bf16>(&dev, 40.0);
        check_fprop::<f16>(&dev, 0.0);
        check_wgrad::<f32>(&dev, 0.0);
        check_wgrad::<bf16>(&dev, 40.0);
        check_wgrad::<f16>(&dev, 0.0);
        check_fprop_stats::<f32>(&dev);
        check_fprop_stats::<bf16>(&dev);
    }
}
