//! The convolution kernels of a kernel device on tensors handed over through DLPack
//! (`tensor.__dlpack__()`): PyTorch's CUDA tensors run prunekit's CUDA kernels in place,
//! on the tensors' own memory, and the host emulation (`emu`) takes CPU tensors the same
//! way (for tests without a GPU). Activations are NHWC, weights KRSC, float32, dense.
//!
//! Ordering: the capsules are made with `stream=` our stream (so PyTorch makes our stream
//! wait for the tensors' pending work, as DLPack specifies), and after the launch the
//! caller's stream waits for ours ([`prunekit::gpu::Gpu::order_before`]): PyTorch's next
//! use of the output, and its reuse of any of the memory, come after our kernels.

use dlpark::ffi::{DLDataTypeCode, DLDeviceType, DLManagedTensor};
use prunekit::gpu::Gpu;
use prunekit::ops::conv;
use prunekit::shape::{ConvShape, Pass};
use prunekit::{Buf, Device};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods};
use std::collections::HashMap;
use std::sync::Mutex;

/// One handle per device name, kept for the process: a CUDA device's modules load once.
static DEVICES: Mutex<Option<HashMap<String, Gpu>>> = Mutex::new(None);

/// The kernel device `name` (`emu`, `cuda`, `cuda:N`) and the DLPack device its tensors
/// must be on.
fn kernel_device(name: &str) -> PyResult<(Gpu, DLDeviceType, i32)> {
    let (want, id) = match name {
        "emu" => (DLDeviceType::CPU, 0),
        "cuda" => (DLDeviceType::CUDA, 0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<i32>) {
            Some(Ok(n)) if n >= 0 => (DLDeviceType::CUDA, n),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "device {name:?}: DLPack tensors run on emu, cuda or cuda:N (CPU tensors take the CPU kernels)"
                )))
            }
        },
    };
    let mut map = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    if let Some(g) = map.get(name) {
        return Ok((g.clone(), want, id));
    }
    let g = match Device::parse(name).map_err(crate::to_py)? {
        Device::Gpu(g) => g,
        Device::Cpu => unreachable!("emu and cuda parse to kernel devices"),
    };
    map.insert(name.to_string(), g.clone());
    Ok((g, want, id))
}

/// The stream the kernels of `device` run on, as an integer for `__dlpack__(stream=...)`,
/// or `None` for the emulation (synchronous).
#[pyfunction]
fn device_stream(device: &str) -> PyResult<Option<u64>> {
    Ok(kernel_device(device)?.0.stream_handle())
}

/// The element types the kernel devices' convolutions take.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }
    fn size(self) -> u64 {
        if self == Dtype::F32 {
            4
        } else {
            2
        }
    }
}

/// A rank-4 dense tensor from a DLPack capsule: its address, shape and element type.
struct View {
    ptr: u64,
    dims: [usize; 4],
    dtype: Dtype,
}

impl View {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }
    fn bytes(&self) -> std::ops::Range<u64> {
        self.ptr..self.ptr + self.dtype.size() * self.len() as u64
    }
}

fn device_name(t: DLDeviceType) -> &'static str {
    match t {
        DLDeviceType::CPU => "cpu",
        DLDeviceType::CUDA => "cuda",
        DLDeviceType::CUDAHOST => "cuda pinned host memory",
        DLDeviceType::CUDAMANAGED => "cuda managed memory",
        DLDeviceType::ROCM => "rocm",
        _ => "another device",
    }
}

