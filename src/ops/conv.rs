//! Convolution (kernels/conv.cu) behind one API for the CPU and kernel devices: the three
//! passes of an implicit-GEMM convolution (fprop, dgrad, wgrad) with activations NHWC and
//! weights KRSC, and the layout conversions NCHW <-> NHWC and OIHW <-> KRSC.
//!
//! On a kernel device the wrappers pick a tile configuration per shape ([`plan`]), never
//! allocate device memory (wgrad's split-K adds into `dw` after zeroing it), and upload
//! nothing but the launch's parameter struct. On the CPU they run the fast path of
//! `crate::cpu::conv` (bf16 and f16: converted to f32, computed, rounded).

use super::params::{ConvParams, FastDiv, TransposePadParams, TransposeParams, PAD_MAX};
use super::profile::{timed, u, Cost, Family, F32};
use super::{check_len, check_on, i32_of, on_gpu};
use crate::cpu::conv as cpu;
use crate::device::{Buf, Device};
use crate::gpu::{Elem, Gpu, Kernel, LaunchConfig};
use crate::shape::{ConvShape, Pass};
use crate::{ensure, invalid, Result};
use half::{bf16, f16};

const MODULE: &str = "conv";

/// Streaming multiprocessors the tile heuristics aim to fill (an H100 SXM has 132).
pub const TARGET_SMS: usize = 132;

/// A tile configuration of the kernels (see the top of kernels/conv.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// 128x128 (tensor cores: 8 warps, 16-byte loads; f32: 256 threads).
    T128x128,
    /// 128x64 (tensor cores only: 4 warps, 16-byte loads).
    T128x64,
    /// 64x64 (tensor cores: 4 warps, 16-byte loads; f32: 64 threads).
    T64x64,
    /// 64x64 with element loads: any width (tensor cores only; f32 always loads elements).
    T64x64Scalar,
    /// 128x128 on the warpgroup MMA (sm_90a): 16-bit types, 2 warpgroups, BK = 64, 16-byte
    /// loads.
    W128x128,
    /// 128x64 on the warpgroup MMA (sm_90a), as [`Tile::W128x128`].
    W128x64,
    /// [`Tile::W128x128`] warp-specialized: a third warpgroup loads, the stages handed over
    /// on mbarriers.
    Ws128x128,
    /// [`Tile::W128x64`] warp-specialized, as [`Tile::Ws128x128`].
    Ws128x64,
}

impl Tile {
    /// The warpgroup-MMA tiles (sm_90a): multistage, then warp-specialized.
    pub const WARPGROUP: [Tile; 4] = [Tile::W128x128, Tile::W128x64, Tile::Ws128x128, Tile::Ws128x64];
    /// (BM, BN, BK) of the tile for elements of `T`.
    pub fn dims<T: ConvElem>(self) -> (usize, usize, usize) {
        let bk = if T::TENSOR_CORES { 32 } else { 8 };
        match self {
            Tile::T128x128 => (128, 128, bk),
            Tile::T128x64 => (128, 64, bk),
            Tile::T64x64 | Tile::T64x64Scalar => (64, 64, bk),
            Tile::W128x128 | Tile::Ws128x128 => (128, 128, 64),
            Tile::W128x64 | Tile::Ws128x64 => (128, 64, 64),
        }
    }
    /// Runs on the warpgroup MMA (needs [`Gpu::has_wgmma`]).
    pub fn wgmma(self) -> bool {
        matches!(self, Tile::W128x128 | Tile::W128x64 | Tile::Ws128x128 | Tile::Ws128x64)
    }
    /// The warp-specialized warpgroup tiles (a producer warpgroup on mbarriers).
    pub fn warp_specialized(self) -> bool {
        matches!(self, Tile::Ws128x128 | Tile::Ws128x64)
    }
    /// Needs channel counts that are multiples of 8 (16-byte loads).
    pub fn vector(self) -> bool {
        !matches!(self, Tile::T64x64Scalar)
    }
    /// The tile's part of the entry-point names, e.g. "t128x128".
    pub fn tag(self) -> &'static str {
        match self {
            Tile::T128x128 => "t128x128",
            Tile::T128x64 => "t128x64",
            Tile::T64x64 => "t64x64",
            Tile::T64x64Scalar => "t64x64s",
            Tile::W128x128 => "w128x128",
            Tile::W128x64 => "w128x64",
            Tile::Ws128x128 => "ws128x128",
            Tile::Ws128x64 => "ws128x64",
        }
    }
}

/// How one pass runs on a kernel device: the tile and the number of splits of the GEMM-K
/// dimension (wgrad only; more than one adds partial sums into `dw` with atomics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The tile configuration.
    pub tile: Tile,
    /// Splits of the reduction (1 = none).
    pub splits: usize,
}

/// Element types the convolution kernels take: f32 (SIMT, exact), bf16 and f16 (tensor
/// cores, f32 accumulation).
pub trait ConvElem: Elem {
    /// Runs on tensor cores (16-bit inputs).
    const TENSOR_CORES: bool;
    /// The batched transpose of this element size.
    const TRANSPOSE: Kernel;
    /// The batched transpose from f32 into this type, rows padded or cut.
    const TRANSPOSE_PAD: Kernel;
    /// The entry point of `pass` with `tile`, if there is one.
    fn kernel(pass: Pass, tile: Tile) -> Option<Kernel>;
    /// The `bnin` entry point of `pass` with `tile` (fprop and wgrad: the BN of the layer
    /// before applied to x as it is loaded), if there is one.
    fn kernel_bnin(pass: Pass, tile: Tile) -> Option<Kernel>;
    /// Widened to f32.
    fn to_f32(self) -> f32;
    /// Rounded from f32 (to nearest even).
    fn from_f32(v: f32) -> Self;
}

