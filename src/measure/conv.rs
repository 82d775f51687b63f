//! `prunekit conv-bench`: times every distinct convolution of ResNet50 at a given image
//! size and batch, dense and with the widths that filters-mode (or channels-mode) pruning
//! leaves at each sparsity, for each pass, on the CPU, the emulation or a CUDA GPU; on
//! CUDA side by side with cuDNN (loaded at run time: its fields are null with a note when
//! libcudnn is missing).

use crate::device::{Buf, Device};
use crate::gpu::Gpu;
use crate::ops::conv::{self, ConvElem};
use crate::prune::{kept_width, Mode, Sparsity};
use crate::shape::{ConvShape, Pass};
use crate::{ensure, invalid, Result};
use half::bf16;

/// The element type of a benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// f32 (SIMT kernels on a GPU).
    F32,
    /// bf16 (tensor cores on a GPU, f32 accumulation).
    Bf16,
}

impl DType {
    /// "f32" or "bf16".
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
    /// The type named `s`.
    pub fn parse(s: &str) -> Result<DType> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            _ => Err(invalid!("unknown dtype {s:?}: expected f32 or bf16")),
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// Batch size N.
    pub batch: usize,
    /// Input image height and width.
    pub size: usize,
    /// Sparsities in [0, 1).
    pub sparsities: Vec<f64>,
    /// Whose widths the pruned shapes have: filters mode (inner widths) or channels mode
    /// (inner widths, the residual stream and the stem).
    pub mode: Mode,
    /// Pruned widths are rounded up to a multiple of this (0 or 1: no rounding).
    pub round_to: usize,
    /// Passes to time.
    pub passes: Vec<Pass>,
    /// Element type.
    pub dtype: DType,
    /// Timed repetitions per measurement (None: 20 on cuda, 3 on cpu, 1 on emu).
    pub iters: Option<usize>,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts {
            batch: 32,
            size: 224,
            sparsities: vec![0.0, 0.25, 0.5, 0.75],
            mode: Mode::Filters,
            round_to: 8,
            passes: Pass::ALL.to_vec(),
            dtype: DType::Bf16,
            iters: None,
        }
    }
}

/// One measurement: a convolution shape, a pass, and its time.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// torchvision name of one convolution with this shape (the first in the network).
    pub layer: String,
    /// The shape.
    pub shape: ConvShape,
    /// The pass.
    pub pass: Pass,
    /// The element type.
    pub dtype: DType,
    /// The sparsity whose widths this shape has.
    pub sparsity: f64,
    /// The pruning mode whose widths this shape has.
    pub mode: Mode,
    /// Milliseconds per call.
    pub ms: f64,
    /// TFLOP/s (2 N P Q K C R S per call).
    pub tflops: f64,
    /// cuDNN's milliseconds for the same shape, dtype and layout (cuda with libcudnn only).
    pub cudnn_ms: Option<f64>,
    /// `cudnn_ms / ms`: above 1 we are faster.
    pub vs_cudnn: Option<f64>,
}

impl Row {
    /// The row as a JSON object: layer, shape (n, c, h, w, k, r, s, stride, pad), pass,
    /// dtype, sparsity, mode, ms and tflops; `cudnn_ms` and `vs_cudnn` are present (null
    /// when unknown) only when `with_cudnn`.
    pub fn to_json(&self, with_cudnn: bool) -> serde_json::Value {
        let sh = &self.shape;
        let mut v = serde_json::json!({
            "layer": self.layer, "n": sh.n, "c": sh.c, "h": sh.h, "w": sh.w, "k": sh.k, "r": sh.r, "s": sh.s,
            "stride": sh.stride, "pad": sh.pad, "pass": self.pass.name(), "dtype": self.dtype.name(),
            "sparsity": self.sparsity, "mode": self.mode.to_string(), "ms": self.ms, "tflops": self.tflops,
        });
        if with_cudnn {
            v["cudnn_ms"] = serde_json::json!(self.cudnn_ms);
            v["vs_cudnn"] = serde_json::json!(self.vs_cudnn);
        }
        v
    }
}

