//! The fused ops of the training step (`prunekit::ops::fused`, `ops::layers::bn_apply_saved`)
//! on the emulation (forward, reversed and shuffled fiber order) and the CPU device,
//! against the f64 batch-norm oracle of `prunekit::cpu::layers::bn`:
//! - the conv fprop with BN statistics in its epilogue writes exactly the unfused conv's y,
//!   and statistics as `bn_forward_train_oracle` computes them from that y, on every tile
//!   (SIMT f32, tensor-core bf16 and f16, vector and scalar loads) and odd shapes;
//! - the statistics are bitwise the same in every fiber order (no atomics);
//! - conv + BN (+ residual) (+ ReLU) in f32 and bf16;
//! - the BN backward that masks its output gradient in place is bitwise the unfused
//!   relu_backward + bn_backward;
//! - bad shapes are errors. `mod cuda` runs the kernel checks on a real GPU.

use half::{bf16, f16};
use prunekit::cpu::layers::bn as cbn;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::conv::{self, ConvElem, Plan, Tile};
use prunekit::ops::fused;
use prunekit::ops::layers::{BnLayer, LayerElem};
use prunekit::shape::{ConvShape, Pass};
use prunekit::{Buf, Device};

mod common;

use common::layers::BnBufs;
use common::{d64, f64s, square_conv as shape, to_t, SplitMix as Rng};

/// Odd channels (3, 7, 67), batch 1, 1x1 and 7x7 and odd maps, stride 2, several row
/// tiles (m > 128), several column tiles (K = 67 > 64), vector and scalar loads.
fn shapes() -> Vec<ConvShape> {
    vec![
        shape(1, 13, 11, 3, 8, 7, 2, 3),   // the stem: C = 3, 7x7 stride 2, batch 1, m = 42
        shape(2, 7, 7, 5, 7, 3, 1, 1),     // 7x7 maps, widths 5 -> 7, m = 98
        shape(1, 9, 7, 27, 67, 3, 2, 1),   // K = 67, stride 2, batch 1, m = 20
        shape(2, 7, 9, 13, 3, 1, 2, 0),    // 1x1 stride 2, K = 3, m = 40
        shape(2, 1, 1, 16, 64, 1, 1, 0),   // 1x1 maps: m = 2, vector loads
        shape(2, 13, 13, 16, 64, 3, 1, 1), // m = 338: 3 or 6 row tiles, vector loads
        shape(3, 9, 9, 8, 67, 1, 1, 0),    // m = 243, K = 67: row and column tiles, a plain GEMM
    ]
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, b| a.max(b.abs()))
}

#[track_caller]
fn check(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // NaN (poison left unwritten) fails too.
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: element {i} is {g}, expected {w} (atol {atol:e}, rtol {rtol:e})"
        );
    }
}

/// Inputs of one case: x in [0.5, 1.5) and filters with a per-filter offset, so that every
/// output channel has a mean well away from 0 next to its spread; BN parameters.
struct Case {
    x: Vec<f32>,
    w: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    res: Vec<f32>,
}

fn case<T: ConvElem>(sh: &ConvShape, seed: u64) -> Case {
    let mut r = Rng::new(seed);
    let round = |v: Vec<f32>| -> Vec<f32> { to_t::<T>(&v).iter().map(|x| x.to_f32()).collect() };
    let x = round(r.vec(sh.x_len(), 0.5, 1.5));
    let kg = sh.r * sh.s * sh.c;
    let off: Vec<f32> = (0..sh.k).map(|k| if k % 2 == 0 { 1.0 } else { -1.0 } * r.uniform(0.1, 0.5)).collect();
    let w = round((0..sh.w_len()).map(|i| off[i / kg] + r.uniform(-0.5, 0.5)).collect());
    let k = sh.k;
    Case {
        x,
        w,
        gamma: r.vec(k, 0.5, 1.5),
        beta: r.vec(k, -0.5, 0.5),
        rm: r.vec(k, -1.0, 1.0),
        rv: r.vec(k, 0.5, 2.0),
        res: round(r.vec(sh.y_len(), -2.0, 2.0)),
    }
}

/// What the fused conv + statistics wrote.
struct Stats {
    y: Vec<f64>,
    y_bits: Vec<u64>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn bits<T: ConvElem>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f32().to_bits() as u64).collect()
}