fn view(obj: &Bound<'_, PyAny>, what: &str, want: DLDeviceType, id: i32) -> PyResult<View> {
    let cap = obj.cast::<PyCapsule>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: expected a DLPack capsule (tensor.__dlpack__()), got {}",
            obj.get_type()
        ))
    })?;
    let ptr = cap
        .pointer_checked(Some(c"dltensor"))
        .map_err(|_| PyValueError::new_err(format!("{what}: not an unused DLPack capsule (named \"dltensor\")")))?;
    // SAFETY: a capsule named "dltensor" holds a DLManagedTensor (the DLPack protocol),
    // alive as long as the capsule, which the caller holds for the whole call.
    let t = unsafe { &(*ptr.cast::<DLManagedTensor>().as_ptr()).dl_tensor };
    if t.device.device_type != want || t.device.device_id != id {
        return Err(PyValueError::new_err(format!(
            "{what} is on {}:{}, the kernels on {}:{id}",
            device_name(t.device.device_type),
            t.device.device_id,
            device_name(want)
        )));
    }
    let dt = t.dtype;
    let dtype = match (dt.code, dt.bits, dt.lanes) {
        (DLDataTypeCode::FLOAT, 32, 1) => Dtype::F32,
        (DLDataTypeCode::FLOAT, 16, 1) => Dtype::F16,
        (DLDataTypeCode::BFLOAT, 16, 1) => Dtype::Bf16,
        _ => {
            return Err(PyValueError::new_err(format!(
                "{what}: expected float32, bfloat16 or float16, got type code {} of {} bits x {} lanes",
                dt.code.0, dt.bits, dt.lanes
            )))
        }
    };
    if t.ndim != 4 {
        return Err(PyValueError::new_err(format!("{what}: expected a rank-4 tensor, got rank {}", t.ndim)));
    }
    // SAFETY: shape (and strides, when not null) point at ndim int64s (DLPack).
    let shape = unsafe { std::slice::from_raw_parts(t.shape, 4) };
    let mut dims = [0usize; 4];
    for (d, &s) in dims.iter_mut().zip(shape) {
        *d = usize::try_from(s).map_err(|_| PyValueError::new_err(format!("{what}: negative extent {s}")))?;
    }
    if !t.strides.is_null() && dims.iter().all(|&d| d > 0) {
        // SAFETY: as above.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, 4) };
        let mut expect = 1i64;
        for i in (0..4).rev() {
            if dims[i] != 1 && strides[i] != expect {
                return Err(PyValueError::new_err(format!(
                    "{what}: not dense in NHWC order (strides {strides:?} for shape {dims:?}); \
                     use channels-last memory (.contiguous(memory_format=torch.channels_last))"
                )));
            }
            expect *= dims[i] as i64;
        }
    }
    Ok(View { ptr: t.data as u64 + t.byte_offset, dims, dtype })
}

fn overlaps(a: &View, b: &View) -> bool {
    let (a, b) = (a.bytes(), b.bytes());
    a.start < b.end && b.start < a.end
}