/// Every convolution of torchvision's ResNet50 (v1.5: stride in the 3x3) at image size
/// `size` and batch `batch`, with filters-mode pruning at `sparsity` (conv1 and conv2 of
/// every bottleneck keep [`kept_width`] filters, the project's one width rule; conv2 and
/// conv3 lose the matching input channels; the stem, downsample convs and conv3 outputs
/// keep their widths).
pub fn resnet50_convs(batch: usize, size: usize, sparsity: f64, round_to: usize) -> Result<Vec<(String, ConvShape)>> {
    resnet50_convs_mode(batch, size, Mode::Filters, sparsity, round_to)
}

/// [`resnet50_convs`] with the widths of either pruning mode: in channels mode the stem's
/// 64 channels and each stage's residual stream (downsample and conv3 outputs, the next
/// block's input) keep [`kept_width`] channels too.
pub fn resnet50_convs_mode(
    batch: usize,
    size: usize,
    mode: Mode,
    sparsity: f64,
    round_to: usize,
) -> Result<Vec<(String, ConvShape)>> {
    let sp = Sparsity::from_f64(sparsity)?;
    let stream = |w: usize| -> Result<usize> {
        match mode {
            Mode::Filters => Ok(w),
            Mode::Channels => kept_width(w, sp, round_to.max(1)),
        }
    };
    let mut out = Vec::new();
    let conv = |name: String, h: usize, c: usize, k: usize, r: usize, stride: usize| -> (String, ConvShape) {
        (name, ConvShape { n: batch, h, w: h, c, k, r, s: r, stride, pad: r / 2 })
    };
    let stem = conv("conv1".into(), size, 3, stream(64)?, 7, 2);
    let mut h = stem.1.p();
    let mut c_in = stem.1.k;
    out.push(stem);
    h = if h + 2 >= 3 { (h + 2 - 3) / 2 + 1 } else { 0 }; // max pool 3x3, stride 2, pad 1
    for (stage, (&blocks, &width)) in [3usize, 4, 6, 3].iter().zip(&[64usize, 128, 256, 512]).enumerate() {
        let kept = kept_width(width, sp, round_to.max(1))?;
        let c_out = stream(width * 4)?;
        for b in 0..blocks {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            let name = |l: &str| format!("layer{}.{b}.{l}", stage + 1);
            out.push(conv(name("conv1"), h, c_in, kept, 1, 1));
            let c2 = conv(name("conv2"), h, kept, kept, 3, stride);
            let h2 = c2.1.p();
            out.push(c2);
            out.push(conv(name("conv3"), h2, kept, c_out, 1, 1));
            if b == 0 {
                out.push(conv(name("downsample.0"), h, c_in, c_out, 1, stride));
            }
            h = h2;
            c_in = c_out;
        }
    }
    for (name, sh) in &out {
        sh.validate().map_err(|e| invalid!("image size {size}: {name}: {e}"))?;
    }
    Ok(out)
}

/// The distinct shapes of [`resnet50_convs`], each with the name of its first conv.
pub fn distinct_convs(batch: usize, size: usize, sparsity: f64, round_to: usize) -> Result<Vec<(String, ConvShape)>> {
    distinct_convs_mode(batch, size, Mode::Filters, sparsity, round_to)
}

/// The distinct shapes of [`resnet50_convs_mode`], each with the name of its first conv.
pub fn distinct_convs_mode(
    batch: usize,
    size: usize,
    mode: Mode,
    sparsity: f64,
    round_to: usize,
) -> Result<Vec<(String, ConvShape)>> {
    let mut seen = std::collections::HashSet::new();
    Ok(resnet50_convs_mode(batch, size, mode, sparsity, round_to)?
        .into_iter()
        .filter(|(_, sh)| seen.insert(*sh))
        .collect())
}

/// Uniform values in [-1, 1), seeded.
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The inputs and outputs of every pass of one convolution shape, filled with seeded
/// random values (outputs uninitialised): what a benchmark of one shape needs.
pub struct PassBuffers<T: ConvElem> {
    x: Buf<T>,
    w: Buf<T>,
    y: Buf<T>,
    dy: Buf<T>,
    dx: Buf<T>,
    dw: Buf<f32>,
}