fn run_stats<T: ConvElem>(dev: &Device, sh: &ConvShape, k: &Case, plan: Option<Plan>) -> Stats {
    let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
    let (x, w) = (up(&k.x), up(&k.w));
    let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
    let mut ws = dev.uninit::<T>(sh.y_len()).unwrap();
    let mut bn = BnBufs::new(dev, vec![1.0; sh.k], vec![0.0; sh.k], k.rm.clone(), k.rv.clone());
    fused::conv2d_fprop_bn_stats_with(dev, sh, &x, &w, &mut y, &mut ws, &mut bn.layer(), plan).unwrap();
    let yv = y.to_vec().unwrap();
    Stats {
        y: f64s(&yv),
        y_bits: bits(&yv),
        mean: bn.save_mean.to_vec().unwrap(),
        invstd: bn.save_invstd.to_vec().unwrap(),
        rm: bn.running_mean.to_vec().unwrap(),
        rv: bn.running_var.to_vec().unwrap(),
    }
}

/// The statistics against the oracle on the y the device wrote, with the tolerances of
/// tests/bn.rs' check_bn_train.
fn check_stats_of(what: &str, sh: &ConvShape, k: &Case, s: &Stats) {
    let (m, c) = (sh.n * sh.p() * sh.q(), sh.k);
    let ones = vec![1.0; c];
    let zeros = vec![0.0; c];
    let o = cbn::bn_forward_train_oracle(m, c, &s.y, &ones, &zeros, &d64(&k.rm), &d64(&k.rv), 0.1, 1e-5, false);
    check(&format!("{what} save_mean"), &d64(&s.mean), &o.mean, 1e-5 * max_abs(&o.mean), 1e-5);
    check(&format!("{what} save_invstd"), &d64(&s.invstd), &o.invstd, 0.0, 2e-5);
    check(&format!("{what} running_mean"), &d64(&s.rm), &o.running_mean, 1e-5 * max_abs(&o.running_mean), 1e-5);
    check(&format!("{what} running_var"), &d64(&s.rv), &o.running_var, 0.0, 2e-5);
}

/// Every tile of `T` that runs the shape, every shape: y bitwise the unfused conv's, the
/// statistics against the oracle.
fn check_stats_every_tile<T: ConvElem>(dev: &Device) {
    let tiles: Vec<Option<Plan>> = if matches!(dev, Device::Cpu) {
        vec![None]
    } else if T::TENSOR_CORES {
        let mut t = vec![Tile::T128x128, Tile::T128x64, Tile::T64x64, Tile::T64x64Scalar];
        if matches!(dev, Device::Gpu(g) if g.has_wgmma()) {
            t.extend(Tile::WARPGROUP);
        }
        t.into_iter().map(|tile| Some(Plan { tile, splits: 1 })).collect()
    } else {
        [Tile::T128x128, Tile::T64x64].into_iter().map(|tile| Some(Plan { tile, splits: 1 })).collect()
    };
    for (i, sh) in shapes().iter().enumerate() {
        let k = case::<T>(sh, 40 + i as u64);
        for &plan in &tiles {
            if let Some(p) = plan {
                if T::TENSOR_CORES && p.tile.vector() && !conv::vector_ok(Pass::Fprop, sh) {
                    continue;
                }
            }
            let what = format!("{} {} {plan:?} {sh:?}", dev.name(), T::NAME);
            let s = run_stats::<T>(dev, sh, &k, plan);
            let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
            let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
            conv::conv2d_fprop_with(dev, sh, &up(&k.x), &up(&k.w), &mut y, plan).unwrap();
            assert!(s.y_bits == bits(&y.to_vec().unwrap()), "{what}: y differs from the unfused conv's");
            check_stats_of(&what, sh, &k, &s);
        }
    }
}

fn emu(schedule: Schedule) -> Device {
    Device::Gpu(Gpu::emu_with(schedule))
}

#[test]
fn emu_stats_epilogue_f32_every_tile() {
    check_stats_every_tile::<f32>(&emu(Schedule::Forward));
}

#[test]
fn emu_stats_epilogue_bf16_every_tile() {
    check_stats_every_tile::<bf16>(&emu(Schedule::Forward));
}

#[test]
fn emu_stats_epilogue_f16_every_tile() {
    check_stats_every_tile::<f16>(&emu(Schedule::Reverse));
}

#[test]
fn cpu_stats_match_oracle() {
    check_stats_every_tile::<f32>(&Device::Cpu);
    check_stats_every_tile::<bf16>(&Device::Cpu);
}