/// One pass of the convolution on DLPack tensors, in place: `pass` is `fprop` (a = x
/// `[N,H,W,C]`, b = w `[K,R,S,C]`, out = y `[N,P,Q,K]`), `dgrad` (a = dy, b = w, out = dx)
/// or `wgrad` (a = x, b = dy, out = dw `[K,R,S,C]`). The inputs are float32, bfloat16 or
/// float16, both alike; the output has their type, except dw, which is float32 (the
/// kernels accumulate and write the weight gradient in float32). `stream`: the caller's
/// stream, made to wait for the kernels (PyTorch's current stream); ignored by the
/// emulation.
#[pyfunction]
#[pyo3(signature = (pass_, a, b, out, stride, padding, device, stream=None))]
#[allow(clippy::too_many_arguments)]
fn conv2d_dlpack(
    py: Python<'_>,
    pass_: &str,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    stride: usize,
    padding: usize,
    device: &str,
    stream: Option<u64>,
) -> PyResult<()> {
    crate::catch(|| {
        let (gpu, want, id) = kernel_device(device)?;
        let pass = Pass::parse(pass_).map_err(crate::to_py)?;
        let names = match pass {
            Pass::Fprop => ["x", "w", "y"],
            Pass::Dgrad => ["dy", "w", "dx"],
            Pass::Wgrad => ["x", "dy", "dw"],
        };
        let (va, vb, vo) = (view(a, names[0], want, id)?, view(b, names[1], want, id)?, view(out, names[2], want, id)?);
        // The geometry: x from the activation (or dx for dgrad), w from the weight (or dw).
        let (x, w) = match pass {
            Pass::Fprop => (va.dims, vb.dims),
            Pass::Dgrad => (vo.dims, vb.dims),
            Pass::Wgrad => (va.dims, vo.dims),
        };
        let [n, h, wd, c] = x;
        let [k, r, s, wc] = w;
        if wc != c {
            return Err(PyValueError::new_err(format!(
                "{} has {wc} input channels, {} has {c} (activations NHWC, weights KRSC)",
                if pass == Pass::Wgrad { "dw" } else { "w" },
                if pass == Pass::Dgrad { "dx" } else { "x" }
            )));
        }
        let sh = ConvShape { n, h, w: wd, c, k, r, s, stride, pad: padding };
        sh.validate().map_err(crate::to_py)?;
        let y = [n, sh.p(), sh.q(), k];
        let dy_view = match pass {
            Pass::Fprop => &vo,
            Pass::Dgrad => &va,
            Pass::Wgrad => &vb,
        };
        if dy_view.dims != y {
            let name = if pass == Pass::Fprop { "y" } else { "dy" };
            return Err(PyValueError::new_err(format!(
                "{name} has shape {:?}, the convolution's output {y:?}",
                dy_view.dims
            )));
        }
        if overlaps(&vo, &va) || overlaps(&vo, &vb) {
            return Err(PyValueError::new_err(format!("{} shares memory with an input", names[2])));
        }
        let t = va.dtype;
        let out_t = if pass == Pass::Wgrad { Dtype::F32 } else { t };
        if vb.dtype != t || vo.dtype != out_t {
            return Err(PyValueError::new_err(format!(
                "{} is {}, {} {} and {} {}: the inputs take one type, {}",
                names[0],
                t.name(),
                names[1],
                vb.dtype.name(),
                names[2],
                vo.dtype.name(),
                if pass == Pass::Wgrad { "dw is float32" } else { "the output theirs" }
            )));
        }
        let job = Job { gpu, sh, pass, views: [va, vb, vo], stream };
        match t {
            Dtype::F32 => job.run::<f32>(py),
            Dtype::Bf16 => job.run::<half::bf16>(py),
            Dtype::F16 => job.run::<half::f16>(py),
        }
    })
}

/// A checked pass, ready to run on tensors of element type `T`.
struct Job {
    gpu: Gpu,
    sh: ConvShape,
    pass: Pass,
    views: [View; 3],
    stream: Option<u64>,
}

impl Job {
    fn run<T: conv::ConvElem>(self, py: Python<'_>) -> PyResult<()> {
        let Job { gpu, sh, pass, views: [va, vb, vo], stream } = self;
        let dev = Device::Gpu(gpu.clone());
        crate::guarded(py, move || {
            let (a, b) = (borrow::<T>(&gpu, &va)?, borrow::<T>(&gpu, &vb)?);
            match pass {
                Pass::Fprop => conv::conv2d_fprop_with(&dev, &sh, &a, &b, &mut borrow::<T>(&gpu, &vo)?, None)?,
                Pass::Dgrad => conv::conv2d_dgrad_with(&dev, &sh, &a, &b, &mut borrow::<T>(&gpu, &vo)?, None)?,
                // dw is float32: the kernels accumulate and write it so.
                Pass::Wgrad => conv::conv2d_wgrad_with(&dev, &sh, &a, &b, &mut borrow::<f32>(&gpu, &vo)?, None)?,
            }
            // The caller's stream waits for the kernels just queued (cuda).
            if let Some(s) = stream {
                gpu.order_before(s)?;
            }
            Ok(())
        })
    }
}

/// `v` as a buffer of `gpu` of element type `U`.
fn borrow<U: prunekit::gpu::Elem>(gpu: &Gpu, v: &View) -> prunekit::Result<Buf<U>> {
    // SAFETY: a dense tensor of this device and type (checked by `view` and the caller)
    // that the caller's capsules keep alive for the call; on cuda, PyTorch's stream then
    // waits for ours before it touches the memory again.
    Ok(Buf::Gpu(unsafe { gpu.borrow::<U>(v.ptr, v.len()) }?))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(device_stream, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_dlpack, m)?)?;
    Ok(())
}
