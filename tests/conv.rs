//! Convolution: every pass of the kernels (through the emulation, forward and reversed
//! fiber order) and of the CPU fast path against the naive oracle, on odd shapes: the
//! stem (C = 3, 7x7, stride 2), widths 5, 13, 27 and 64, stride 2 with odd H and W, batch
//! 1, 1x1 with stride 2; f32 with a tight tolerance and bf16 with one scaled to the
//! reduction length; adjoint identities; layout conversions; bad inputs.
//!
//! The `cuda` module runs the same checks on a real GPU (ignored where there is none).

mod common;

use common::{square_conv as shape, to_t};

use half::bf16;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::ops::conv::{self, ConvElem, Plan, Tile};
use prunekit::ops::layers;
use prunekit::shape::{ConvShape, Pass};
use prunekit::{Buf, Device};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    common::Rng::new(seed).vec(n)
}

/// Odd shapes, small enough for the emulation.
fn odd_shapes() -> Vec<ConvShape> {
    vec![
        shape(1, 13, 11, 3, 8, 7, 2, 3),  // the stem: C = 3, 7x7, stride 2, pad 3, odd H and W
        shape(2, 7, 7, 5, 13, 3, 1, 1),   // widths 5 -> 13
        shape(1, 9, 7, 27, 5, 3, 2, 1),   // 27 -> 5, stride 2, odd H and W, batch 1
        shape(2, 7, 9, 13, 27, 1, 2, 0),  // 1x1 stride 2, odd widths
        shape(1, 6, 5, 64, 64, 3, 1, 1),  // 64 -> 64 (vector path), batch 1
        shape(2, 9, 9, 16, 64, 1, 2, 0),  // 1x1 stride 2, vector path (downsample)
        shape(1, 9, 11, 64, 16, 3, 2, 1), // 3x3 stride 2, odd H and W, vector path
        shape(2, 5, 5, 24, 40, 1, 1, 0),  // 1x1 stride 1: a plain GEMM
        shape(2, 10, 11, 8, 16, 5, 3, 2), // 5x5 stride 3: nine dgrad phases, some without a tap row
    ]
}

fn to_f<T: ConvElem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Inputs of one shape (rounded to T), as f32 for the oracle.
struct Data {
    x: Vec<f32>,
    w: Vec<f32>,
    dy: Vec<f32>,
}

fn data<T: ConvElem>(sh: &ConvShape, seed: u64) -> Data {
    let round = |v: Vec<f32>| to_f::<T>(&to_t::<T>(&v));
    Data {
        x: round(rand_vec(sh.x_len(), seed)),
        w: round(rand_vec(sh.w_len(), seed + 1)),
        dy: round(rand_vec(sh.y_len(), seed + 2)),
    }
}

/// |got - want| <= atol + rtol |want| elementwise: f32 tight, 16-bit scaled with the
/// reduction length `kg` (and the output rounding unless the output is f32).
fn check_close(what: &str, got: &[f32], want: &[f32], bits16: bool, f32_out: bool, kg: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    // 16-bit inputs are exact in f32, so an f32 output (wgrad) is held to f32's bound.
    let (atol, rtol) =
        if !bits16 || f32_out { (1e-5 * (kg as f32).sqrt(), 1e-5) } else { (2e-3 * (kg as f32).sqrt(), 8e-3) };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = atol + rtol * w.abs();
        // NaN (poison left unwritten) fails too.
        assert!(err <= tol, "{what}: element {i} is {g}, expected {w} (error {err} > tolerance {tol})");
    }
}

fn run_pass<T: ConvElem>(dev: &Device, pass: Pass, sh: &ConvShape, d: &Data, plan: Option<Plan>) -> Vec<f32> {
    let up = |v: &[f32]| dev.upload(to_t::<T>(v)).unwrap();
    match pass {
        Pass::Fprop => {
            let (x, w) = (up(&d.x), up(&d.w));
            let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
            conv::conv2d_fprop_with(dev, sh, &x, &w, &mut y, plan).unwrap();
            to_f(&y.to_vec().unwrap())
        }
        Pass::Dgrad => {
            let (dy, w) = (up(&d.dy), up(&d.w));
            let mut dx = dev.uninit::<T>(sh.x_len()).unwrap();
            conv::conv2d_dgrad_with(dev, sh, &dy, &w, &mut dx, plan).unwrap();
            to_f(&dx.to_vec().unwrap())
        }
        Pass::Wgrad => {
            let (x, dy) = (up(&d.x), up(&d.dy));
            let mut dw = dev.uninit::<f32>(sh.w_len()).unwrap();
            conv::conv2d_wgrad_with(dev, sh, &x, &dy, &mut dw, plan).unwrap();
            dw.to_vec().unwrap()
        }
    }
}

fn oracle(pass: Pass, sh: &ConvShape, d: &Data) -> Vec<f32> {
    match pass {
        Pass::Fprop => prunekit::cpu::conv::fprop_oracle(sh, &d.x, &d.w),
        Pass::Dgrad => prunekit::cpu::conv::dgrad_oracle(sh, &d.dy, &d.w),
        Pass::Wgrad => prunekit::cpu::conv::wgrad_oracle(sh, &d.x, &d.dy),
    }
}

/// Every pass of every odd shape on `dev` against the oracle.
fn check_passes<T: ConvElem>(dev: &Device) {
    for (i, sh) in odd_shapes().iter().enumerate() {
        let d = data::<T>(sh, 100 + i as u64);
        for pass in Pass::ALL {
            let got = run_pass::<T>(dev, pass, sh, &d, None);
            let what = format!("{} {} {} {sh:?}", dev.name(), T::NAME, pass.name());
            check_close(&what, &got, &oracle(pass, sh, &d), T::TENSOR_CORES, pass == Pass::Wgrad, pass.gemm(sh).2);
        }
    }
}