/// The statistics are the same bits in every fiber order: fixed-order reductions, no atomics.
#[test]
fn emu_stats_are_deterministic() {
    let sh = shape(2, 13, 13, 16, 64, 3, 1, 1);
    let k = case::<bf16>(&sh, 7);
    let k32 = case::<f32>(&sh, 8);
    let runs: Vec<_> = common::emu_devices()
        .iter()
        .map(|d| (run_stats::<bf16>(d, &sh, &k, None), run_stats::<f32>(d, &sh, &k32, None)))
        .collect();
    for (a, b) in runs.iter().zip(&runs[1..]) {
        for (x, y) in [(&a.0, &b.0), (&a.1, &b.1)] {
            assert!(x.y_bits == y.y_bits);
            for (u, v) in [(&x.mean, &y.mean), (&x.invstd, &y.invstd), (&x.rm, &y.rm), (&x.rv, &y.rv)] {
                let (ub, vb): (Vec<u32>, Vec<u32>) =
                    (u.iter().map(|f| f.to_bits()).collect(), v.iter().map(|f| f.to_bits()).collect());
                assert_eq!(ub, vb, "statistics differ between fiber orders");
            }
        }
    }
}

/// conv + BN (+ residual) (+ ReLU) against the oracle: y bitwise the unfused conv's, the
/// statistics, and the output within the tolerance of tests/bn.rs' check_bn_train
/// (one rounding of the output; the residual adds its own magnitude to the scale).
fn check_forward<T: ConvElem + LayerElem>(dev: &Device) {
    for (i, sh) in shapes().iter().enumerate() {
        let k = case::<T>(sh, 70 + i as u64);
        let (m, c) = (sh.n * sh.p() * sh.q(), sh.k);
        for (residual, relu) in [(false, true), (false, false), (true, true), (true, false)] {
            let what =
                format!("{} {} {sh:?} residual {residual} relu {relu}", dev.name(), <T as prunekit::gpu::Elem>::NAME);
            let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
            let (x, w, res) = (up(&k.x), up(&k.w), up(&k.res));
            let mut bn = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), k.rm.clone(), k.rv.clone());
            let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
            let mut out = dev.uninit::<T>(sh.y_len()).unwrap();
            let r: Option<&Buf<T>> = residual.then_some(&res);
            fused::conv_bn_forward_train(dev, sh, &x, None, &w, &mut y, &mut bn.layer(), r, relu, &mut out).unwrap();
            let (sm, si, rv) = (&bn.save_mean, &bn.save_invstd, &bn.running_var);
            let yv = f64s(&y.to_vec().unwrap());
            let mut yref = dev.uninit::<T>(sh.y_len()).unwrap();
            conv::conv2d_fprop(dev, sh, &x, &w, &mut yref).unwrap();
            assert!(
                bits(&y.to_vec().unwrap()) == bits(&yref.to_vec().unwrap()),
                "{what}: y differs from the unfused conv's"
            );
            let o = cbn::bn_forward_train_oracle(
                m,
                c,
                &yv,
                &d64(&k.gamma),
                &d64(&k.beta),
                &d64(&k.rm),
                &d64(&k.rv),
                0.1,
                1e-5,
                relu && !residual,
            );
            let want: Vec<f64> = if residual {
                o.y.iter().zip(&k.res).map(|(&v, &r)| v + r as f64).map(|v| if relu { v.max(0.0) } else { v }).collect()
            } else {
                o.y.clone()
            };
            let mean_ulp =
                (0..c).map(|ch| o.mean[ch].abs() * o.invstd[ch] * k.gamma[ch] as f64).fold(0.0, f64::max) * 1.2e-7;
            let scale = max_abs(&o.y).max(max_abs(&want));
            let rtol = if std::mem::size_of::<T>() == 2 { 1.0 / 128.0 } else { 2e-5 };
            check(&format!("{what} out"), &f64s(&out.to_vec().unwrap()), &want, 2e-5 * scale + mean_ulp, rtol);
            check(&format!("{what} save_mean"), &d64(&sm.to_vec().unwrap()), &o.mean, 1e-5 * max_abs(&o.mean), 1e-5);
            check(&format!("{what} save_invstd"), &d64(&si.to_vec().unwrap()), &o.invstd, 0.0, 2e-5);
            check(&format!("{what} running_var"), &d64(&rv.to_vec().unwrap()), &o.running_var, 0.0, 2e-5);
        }
    }
}

#[test]
fn emu_conv_bn_forward_f32() {
    check_forward::<f32>(&emu(Schedule::Reverse));
}

#[test]
fn emu_conv_bn_forward_bf16() {
    check_forward::<bf16>(&emu(Schedule::Shuffle(0x5eed)));
}

#[test]
fn cpu_conv_bn_forward() {
    check_forward::<f32>(&Device::Cpu);
    check_forward::<bf16>(&Device::Cpu);
}

