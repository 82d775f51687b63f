//! Batch norm backward sums taken in a dgrad's epilogue
//! (`prunekit::ops::fused::conv2d_dgrad_bn_sums`, `conv2d_dgrad_accumulate_bn_sums`) and the
//! BN backward's dx pass alone (`prunekit::ops::layers::bn_backward_dx`), on the emulation
//! (forward, reversed and shuffled fiber order) and the CPU device:
//! - on every tile that runs the shape (SIMT f32, tensor-core bf16, vector and scalar
//!   loads), dx is bitwise the plain dgrad's (or dgrad_accumulate's, with and without its
//!   ReLU mask) on the same device and tile;
//! - dbeta and dgamma against an f64 oracle of the sums over the stored dx (through the
//!   BN's own ReLU, its output as the forward computes it on that device), atol 1e-5 of
//!   the sums of magnitudes, and against the unfused BN backward on the same device; the
//!   same for a second BN of the same gradient (its own input, statistics and sums);
//! - odd widths (5, 7, 13, 67), batch 1, 1x1 and 3x3, stride 2 (the dgrad's phases, each
//!   with its row tiles, 1x1 stride 2 with phases that have no taps), several row and
//!   column tiles;
//! - bn_backward_dx from the unfused backward's dbeta and dgamma is bitwise that backward's
//!   dx, with and without the ReLU;
//! - bad inputs are errors. `mod cuda` runs the same checks on a real GPU.

use half::bf16;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::conv::{self, ConvElem, Plan, ReluMask, Tile};
use prunekit::ops::fused::{self, GradBn};
use prunekit::ops::layers::{self, BnLayer, LayerElem};
use prunekit::shape::{ConvShape, Pass};
use prunekit::{Buf, Device};

mod common;

use common::layers::{up, BnBufs};
use common::{square_conv as shape, to_t, SplitMix as Rng};

/// The dgrad's output is the BN's input shape: C (the BN's channels) odd and wide, stride 1
/// and 2, 1x1 and 3x3, batch 1, several row tiles per phase.
fn shapes() -> Vec<ConvShape> {
    vec![
        shape(1, 9, 7, 13, 7, 3, 1, 1),    // C = 13, 3x3 pad 1, batch 1, m = 63
        shape(2, 7, 9, 5, 67, 1, 2, 0),    // 1x1 stride 2: phases without taps, C = 5
        shape(2, 13, 13, 16, 64, 3, 1, 1), // m = 338: several row tiles, vector loads
        shape(3, 15, 15, 16, 24, 3, 2, 1), // 3x3 stride 2: four phases of 147..192 rows
        shape(2, 14, 14, 16, 32, 1, 2, 0), // 1x1 stride 2, vector loads
        shape(3, 9, 9, 67, 8, 1, 1, 0),    // C = 67: column tiles, scalar loads
        shape(1, 1, 1, 8, 8, 1, 1, 0),     // one value per channel
    ]
}

/// Every tile of `T` that runs the dgrad of `sh`, or the default plan on the CPU.
fn tiles<T: ConvElem>(dev: &Device, sh: &ConvShape) -> Vec<Option<Plan>> {
    if matches!(dev, Device::Cpu) {
        return vec![None];
    }
    let mut all = if T::TENSOR_CORES {
        vec![Tile::T128x128, Tile::T128x64, Tile::T64x64, Tile::T64x64Scalar]
    } else {
        vec![Tile::T128x128, Tile::T64x64]
    };
    if T::TENSOR_CORES && matches!(dev, Device::Gpu(g) if g.has_wgmma()) {
        all.extend(Tile::WARPGROUP);
    }
    all.iter()
        .filter(|t| !(T::TENSOR_CORES && t.vector() && !conv::vector_ok(Pass::Dgrad, sh)))
        .map(|&tile| Some(Plan { tile, splits: 1 }))
        .collect()
}