/// Every tile (and wgrad split) of `T` on the shapes each can run.
fn check_tiles<T: ConvElem>(dev: &Device) {
    let tiles: &[Tile] = if T::TENSOR_CORES {
        &[Tile::T128x128, Tile::T128x64, Tile::T64x64, Tile::T64x64Scalar]
    } else {
        &[Tile::T128x128, Tile::T64x64]
    };
    let shapes = [shape(1, 9, 11, 64, 16, 3, 2, 1), shape(2, 5, 7, 13, 27, 3, 1, 1)];
    for (i, sh) in shapes.iter().enumerate() {
        let d = data::<T>(sh, 300 + i as u64);
        for pass in Pass::ALL {
            let want = oracle(pass, sh, &d);
            for &tile in tiles {
                if T::TENSOR_CORES && tile.vector() && !conv::vector_ok(pass, sh) {
                    continue;
                }
                let splits: &[usize] = if pass == Pass::Wgrad { &[1, 3] } else { &[1] };
                for &splits in splits {
                    let got = run_pass::<T>(dev, pass, sh, &d, Some(Plan { tile, splits }));
                    let what = format!("{} {} {} {tile:?} x{splits} {sh:?}", dev.name(), T::NAME, pass.name());
                    check_close(&what, &got, &want, T::TENSOR_CORES, pass == Pass::Wgrad, pass.gemm(sh).2);
                }
            }
        }
    }
}

/// Shapes for the warpgroup-MMA tiles (C a multiple of 8; dgrad and wgrad also K): the
/// padded stem (C = 8, 7x7 stride 2, a GEMM-K of 392: six full k-tiles of 64 and a partial
/// one; K = 13: fprop only), GEMM-K shorter than one k-tile (8) and a long one (1800: 29
/// k-tiles through the 4-stage pipeline), widths over 128 with partial column tiles (136),
/// M of several row tiles with a partial last one, stride 2 and 5x5 stride 3 (dgrad's
/// phases, some without a tap row), padding, batch 1.
fn wgmma_shapes() -> Vec<ConvShape> {
    vec![
        shape(2, 9, 7, 8, 13, 7, 2, 3),
        shape(3, 11, 13, 72, 136, 1, 1, 0),
        shape(1, 12, 12, 200, 72, 3, 1, 1),
        shape(2, 9, 11, 8, 64, 1, 1, 0),
        shape(1, 9, 11, 64, 16, 3, 2, 1),
        shape(2, 9, 9, 16, 64, 1, 2, 0),
        shape(2, 10, 11, 8, 16, 5, 3, 2),
    ]
}