/// BN backward that masks dy in place (`bn_backward_masking_dy`) against relu_backward then
/// bn_backward on the same device: bitwise the same g, dx, dgamma and dbeta (the same
/// arithmetic in the same order, one pass less).
fn check_backward_masking<T: LayerElem + ConvElem>(dev: &Device) {
    use prunekit::ops::layers as l;
    for (i, &(m, c)) in
        [(2usize, 7usize), (7, 3), (300, 5), (1001, 13), (517, 64), (37, 67), (49, 16)].iter().enumerate()
    {
        let mut r = Rng::new(900 + i as u64);
        let up = |v: Vec<f32>| dev.upload(to_t::<T>(&v)).unwrap();
        let x = up(r.vec(m * c, -1.0, 2.0));
        let out = up(r.vec(m * c, -1.0, 1.0)); // about half the mask is off
        let dyv = r.vec(m * c, -1.0, 1.0);
        let (gamma, mean, invstd) = (r.vec(c, 0.5, 1.5), r.vec(c, 0.0, 1.0), r.vec(c, 0.5, 2.0));
        // gamma and the saved statistics; beta and the running statistics are not read.
        let bn = || {
            let mut b = BnBufs::new(dev, gamma.clone(), vec![0.0; c], vec![0.0; c], vec![1.0; c]);
            b.save_mean = dev.upload(mean.clone()).unwrap();
            b.save_invstd = dev.upload(invstd.clone()).unwrap();
            b
        };
        let (mut bn0, mut bn1) = (bn(), bn());
        let mut dx0 = dev.uninit::<T>(m * c).unwrap();
        let mut g0 = dev.uninit::<T>(m * c).unwrap();
        l::relu_backward(dev, &out, &up(dyv.clone()), &mut g0).unwrap();
        l::bn_backward(dev, m, &x, None, &g0, &mut bn0.layer(), &mut dx0).unwrap();
        let mut dx1 = dev.uninit::<T>(m * c).unwrap();
        let mut g1 = up(dyv);
        l::bn_backward_masking_dy(dev, m, &x, &out, &mut g1, &mut bn1.layer(), &mut dx1).unwrap();
        let (dg0, db0, dg1, db1) = (&bn0.dgamma, &bn0.dbeta, &bn1.dgamma, &bn1.dbeta);
        let what = format!("{} {} {m}x{c}", dev.name(), <T as prunekit::gpu::Elem>::NAME);
        assert!(bits(&g0.to_vec().unwrap()) == bits(&g1.to_vec().unwrap()), "{what}: g");
        assert!(bits(&dx0.to_vec().unwrap()) == bits(&dx1.to_vec().unwrap()), "{what}: dx");
        let fb = |b: &Buf<f32>| b.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(fb(dg0), fb(dg1), "{what}: dgamma");
        assert_eq!(fb(db0), fb(db1), "{what}: dbeta");
    }
}

#[test]
fn backward_masking_dy_matches_unfused() {
    let mut devs = vec![Device::Cpu];
    devs.extend(common::emu_devices());
    for dev in &devs {
        check_backward_masking::<f32>(dev);
        check_backward_masking::<bf16>(dev);
    }
}

#[test]
fn bad_inputs_are_errors() {
    for dev in [Device::Cpu, emu(Schedule::Forward)] {
        let sh = shape(1, 1, 1, 8, 8, 1, 1, 0); // m = 1: no batch statistics
        let z = |n: usize| dev.zeros::<f32>(n).unwrap();
        let (x, w) = (z(sh.x_len()), z(sh.w_len()));
        let (mut y, mut ws) = (z(sh.y_len()), z(sh.y_len()));
        let mut bn = BnBufs::new(&dev, vec![0.0; 8], vec![0.0; 8], vec![0.0; 8], vec![0.0; 8]);
        let r = fused::conv2d_fprop_bn_stats(&dev, &sh, &x, &w, &mut y, &mut ws, &mut bn.layer());
        assert!(r.is_err(), "m = 1 must be an error on {}", dev.name());
        let sh = shape(2, 3, 3, 8, 8, 1, 1, 0);
        let (x, w) = (z(sh.x_len()), z(sh.w_len()));
        let (mut y, mut ws) = (z(sh.y_len()), z(sh.y_len() - 1));
        let r = fused::conv2d_fprop_bn_stats(&dev, &sh, &x, &w, &mut y, &mut ws, &mut bn.layer());
        assert!(r.is_err(), "a short workspace must be an error on {}", dev.name());
        let mut ws = z(sh.y_len());
        let mut short = z(7);
        let layer = &mut BnLayer { save_mean: &mut short, ..bn.layer() };
        let r = fused::conv2d_fprop_bn_stats(&dev, &sh, &x, &w, &mut y, &mut ws, layer);
        assert!(r.is_err(), "a short save_mean must be an error on {}", dev.name());
        let mut out = z(sh.y_len());
        let res = z(sh.y_len() + 1);
        let r = prunekit::ops::layers::bn_apply_saved(&dev, 18, &y, &bn.layer().input(true), Some(&res), &mut out);
        assert!(r.is_err(), "a residual of the wrong length must be an error on {}", dev.name());
    }
}