macro_rules! kernel_table {
    ($pass:ident, $tile:ident, $dt:literal, [$(($p:ident, $ps:literal, $t:ident, $ts:literal)),* $(,)?]) => {
        match ($pass, $tile) {
            $((Pass::$p, Tile::$t) => Some(Kernel::new(MODULE, concat!("conv2d_", $ps, "_", $ts, "_", $dt))),)*
            #[allow(unreachable_patterns)]
            _ => None,
        }
    };
}
macro_rules! tc_table {
    ($pass:ident, $tile:ident, $dt:literal) => {
        kernel_table!(
            $pass,
            $tile,
            $dt,
            [
                (Fprop, "fprop", T128x128, "t128x128"),
                (Fprop, "fprop", T128x64, "t128x64"),
                (Fprop, "fprop", T64x64, "t64x64"),
                (Fprop, "fprop", T64x64Scalar, "t64x64s"),
                (Fprop, "fprop", W128x128, "w128x128"),
                (Fprop, "fprop", W128x64, "w128x64"),
                (Fprop, "fprop", Ws128x128, "ws128x128"),
                (Fprop, "fprop", Ws128x64, "ws128x64"),
                (Dgrad, "dgrad", T128x128, "t128x128"),
                (Dgrad, "dgrad", T128x64, "t128x64"),
                (Dgrad, "dgrad", T64x64, "t64x64"),
                (Dgrad, "dgrad", T64x64Scalar, "t64x64s"),
                (Dgrad, "dgrad", W128x128, "w128x128"),
                (Dgrad, "dgrad", W128x64, "w128x64"),
                (Dgrad, "dgrad", Ws128x128, "ws128x128"),
                (Dgrad, "dgrad", Ws128x64, "ws128x64"),
                (Wgrad, "wgrad", T128x128, "t128x128"),
                (Wgrad, "wgrad", T128x64, "t128x64"),
                (Wgrad, "wgrad", T64x64, "t64x64"),
                (Wgrad, "wgrad", T64x64Scalar, "t64x64s"),
                (Wgrad, "wgrad", W128x128, "w128x128"),
                (Wgrad, "wgrad", W128x64, "w128x64"),
                (Wgrad, "wgrad", Ws128x128, "ws128x128"),
                (Wgrad, "wgrad", Ws128x64, "ws128x64"),
            ]
        )
    };
}

macro_rules! bnin_table {
    ($pass:ident, $tile:ident, $dt:literal) => {
        kernel_table!(
            $pass,
            $tile,
            $dt,
            [
                (Fprop, "fprop_bnin", T128x128, "t128x128"),
                (Fprop, "fprop_bnin", T128x64, "t128x64"),
                (Fprop, "fprop_bnin", T64x64, "t64x64"),
                (Fprop, "fprop_bnin", T64x64Scalar, "t64x64s"),
                (Wgrad, "wgrad_bnin", T128x128, "t128x128"),
                (Wgrad, "wgrad_bnin", T128x64, "t128x64"),
                (Wgrad, "wgrad_bnin", T64x64, "t64x64"),
                (Wgrad, "wgrad_bnin", T64x64Scalar, "t64x64s"),
            ]
        )
    };
}