fn rounded<T: ConvElem>(v: Vec<f32>) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn host<T: ConvElem>(b: &Buf<T>) -> Vec<f32> {
    b.to_vec().unwrap().iter().map(|v| v.to_f32()).collect()
}

/// One case: dy and w of the dgrad, the BN's input x (its conv output), the BN, and for the
/// accumulating dgrad the gradient already in dx and a ReLU output that masks the sum.
struct Case {
    dy: Vec<f32>,
    w: Vec<f32>,
    x: Vec<f32>,
    dx0: Vec<f32>,
    mask: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

fn case<T: ConvElem>(sh: &ConvShape, seed: u64) -> Case {
    let mut r = Rng::new(seed);
    let c = sh.c;
    Case {
        dy: rounded::<T>(r.vec(sh.y_len(), -1.0, 1.0)),
        w: rounded::<T>(r.vec(sh.w_len(), -1.0, 1.0)),
        x: rounded::<T>(r.vec(sh.x_len(), -1.0, 3.0)),
        dx0: rounded::<T>(r.vec(sh.x_len(), -1.0, 1.0)),
        mask: rounded::<T>(r.vec(sh.x_len(), -1.0, 1.0).into_iter().map(|v| v.max(0.0)).collect()),
        gamma: r.vec(c, 0.5, 1.5),
        beta: r.vec(c, -0.5, 0.5),
        mean: r.vec(c, 0.5, 1.5),
        invstd: r.vec(c, 0.5, 2.0),
    }
}

fn bn_bufs(dev: &Device, k: &Case) -> BnBufs {
    let c = k.gamma.len();
    let mut b = BnBufs::new(dev, k.gamma.clone(), k.beta.clone(), vec![0.0; c], vec![1.0; c]);
    b.save_mean = up(dev, k.mean.clone());
    b.save_invstd = up(dev, k.invstd.clone());
    b
}

/// How the dgrad stores dx.
#[derive(Clone, Copy, Debug)]
enum Store {
    Plain,
    Accumulate,
    AccumulateMasked,
}

/// The BN's ReLU output as the forward writes it on `dev` (bn_apply_saved).
fn relu_out<T: ConvElem + LayerElem>(dev: &Device, m: usize, x: &Buf<T>, bn: &BnLayer<'_>) -> Buf<T> {
    let mut o = up(dev, vec![<T as ConvElem>::from_f32(0.0); x.len()]);
    layers::bn_apply_saved(dev, m, x, &bn.input(true), None, &mut o).unwrap();
    o
}

/// Runs the fused op and the plain dgrad on one tile and checks dx bitwise and the sums
/// against the f64 oracle and the unfused BN backward.
fn check_one<T: ConvElem + LayerElem>(
    dev: &Device,
    sh: &ConvShape,
    plan: Option<Plan>,
    store: Store,
    relu: bool,
    second: bool,
) {
    let k = case::<T>(sh, 7 + sh.x_len() as u64);
    // The second BN (no ReLU) of the same gradient: its own input and statistics.
    let k2 = case::<T>(sh, 1000 + sh.x_len() as u64);
    let x2 = up(dev, to_t::<T>(&k2.x));
    let mut bn2 = bn_bufs(dev, &k2);
    let (m, c) = (sh.n * sh.h * sh.w, sh.c);
    let what = format!("{dev:?} {} {sh:?} {plan:?} {store:?} relu {relu} second {second}", T::NAME);
    let (dy, w, x) = (up(dev, to_t::<T>(&k.dy)), up(dev, to_t::<T>(&k.w)), up(dev, to_t::<T>(&k.x)));
    let mask = up(dev, to_t::<T>(&k.mask));
    let mut bn = bn_bufs(dev, &k);
    let mut ws = up(dev, vec![f32::NAN; (2 * fused::grad_sums_workspace_len::<T>(sh, plan)).max(1)]);
    // Fused.
    let mut dx = up(dev, to_t::<T>(&k.dx0));
    {
        let mut l2 = bn2.layer();
        let second = second.then_some((&x2, &mut l2));
        let grad = GradBn { x: &x, bn: &mut bn.layer(), relu, second, workspace: &mut ws };
        match store {
            Store::Plain => fused::conv2d_dgrad_bn_sums_with(dev, sh, &dy, &w, &mut dx, grad, plan),
            Store::Accumulate => {
                fused::conv2d_dgrad_accumulate_bn_sums_with(dev, sh, &dy, &w, None, &mut dx, grad, plan)
            }
            Store::AccumulateMasked => fused::conv2d_dgrad_accumulate_bn_sums_with(
                dev,
                sh,
                &dy,
                &w,
                Some(ReluMask::Output(&mask)),
                &mut dx,
                grad,
                plan,
            ),
        }
        .unwrap();
    }
    // Unfused, same tile.
    let mut dx_u = up(dev, to_t::<T>(&k.dx0));
    match store {
        Store::Plain => conv::conv2d_dgrad_with(dev, sh, &dy, &w, &mut dx_u, plan),
        Store::Accumulate => conv::conv2d_dgrad_accumulate_with(dev, sh, &dy, &w, None, &mut dx_u, plan),
        Store::AccumulateMasked => {
            conv::conv2d_dgrad_accumulate_with(dev, sh, &dy, &w, Some(ReluMask::Output(&mask)), &mut dx_u, plan)
        }
    }
    .unwrap();
    let (g, gu) = (host(&dx), host(&dx_u));
    assert!(g.iter().zip(&gu).all(|(a, b)| a.to_bits() == b.to_bits()), "dx differs from the plain dgrad: {what}");
    // The f64 oracle over the stored gradient, through the ReLU as the forward computed it.
    let mut bu = bn_bufs(dev, &k);
    let o = relu_out(dev, m, &x, &bu.layer());
    let oh = host(&o);
    let (mut sg, mut sgx, mut abs) = (vec![0.0f64; c], vec![0.0f64; c], vec![0.0f64; c]);
    for i in 0..m * c {
        let ch = i % c;
        let gi = if relu && oh[i] <= 0.0 { 0.0 } else { g[i] as f64 };
        let d = k.x[i] as f64 - k.mean[ch] as f64;
        sg[ch] += gi;
        sgx[ch] += gi * d;
        abs[ch] += gi.abs() * (1.0 + d.abs());
    }
    let (dbeta, dgamma) = (bn.dbeta.to_vec().unwrap(), bn.dgamma.to_vec().unwrap());
    for ch in 0..c {
        let tol = 1e-5 * abs[ch] + 1e-6;
        assert!((dbeta[ch] as f64 - sg[ch]).abs() <= tol, "dbeta[{ch}] {} vs {}: {what}", dbeta[ch], sg[ch]);
        let want = sgx[ch] * k.invstd[ch] as f64;
        let tol = tol * k.invstd[ch] as f64;
        assert!((dgamma[ch] as f64 - want).abs() <= tol, "dgamma[{ch}] {} vs {want}: {what}", dgamma[ch]);
    }
    if second {
        // The second BN's sums: the same g, unmasked, its own x and mean.
        let (mut sg2, mut sgx2, mut abs2) = (vec![0.0f64; c], vec![0.0f64; c], vec![0.0f64; c]);
        for (i, (&gi, &xi)) in g.iter().zip(&k2.x).enumerate() {
            let ch = i % c;
            let (gi, d) = (gi as f64, xi as f64 - k2.mean[ch] as f64);
            sg2[ch] += gi;
            sgx2[ch] += gi * d;
            abs2[ch] += gi.abs() * (1.0 + d.abs());
        }
        let (db2, dg2) = (bn2.dbeta.to_vec().unwrap(), bn2.dgamma.to_vec().unwrap());
        for ch in 0..c {
            let tol = 1e-5 * abs2[ch] + 1e-6;
            assert!((db2[ch] as f64 - sg2[ch]).abs() <= tol, "second dbeta[{ch}]: {what}");
            let want = sgx2[ch] * k2.invstd[ch] as f64;
            assert!((dg2[ch] as f64 - want).abs() <= tol * k2.invstd[ch] as f64, "second dgamma[{ch}]: {what}");
        }
    }
    // The unfused BN backward of the same gradient on the same device.
    let mut dxbn = up(dev, vec![<T as ConvElem>::from_f32(0.0); x.len()]);
    let ro = relu.then_some(&o);
    layers::bn_backward(dev, m, &x, ro, &dx_u, &mut bu.layer(), &mut dxbn).unwrap();
    let (db, dg) = (bu.dbeta.to_vec().unwrap(), bu.dgamma.to_vec().unwrap());
    for ch in 0..c {
        let tol = 2e-5 * abs[ch] + 1e-6;
        assert!((dbeta[ch] - db[ch]).abs() as f64 <= tol, "dbeta[{ch}] vs bn_backward: {what}");
        assert!((dgamma[ch] - dg[ch]).abs() as f64 <= tol * k.invstd[ch] as f64, "dgamma[{ch}] vs bn_backward: {what}");
    }
}

fn check_all<T: ConvElem + LayerElem>(dev: &Device) {
    for sh in shapes() {
        for plan in tiles::<T>(dev, &sh) {
            for store in [Store::Plain, Store::Accumulate, Store::AccumulateMasked] {
                for (relu, second) in [(true, false), (false, false), (false, true)] {
                    check_one::<T>(dev, &sh, plan, store, relu, second);
                }
            }
        }
    }
}

fn emu(schedule: Schedule) -> Device {
    Device::Gpu(Gpu::emu_with(schedule))
}

#[test]
fn emu_dgrad_bn_sums_f32_every_tile() {
    check_all::<f32>(&emu(Schedule::Reverse));
}

#[test]
fn emu_dgrad_bn_sums_bf16_every_tile() {
    check_all::<bf16>(&emu(Schedule::Shuffle(0x5eed)));
}

#[test]
fn cpu_dgrad_bn_sums() {
    check_all::<f32>(&Device::Cpu);
    check_all::<bf16>(&Device::Cpu);
}

/// bn_backward_dx with the unfused backward's parameter gradients gives its dx, bitwise.
fn check_dx_pass<T: ConvElem + LayerElem>(dev: &Device) {
    for sh in shapes() {
        let k = case::<T>(&sh, 99 + sh.c as u64);
        let m = sh.n * sh.h * sh.w;
        let (x, dy) = (up(dev, to_t::<T>(&k.x)), up(dev, to_t::<T>(&k.dx0)));
        for relu in [true, false] {
            let mut bn = bn_bufs(dev, &k);
            let o = relu_out(dev, m, &x, &bn.layer());
            let mut want = up(dev, vec![<T as ConvElem>::from_f32(0.0); x.len()]);
            if relu && !matches!(dev, Device::Cpu) {
                layers::bn_backward_through_relu(dev, m, &x, &o, &dy, &mut bn.layer(), &mut want).unwrap();
            } else {
                layers::bn_backward(dev, m, &x, relu.then_some(&o), &dy, &mut bn.layer(), &mut want).unwrap();
            }
            let mut got = up(dev, vec![<T as ConvElem>::from_f32(f32::NAN); x.len()]);
            layers::bn_backward_dx(dev, m, &x, &dy, &bn.layer(), relu, &mut got).unwrap();
            let (a, b) = (host(&got), host(&want));
            assert!(
                a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                "{dev:?} {} {sh:?} relu {relu}",
                T::NAME
            );
        }
    }
}

#[test]
fn bn_backward_dx_is_the_backward_dx_pass() {
    for dev in [emu(Schedule::Forward), Device::Cpu] {
        check_dx_pass::<f32>(&dev);
        check_dx_pass::<bf16>(&dev);
    }
}

#[test]
fn bad_inputs_are_refused() {
    let dev = emu(Schedule::Forward);
    let sh = shape(2, 13, 13, 16, 64, 3, 1, 1);
    let k = case::<f32>(&sh, 3);
    let (dy, w, x) = (up(&dev, k.dy.clone()), up(&dev, k.w.clone()), up(&dev, k.x.clone()));
    let need = fused::grad_sums_workspace_len::<f32>(&sh, None);
    assert!(need > 0, "several row tiles");
    let mut bn = bn_bufs(&dev, &k);
    let mut dx = up(&dev, k.dx0.clone());
    let err = |r: prunekit::Result<()>| r.unwrap_err().to_string();
    // A workspace too small for the tiles' sums.
    let mut small = up(&dev, vec![0.0f32; need - 1]);
    let grad = GradBn { x: &x, bn: &mut bn.layer(), relu: true, second: None, workspace: &mut small };
    let e = err(fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut dx, grad));
    assert!(e.contains("workspace"), "{e}");
    // The BN's input of the wrong size.
    let mut ws = up(&dev, vec![0.0f32; need]);
    let short = up(&dev, vec![0.0f32; sh.x_len() - 1]);
    let grad = GradBn { x: &short, bn: &mut bn.layer(), relu: true, second: None, workspace: &mut ws };
    let e = err(fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut dx, grad));
    assert!(e.contains("batch norm's input"), "{e}");
    // A BN of other channels.
    let mut other = bn_bufs(&dev, &case::<f32>(&shape(1, 1, 1, 8, 8, 1, 1, 0), 1));
    let grad = GradBn { x: &x, bn: &mut other.layer(), relu: false, second: None, workspace: &mut ws };
    let e = err(fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut dx, grad));
    assert!(e.contains("channels"), "{e}");
    // A mask of the wrong size; a buffer on another device.
    let bad_mask = up(&dev, vec![0.0f32; 3]);
    let grad = GradBn { x: &x, bn: &mut bn.layer(), relu: false, second: None, workspace: &mut ws };
    let e = err(fused::conv2d_dgrad_accumulate_bn_sums(
        &dev,
        &sh,
        &dy,
        &w,
        Some(ReluMask::Output(&bad_mask)),
        &mut dx,
        grad,
    ));
    assert!(e.contains("relu_out"), "{e}");
    let host_x = up(&Device::Cpu, k.x.clone());
    let grad = GradBn { x: &host_x, bn: &mut bn.layer(), relu: false, second: None, workspace: &mut ws };
    assert!(fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut dx, grad).is_err());
    // A second BN with the first through a ReLU; a workspace without room for the second.
    let mut b2 = bn_bufs(&dev, &k);
    let grad =
        GradBn { x: &x, bn: &mut bn.layer(), relu: true, second: Some((&x, &mut b2.layer())), workspace: &mut ws };
    let e = err(fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut dx, grad));
    assert!(e.contains("ReLU"), "{e}");
    let grad =
        GradBn { x: &x, bn: &mut bn.layer(), relu: false, second: Some((&x, &mut b2.layer())), workspace: &mut ws };
    let e = err(fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut dx, grad));
    assert!(e.contains("workspace"), "{e}");
    // bn_backward_dx: wrong lengths.
    let m = sh.n * sh.h * sh.w;
    let mut out = up(&dev, vec![0.0f32; sh.x_len()]);
    assert!(layers::bn_backward_dx(&dev, m + 1, &x, &dx, &bn.layer(), true, &mut out).is_err());
    assert!(layers::bn_backward_dx(&dev, m, &x, &dx, &bn.layer(), true, &mut out).is_ok());
}

mod cuda {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_dgrad_bn_sums_every_tile() {
        let dev = common::cuda_device();
        check_all::<f32>(&dev);
        check_all::<bf16>(&dev);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_bn_backward_dx_is_the_backward_dx_pass() {
        let dev = common::cuda_device();
        check_dx_pass::<f32>(&dev);
        check_dx_pass::<bf16>(&dev);
    }
}