impl<T: ConvElem> PassBuffers<T> {
    /// Buffers for `sh` on `dev`.
    pub fn new(dev: &Device, sh: &ConvShape) -> Result<Self> {
        let up = |n: usize, seed: u64| dev.upload(rand_vec(n, seed).into_iter().map(T::from_f32).collect());
        Ok(PassBuffers {
            x: up(sh.x_len(), 1)?,
            w: up(sh.w_len(), 2)?,
            y: dev.uninit(sh.y_len())?,
            dy: up(sh.y_len(), 3)?,
            dx: dev.uninit(sh.x_len())?,
            dw: dev.uninit(sh.w_len())?,
        })
    }

    /// Runs one pass of `sh` on these buffers.
    pub fn run(&mut self, dev: &Device, pass: Pass, sh: &ConvShape) -> Result<()> {
        match pass {
            Pass::Fprop => conv::conv2d_fprop(dev, sh, &self.x, &self.w, &mut self.y),
            Pass::Dgrad => conv::conv2d_dgrad(dev, sh, &self.dy, &self.w, &mut self.dx),
            Pass::Wgrad => conv::conv2d_wgrad(dev, sh, &self.x, &self.dy, &mut self.dw),
        }
    }
}

/// How often a measurement calls what it times: `warm` untimed calls, then `iters` timed
/// ones.
#[derive(Clone, Copy)]
struct Reps {
    warm: usize,
    iters: usize,
}

/// Milliseconds per call of `f` (CUDA events on a kernel device, the wall clock on the
/// CPU).
fn time_ms(dev: &Device, reps: Reps, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..reps.warm {
        f()?;
    }
    dev.synchronize()?;
    let start = dev.mark()?;
    for _ in 0..reps.iters {
        f()?;
    }
    let end = dev.mark()?;
    Ok(dev.elapsed_ms(&start, &end)? / reps.iters as f64)
}

/// Runs the benchmark; `progress` sees each row as it is measured. Returns the rows and
/// the note about cuDNN (on cuda: why its fields are null, if they are).
pub fn run(dev: &Device, opts: &BenchOpts, mut progress: impl FnMut(&Row)) -> Result<(Vec<Row>, Option<String>)> {
    ensure!(opts.batch > 0, "--batch must be at least 1");
    ensure!(opts.size > 0, "--size must be at least 1");
    ensure!(!opts.sparsities.is_empty(), "no sparsity to measure");
    ensure!(!opts.passes.is_empty(), "no pass to measure");
    ensure!(opts.iters != Some(0), "--iters must be at least 1");
    for &s in &opts.sparsities {
        ensure!(s.is_finite() && (0.0..1.0).contains(&s), "sparsity {s} is outside [0, 1)");
    }
    let is_cuda = dev.kind() == "cuda";
    let reps = match dev.kind() {
        "cuda" => Reps { warm: 3, iters: opts.iters.unwrap_or(20) },
        "emu" => Reps { warm: 0, iters: opts.iters.unwrap_or(1) },
        _ => Reps { warm: 1, iters: opts.iters.unwrap_or(3) },
    };
    let mut cudnn = None;
    let mut note = None;
    if let Device::Gpu(g) = dev {
        if is_cuda {
            match cudnn::Cudnn::new(g) {
                Ok(c) => cudnn = Some(c),
                Err(e) => note = Some(format!("cuDNN comparison skipped (cudnn_ms and vs_cudnn are null): {e}")),
            }
        }
    }
    let mut rows = Vec::new();
    for &sp in &opts.sparsities {
        for (layer, sh) in distinct_convs_mode(opts.batch, opts.size, opts.mode, sp, opts.round_to)? {
            let shape_rows = match opts.dtype {
                DType::F32 => measure::<f32>(dev, &layer, &sh, sp, opts, reps, cudnn.as_ref())?,
                DType::Bf16 => measure::<bf16>(dev, &layer, &sh, sp, opts, reps, cudnn.as_ref())?,
            };
            for r in &shape_rows {
                progress(r);
            }
            rows.extend(shape_rows);
        }
    }
    Ok((rows, note))
}