/// The warpgroup-MMA tiles `tiles`, every pass that runs the shape (wgrad with 1 and 3
/// splits), against the oracle.
fn check_wgmma_tiles<T: ConvElem>(dev: &Device, tiles: &[Tile]) {
    for (i, sh) in wgmma_shapes().iter().enumerate() {
        let d = data::<T>(sh, 1100 + i as u64);
        for pass in Pass::ALL {
            if !conv::vector_ok(pass, sh) {
                continue;
            }
            let want = oracle(pass, sh, &d);
            for &tile in tiles {
                let splits: &[usize] = if pass == Pass::Wgrad { &[1, 3] } else { &[1] };
                for &splits in splits {
                    let got = run_pass::<T>(dev, pass, sh, &d, Some(Plan { tile, splits }));
                    let what = format!("{} {} {} {tile:?} x{splits} {sh:?}", dev.name(), T::NAME, pass.name());
                    check_close(&what, &got, &want, true, pass == Pass::Wgrad, pass.gemm(sh).2);
                }
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// <dgrad(dy), x> = <dy, fprop(x)> and <wgrad(x, dy), w> = <dy, fprop(x; w)> on `dev`.
fn check_adjoint<T: ConvElem>(dev: &Device) {
    for (i, sh) in odd_shapes().iter().enumerate() {
        let d = data::<T>(sh, 500 + i as u64);
        let y = run_pass::<T>(dev, Pass::Fprop, sh, &d, None);
        let dx = run_pass::<T>(dev, Pass::Dgrad, sh, &d, None);
        let dw = run_pass::<T>(dev, Pass::Wgrad, sh, &d, None);
        let lhs = dot(&d.dy, &y);
        let scale = d.dy.iter().zip(&y).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>().max(1.0);
        let tol = if T::TENSOR_CORES { 1e-2 } else { 1e-5 } * scale;
        let (a, b) = (dot(&dx, &d.x), dot(&dw, &d.w));
        assert!(
            (a - lhs).abs() <= tol,
            "{} {}: <dgrad(dy), x> = {a} but <dy, fprop(x)> = {lhs} ({sh:?})",
            dev.name(),
            T::NAME
        );
        assert!(
            (b - lhs).abs() <= tol,
            "{} {}: <wgrad(x, dy), w> = {b} but <dy, fprop(x)> = {lhs} ({sh:?})",
            dev.name(),
            T::NAME
        );
    }
}

/// NCHW <-> NHWC and OIHW <-> KRSC against index arithmetic, and round trips.
fn check_layouts<T: ConvElem>(dev: &Device) {
    let (n, c, h, w) = (3, 5, 7, 37);
    let src: Vec<f32> = (0..n * c * h * w).map(|i| (i % 251) as f32).collect();
    let s = dev.upload(to_t::<T>(&src)).unwrap();
    let mut d = dev.uninit::<T>(src.len()).unwrap();
    conv::nchw_to_nhwc(dev, n, c, h, w, &s, &mut d).unwrap();
    let got = to_f(&d.to_vec().unwrap());
    for ni in 0..n {
        for ci in 0..c {
            for hi in 0..h {
                for wi in 0..w {
                    assert_eq!(got[((ni * h + hi) * w + wi) * c + ci], src[((ni * c + ci) * h + hi) * w + wi]);
                }
            }
        }
    }
    let mut back = dev.uninit::<T>(src.len()).unwrap();
    conv::nhwc_to_nchw(dev, n, c, h, w, &d, &mut back).unwrap();
    assert_eq!(to_f(&back.to_vec().unwrap()), src);
    // Weights: OIHW [K, C, R, S] -> KRSC.
    let (k, c, r, s_) = (33, 6, 3, 3);
    let wsrc: Vec<f32> = (0..k * c * r * s_).map(|i| (i % 241) as f32).collect();
    let ws = dev.upload(to_t::<T>(&wsrc)).unwrap();
    let mut wd = dev.uninit::<T>(wsrc.len()).unwrap();
    conv::oihw_to_krsc(dev, k, c, r, s_, &ws, &mut wd).unwrap();
    let got = to_f(&wd.to_vec().unwrap());
    for ki in 0..k {
        for ci in 0..c {
            for ri in 0..r {
                for si in 0..s_ {
                    assert_eq!(got[((ki * r + ri) * s_ + si) * c + ci], wsrc[((ki * c + ci) * r + ri) * s_ + si]);
                }
            }
        }
    }
    let mut wback = dev.uninit::<T>(wsrc.len()).unwrap();
    conv::krsc_to_oihw(dev, k, c, r, s_, &wd, &mut wback).unwrap();
    assert_eq!(to_f(&wback.to_vec().unwrap()), wsrc);
}

/// `got` is `src` (NCHW, n x c x hw) in NHWC with its channels padded with zeros to cp.
fn check_padded(
    got: &[f32],
    src: &[f32],
    (n, c, hw, cp): (usize, usize, usize, usize),
    round: impl Fn(f32) -> f32,
    what: &str,
) {
    assert_eq!(got.len(), n * hw * cp);
    for ni in 0..n {
        for p in 0..hw {
            for ci in 0..cp {
                let want = if ci < c { round(src[(ni * c + ci) * hw + p]) } else { 0.0 };
                let g = got[(ni * hw + p) * cp + ci];
                assert!(
                    g.to_bits() == want.to_bits(),
                    "{what} n{n} c{c} hw{hw} cp{cp} at ({ni},{p},{ci}): {g} vs {want}"
                );
            }
        }
    }
}

/// NCHW f32 -> NHWC in T with the channels padded (3 to 4, 8 and 16, 5 to 8, none), and
/// rows padded and cut (`pad_rows`), against index arithmetic: every element written (the
/// destinations start as NaN), the pad zeros, the rest the source rounded to T once. Odd
/// pixel counts, batch 1. Bad widths are errors.
fn check_padded_layouts<T: ConvElem>(dev: &Device) {
    let round = |v: f32| T::from_f32(v).to_f32();
    for (n, c, h, w, cp) in [(3, 3, 7, 37, 8), (1, 3, 5, 5, 4), (2, 3, 9, 11, 16), (2, 5, 3, 7, 8), (1, 3, 1, 1, 3)] {
        let src = rand_vec(n * c * h * w, (n * 131 + c * 17 + cp) as u64);
        let s = dev.upload(src.clone()).unwrap();
        let mut d = dev.upload(vec![T::from_f32(f32::NAN); n * h * w * cp]).unwrap();
        conv::nchw_to_nhwc_padded(dev, n, c, h, w, cp, &s, &mut d).unwrap();
        check_padded(&to_f(&d.to_vec().unwrap()), &src, (n, c, h * w, cp), round, &format!("{dev:?} {}", T::NAME));
    }
    // Rows of a KRSC weight padded (3 -> 8) and cut (8 -> 3).
    for (rows, c, cp) in [(7 * 7 * 5, 3, 8), (13, 8, 3), (4, 1, 16)] {
        let src = rand_vec(rows * c, (rows + c) as u64);
        let s = dev.upload(src.clone()).unwrap();
        let mut d = dev.upload(vec![T::from_f32(f32::NAN); rows * cp]).unwrap();
        conv::pad_rows(dev, rows, c, cp, &s, &mut d).unwrap();
        let got = to_f(&d.to_vec().unwrap());
        for r in 0..rows {
            for i in 0..cp {
                let want = if i < c { round(src[r * c + i]) } else { 0.0 };
                assert_eq!(
                    got[r * cp + i].to_bits(),
                    want.to_bits(),
                    "{dev:?} pad_rows {rows}x{c} -> {cp} at ({r},{i})"
                );
            }
        }
    }
    let s = dev.upload(vec![0.0f32; 2 * 3 * 4]).unwrap();
    let mut d = dev.upload(vec![T::from_f32(0.0); 2 * 4 * 17]).unwrap();
    assert!(conv::nchw_to_nhwc_padded(dev, 2, 3, 2, 2, 17, &s, &mut d).is_err(), "more than 16 per row");
    assert!(conv::nchw_to_nhwc_padded(dev, 2, 3, 2, 2, 2, &s, &mut d).is_err(), "a cut input");
    assert!(conv::nchw_to_nhwc_padded(dev, 2, 3, 2, 2, 8, &s, &mut d).is_err(), "a destination of the wrong size");
    assert!(conv::pad_rows(dev, 8, 3, 0, &s, &mut d).is_err(), "empty rows");
}

fn emu(schedule: Schedule) -> Device {
    Device::Gpu(Gpu::emu_with(schedule))
}

#[test]
fn emu_f32_matches_oracle_forward_and_reverse() {
    for dev in [emu(Schedule::Forward), emu(Schedule::Reverse)] {
        check_passes::<f32>(&dev);
    }
}

#[test]
fn emu_bf16_matches_oracle_forward_and_reverse() {
    for dev in [emu(Schedule::Forward), emu(Schedule::Reverse)] {
        check_passes::<bf16>(&dev);
    }
}

#[test]
fn emu_every_tile_and_split() {
    let dev = emu(Schedule::Forward);
    check_tiles::<f32>(&dev);
    check_tiles::<bf16>(&dev);
    check_tiles::<half::f16>(&emu(Schedule::Reverse));
}

#[test]
fn emu_warpgroup_mma_tiles() {
    check_wgmma_tiles::<bf16>(&emu(Schedule::Forward), &Tile::WARPGROUP);
    check_wgmma_tiles::<half::f16>(&emu(Schedule::Reverse), &Tile::WARPGROUP);
    // The producer and the MMA warpgroups of the warp-specialized tiles in a shuffled order.
    check_wgmma_tiles::<bf16>(&emu(Schedule::Shuffle(11)), &[Tile::Ws128x128, Tile::Ws128x64]);
}

/// The warp-specialized kernels hand a stage back to the producer only once the MMAs that
/// read it are done: a build that hands it back as soon as they are issued (a planted bug)
/// lets the producer copy into a tile the MMAs still read, which the emulation reports.
#[test]
fn a_stage_released_while_its_mmas_run_is_caught() {
    let sh = shape(1, 12, 12, 200, 72, 3, 1, 1); // 29 k-tiles: the ring goes round 5 times
    let d = data::<bf16>(&sh, 3);
    for schedule in [Schedule::Forward, Schedule::Reverse] {
        let dev = Device::Gpu(Gpu::emu_with_fault(schedule, "conv_fault_ws_early_release").unwrap());
        let up = |v: &[f32]| dev.upload(to_t::<bf16>(v)).unwrap();
        let (x, w) = (up(&d.x), up(&d.w));
        let mut y = dev.uninit::<bf16>(sh.y_len()).unwrap();
        for tile in [Tile::Ws128x128, Tile::Ws128x64] {
            let plan = Some(Plan { tile, splits: 1 });
            let err = conv::conv2d_fprop_with(&dev, &sh, &x, &w, &mut y, plan).unwrap_err().to_string();
            assert!(err.contains("a wgmma.mma_async in flight reads"), "{schedule:?} {tile:?}: {err}");
        }
    }
}

#[test]
fn wgmma_tiles_are_16_bit_with_channels_in_eights() {
    let dev = emu(Schedule::Forward);
    let plan = Some(Plan { tile: Tile::W128x128, splits: 1 });
    let sh = shape(1, 6, 5, 16, 16, 3, 1, 1);
    let d = data::<f32>(&sh, 1);
    let (x, w) = (dev.upload(d.x.clone()).unwrap(), dev.upload(d.w.clone()).unwrap());
    let mut y = dev.uninit::<f32>(sh.y_len()).unwrap();
    assert!(conv::conv2d_fprop_with(&dev, &sh, &x, &w, &mut y, plan).is_err(), "f32");
    // K = 12: dgrad has no 16-byte loads of dy (fprop would, C = 16).
    let odd = shape(1, 6, 5, 16, 12, 3, 1, 1);
    let d = data::<bf16>(&odd, 2);
    let up = |v: &[f32]| dev.upload(to_t::<bf16>(v)).unwrap();
    let mut dx = dev.uninit::<bf16>(odd.x_len()).unwrap();
    assert!(conv::conv2d_dgrad_with(&dev, &odd, &up(&d.dy), &up(&d.w), &mut dx, plan).is_err(), "K = 12");
}

#[test]
fn emu_adjoint_identities() {
    let dev = emu(Schedule::Reverse);
    check_adjoint::<f32>(&dev);
    check_adjoint::<bf16>(&dev);
}

#[test]
fn cpu_fast_path_matches_oracle() {
    check_passes::<f32>(&Device::Cpu);
    check_passes::<bf16>(&Device::Cpu);
    check_adjoint::<f32>(&Device::Cpu);
    // Larger shapes that take the parallel and blocked branches of the fast path.
    for (i, sh) in
        [shape(5, 14, 13, 32, 24, 3, 1, 1), shape(1, 30, 30, 16, 8, 3, 2, 1), shape(9, 8, 8, 40, 24, 1, 1, 0)]
            .iter()
            .enumerate()
    {
        let d = data::<f32>(sh, 700 + i as u64);
        for pass in Pass::ALL {
            let got = run_pass::<f32>(&Device::Cpu, pass, sh, &d, None);
            let what = format!("cpu {} {sh:?}", pass.name());
            check_close(&what, &got, &oracle(pass, sh, &d), false, true, pass.gemm(sh).2);
        }
    }
}

/// The fast path's thin GEMMs (few output rows: small images, small batches) and filter
/// taps that only ever read padding, against the oracle: N P Q from 1 up, odd C and K,
/// stride 2, batch 1, and more rows than one block of the blocked dgrad.
#[test]
fn cpu_fast_path_thin_shapes_and_dead_taps() {
    let shapes = [
        shape(1, 1, 1, 37, 61, 1, 1, 0),    // one row: a GEMV
        shape(1, 1, 1, 300, 33, 3, 1, 1),   // 3x3 on a 1x1 image: only the centre tap is live
        shape(7, 1, 1, 45, 129, 3, 1, 1),   // the same, 7 rows
        shape(3, 2, 2, 131, 67, 3, 2, 1),   // 3x3 stride 2 on 2x2: 2x2 live taps, 1x1 output
        shape(5, 2, 2, 19, 23, 3, 1, 1),    // 3x3 stride 1 on 2x2: every tap live, 4 rows per image
        shape(5, 3, 3, 19, 23, 1, 2, 0),    // 1x1 stride 2 on 3x3 (a thin downsample)
        shape(1, 2, 2, 513, 1029, 1, 2, 0), // 1x1 stride 2, batch 1, one output row, wide
        shape(64, 1, 1, 515, 257, 1, 1, 0), // layer4's thin 1x1: 64 rows, odd widths
        shape(2, 3, 1, 9, 11, 3, 2, 1),     // live rows differ from live columns
        shape(2, 1, 1, 5, 7, 1, 2, 1),      // every output reads padding only: zeros
        shape(9, 8, 8, 1000, 8, 3, 1, 1),   // dgrad over two blocks of images
    ];
    for (i, sh) in shapes.iter().enumerate() {
        let d = data::<f32>(sh, 900 + i as u64);
        for pass in Pass::ALL {
            let got = run_pass::<f32>(&Device::Cpu, pass, sh, &d, None);
            let what = format!("cpu {} {sh:?}", pass.name());
            check_close(&what, &got, &oracle(pass, sh, &d), false, true, pass.gemm(sh).2);
        }
    }
}

#[test]
fn layouts_on_every_device() {
    for dev in [Device::Cpu, emu(Schedule::Forward), emu(Schedule::Reverse)] {
        check_layouts::<f32>(&dev);
        check_layouts::<bf16>(&dev);
    }
}

/// The padded conversion into a destination that starts off a 16-byte boundary (memory
/// borrowed at an odd element): the kernel stores element by element there.
fn check_padded_unaligned<T: ConvElem>() {
    let gpu = Gpu::emu_with(Schedule::Reverse);
    let dev = Device::Gpu(gpu.clone());
    let (n, c, h, w, cp) = (2, 3, 5, 7, 8);
    let src = rand_vec(n * c * h * w, 5);
    let s = dev.upload(src.clone()).unwrap();
    let len = n * h * w * cp;
    let mut host = vec![T::from_f32(f32::NAN); len + 1];
    // SAFETY: host memory (the emulation's device memory) that outlives the buffer.
    let mut d =
        Buf::Gpu(unsafe { gpu.borrow::<T>(host.as_mut_ptr() as u64 + std::mem::size_of::<T>() as u64, len) }.unwrap());
    conv::nchw_to_nhwc_padded(&dev, n, c, h, w, cp, &s, &mut d).unwrap();
    drop(d);
    assert!(host[0].to_f32().is_nan(), "nothing written before the buffer");
    let got = to_f(&host[1..]);
    check_padded(&got, &src, (n, c, h * w, cp), |v| T::from_f32(v).to_f32(), &format!("unaligned {}", T::NAME));
}

#[test]
fn padded_layouts_on_every_device() {
    check_padded_unaligned::<f32>();
    check_padded_unaligned::<bf16>();
    for dev in [Device::Cpu, emu(Schedule::Forward), emu(Schedule::Reverse)] {
        check_padded_layouts::<f32>(&dev);
        check_padded_layouts::<bf16>(&dev);
        check_padded_layouts::<half::f16>(&dev);
    }
}

/// conv2d_dgrad_accumulate adds dgrad's result to what dx holds, then with a ReLU's output
/// zeroes the sums where it is not positive: in f32 bitwise the plain dgrad's output added
/// on the host (the same f32 sum, rounded once) and masked; in 16-bit types against the
/// oracle plus the old values, masked. On every tile that runs the shape; the mask has
/// zeros, negative values and positive ones, and is given as the ReLU's output and as its
/// bits (the same results, bitwise).
fn check_dgrad_accumulate<T: ConvElem>(dev: &Device) {
    let tiles: Vec<Option<Plan>> = if matches!(dev, Device::Cpu) {
        vec![None]
    } else if T::TENSOR_CORES {
        let mut t = vec![Tile::T128x128, Tile::T128x64, Tile::T64x64, Tile::T64x64Scalar];
        if matches!(dev, Device::Gpu(g) if g.has_wgmma()) {
            t.extend(Tile::WARPGROUP);
        }
        t.into_iter().map(|tile| Some(Plan { tile, splits: 1 })).collect()
    } else {
        [Tile::T128x128, Tile::T64x64].map(|tile| Some(Plan { tile, splits: 1 })).into()
    };
    for (i, sh) in odd_shapes().iter().enumerate() {
        let d = data::<T>(sh, 700 + i as u64);
        let old = to_f::<T>(&to_t::<T>(&rand_vec(sh.x_len(), 800 + i as u64)));
        // A ReLU's output in shape only: every third value 0, the rest of either sign.
        let relu: Vec<f32> = rand_vec(sh.x_len(), 900 + i as u64)
            .iter()
            .enumerate()
            .map(|(j, &v)| if j % 3 == 0 { 0.0 } else { v })
            .collect();
        let relu_dev = dev.upload(to_t::<T>(&relu)).unwrap();
        let mut bits = vec![0u8; layers::relu_bits_len(sh.x_len())];
        for (j, v) in to_f::<T>(&to_t::<T>(&relu)).iter().enumerate() {
            bits[j / 8] |= ((*v > 0.0) as u8) << (j % 8);
        }
        let bits_dev = dev.upload(bits).unwrap();
        let (dy, w) = (dev.upload(to_t::<T>(&d.dy)).unwrap(), dev.upload(to_t::<T>(&d.w)).unwrap());
        let mut by_output = Vec::new();
        for (&plan, mask_kind) in tiles.iter().flat_map(|p| [(p, 0), (p, 1), (p, 2)]) {
            let masked = mask_kind > 0;
            let keep = |j: usize| !masked || relu[j] > 0.0;
            let want: Vec<f32> = oracle(Pass::Dgrad, sh, &d)
                .iter()
                .zip(&old)
                .enumerate()
                .map(|(j, (r, o))| if keep(j) { r + o } else { 0.0 })
                .collect();
            if let Some(p) = plan {
                if T::TENSOR_CORES && p.tile.vector() && !conv::vector_ok(Pass::Dgrad, sh) {
                    continue;
                }
            }
            let what = format!("{} {} dgrad accumulate mask {mask_kind} {plan:?} {sh:?}", dev.name(), T::NAME);
            let mut dx = dev.upload(to_t::<T>(&old)).unwrap();
            let mask = match mask_kind {
                0 => None,
                1 => Some(conv::ReluMask::Output(&relu_dev)),
                _ => Some(conv::ReluMask::Bits(&bits_dev)),
            };
            conv::conv2d_dgrad_accumulate_with(dev, sh, &dy, &w, mask, &mut dx, plan).unwrap();
            let got = to_f(&dx.to_vec().unwrap());
            // The bits give the output's results, bitwise.
            match mask_kind {
                1 => by_output = got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                2 => assert!(got.iter().map(|v| v.to_bits()).eq(by_output.iter().copied()), "{what}: bits vs output"),
                _ => {}
            }
            if T::NAME == "f32" {
                let plain = run_pass::<T>(dev, Pass::Dgrad, sh, &d, plan);
                let sum =
                    plain.iter().zip(&old).enumerate().map(|(j, (r, o))| if keep(j) { (o + r).to_bits() } else { 0 });
                assert!(got.iter().map(|v| v.to_bits()).eq(sum), "{what}: not dgrad + old (masked), bitwise");
            } else if masked {
                assert!(
                    got.iter().enumerate().all(|(j, v)| keep(j) || v.to_bits() == 0),
                    "{what}: masked values not +0"
                );
            }
            check_close(&what, &got, &want, T::TENSOR_CORES, false, Pass::Dgrad.gemm(sh).2);
        }
    }
}

#[test]
fn dgrad_accumulate_adds_to_the_output() {
    for dev in common::emu_devices().iter().chain([&Device::Cpu]) {
        check_dgrad_accumulate::<f32>(dev);
        check_dgrad_accumulate::<bf16>(dev);
    }
    let dev = emu(Schedule::Forward);
    let sh = shape(1, 5, 5, 8, 8, 3, 1, 1);
    let (dy, w) = (dev.upload(vec![1.0f32; sh.y_len()]).unwrap(), dev.upload(vec![1.0f32; sh.w_len()]).unwrap());
    let mut short = dev.upload(vec![0.0f32; sh.x_len() - 1]).unwrap();
    assert!(conv::conv2d_dgrad_accumulate(&dev, &sh, &dy, &w, None, &mut short).is_err());
    let mut dx = dev.upload(vec![0.0f32; sh.x_len()]).unwrap();
    let short_mask = dev.upload(vec![1.0f32; sh.x_len() - 1]).unwrap();
    let out = |m| Some(conv::ReluMask::Output(m));
    assert!(conv::conv2d_dgrad_accumulate(&dev, &sh, &dy, &w, out(&short_mask), &mut dx).is_err());
    let host_mask = Buf::Host(vec![1.0f32; sh.x_len()]);
    assert!(conv::conv2d_dgrad_accumulate(&dev, &sh, &dy, &w, out(&host_mask), &mut dx).is_err());
    // Bits: one per element, in whole 32-bit words (200 elements: 28 bytes).
    let bits = |n: usize| dev.upload(vec![0xFFu8; n]).unwrap();
    let e = conv::conv2d_dgrad_accumulate(&dev, &sh, &dy, &w, Some(conv::ReluMask::Bits(&bits(25))), &mut dx);
    assert!(e.unwrap_err().to_string().contains("bits"));
    conv::conv2d_dgrad_accumulate(&dev, &sh, &dy, &w, Some(conv::ReluMask::Bits(&bits(28))), &mut dx).unwrap();
}

#[test]
fn bad_inputs_are_errors() {
    let sh = shape(1, 5, 5, 8, 16, 3, 1, 1);
    for dev in [Device::Cpu, emu(Schedule::Forward)] {
        let x = dev.zeros::<f32>(sh.x_len()).unwrap();
        let w = dev.zeros::<f32>(sh.w_len()).unwrap();
        let mut y = dev.zeros::<f32>(sh.y_len()).unwrap();
        let mut dw = dev.zeros::<f32>(sh.w_len()).unwrap();
        // Wrong lengths.
        let short = dev.zeros::<f32>(sh.x_len() - 1).unwrap();
        let e = conv::conv2d_fprop(&dev, &sh, &short, &w, &mut y).unwrap_err();
        assert!(e.to_string().contains("elements"), "{e}");
        let mut short_y = dev.zeros::<f32>(sh.y_len() + 1).unwrap();
        assert!(conv::conv2d_fprop(&dev, &sh, &x, &w, &mut short_y).is_err());
        assert!(conv::conv2d_dgrad(&dev, &sh, &x, &w, &mut y).is_err()); // dy has y's length, not x's
        let mut short_dw = dev.zeros::<f32>(sh.w_len() - 1).unwrap();
        assert!(conv::conv2d_wgrad(&dev, &sh, &x, &y, &mut short_dw).is_err());
        // Zero sizes, zero stride, empty output, overflow.
        for bad in [
            ConvShape { n: 0, ..sh },
            ConvShape { c: 0, ..sh },
            ConvShape { stride: 0, ..sh },
            ConvShape { r: 9, s: 9, pad: 0, ..sh },
            ConvShape { n: usize::MAX / 2, ..sh },
        ] {
            let e = conv::conv2d_fprop(&dev, &bad, &x, &w, &mut y).unwrap_err();
            assert!(!e.to_string().is_empty());
            assert!(conv::conv2d_wgrad(&dev, &bad, &x, &y, &mut dw).is_err());
        }
        // Layouts with wrong lengths.
        let mut d = dev.zeros::<f32>(10).unwrap();
        assert!(conv::nchw_to_nhwc(&dev, 1, 2, 2, 2, &x, &mut d).is_err());
    }
    // Buffers on another device: host buffers on emu, emu buffers on the CPU, and buffers
    // of another emulated device.
    let (a, b) = (emu(Schedule::Forward), emu(Schedule::Forward));
    let hx = Device::Cpu.zeros::<f32>(sh.x_len()).unwrap();
    let (ax, aw) = (a.zeros::<f32>(sh.x_len()).unwrap(), a.zeros::<f32>(sh.w_len()).unwrap());
    let mut ay = a.zeros::<f32>(sh.y_len()).unwrap();
    let mut hy = Device::Cpu.zeros::<f32>(sh.y_len()).unwrap();
    let e = conv::conv2d_fprop(&a, &sh, &hx, &aw, &mut ay).unwrap_err();
    assert!(e.to_string().contains("not on the device"), "{e}");
    assert!(conv::conv2d_fprop(&Device::Cpu, &sh, &ax, &aw, &mut hy).is_err());
    assert!(conv::conv2d_fprop(&b, &sh, &ax, &aw, &mut ay).is_err());
    let mut by = b.zeros::<f32>(sh.y_len()).unwrap();
    assert!(conv::conv2d_fprop(&a, &sh, &ax, &aw, &mut by).is_err());
    // A vector tile forced on widths that are not multiples of 8; a split fprop; no f32 128x64.
    let odd = shape(1, 5, 5, 5, 8, 3, 1, 1);
    let (ox, ow) = (a.zeros::<bf16>(odd.x_len()).unwrap(), a.zeros::<bf16>(odd.w_len()).unwrap());
    let mut oy = a.zeros::<bf16>(odd.y_len()).unwrap();
    let plan = Plan { tile: Tile::T64x64, splits: 1 };
    assert!(conv::conv2d_fprop_with(&a, &odd, &ox, &ow, &mut oy, Some(plan)).is_err());
    let plan = Plan { tile: Tile::T64x64Scalar, splits: 2 };
    assert!(conv::conv2d_fprop_with(&a, &odd, &ox, &ow, &mut oy, Some(plan)).is_err());
    let plan = Plan { tile: Tile::T128x64, splits: 1 };
    assert!(conv::conv2d_fprop_with(&a, &sh, &ax, &aw, &mut ay, Some(plan)).is_err());
}

#[test]
fn shape_arithmetic() {
    let sh = shape(2, 224, 224, 3, 64, 7, 2, 3);
    assert_eq!((sh.p(), sh.q()), (112, 112));
    assert_eq!(sh.y_len(), 2 * 112 * 112 * 64);
    assert_eq!(sh.flops(), 2.0 * 2.0 * 112.0 * 112.0 * 64.0 * 3.0 * 49.0);
    assert!(sh.validate().is_ok());
    let odd = shape(1, 9, 7, 8, 8, 3, 2, 1);
    assert_eq!((odd.p(), odd.q()), (5, 4));
    assert!(ConvShape { h: 1, pad: 0, ..odd }.validate().is_err());
    let _ = Buf::<f32>::Host(vec![]);
}

#[test]
fn conv_bench_shapes_widths_and_rows() {
    use prunekit::measure::conv::{distinct_convs, resnet50_convs, run, BenchOpts, DType};
    // ResNet50 has 53 convolutions; the dense ones at 224 have these distinct shapes.
    let all = resnet50_convs(2, 224, 0.0, 8).unwrap();
    let all_at = |n: usize| resnet50_convs(n, 224, 0.0, 8).unwrap();
    assert_eq!(all.len(), 53);
    let dense = distinct_convs(2, 224, 0.0, 8).unwrap();
    let find = |v: &[(String, ConvShape)], name: &str| v.iter().find(|(n, _)| n == name).map(|x| x.1);
    assert_eq!(find(&dense, "conv1"), Some(shape(2, 224, 224, 3, 64, 7, 2, 3)));
    assert_eq!(find(&dense, "layer2.0.conv2"), Some(shape(2, 56, 56, 128, 128, 3, 2, 1)));
    assert_eq!(find(&dense, "layer4.0.downsample.0"), Some(shape(2, 14, 14, 1024, 2048, 1, 2, 0)));
    assert_eq!(find(&dense, "layer4.2.conv3"), None, "repeated shapes appear once, under their first name");
    // Filters mode at 0.7 with round_to 8: conv1/conv2 widths ceil(0.3 * w) rounded to 8;
    // conv3 keeps its output, downsample and stem keep everything.
    let pruned = resnet50_convs(1, 224, 0.7, 8).unwrap();
    let p = |name: &str| find(&pruned, name).unwrap();
    assert_eq!((p("layer1.0.conv1").c, p("layer1.0.conv1").k), (64, 24)); // ceil(19.2) = 20 -> 24
    assert_eq!((p("layer1.0.conv2").c, p("layer1.0.conv2").k), (24, 24));
    assert_eq!((p("layer1.0.conv3").c, p("layer1.0.conv3").k), (24, 256));
    assert_eq!((p("layer3.2.conv2").c, p("layer3.2.conv2").k), (80, 80)); // ceil(76.8) = 77 -> 80
    assert_eq!(p("layer2.0.downsample.0").k, 512);
    assert_eq!(p("conv1").k, 64);
    // Channels mode at 0.5: the stem and the residual stream keep half too, so every input
    // after the stem is a kept stream width.
    use prunekit::measure::conv::resnet50_convs_mode;
    use prunekit::prune::Mode;
    let ch = resnet50_convs_mode(1, 224, Mode::Channels, 0.5, 8).unwrap();
    let c = |name: &str| find(&ch, name).unwrap();
    assert_eq!(ch.len(), 53);
    assert_eq!(c("conv1").k, 32);
    assert_eq!((c("layer1.0.conv1").c, c("layer1.0.conv1").k), (32, 32));
    assert_eq!((c("layer1.0.conv3").c, c("layer1.0.conv3").k), (32, 128));
    assert_eq!((c("layer1.0.downsample.0").c, c("layer1.0.downsample.0").k), (32, 128));
    assert_eq!((c("layer2.0.conv1").c, c("layer2.0.conv1").k), (128, 64));
    assert_eq!((c("layer4.2.conv3").c, c("layer4.2.conv3").k), (256, 1024));
    assert_eq!(resnet50_convs_mode(1, 224, Mode::Channels, 0.0, 8).unwrap(), all_at(1));
    // Rows on the CPU, with exactly the documented fields (plus the cuDNN pair on cuda).
    let opts = BenchOpts {
        batch: 1,
        size: 32,
        sparsities: vec![0.0, 0.5],
        mode: prunekit::prune::Mode::Filters,
        round_to: 8,
        passes: vec![Pass::Fprop, Pass::Wgrad],
        dtype: DType::F32,
        iters: Some(1),
    };
    let mut seen = 0;
    let (rows, note) = run(&Device::Cpu, &opts, |_| seen += 1).unwrap();
    assert!(note.is_none());
    assert_eq!(rows.len(), seen);
    assert_eq!(
        rows.len(),
        2 * (distinct_convs(1, 32, 0.0, 8).unwrap().len() + distinct_convs(1, 32, 0.5, 8).unwrap().len())
    );
    for r in &rows {
        assert!(r.ms > 0.0 && r.tflops > 0.0 && r.cudnn_ms.is_none());
    }
    let keys = |v: serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let mut want = [
        "layer", "n", "c", "h", "w", "k", "r", "s", "stride", "pad", "pass", "dtype", "sparsity", "mode", "ms",
        "tflops",
    ]
    .map(String::from)
    .to_vec();
    want.sort();
    assert_eq!(keys(rows[0].to_json(false)), want);
    let j = rows[0].to_json(true);
    assert!(j["cudnn_ms"].is_null() && j["vs_cudnn"].is_null());
    assert_eq!(keys(j).len(), 18);
    // Bad settings are errors.
    for bad in [
        BenchOpts { batch: 0, ..opts.clone() },
        BenchOpts { sparsities: vec![1.0], ..opts.clone() },
        BenchOpts { passes: vec![], ..opts.clone() },
        BenchOpts { iters: Some(0), ..opts.clone() },
    ] {
        assert!(run(&Device::Cpu, &bad, |_| ()).is_err());
    }
}

mod cuda {
    use super::*;
    const WHY: &str = "needs a CUDA GPU: run with --include-ignored on a GPU machine";
    fn dev() -> Device {
        Device::Gpu(Gpu::cuda(0).unwrap_or_else(|e| panic!("{WHY}: {e}")))
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_f32_matches_oracle() {
        check_passes::<f32>(&dev());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_bf16_matches_oracle() {
        check_passes::<bf16>(&dev());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_dgrad_accumulate() {
        check_dgrad_accumulate::<f32>(&dev());
        check_dgrad_accumulate::<bf16>(&dev());
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_every_tile_and_split() {
        let d = dev();
        check_tiles::<f32>(&d);
        check_tiles::<bf16>(&d);
        check_tiles::<half::f16>(&d);
    }
    #[test]
    #[ignore = "needs a CUDA GPU of compute capability 9.0"]
    fn cuda_warpgroup_mma_tiles() {
        let d = dev();
        check_wgmma_tiles::<bf16>(&d, &Tile::WARPGROUP);
        check_wgmma_tiles::<half::f16>(&d, &Tile::WARPGROUP);
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_padded_layouts() {
        let d = dev();
        check_padded_layouts::<f32>(&d);
        check_padded_layouts::<bf16>(&d);
        check_padded_layouts::<half::f16>(&d);
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_adjoint_identities() {
        let d = dev();
        check_adjoint::<f32>(&d);
        check_adjoint::<bf16>(&d);
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_conv_bench_against_cudnn() {
        use prunekit::measure::conv::{run, BenchOpts, DType};
        let opts = BenchOpts {
            batch: 2,
            size: 64,
            sparsities: vec![0.0, 0.5],
            mode: prunekit::prune::Mode::Filters,
            round_to: 8,
            passes: Pass::ALL.to_vec(),
            dtype: DType::Bf16,
            iters: Some(3),
        };
        let (rows, note) = run(&dev(), &opts, |_| ()).unwrap();
        assert!(!rows.is_empty());
        for r in &rows {
            assert!(r.ms > 0.0);
            // Either cuDNN was found and timed every row, or a note says why not.
            assert_eq!(r.cudnn_ms.is_some(), note.is_none(), "{r:?} {note:?}");
            assert_eq!(r.vs_cudnn.is_some(), note.is_none());
        }
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_layouts() {
        let d = dev();
        check_layouts::<f32>(&d);
        check_layouts::<bf16>(&d);
    }
}

/// Memory another owner allocated (what DLPack hands over), borrowed as device buffers:
/// the three passes read and write it like their own buffers, and dropping the borrowed
/// buffers leaves it alone.
#[test]
fn borrowed_memory_runs_every_pass() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let dev = Device::Gpu(gpu.clone());
    let sh = shape(2, 9, 7, 5, 13, 3, 2, 1); // odd sizes, stride 2
    let d = data::<f32>(&sh, 7);
    let (mut x, mut w, mut dy) = (d.x.clone(), d.w.clone(), d.dy.clone());
    let (mut y, mut dx, mut dw) = (vec![f32::NAN; sh.y_len()], vec![f32::NAN; sh.x_len()], vec![f32::NAN; sh.w_len()]);
    let borrow = |v: &mut Vec<f32>| -> Buf<f32> {
        // SAFETY: host memory (the emulation's device memory) that outlives the buffer.
        Buf::Gpu(unsafe { gpu.borrow::<f32>(v.as_mut_ptr() as u64, v.len()) }.unwrap())
    };
    let (bx, bw, bdy) = (borrow(&mut x), borrow(&mut w), borrow(&mut dy));
    let (mut by, mut bdx, mut bdw) = (borrow(&mut y), borrow(&mut dx), borrow(&mut dw));
    conv::conv2d_fprop_with(&dev, &sh, &bx, &bw, &mut by, None).unwrap();
    conv::conv2d_dgrad_with(&dev, &sh, &bdy, &bw, &mut bdx, None).unwrap();
    conv::conv2d_wgrad_with(&dev, &sh, &bx, &bdy, &mut bdw, None).unwrap();
    drop((bx, bw, bdy, by, bdx, bdw));
    for (pass, got) in [(Pass::Fprop, &y), (Pass::Dgrad, &dx), (Pass::Wgrad, &dw)] {
        check_close(&format!("{pass:?}"), got, &oracle(pass, &sh, &d), false, true, sh.c * sh.r * sh.s);
    }
    assert_eq!(gpu.stream_handle(), None, "the emulation has no stream to order against");
    gpu.order_before(0).unwrap();
    // A misaligned address is refused.
    assert!(unsafe { gpu.borrow::<f32>(x.as_ptr() as u64 + 2, 4) }.is_err());
}