impl ConvElem for f32 {
    const TENSOR_CORES: bool = false;
    const TRANSPOSE: Kernel = Kernel::new(MODULE, "transpose_f32");
    const TRANSPOSE_PAD: Kernel = Kernel::new(MODULE, "transpose_pad_f32_f32");
    fn kernel_bnin(pass: Pass, tile: Tile) -> Option<Kernel> {
        kernel_table!(
            pass,
            tile,
            "f32",
            [
                (Fprop, "fprop_bnin", T128x128, "t128x128"),
                (Fprop, "fprop_bnin", T64x64, "t64x64"),
                (Wgrad, "wgrad_bnin", T128x128, "t128x128"),
                (Wgrad, "wgrad_bnin", T64x64, "t64x64"),
            ]
        )
    }
    fn kernel(pass: Pass, tile: Tile) -> Option<Kernel> {
        kernel_table!(
            pass,
            tile,
            "f32",
            [
                (Fprop, "fprop", T128x128, "t128x128"),
                (Fprop, "fprop", T64x64, "t64x64"),
                (Dgrad, "dgrad", T128x128, "t128x128"),
                (Dgrad, "dgrad", T64x64, "t64x64"),
                (Wgrad, "wgrad", T128x128, "t128x128"),
                (Wgrad, "wgrad", T64x64, "t64x64"),
            ]
        )
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl ConvElem for bf16 {
    const TENSOR_CORES: bool = true;
    const TRANSPOSE: Kernel = Kernel::new(MODULE, "transpose_bf16");
    const TRANSPOSE_PAD: Kernel = Kernel::new(MODULE, "transpose_pad_f32_bf16");
    fn kernel(pass: Pass, tile: Tile) -> Option<Kernel> {
        tc_table!(pass, tile, "bf16")
    }
    fn kernel_bnin(pass: Pass, tile: Tile) -> Option<Kernel> {
        bnin_table!(pass, tile, "bf16")
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl ConvElem for f16 {
    const TENSOR_CORES: bool = true;
    const TRANSPOSE: Kernel = Kernel::new(MODULE, "transpose_f16");
    const TRANSPOSE_PAD: Kernel = Kernel::new(MODULE, "transpose_pad_f32_f16");
    fn kernel(pass: Pass, tile: Tile) -> Option<Kernel> {
        tc_table!(pass, tile, "f16")
    }
    fn kernel_bnin(pass: Pass, tile: Tile) -> Option<Kernel> {
        bnin_table!(pass, tile, "f16")
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// True when the channel counts allow the 16-byte (8-element) loads of the vector tiles:
/// C for fprop, C and K for dgrad and wgrad.
pub fn vector_ok(pass: Pass, sh: &ConvShape) -> bool {
    match pass {
        Pass::Fprop => sh.c.is_multiple_of(8),
        Pass::Dgrad | Pass::Wgrad => sh.c.is_multiple_of(8) && sh.k.is_multiple_of(8),
    }
}

/// The plan the wrappers use for `pass` on `sh` with elements `T`: the largest tile that
/// still gives about one block per SM, the scalar tile where widths are not multiples
/// of 8 (16-bit types), and for wgrad enough splits of the long reduction (N*P*Q) to fill
/// about two waves, each split at least 8 k-tiles deep.
pub fn plan<T: ConvElem>(pass: Pass, sh: &ConvShape) -> Plan {
    let (m, n, _) = pass.gemm(sh);
    let blocks = |bm: usize, bn: usize| m.div_ceil(bm) * n.div_ceil(bn);
    let tile = if T::TENSOR_CORES {
        if !vector_ok(pass, sh) {
            Tile::T64x64Scalar
        } else if n > 64 && blocks(128, 128) >= TARGET_SMS {
            Tile::T128x128
        } else if blocks(128, 64) >= TARGET_SMS {
            Tile::T128x64
        } else {
            Tile::T64x64
        }
    } else if blocks(128, 128) >= TARGET_SMS {
        Tile::T128x128
    } else {
        Tile::T64x64
    };
    let splits = if pass == Pass::Wgrad { wgrad_splits::<T>(tile, sh) } else { 1 };
    Plan { tile, splits }
}

/// wgrad's splits of its reduction (N*P*Q) with `tile`: enough to fill about two waves,
/// each split at least 8 k-tiles deep (32 for f32).
fn wgrad_splits<T: ConvElem>(tile: Tile, sh: &ConvShape) -> usize {
    let (m, n, k) = Pass::Wgrad.gemm(sh);
    let (bm, bn, bk) = tile.dims::<T>();
    let ktiles = k.div_ceil(bk);
    let want = (2 * TARGET_SMS).div_ceil(m.div_ceil(bm) * n.div_ceil(bn));
    let min_depth = if T::TENSOR_CORES { 8 } else { 32 };
    want.min(ktiles / min_depth).max(1)
}

/// The plan of `pass` on `sh` on `gpu`: [`plan`], except that a pass of a 16-bit type with
/// 16-byte loads takes the warpgroup-MMA tiles where [`Gpu::conv_wgmma`] says so: 128x128
/// when the GEMM's N is over 64 and it fills about one wave of them, else 128x64 (their
/// warp-specialized forms where [`Gpu::conv_wgmma_ws`] says so); wgrad split as [`plan`]
/// splits it. `bn_in`: the launch applies a BN to x as it loads it (fprop
/// and wgrad: the mma.sync tiles only; dgrad: the BN whose backward sums its epilogue takes,
/// which the warpgroup tiles take too).
pub fn plan_on<T: ConvElem>(gpu: &Gpu, pass: Pass, sh: &ConvShape, bn_in: bool) -> Plan {
    let base = plan::<T>(pass, sh);
    let on_load = bn_in && pass != Pass::Dgrad;
    if !(T::TENSOR_CORES && !on_load && base.tile.vector() && gpu.conv_wgmma()) {
        return base;
    }
    let (m, n, _) = pass.gemm(sh);
    let large = n > 64 && m.div_ceil(128) * n.div_ceil(128) >= TARGET_SMS;
    let tile = match (large, gpu.conv_wgmma_ws()) {
        (true, false) => Tile::W128x128,
        (false, false) => Tile::W128x64,
        (true, true) => Tile::Ws128x128,
        (false, true) => Tile::Ws128x64,
    };
    Plan { tile, splits: if pass == Pass::Wgrad { wgrad_splits::<T>(tile, sh) } else { 1 } }
}

/// `n / d` as a multiply and a shift for `0 <= n < 2^31` (see `PkFastDiv`).
pub fn fast_div(d: i32) -> FastDiv {
    assert!(d >= 1, "fast_div of {d}");
    if d == 1 {
        return FastDiv { d, mul: 0, shr: 0, pad0: 0 };
    }
    let l = 32 - (d as u32 - 1).leading_zeros(); // ceil(log2 d)
    let p = 31 + l;
    let mul = (1u64 << p).div_ceil(d as u64);
    FastDiv { d, mul: mul as u32, shr: p - 32, pad0: 0 }
}

/// Shared-memory bytes of a launch (must match TcSmem / SimtCfg in conv.cu; the emulation
/// faults on any access past what is given here).
fn smem_bytes<T: ConvElem>(pass: Pass, tile: Tile) -> usize {
    let (bm, bn, bk) = tile.dims::<T>();
    let rows = bm * 20; // RowInfo: 5 ints per row
    if tile.warp_specialized() {
        // WsCfg: the rows, two mbarriers per stage, the tiles at a 1024-byte boundary after
        // them; 5 stages of 128x128, 6 of 128x64.
        let stages = if tile == Tile::Ws128x128 { 5 } else { 6 };
        return rows + 2 * stages * 8 + 1024 + stages * (bm + bn) * bk * 2;
    }
    if tile.wgmma() {
        // WgCfg: the tiles start at a 1024-byte boundary after the rows, 4 stages.
        return rows + 1024 + 4 * (bm + bn) * bk * 2;
    }
    if T::TENSOR_CORES {
        let stages = if tile.vector() { 4 } else { 3 };
        let a = if pass != Pass::Wgrad { bm * (bk + 8) } else { bk * (bm + 8) };
        let b = if pass == Pass::Fprop { bn * (bk + 8) } else { bk * (bn + 8) };
        rows + stages * (a + b) * 2
    } else {
        rows + 3 * bk * ((bm + 4) + (bn + 4)) * 4
    }
}

fn threads<T: ConvElem>(tile: Tile) -> u32 {
    match (T::TENSOR_CORES, tile) {
        (true, Tile::Ws128x128 | Tile::Ws128x64) => 384,
        (true, Tile::T128x128 | Tile::W128x128 | Tile::W128x64) => 256,
        (true, _) => 128,
        (false, Tile::T128x128) => 256,
        (false, _) => 64,
    }
}

fn check_host_or_dev<T: Elem>(dev: &Device, b: &Buf<T>, what: &str, want: usize) -> Result<()> {
    check_on(b, dev, what)?;
    check_len(b, want, what)
}

/// Checks the shape, and the device and length of the three buffers.
pub(crate) fn prepare<T: ConvElem, O: Elem>(
    dev: &Device,
    sh: &ConvShape,
    a: (&Buf<T>, &str, usize),
    b: (&Buf<T>, &str, usize),
    out: (&Buf<O>, &str, usize),
) -> Result<()> {
    sh.validate()?;
    check_host_or_dev(dev, a.0, a.1, a.2)?;
    check_host_or_dev(dev, b.0, b.1, b.2)?;
    check_host_or_dev(dev, out.0, out.1, out.2)
}

/// Where an fprop's epilogue writes the BN statistics of its output (device addresses; see
/// `PkConvParams::bn_stats`): the per-row-tile pairs, or with one row tile the means and M2.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StatsOut {
    pub part: u64,
    pub mean: u64,
    pub m2: u64,
}

/// What a pass's epilogue does besides storing its result.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Epilogue {
    /// Overwrites the output.
    Store,
    /// fprop: also writes the BN statistics of the stored output.
    Stats(StatsOut),
    /// dgrad: adds the result to the output's values (`PkConvParams::accumulate`), then
    /// masks the sum by a ReLU's output or its bits, unless [`MaskPtr::NONE`].
    Accumulate { mask: MaskPtr },
    /// dgrad: stores (with `accumulate`, as [`Epilogue::Accumulate`] with that mask), then
    /// takes the backward sums of the batch norm whose output's gradient it stored
    /// (`PkConvParams::bn_grad`): the BN's input at device address `x`, its parameters the
    /// launch's `bn_in`, the sums out to `out` (per row tile, or the two `[C]` buffers).
    GradSums { accumulate: Option<MaskPtr>, x: u64, out: StatsOut, second: Option<GradSecond> },
}

/// The device address of an accumulating dgrad's mask (see [`ReluMask`]): a ReLU's output
/// (`acc_mask`) or its bits (`acc_mask_bits`); both 0 without a mask.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MaskPtr {
    pub output: u64,
    pub bits: u64,
}

impl MaskPtr {
    pub(crate) const NONE: MaskPtr = MaskPtr { output: 0, bits: 0 };
}

/// The ReLU an accumulated dgrad's sum goes through ([`conv2d_dgrad_accumulate`]): its
/// output (`[N, H, W, C]`, the x shape; kept where > 0), or its decisions as bits (bit
/// `i % 8` of byte `i / 8` set where the output at flat NHWC index `i` is > 0, as
/// [`crate::ops::layers::bn_apply_residual`] writes them beside a block's output): the
/// same sums, reading 1/16 of the bytes of a bf16 output.
#[derive(Clone, Copy)]
pub enum ReluMask<'a, T: Elem> {
    /// The ReLU's output.
    Output(&'a Buf<T>),
    /// The ReLU's decisions, [`crate::ops::layers::relu_bits_len`] bytes.
    Bits(&'a Buf<u8>),
}

impl<T: Elem> ReluMask<'_, T> {
    /// Checks the mask holds `len` decisions on `dev`.
    pub(crate) fn check(&self, dev: &Device, len: usize) -> Result<()> {
        match self {
            ReluMask::Output(b) => check_host_or_dev(dev, *b, "relu_out", len),
            ReluMask::Bits(b) => check_host_or_dev(dev, *b, "the ReLU's bits", crate::ops::layers::relu_bits_len(len)),
        }
    }

    /// The device address on a kernel device.
    pub(crate) fn ptr(&self, gpu: &Gpu) -> Result<MaskPtr> {
        Ok(match self {
            ReluMask::Output(b) => MaskPtr { output: on_gpu(*b, gpu, "relu_out")?.ptr(), bits: 0 },
            ReluMask::Bits(b) => MaskPtr { output: 0, bits: on_gpu(*b, gpu, "the ReLU's bits")?.ptr() },
        })
    }

    /// What the mask adds to a pass's count ([`Cost::conv_accumulate`]).
    pub(crate) fn kind(mask: Option<&Self>) -> MaskKind {
        match mask {
            None => MaskKind::None,
            Some(ReluMask::Output(_)) => MaskKind::Output,
            Some(ReluMask::Bits(_)) => MaskKind::Bits,
        }
    }
}

impl<T: ConvElem> ReluMask<'_, T> {
    /// Whether the ReLU keeps flat index `i` (host buffers).
    fn keeps_host(&self) -> impl Fn(usize) -> bool + Sync + '_ {
        let (out, bits) = match self {
            ReluMask::Output(b) => (Some(b.host().expect("checked")), None),
            ReluMask::Bits(b) => (None, Some(b.host().expect("checked"))),
        };
        move |i| match (out, bits) {
            (Some(o), _) => o[i].to_f32() > 0.0,
            (_, Some(b)) => (b[i / 8] >> (i % 8)) & 1 == 1,
            _ => true,
        }
    }
}

/// What an accumulating dgrad reads to mask its sums, for its count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// No mask.
    None,
    /// A ReLU's output, an element per element of dx.
    Output,
    /// A ReLU's decisions, a bit per element of dx.
    Bits,
}