/// The rows of one shape: each pass of `opts`, timed on `dev` (and by cuDNN when given).
fn measure<T: ConvElem + cudnn::CudnnElem>(
    dev: &Device,
    layer: &str,
    sh: &ConvShape,
    sparsity: f64,
    opts: &BenchOpts,
    reps: Reps,
    cudnn: Option<&cudnn::Cudnn>,
) -> Result<Vec<Row>> {
    let mut b = PassBuffers::<T>::new(dev, sh)?;
    let mut rows = Vec::with_capacity(opts.passes.len());
    for &pass in &opts.passes {
        let ms = time_ms(dev, reps, || b.run(dev, pass, sh))?;
        let cudnn_ms = match (cudnn, dev.gpu()) {
            (Some(c), Some(g)) => Some(c.time_ms::<T>(g, pass, sh, &b, reps)?),
            _ => None,
        };
        rows.push(Row {
            layer: layer.to_string(),
            shape: *sh,
            pass,
            dtype: opts.dtype,
            sparsity,
            mode: opts.mode,
            ms,
            tflops: sh.flops() / (ms * 1e-3) / 1e12,
            cudnn_ms,
            vs_cudnn: cudnn_ms.map(|c| c / ms),
        });
    }
    Ok(rows)
}

/// The rows as a table (one line per row), with geometric means of `vs_cudnn` per
/// sparsity where known.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:>4} {:>4}x{:<4} {:>5} {:>5} {:>3} {:>2} {:>3} {:>5} {:>5} {:>9} {:>8} {:>9} {:>6}",
        "layer", "n", "h", "w", "c", "k", "rs", "st", "pad", "pass", "spars", "ms", "TFLOP/s", "cudnn_ms", "vs"
    );
    for r in rows {
        let sh = &r.shape;
        let _ = writeln!(
            s,
            "{:<22} {:>4} {:>4}x{:<4} {:>5} {:>5} {:>3} {:>2} {:>3} {:>5} {:>5.2} {:>9.4} {:>8.3} {:>9} {:>6}",
            r.layer,
            sh.n,
            sh.h,
            sh.w,
            sh.c,
            sh.k,
            format!("{}x{}", sh.r, sh.s),
            sh.stride,
            sh.pad,
            r.pass.name(),
            r.sparsity,
            r.ms,
            r.tflops,
            r.cudnn_ms.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
            r.vs_cudnn.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
        );
    }
    let mut sps: Vec<f64> = rows.iter().map(|r| r.sparsity).collect();
    sps.dedup();
    for sp in sps {
        let v: Vec<f64> = rows.iter().filter(|r| r.sparsity == sp).filter_map(|r| r.vs_cudnn).collect();
        if !v.is_empty() {
            let g = (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp();
            let _ = writeln!(s, "sparsity {sp}: geometric mean of vs_cudnn over {} rows = {g:.3}", v.len());
        }
    }
    s
}

/// cuDNN through cudarc's bindings, loaded at run time.
mod cudnn {
    use super::*;
    use cudarc::cudnn::{result as cr, sys};
    use cudarc::driver::{result as dr, sys as dsys};
    use std::ffi::c_void;

    /// Element types with a cuDNN data type.
    pub trait CudnnElem {
        const DT: sys::cudnnDataType_t;
    }
    impl CudnnElem for f32 {
        const DT: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    }
    impl CudnnElem for bf16 {
        const DT: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
    }

    /// One cuDNN call with a workspace (pointer, bytes).
    type CudnnCall = Box<dyn Fn(*mut c_void, usize) -> sys::cudnnStatus_t>;

    pub struct Cudnn {
        handle: sys::cudnnHandle_t,
    }

    impl Drop for Cudnn {
        fn drop(&mut self) {
            // SAFETY: created by create_handle, destroyed once.
            unsafe {
                let _ = cr::destroy_handle(self.handle);
            }
        }
    }

    fn err(what: &str, e: impl std::fmt::Debug) -> crate::Error {
        invalid!("cuDNN {what}: {e:?}")
    }

    /// Descriptors of one convolution, destroyed on drop.
    struct Descs {
        x: sys::cudnnTensorDescriptor_t,
        y: sys::cudnnTensorDescriptor_t,
        w: sys::cudnnFilterDescriptor_t,
        conv: sys::cudnnConvolutionDescriptor_t,
    }
    impl Drop for Descs {
        fn drop(&mut self) {
            // SAFETY: each was created once below.
            unsafe {
                let _ = cr::destroy_tensor_descriptor(self.x);
                let _ = cr::destroy_tensor_descriptor(self.y);
                let _ = cr::destroy_filter_descriptor(self.w);
                let _ = cr::destroy_convolution_descriptor(self.conv);
            }
        }
    }