/// A small bottleneck ResNet with odd widths (tests/profile.rs' tiny_arch): identity and
/// downsample blocks; small enough that no wgrad splits (split-K adds with atomics, whose
/// order varies on a GPU, and bitwise comparison would not be a check).
fn tiny_arch() -> prunekit::model::Arch {
    use prunekit::model::{Arch, Block};
    let b = |stage, index, cin, w1, w2, cout, stride, downsample| Block {
        stage,
        index,
        cin,
        w1,
        w2,
        cout,
        stride,
        downsample,
    };
    Arch {
        stem: 8,
        classes: 5,
        blocks: vec![
            b(1, 0, 8, 3, 5, 6, 1, true),
            b(1, 1, 6, 4, 4, 6, 1, false),
            b(2, 0, 6, 4, 3, 10, 2, true),
            b(3, 0, 10, 3, 3, 7, 2, true),
            b(4, 0, 7, 5, 4, 12, 2, true),
        ],
    }
}

/// Seven steps with `train_step_graphed` and seven with `train_step` from the same weights
/// and batch end with the same bits in every parameter and momentum; the label smoothing
/// changes before the fourth step and the BN fusion before the sixth (a graph captured
/// before would replay the old settings).
fn check_graphed_steps(dev: &Device, precision: prunekit::model::PrecisionKind) {
    use prunekit::model::{init::torchvision_init, Model, Sgd};
    let sd = torchvision_init(&tiny_arch(), 3);
    let sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };
    let mut r = Rng::new(5);
    let images = r.vec(2 * 3 * 28 * 28, -1.0, 1.0);
    let targets = vec![1i64, 4];
    let run = |graphed: bool| {
        let mut m = Model::from_state(dev, &sd, precision).unwrap();
        let mut ws = m.workspace(2, 28, 28).unwrap();
        m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
        for step in 0..7 {
            if step == 3 {
                m.set_label_smoothing(0.1).unwrap();
            }
            if step == 5 {
                m.set_bn_fusion(prunekit::model::BnFusion::ALL);
            }
            if graphed {
                m.train_step_graphed(&mut ws, &sgd).unwrap();
            } else {
                m.train_step(&mut ws, &sgd).unwrap();
            }
        }
        (m.loss(&ws).unwrap(), m.to_state().unwrap(), m.momentum_state().unwrap())
    };
    let (a, b) = (run(false), run(true));
    assert_eq!(a.0.to_bits(), b.0.to_bits(), "loss on {}", dev.name());
    for (x, y) in [(&a.1, &b.1), (&a.2, &b.2)] {
        for (name, t) in &x.tensors {
            let (u, v) = (t.as_f32().unwrap(), y.tensors[name].as_f32().unwrap());
            assert!(u.iter().zip(v).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} differs on {}", dev.name());
        }
    }
}

#[test]
fn emu_graphed_step_is_the_plain_step() {
    // The emulation runs the launches directly: the same sequence, the same bits.
    check_graphed_steps(&emu(Schedule::Forward), prunekit::model::PrecisionKind::F32);
    check_graphed_steps(&Device::Cpu, prunekit::model::PrecisionKind::F32);
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_graphed_step_is_the_plain_step() {
        let dev = common::cuda_device();
        check_graphed_steps(&dev, prunekit::model::PrecisionKind::F32);
        check_graphed_steps(&dev, prunekit::model::PrecisionKind::Bf16);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_stats_epilogue_every_tile() {
        let dev = common::cuda_device();
        check_stats_every_tile::<f32>(&dev);
        check_stats_every_tile::<bf16>(&dev);
        check_stats_every_tile::<f16>(&dev);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_backward_masking_dy() {
        let dev = common::cuda_device();
        check_backward_masking::<f32>(&dev);
        check_backward_masking::<bf16>(&dev);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_conv_bn_forward() {
        let dev = common::cuda_device();
        check_forward::<f32>(&dev);
        check_forward::<bf16>(&dev);
    }
}