/// A second batch norm (no ReLU) whose output has the gradient a dgrad stores, and whose
/// backward sums its epilogue takes too (`PkConvParams::bn2_x`): its input and saved mean,
/// and where its sums go (device addresses).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GradSecond {
    pub x: u64,
    pub mean: u64,
    pub out: StatsOut,
}

/// The batch norm (+ ReLU) a `bnin` launch applies to its x operand as it loads it
/// (device addresses of `[C]` f32 vectors; see `PkConvParams::in_mean`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BnInPtrs {
    pub mean: u64,
    pub invstd: u64,
    pub gamma: u64,
    pub beta: u64,
    pub relu: bool,
}

/// Launches one pass; returns the row tiles (grid.x) and the tile's BM.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch<T: ConvElem, O: Elem>(
    gpu: &Gpu,
    pass: Pass,
    sh: &ConvShape,
    a: &Buf<T>,
    b: &Buf<T>,
    out: &mut Buf<O>,
    forced: Option<Plan>,
    epi: Epilogue,
) -> Result<(usize, usize)> {
    launch_bnin(gpu, pass, sh, a, b, out, forced, epi, None)
}

/// [`launch`], with the BN of `bn_in` applied to x (fprop and wgrad only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_bnin<T: ConvElem, O: Elem>(
    gpu: &Gpu,
    pass: Pass,
    sh: &ConvShape,
    a: &Buf<T>,
    b: &Buf<T>,
    out: &mut Buf<O>,
    forced: Option<Plan>,
    epi: Epilogue,
    bn_in: Option<BnInPtrs>,
) -> Result<(usize, usize)> {
    let stats = match epi {
        Epilogue::Stats(s) => Some(s),
        _ => None,
    };
    ensure!(stats.is_none() || pass == Pass::Fprop, "only fprop computes BN statistics");
    let (accumulate, acc_mask) = match epi {
        Epilogue::Accumulate { mask } | Epilogue::GradSums { accumulate: Some(mask), .. } => (true, mask),
        _ => (false, MaskPtr::NONE),
    };
    ensure!(!accumulate || pass == Pass::Dgrad, "only dgrad adds its result to its output");
    let (grad, second) = match epi {
        Epilogue::GradSums { x, out, second, .. } => (Some((x, out)), second),
        _ => (None, None),
    };
    ensure!(grad.is_none() || pass == Pass::Dgrad, "only dgrad takes batch norm backward sums");
    // dgrad's batch norm is the one whose sums its epilogue takes; the others' is applied to x.
    ensure!(
        (pass == Pass::Dgrad) == grad.is_some() || bn_in.is_none(),
        "dgrad takes a batch norm only for the sums of its backward"
    );
    ensure!(grad.is_none() || bn_in.is_some(), "internal: batch norm sums without the batch norm");
    let plan = forced.unwrap_or_else(|| plan_on::<T>(gpu, pass, sh, bn_in.is_some()));
    let kernel = if bn_in.is_some() && pass != Pass::Dgrad {
        T::kernel_bnin(pass, plan.tile)
    } else {
        T::kernel(pass, plan.tile)
    }
    .ok_or_else(|| invalid!("no {} kernel with tile {:?} for {}", pass.name(), plan.tile, T::NAME))?;
    if plan.tile.vector() && T::TENSOR_CORES {
        ensure!(vector_ok(pass, sh), "tile {:?} needs channel counts that are multiples of 8 ({sh:?})", plan.tile);
    }
    ensure!(
        !plan.tile.wgmma() || gpu.has_wgmma(),
        "tile {:?} runs on the warpgroup MMA, which {} does not have (it needs sm_90)",
        plan.tile,
        gpu.name()
    );
    let (ga, gb) = (on_gpu(a, gpu, "the first operand")?, on_gpu(b, gpu, "the second operand")?);
    let go = match out {
        Buf::Gpu(g) if g.same_gpu(gpu) => g,
        _ => return Err(invalid!("the output is not on the device {}", gpu.name())),
    };
    for (ptr, what) in [(ga.ptr(), "first operand"), (gb.ptr(), "second operand"), (go.ptr(), "output")] {
        ensure!(ptr % 16 == 0, "the {what} is not 16-byte aligned");
    }
    // Every element count (and so every offset the kernels form) fits in i32.
    for (len, what) in [(sh.x_len(), "x"), (sh.w_len(), "w"), (sh.y_len(), "y")] {
        i32_of(len, &format!("the element count of {what}"))?;
    }
    let (m, n, k) = pass.gemm(sh);
    let (bm, bn, bk) = plan.tile.dims::<T>();
    let ktiles = k.div_ceil(bk);
    ensure!(plan.splits >= 1, "a plan needs at least one split");
    ensure!(pass == Pass::Wgrad || plan.splits == 1, "only wgrad splits its reduction");
    let per_split = ktiles.div_ceil(plan.splits.min(ktiles.max(1)));
    let splits = ktiles.div_ceil(per_split.max(1)).max(1);
    // dgrad: one grid.z slice per stride phase, each as many rows as the largest phase.
    let grid = if pass == Pass::Dgrad {
        let phase_rows = sh.n * sh.h.div_ceil(sh.stride) * sh.w.div_ceil(sh.stride);
        (phase_rows.div_ceil(bm), n.div_ceil(bn), sh.stride * sh.stride)
    } else {
        (m.div_ceil(bm), n.div_ceil(bn), splits)
    };
    ensure!(
        grid.0 <= i32::MAX as usize && grid.1 <= 65535 && grid.2 <= 65535,
        "convolution {sh:?} needs a grid of {grid:?} blocks, more than CUDA allows"
    );
    let i = |x: usize, w: &str| i32_of(x, w);
    let fd = |x: usize, w: &str| -> Result<FastDiv> { Ok(fast_div(i(x, w)?)) };
    let (p_, q_) = (sh.p(), sh.q());
    let params = ConvParams {
        a: ga.ptr(),
        b: gb.ptr(),
        out: go.ptr(),
        n: i(sh.n, "n")?,
        h: i(sh.h, "h")?,
        w: i(sh.w, "w")?,
        c: i(sh.c, "c")?,
        k: i(sh.k, "k")?,
        r: i(sh.r, "r")?,
        s: i(sh.s, "s")?,
        stride: i(sh.stride, "stride")?,
        pad: i(sh.pad, "pad")?,
        p: i(p_, "p")?,
        q: i(q_, "q")?,
        gemm_m: i(m, "gemm m")?,
        gemm_n: i(n, "gemm n")?,
        gemm_k: i(k, "gemm k")?,
        k_tiles_per_split: i(per_split, "k-tiles")?,
        pad0: 0,
        div_c: fd(sh.c, "c")?,
        div_k: fd(sh.k, "k")?,
        div_s: fd(sh.s, "s")?,
        div_q: fd(q_, "q")?,
        div_pq: fd(p_ * q_, "p*q")?,
        div_w: fd(sh.w, "w")?,
        div_hw: fd(sh.h * sh.w, "h*w")?,
        bn_part: stats.or(grad.map(|g| g.1)).map_or(0, |st| st.part),
        bn_mean: stats.or(grad.map(|g| g.1)).map_or(0, |st| st.mean),
        bn_m2: stats.or(grad.map(|g| g.1)).map_or(0, |st| st.m2),
        bn_stats: stats.is_some() as i32,
        accumulate: accumulate as i32,
        in_mean: bn_in.map_or(0, |b| b.mean),
        in_invstd: bn_in.map_or(0, |b| b.invstd),
        in_gamma: bn_in.map_or(0, |b| b.gamma),
        in_beta: bn_in.map_or(0, |b| b.beta),
        in_relu: bn_in.is_some_and(|b| b.relu) as i32,
        bn_grad: grad.is_some() as i32,
        acc_mask: acc_mask.output,
        acc_mask_bits: acc_mask.bits,
        bn_x: grad.map_or(0, |g| g.0),
        bn2_x: second.map_or(0, |b| b.x),
        bn2_mean: second.map_or(0, |b| b.mean),
        bn2_part: second.map_or(0, |b| b.out.part),
        bn2_sum: second.map_or(0, |b| b.out.mean),
        bn2_sumx: second.map_or(0, |b| b.out.m2),
    };
    let cfg = LaunchConfig {
        grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block: (threads::<T>(plan.tile), 1, 1),
        shared_mem_bytes: smem_bytes::<T>(pass, plan.tile) as u32,
    };
    if splits > 1 {
        // The splits add into dw.
        match out {
            Buf::Gpu(g) => gpu.fill_zero(g)?,
            Buf::Host(_) => unreachable!("checked above"),
        }
    }
    // SAFETY: every buffer was checked to live on this device and to hold exactly the
    // elements of its tensor; the kernels read and write only inside the tensors of the
    // shape (every load is predicated on the tensor's bounds, every store on M and N).
    // With statistics the epilogue also writes K pairs per row tile through bn_part, or K
    // floats through bn_mean and bn_m2 (one row tile); with the BN backward sums, C pairs
    // per row tile of all phases or C floats each, and reads bn_x (x's shape), and the same
    // through the bn2_* pointers for a second BN, which also reads C floats of bn2_mean; the caller
    // sized those. A bnin launch, and dgrad with the sums, reads C floats through each in_*
    // pointer (the caller checked their lengths).
    unsafe { gpu.launch(kernel, cfg, &params)? };
    Ok((grid.0, bm))
}