    fn descs<T: CudnnElem>(sh: &ConvShape) -> Result<Descs> {
        let i = |v: usize| v as i32;
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let d = Descs {
            x: cr::create_tensor_descriptor().map_err(|e| err("tensor descriptor", e))?,
            y: cr::create_tensor_descriptor().map_err(|e| err("tensor descriptor", e))?,
            w: cr::create_filter_descriptor().map_err(|e| err("filter descriptor", e))?,
            conv: cr::create_convolution_descriptor().map_err(|e| err("convolution descriptor", e))?,
        };
        // SAFETY: fresh descriptors.
        unsafe {
            cr::set_tensor4d_descriptor(d.x, nhwc, T::DT, [i(sh.n), i(sh.c), i(sh.h), i(sh.w)])
                .map_err(|e| err("x descriptor", e))?;
            cr::set_tensor4d_descriptor(d.y, nhwc, T::DT, [i(sh.n), i(sh.k), i(sh.p()), i(sh.q())])
                .map_err(|e| err("y descriptor", e))?;
            cr::set_filter4d_descriptor(d.w, T::DT, nhwc, [i(sh.k), i(sh.c), i(sh.r), i(sh.s)])
                .map_err(|e| err("w descriptor", e))?;
            cr::set_convolution2d_descriptor(
                d.conv,
                i(sh.pad),
                i(sh.pad),
                i(sh.stride),
                i(sh.stride),
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| err("convolution descriptor", e))?;
            // f32 without TF32 (as our SIMT kernels); bf16 on tensor cores.
            let math = if T::DT == sys::cudnnDataType_t::CUDNN_DATA_FLOAT {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            };
            cr::set_convolution_math_type(d.conv, math).map_err(|e| err("math type", e))?;
        }
        Ok(d)
    }

    impl Cudnn {
        /// A handle on the current context of `gpu`, or why there is none.
        pub fn new(gpu: &Gpu) -> Result<Cudnn> {
            // SAFETY: only tries to load the library.
            if !unsafe { sys::is_culib_present() } {
                return Err(invalid!("libcudnn (cuDNN 9) was not found by the dynamic loader"));
            }
            gpu.synchronize()?; // binds our context to this thread
            let handle = std::panic::catch_unwind(cr::create_handle)
                .map_err(|_| invalid!("libcudnn could not be loaded"))?
                .map_err(|e| err("cudnnCreate", e))?;
            Ok(Cudnn { handle })
        }