/// A host buffer as f32: borrowed when T is f32, else widened (exactly).
pub(crate) fn host_f32<T: ConvElem>(b: &Buf<T>) -> std::borrow::Cow<'_, [f32]> {
    let h = b.host().expect("checked to be on the host");
    if T::NAME == "f32" {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(h))
    } else {
        std::borrow::Cow::Owned(h.iter().map(|v| v.to_f32()).collect())
    }
}

/// `y[n,p,q,k] = sum_{r,s,c} x[n, p*stride-pad+r, q*stride-pad+s, c] * w[k,r,s,c]`
/// (x NHWC, w KRSC, y NPQK; overwrites y).
pub fn conv2d_fprop<T: ConvElem>(dev: &Device, sh: &ConvShape, x: &Buf<T>, w: &Buf<T>, y: &mut Buf<T>) -> Result<()> {
    conv2d_fprop_with(dev, sh, x, w, y, None)
}

/// [`conv2d_fprop`] with a given plan on a kernel device (`None`: [`plan`]'s choice; the
/// CPU ignores it). For tests and benchmarks of every tile.
pub fn conv2d_fprop_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    w: &Buf<T>,
    y: &mut Buf<T>,
    plan: Option<Plan>,
) -> Result<()> {
    prepare(dev, sh, (x, "x", sh.x_len()), (w, "w", sh.w_len()), (&*y, "y", sh.y_len()))?;
    timed(dev, Family::ConvFprop, cost::<T>(Pass::Fprop, sh), || match dev {
        Device::Cpu => {
            cpu_run(x, w, y, sh.y_len(), |a, b, o| cpu::fprop(sh, a, b, o));
            Ok(())
        }
        Device::Gpu(gpu) => launch(gpu, Pass::Fprop, sh, x, w, y, plan, Epilogue::Store).map(|_| ()),
    })
}

/// The profile's count of `pass` on `sh` (computed only inside a profile scope).
fn cost<T: ConvElem>(pass: Pass, sh: &ConvShape) -> impl FnOnce() -> Cost + '_ {
    move || Cost::conv(pass, sh, std::mem::size_of::<T>())
}

/// `dx` = the gradient with respect to x of `<dy, conv(x, w)>` (dy NPQK, w KRSC, dx NHWC;
/// overwrites dx).
pub fn conv2d_dgrad<T: ConvElem>(dev: &Device, sh: &ConvShape, dy: &Buf<T>, w: &Buf<T>, dx: &mut Buf<T>) -> Result<()> {
    conv2d_dgrad_with(dev, sh, dy, w, dx, None)
}

/// [`conv2d_dgrad`] with a given plan on a kernel device (see [`conv2d_fprop_with`]).
pub fn conv2d_dgrad_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    dx: &mut Buf<T>,
    plan: Option<Plan>,
) -> Result<()> {
    prepare(dev, sh, (dy, "dy", sh.y_len()), (w, "w", sh.w_len()), (&*dx, "dx", sh.x_len()))?;
    timed(dev, Family::ConvDgrad, cost::<T>(Pass::Dgrad, sh), || match dev {
        Device::Cpu => {
            cpu_run(dy, w, dx, sh.x_len(), |a, b, o| cpu::dgrad(sh, a, b, o));
            Ok(())
        }
        Device::Gpu(gpu) => launch(gpu, Pass::Dgrad, sh, dy, w, dx, plan, Epilogue::Store).map(|_| ()),
    })
}