        /// cuDNN's best algorithm for `pass` (cudnnFind*, which times them all) on the
        /// inputs of `bufs`, timed with CUDA events on the legacy stream that the handle
        /// uses.
        pub fn time_ms<T: ConvElem + CudnnElem>(
            &self,
            gpu: &Gpu,
            pass: Pass,
            sh: &ConvShape,
            bufs: &PassBuffers<T>,
            reps: Reps,
        ) -> Result<f64> {
            gpu.synchronize()?;
            let d = descs::<T>(sh)?;
            let p = |b: &Buf<T>| -> Result<*mut c_void> {
                Ok(b.gpu_buf().ok_or_else(|| invalid!("buffer not on the GPU"))?.ptr() as *mut c_void)
            };
            let (xp, wp, dyp) = (p(&bufs.x)?, p(&bufs.w)?, p(&bufs.dy)?);
            // Outputs of cuDNN's own (same dtype as the inputs, also for dw).
            let out_len = match pass {
                Pass::Fprop => sh.y_len(),
                Pass::Dgrad => sh.x_len(),
                Pass::Wgrad => sh.w_len(),
            };
            let out = gpu.alloc::<T>(out_len)?;
            let op = out.ptr() as *mut c_void;
            let (alpha, beta) = (1.0f32, 0.0f32);
            let (a, bt) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
            let h = self.handle;
            let mut count = 0i32;
            // Find the best algorithm, allocate its workspace, and make a closure that runs it.
            let (ws_bytes, run): (usize, CudnnCall) = unsafe {
                match pass {
                    Pass::Fprop => {
                        let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 16];
                        sys::cudnnFindConvolutionForwardAlgorithm(
                            h,
                            d.x,
                            d.w,
                            d.conv,
                            d.y,
                            16,
                            &mut count,
                            perf.as_mut_ptr(),
                        )
                        .result()
                        .map_err(|e| err("cudnnFindConvolutionForwardAlgorithm", e))?;
                        let best = perf[..count.max(0) as usize]
                            .iter()
                            .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                            .ok_or_else(|| invalid!("cuDNN has no forward algorithm for {sh:?}"))?;
                        let (algo, ws) = (best.algo, best.memory);
                        let (xd, wd, cd, yd) = (d.x, d.w, d.conv, d.y);
                        (
                            ws,
                            Box::new(move |wsp, wsn| {
                                sys::cudnnConvolutionForward(h, a, xd, xp, wd, wp, cd, algo, wsp, wsn, bt, yd, op)
                            }),
                        )
                    }
                    Pass::Dgrad => {
                        let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 16];
                        sys::cudnnFindConvolutionBackwardDataAlgorithm(
                            h,
                            d.w,
                            d.y,
                            d.conv,
                            d.x,
                            16,
                            &mut count,
                            perf.as_mut_ptr(),
                        )
                        .result()
                        .map_err(|e| err("cudnnFindConvolutionBackwardDataAlgorithm", e))?;
                        let best = perf[..count.max(0) as usize]
                            .iter()
                            .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                            .ok_or_else(|| invalid!("cuDNN has no backward-data algorithm for {sh:?}"))?;
                        let (algo, ws) = (best.algo, best.memory);
                        let (xd, wd, cd, yd) = (d.x, d.w, d.conv, d.y);
                        (
                            ws,
                            Box::new(move |wsp, wsn| {
                                sys::cudnnConvolutionBackwardData(h, a, wd, wp, yd, dyp, cd, algo, wsp, wsn, bt, xd, op)
                            }),
                        )
                    }
                    Pass::Wgrad => {
                        let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 16];
                        sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                            h,
                            d.x,
                            d.y,
                            d.conv,
                            d.w,
                            16,
                            &mut count,
                            perf.as_mut_ptr(),
                        )
                        .result()
                        .map_err(|e| err("cudnnFindConvolutionBackwardFilterAlgorithm", e))?;
                        let best = perf[..count.max(0) as usize]
                            .iter()
                            .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                            .ok_or_else(|| invalid!("cuDNN has no backward-filter algorithm for {sh:?}"))?;
                        let (algo, ws) = (best.algo, best.memory);
                        let (xd, wd, cd, yd) = (d.x, d.w, d.conv, d.y);
                        (
                            ws,
                            Box::new(move |wsp, wsn| {
                                sys::cudnnConvolutionBackwardFilter(
                                    h, a, xd, xp, yd, dyp, cd, algo, wsp, wsn, bt, wd, op,
                                )
                            }),
                        )
                    }
                }
            };
            let ws = gpu.alloc::<u8>(ws_bytes.max(1))?;
            let wsp = ws.ptr() as *mut c_void;
            let call = || -> Result<()> { run(wsp, ws_bytes).result().map_err(|e| err(pass.name(), e)) };
            for _ in 0..reps.warm {
                call()?;
            }
            let ev = |f| dr::event::create(f).map_err(|e| err("cuEventCreate", e));
            let (start, end) = (ev(dsys::CUevent_flags::CU_EVENT_DEFAULT)?, ev(dsys::CUevent_flags::CU_EVENT_DEFAULT)?);
            let null: dsys::CUstream = std::ptr::null_mut();
            // SAFETY: fresh events on the legacy stream, which the handle uses.
            let ms = unsafe {
                let r = (|| -> Result<f64> {
                    dr::event::record(start, null).map_err(|e| err("cuEventRecord", e))?;
                    for _ in 0..reps.iters {
                        call()?;
                    }
                    dr::event::record(end, null).map_err(|e| err("cuEventRecord", e))?;
                    dr::event::synchronize(end).map_err(|e| err("cuEventSynchronize", e))?;
                    Ok(dr::event::elapsed(start, end).map_err(|e| err("cuEventElapsedTime", e))? as f64)
                })();
                let _ = dr::event::destroy(start);
                let _ = dr::event::destroy(end);
                r?
            };
            // The buffers must outlive the queued work.
            dr::ctx::synchronize().map_err(|e| err("cuCtxSynchronize", e))?;
            drop((out, ws));
            Ok(ms / reps.iters as f64)
        }
    }
}