thread_local! {
    /// The CPU's [`conv2d_dgrad_accumulate`] result before it is added: as large as the
    /// largest dx this thread accumulated into.
    static DGRAD_SUM: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dx += ` the gradient with respect to x of `<dy, conv(x, w)>`: [`conv2d_dgrad`] added to
/// the values `dx` holds (a gradient that already has another branch's, as a residual
/// block's input has its shortcut's), each sum computed in f32 from the stored value and
/// the pass's f32 result and rounded once; then, with `relu` (the ReLU that x came through,
/// as a block's input is the previous block's final ReLU: its output or its bits, see
/// [`ReluMask`]), each sum where that ReLU's output is not positive is 0: the gradient
/// through that ReLU too. Instead of a dgrad into a temporary, an add pass and a masking
/// pass: reads dx (and the mask) once, writes it once. For f32 bitwise the three; for
/// 16-bit types one rounding fewer.
pub fn conv2d_dgrad_accumulate<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    relu_out: Option<ReluMask<'_, T>>,
    dx: &mut Buf<T>,
) -> Result<()> {
    conv2d_dgrad_accumulate_with(dev, sh, dy, w, relu_out, dx, None)
}

/// [`conv2d_dgrad_accumulate`] with a given plan on a kernel device (see
/// [`conv2d_fprop_with`]).
pub fn conv2d_dgrad_accumulate_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    relu_out: Option<ReluMask<'_, T>>,
    dx: &mut Buf<T>,
    plan: Option<Plan>,
) -> Result<()> {
    prepare(dev, sh, (dy, "dy", sh.y_len()), (w, "w", sh.w_len()), (&*dx, "dx", sh.x_len()))?;
    if let Some(r) = &relu_out {
        r.check(dev, sh.x_len())?;
    }
    let cost = || Cost::conv_accumulate(sh, std::mem::size_of::<T>(), ReluMask::kind(relu_out.as_ref()));
    timed(dev, Family::ConvDgrad, cost, || match dev {
        Device::Cpu => {
            dgrad_accumulate_host(sh, dy, w, relu_out, dx);
            Ok(())
        }
        Device::Gpu(gpu) => {
            let mask = relu_out.map(|r| r.ptr(gpu)).transpose()?.unwrap_or(MaskPtr::NONE);
            launch(gpu, Pass::Dgrad, sh, dy, w, dx, plan, Epilogue::Accumulate { mask }).map(|_| ())
        }
    })
}

/// The CPU's [`conv2d_dgrad_accumulate`] (every buffer checked and on the host).
pub(crate) fn dgrad_accumulate_host<T: ConvElem>(
    sh: &ConvShape,
    dy: &Buf<T>,
    w: &Buf<T>,
    relu_out: Option<ReluMask<'_, T>>,
    dx: &mut Buf<T>,
) {
    use rayon::prelude::*;
    let (a, b) = (host_f32(dy), host_f32(w));
    // The f32 result goes to a buffer this thread keeps for the next call (a training step
    // asks for the same sizes every step; fresh memory would fault in on every write), then
    // is added to dx in parallel.
    DGRAD_SUM.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() < sh.x_len() {
            r.resize(sh.x_len(), 0.0);
        }
        let r = &mut r[..sh.x_len()];
        cpu::dgrad(sh, &a, &b, r);
        let keeps = relu_out.as_ref().map(|m| m.keeps_host());
        const CHUNK: usize = 1 << 14;
        let dxh = dx.host_mut().expect("checked");
        dxh.par_chunks_mut(CHUNK).zip(r.par_chunks(CHUNK)).enumerate().for_each(|(i, (d, s))| {
            for (j, (d, s)) in d.iter_mut().zip(s).enumerate() {
                // As the kernels: the sum, kept where the ReLU's output is > 0 (not NaN).
                let keep = keeps.as_ref().is_none_or(|k| k(i * CHUNK + j));
                *d = T::from_f32(if keep { d.to_f32() + s } else { 0.0 });
            }
        });
    });
}

/// `dw` = the gradient with respect to w of `<dy, conv(x, w)>`, always f32 (x NHWC, dy
/// NPQK, dw KRSC; overwrites dw).
pub fn conv2d_wgrad<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    dy: &Buf<T>,
    dw: &mut Buf<f32>,
) -> Result<()> {
    conv2d_wgrad_with(dev, sh, x, dy, dw, None)
}

/// [`conv2d_wgrad`] with a given plan on a kernel device (see [`conv2d_fprop_with`]).
pub fn conv2d_wgrad_with<T: ConvElem>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    dy: &Buf<T>,
    dw: &mut Buf<f32>,
    plan: Option<Plan>,
) -> Result<()> {
    prepare(dev, sh, (dy, "dy", sh.y_len()), (x, "x", sh.x_len()), (&*dw, "dw", sh.w_len()))?;
    timed(dev, Family::ConvWgrad, cost::<T>(Pass::Wgrad, sh), || match dev {
        Device::Cpu => {
            cpu::wgrad(sh, &host_f32(x), &host_f32(dy), dw.host_mut().expect("checked"));
            Ok(())
        }
        Device::Gpu(gpu) => launch(gpu, Pass::Wgrad, sh, dy, x, dw, plan, Epilogue::Store).map(|_| ()),
    })
}

/// Runs a CPU pass on host buffers: in place for f32, through f32 copies for 16-bit types.
pub(crate) fn cpu_run<T: ConvElem>(
    a: &Buf<T>,
    b: &Buf<T>,
    out: &mut Buf<T>,
    out_len: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]),
) {
    let (a, b) = (host_f32(a), host_f32(b));
    with_f32_out(out, out_len, |o| f(&a, &b, o));
}

/// Runs `f` on `out` as f32: `out` itself for f32, else an f32 temporary of `out_len`
/// elements rounded (to nearest even) into `out` afterwards.
pub(crate) fn with_f32_out<T: ConvElem>(out: &mut Buf<T>, out_len: usize, f: impl FnOnce(&mut [f32])) {
    let oh = out.host_mut().expect("checked");
    if T::NAME == "f32" {
        f(bytemuck::cast_slice_mut(oh));
    } else {
        let mut o = vec![0.0f32; out_len];
        f(&mut o);
        for (d, s) in oh.iter_mut().zip(&o) {
            *d = T::from_f32(*s);
        }
    }
}

// ---------------------------------------------------------------- layouts

fn transpose<T: ConvElem>(
    dev: &Device,
    batch: usize,
    rows: usize,
    cols: usize,
    src: &Buf<T>,
    dst: &mut Buf<T>,
) -> Result<()> {
    let len = batch
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols))
        .ok_or_else(|| invalid!("layout conversion of {batch}x{rows}x{cols} elements overflows"))?;
    check_host_or_dev(dev, src, "the source", len)?;
    check_host_or_dev(dev, dst, "the destination", len)?;
    if len == 0 {
        return Ok(());
    }
    timed(
        dev,
        Family::Layout,
        || Cost::transpose(len, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                let s = src.host().expect("checked").to_vec();
                cpu::transpose(&s, dst.host_mut().expect("checked"), batch, rows, cols);
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (gs, gd) = (on_gpu(src, gpu, "the source")?, on_gpu(&*dst, gpu, "the destination")?);
                let p = TransposeParams {
                    src: gs.ptr(),
                    dst: gd.ptr(),
                    batch: i32_of(batch, "batch")?,
                    rows: i32_of(rows, "rows")?,
                    cols: i32_of(cols, "columns")?,
                    pad0: 0,
                };
                i32_of(len, "elements")?;
                let grid = (cols.div_ceil(32), rows.div_ceil(32), batch.min(65535));
                ensure!(grid.0 <= i32::MAX as usize && grid.1 <= 65535, "layout conversion too large");
                let cfg = LaunchConfig {
                    grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
                    block: (32, 8, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: src and dst hold batch*rows*cols elements each (checked above).
                unsafe { gpu.launch(T::TRANSPOSE, cfg, &p)? };
                Ok(())
            }
        },
    )
}

/// `dst[b][j][i] = i < rows ? src[b][i][j] : 0` for `i < ld` (f32 to T, rounded to nearest
/// even): `batch` transposed matrices with their rows padded with zeros or cut to `ld`.
#[allow(clippy::too_many_arguments)]
fn transpose_pad<T: ConvElem>(
    dev: &Device,
    batch: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    src: &Buf<f32>,
    dst: &mut Buf<T>,
) -> Result<()> {
    ensure!((1..=PAD_MAX).contains(&ld), "padded rows of {ld} elements: 1 to {PAD_MAX} are supported");
    let (n_src, n_dst) = batch
        .checked_mul(cols)
        .and_then(|bc| Some((bc.checked_mul(rows)?, bc.checked_mul(ld)?)))
        .ok_or_else(|| invalid!("layout conversion of {batch}x{rows}x{cols} elements overflows"))?;
    check_host_or_dev(dev, src, "the source", n_src)?;
    check_host_or_dev(dev, dst, "the destination", n_dst)?;
    if n_dst == 0 {
        return Ok(());
    }
    timed(
        dev,
        Family::Layout,
        || Cost::transpose_pad(batch * cols, rows.min(ld), ld, std::mem::size_of::<T>()),
        || match dev {
            Device::Cpu => {
                let mut o = vec![0.0f32; n_dst];
                cpu::transpose_pad(src.host().expect("checked"), &mut o, batch, rows, cols, ld);
                for (d, v) in dst.host_mut().expect("checked").iter_mut().zip(o) {
                    *d = T::from_f32(v);
                }
                Ok(())
            }
            Device::Gpu(gpu) => {
                let (gs, gd) = (on_gpu(src, gpu, "the source")?, on_gpu(&*dst, gpu, "the destination")?);
                let p = TransposePadParams {
                    src: gs.ptr(),
                    dst: gd.ptr(),
                    batch: i32_of(batch, "batch")?,
                    rows: i32_of(rows, "rows")?,
                    cols: i32_of(cols, "columns")?,
                    ld: ld as i32,
                };
                i32_of(n_src.max(n_dst), "elements")?;
                let threads = 256usize;
                let blocks = (batch * cols).div_ceil(threads).min(65535 * 8);
                let cfg =
                    LaunchConfig { grid: (blocks as u32, 1, 1), block: (threads as u32, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: src holds batch*rows*cols and dst batch*cols*ld elements (checked above).
                unsafe { gpu.launch(T::TRANSPOSE_PAD, cfg, &p)? };
                Ok(())
            }
        },
    )
}

/// Images NCHW f32 (`src`, `n` x `c` x `h` x `w`) to NHWC in `T` (`dst`) with the channels
/// padded with zeros to `cp` (at most 16): one pass in place of a transpose and a cast. The
/// stem of a tensor-core model runs on it with C = 8 (16-byte loads, as the other convs).
#[allow(clippy::too_many_arguments)]
pub fn nchw_to_nhwc_padded<T: ConvElem>(
    dev: &Device,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cp: usize,
    src: &Buf<f32>,
    dst: &mut Buf<T>,
) -> Result<()> {
    ensure!(cp >= c, "padding {c} channels to {cp} would drop some");
    transpose_pad(dev, n, c, h.checked_mul(w).ok_or_else(|| invalid!("h*w overflows"))?, cp, src, dst)
}

/// The `rows` rows of `src` (f32, `c` elements each, as a KRSC weight's K*R*S rows of C)
/// into `dst` (T) with `cp` elements each: padded with zeros (`cp > c`) or cut (`cp < c`).
/// The stem's weight goes to its padded copy this way, and its padded gradient back.
pub fn pad_rows<T: ConvElem>(
    dev: &Device,
    rows: usize,
    c: usize,
    cp: usize,
    src: &Buf<f32>,
    dst: &mut Buf<T>,
) -> Result<()> {
    transpose_pad(dev, rows, c, 1, cp, src, dst)
}

/// Activations NCHW (`src`) to NHWC (`dst`).
pub fn nchw_to_nhwc<T: ConvElem>(
    dev: &Device,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    src: &Buf<T>,
    dst: &mut Buf<T>,
) -> Result<()> {
    transpose(dev, n, c, h.checked_mul(w).ok_or_else(|| invalid!("h*w overflows"))?, src, dst)
}

/// Activations NHWC (`src`) to NCHW (`dst`).
pub fn nhwc_to_nchw<T: ConvElem>(
    dev: &Device,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    src: &Buf<T>,
    dst: &mut Buf<T>,
) -> Result<()> {
    transpose(dev, n, h.checked_mul(w).ok_or_else(|| invalid!("h*w overflows"))?, c, src, dst)
}

/// Weights OIHW (`src`, torchvision's `[K, C, R, S]`) to KRSC (`dst`).
pub fn oihw_to_krsc<T: ConvElem>(
    dev: &Device,
    k: usize,
    c: usize,
    r: usize,
    s: usize,
    src: &Buf<T>,
    dst: &mut Buf<T>,
) -> Result<()> {
    transpose(dev, k, c, r.checked_mul(s).ok_or_else(|| invalid!("r*s overflows"))?, src, dst)
}

/// Weights KRSC (`src`) to OIHW (`dst`).
pub fn krsc_to_oihw<T: ConvElem>(
    dev: &Device,
    k: usize,
    c: usize,
    r: usize,
    s: usize,
    src: &Buf<T>,
    dst: &mut Buf<T>,
) -> Result<()> {
    transpose(dev, k, r.checked_mul(s).ok_or_else(|| invalid!("r*s overflows"))?, c, src, dst)
}

/// The profile's counts of this module's ops (see [`crate::ops::profile`]).
impl Cost {
    /// A convolution pass: FLOPs `2 * N*P*Q * K * C*R*S` for each pass (dgrad of a strided
    /// conv skips the taps that meet no input, as its phase GEMMs do); bytes: fprop reads
    /// x and w and writes y, dgrad reads dy and w and writes dx (all in `elem`), wgrad
    /// reads x and dy (`elem`) and writes dw (f32).
    pub fn conv(pass: Pass, sh: &ConvShape, elem: usize) -> Cost {
        let (e, x, w, y) = (u(elem), u(sh.x_len()), u(sh.w_len()), u(sh.y_len()));
        let macs = u(sh.n) * u(sh.p()) * u(sh.q()) * u(sh.k) * u(sh.c) * u(sh.r) * u(sh.s);
        let bytes = match pass {
            Pass::Fprop | Pass::Dgrad => (x + w + y) * e,
            Pass::Wgrad => (x + y) * e + w * F32,
        };
        Cost { flops: 2 * macs, bytes }
    }

    /// A dgrad that adds its result to dx ([`conv2d_dgrad_accumulate`]): the dgrad's
    /// count, plus dx read once (and the masking ReLU's output, or its bits, read). FLOPs:
    /// the GEMM's only, as every conv pass counts them (the addition and the mask per
    /// element of dx are not counted).
    pub fn conv_accumulate(sh: &ConvShape, elem: usize, mask: MaskKind) -> Cost {
        let c = Cost::conv(Pass::Dgrad, sh, elem);
        let mask = match mask {
            MaskKind::None => 0,
            MaskKind::Output => u(sh.x_len()) * u(elem),
            MaskKind::Bits => u(sh.x_len().div_ceil(8)),
        };
        Cost { flops: c.flops, bytes: c.bytes + u(sh.x_len()) * u(elem) + mask }
    }

    /// A padded layout conversion from f32 ([`nchw_to_nhwc_padded`], [`pad_rows`]): `rows`
    /// output rows, each reading `keep` f32 elements and writing `ld` of `elem` bytes.
    pub fn transpose_pad(rows: usize, keep: usize, ld: usize, elem: usize) -> Cost {
        Cost { flops: 0, bytes: u(rows) * (4 * u(keep) + u(ld) * u(elem)) }
    }

    /// A layout conversion (transpose) of n elements: reads and writes each once.
    pub fn transpose(n: usize, elem: usize) -> Cost {
        Cost { flops: 0, bytes: 2 * u(n) * u(elem) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_div_is_exact() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32 & 0x7fff_ffff
        };
        for d in (1..300).chain([511, 512, 513, 3136, 12544, 50176, 1 << 20, (1 << 30) + 7, i32::MAX]) {
            let f = fast_div(d);
            let div = |n: u32| if f.mul == 0 { n } else { ((n as u64 * f.mul as u64) >> 32) as u32 >> f.shr };
            for n in (0..2000u32).chain([i32::MAX as u32, i32::MAX as u32 - 1]).chain((0..2000).map(|_| next())) {
                assert_eq!(div(n), n / d as u32, "{n} / {d}");
            }
        }
    }

    #[test]
    fn plans_pick_the_scalar_tile_for_odd_widths() {
        let sh = ConvShape { n: 2, h: 9, w: 9, c: 13, k: 16, r: 3, s: 3, stride: 1, pad: 1 };
        assert_eq!(plan::<bf16>(Pass::Fprop, &sh).tile, Tile::T64x64Scalar);
        let big = ConvShape { n: 64, h: 56, w: 56, c: 64, k: 256, r: 1, s: 1, stride: 1, pad: 0 };
        assert_eq!(plan::<bf16>(Pass::Fprop, &big).tile, Tile::T128x128);
        let p = plan::<bf16>(Pass::Wgrad, &big);
        assert!(p.splits > 1, "{p:?}");
    }
}
