//! The executor: one API over two back ends that run the kernels of `kernels/*.cu`.
//!
//! - **cuda**: a real GPU through cudarc (the driver is loaded at run time, so nothing
//!   CUDA is needed to build); the kernels are the fatbins that build.rs made with nvcc.
//! - **emu**: the same kernels compiled for the host against `kernels/emu`, run by the
//!   emulation of the CUDA execution model (fibers, guard pages, poison, barrier checks).
//!
//! Everything a kernel needs goes through [`Gpu`]: typed buffers ([`GpuBuf`]), copies,
//! launches of a named kernel with a `#[repr(C)]` parameter struct, and timing events.
//! Modules are loaded lazily, once. Every failure is a [`GpuError`].

mod cuda;
mod emu;
mod error;

use std::marker::PhantomData;
use std::sync::Arc;

pub use emu::Schedule;
pub use error::GpuError;

/// Where build.rs put each kernel module: the fatbin (when nvcc was found) and the
/// emulation's table of entry points.
pub struct ModuleSource {
    /// The module's name: `kernels/<name>.cu`.
    pub name: &'static str,
    /// The nvcc-compiled fatbin for the cuda back end; `None` when built without nvcc.
    pub fatbin: Option<&'static [u8]>,
    /// Returns the module's table of host-compiled entry points for the emu back end.
    pub emu: unsafe extern "C" fn() -> *const EmuModule,
}

/// Opaque: the emulation's table of one module's entry points.
#[repr(C)]
pub struct EmuModule {
    _private: [u8; 0],
}

mod generated {
    use super::{EmuModule, ModuleSource};
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The nvcc release the CUDA kernels were compiled with, if any.
pub fn nvcc_version() -> Option<&'static str> {
    generated::NVCC_VERSION
}

/// ptxas' report for every kernel and architecture: registers, spills, shared memory.
pub fn resource_report() -> &'static str {
    generated::RESOURCE_REPORT
}

fn module_source(name: &str) -> Option<&'static ModuleSource> {
    generated::MODULES.iter().find(|m| m.name == name)
}

/// The emulation-only modules with a planted bug: (variant name, the module it replaces).
#[doc(hidden)]
pub fn emu_fault_variants() -> Vec<(&'static str, &'static str)> {
    generated::EMU_FAULTS.iter().map(|(s, m)| (s.name, *m)).collect()
}

/// A kernel entry point: `kernels/<module>.cu`, `extern "C"` function `name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The module: `kernels/<module>.cu`.
    pub module: &'static str,
    /// The `extern "C"` kernel function's name.
    pub name: &'static str,
}

impl Kernel {
    /// The kernel `name` of `kernels/<module>.cu`.
    pub const fn new(module: &'static str, name: &'static str) -> Self {
        Kernel { module, name }
    }
}

/// A kernel's parameter struct: `#[repr(C)]`, plain data, mirrored in `kernels/params.h`.
///
/// # Safety
/// The type must have exactly the layout of the C struct named `C_NAME`, and every
/// device pointer in it must be valid for what the kernel does with it.
pub unsafe trait KernelParams: Copy + Send + 'static {
    /// The name of the mirrored C struct in `kernels/params.h`.
    const C_NAME: &'static str;
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks along x, y and z (each at least 1).
    pub grid: (u32, u32, u32),
    /// Threads per block along x, y and z (each at least 1).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// `blocks` blocks of `threads` threads along x.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchConfig { grid: (blocks, 1, 1), block: (threads, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Element types that live in device buffers.
pub trait Elem: bytemuck::Pod + Send + Sync + std::fmt::Debug + 'static {
    /// The type's short name in messages, e.g. `f32`.
    const NAME: &'static str;
}
macro_rules! elem {
    ($($t:ty => $n:literal),*) => { $(impl Elem for $t { const NAME: &'static str = $n; })* };
}
elem!(f32 => "f32", f64 => "f64", half::bf16 => "bf16", half::f16 => "f16", i32 => "i32", i64 => "i64",
      u8 => "u8", u16 => "u16", u32 => "u32", u64 => "u64");

/// Which back end a [`Gpu`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A real NVIDIA GPU through the CUDA driver.
    Cuda,
    /// The host emulation of CUDA.
    Emu,
}

enum Backend {
    Cuda(cuda::CudaBackend),
    Emu(emu::EmuBackend),
}

/// A captured CUDA graph ([`Gpu::capture`]), replayed with [`Gpu::replay`]; it keeps its
/// device alive.
pub struct Graph {
    graph: cuda::CudaGraph,
    backend: Arc<Backend>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph")
    }
}

/// A handle to a kernel device (cheap to clone). All work is ordered on one stream.
#[derive(Clone)]
pub struct Gpu {
    backend: Arc<Backend>,
    allocations: Arc<std::sync::atomic::AtomicU64>,
    conv_wgmma: bool,
    conv_wgmma_ws: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.name())
    }
}

/// What `PK_WGMMA` asks for: (the warpgroup-MMA convolutions, their warp-specialized
/// form). Unset, empty or `0`: neither; `1`: the multistage kernels; `ws`: the
/// warp-specialized ones; anything else is an error.
pub fn wgmma_from_env() -> Result<(bool, bool), GpuError> {
    match std::env::var("PK_WGMMA").as_deref() {
        Err(_) | Ok("") | Ok("0") => Ok((false, false)),
        Ok("1") => Ok((true, false)),
        Ok("ws") => Ok((true, true)),
        Ok(v) => Err(GpuError::Invalid(format!("PK_WGMMA is {v:?}: it takes 0, 1 or ws"))),
    }
}

impl Gpu {
    /// A handle over `backend` with the convolution kernels `PK_WGMMA` asks for (see
    /// [`wgmma_from_env`]; an invalid value counts as unset here: the constructors that
    /// can fail report it first).
    fn over(backend: Backend) -> Gpu {
        let mut g = Gpu {
            backend: Arc::new(backend),
            allocations: Default::default(),
            conv_wgmma: false,
            conv_wgmma_ws: false,
        };
        let (wgmma, ws) = wgmma_from_env().unwrap_or((false, false));
        g.conv_wgmma = g.has_wgmma() && wgmma;
        g.conv_wgmma_ws = g.conv_wgmma && ws;
        g
    }

    /// The CUDA device `ordinal`. Fails with a clear error when there is no driver, no
    /// device, when the kernels were built without nvcc, or when `PK_WGMMA` is set to
    /// something other than `0`, `1` or `ws`.
    pub fn cuda(ordinal: usize) -> Result<Gpu, GpuError> {
        wgmma_from_env()?;
        Ok(Gpu::over(Backend::Cuda(cuda::CudaBackend::new(ordinal)?)))
    }

    /// The host emulation, with the fiber schedule from `PK_EMU_SCHEDULE`
    /// (`forward`, `reverse` or `shuffle:SEED`; forward by default). Fails on an invalid
    /// `PK_EMU_SCHEDULE` or `PK_WGMMA`.
    pub fn emu() -> Result<Gpu, GpuError> {
        wgmma_from_env()?;
        Ok(Gpu::emu_with(Schedule::from_env()?))
    }

    /// The host emulation with the given fiber schedule.
    pub fn emu_with(schedule: Schedule) -> Gpu {
        Gpu::over(Backend::Emu(emu::EmuBackend::new(schedule)))
    }

    /// The host emulation in counting mode (`emu:count`): every launch is checked and
    /// skipped, so that the ops layer's FLOP and byte counts of any shape come without the
    /// work (see the emu back end's documentation). Fails on an invalid `PK_WGMMA`.
    pub fn emu_count() -> Result<Gpu, GpuError> {
        wgmma_from_env()?;
        Ok(Gpu::over(Backend::Emu(emu::EmuBackend::counting())))
    }

    /// How many times each kernel was launched on this device, in the emulation (`None` on
    /// a GPU): tests use it to see which kernels a computation ran.
    pub fn emu_launches(&self) -> Option<std::collections::HashMap<&'static str, u64>> {
        match &*self.backend {
            Backend::Cuda(_) => None,
            Backend::Emu(e) => Some(e.launches()),
        }
    }

    /// Whether this is the emulation's counting mode, whose results are all zeros.
    pub fn counts_only(&self) -> bool {
        matches!(&*self.backend, Backend::Emu(e) if e.counts_only())
    }

    /// The host emulation with one module replaced by a variant with a planted bug (see
    /// [`emu_fault_variants`]), for tests that show a real kernel bug is caught.
    #[doc(hidden)]
    pub fn emu_with_fault(schedule: Schedule, variant: &str) -> Result<Gpu, GpuError> {
        let (src, module) = generated::EMU_FAULTS
            .iter()
            .find(|(s, _)| s.name == variant)
            .ok_or_else(|| GpuError::Invalid(format!("no emulation fault variant {variant:?}")))?;
        let backend = emu::EmuBackend::with_fault(schedule, module, src);
        Ok(Gpu::over(Backend::Emu(backend)))
    }

    /// Which back end this handle runs on.
    pub fn kind(&self) -> BackendKind {
        match &*self.backend {
            Backend::Cuda(_) => BackendKind::Cuda,
            Backend::Emu(_) => BackendKind::Emu,
        }
    }

    /// A human-readable name: the GPU's, or the emulation's with its schedule; with the
    /// warpgroup-MMA convolutions on ([`conv_wgmma`](Gpu::conv_wgmma)) it says so.
    pub fn name(&self) -> String {
        let name = match &*self.backend {
            Backend::Cuda(c) => c.name(),
            Backend::Emu(e) => e.name(),
        };
        match (self.conv_wgmma, self.conv_wgmma_ws) {
            (true, true) => format!("{name}, convolutions on warp-specialized wgmma"),
            (true, false) => format!("{name}, convolutions on wgmma"),
            _ => name,
        }
    }

    /// Whether this device runs the warpgroup-MMA kernels (wgmma, built for sm_90a): a
    /// CUDA GPU of compute capability 9.0 (H100, H200), and the emulation.
    pub fn has_wgmma(&self) -> bool {
        match &*self.backend {
            Backend::Cuda(c) => c.compute_capability() == (9, 0),
            Backend::Emu(_) => true,
        }
    }

    /// Whether the convolutions pick the warpgroup-MMA kernels where one exists (fprop of
    /// 16-bit types with channel counts that are multiples of 8): on a device that
    /// [`has_wgmma`](Gpu::has_wgmma), when the environment set `PK_WGMMA=1` (or `ws`, see
    /// [`conv_wgmma_ws`](Gpu::conv_wgmma_ws)) as the handle was made, or after
    /// [`set_conv_wgmma`](Gpu::set_conv_wgmma). Off by default: the mma.sync kernels are
    /// the ones timed and verified on a GPU so far.
    pub fn conv_wgmma(&self) -> bool {
        self.conv_wgmma
    }

    /// Turns the warpgroup-MMA convolutions on or off for this handle (and the clones made
    /// from it afterwards); an error on a device without them.
    pub fn set_conv_wgmma(&mut self, on: bool) -> Result<(), GpuError> {
        if on && !self.has_wgmma() {
            return Err(GpuError::Invalid(format!("{} has no warpgroup MMA (wgmma needs sm_90)", self.name())));
        }
        self.conv_wgmma = on;
        if !on {
            self.conv_wgmma_ws = false;
        }
        Ok(())
    }

    /// Whether the warpgroup-MMA convolutions are the warp-specialized ones (a producer
    /// warpgroup hands the stages to two MMA warpgroups on mbarriers): with
    /// [`conv_wgmma`](Gpu::conv_wgmma), when the environment set `PK_WGMMA=ws` or after
    /// [`set_conv_wgmma_ws`](Gpu::set_conv_wgmma_ws).
    pub fn conv_wgmma_ws(&self) -> bool {
        self.conv_wgmma_ws
    }

    /// Turns the warpgroup-MMA convolutions on in their warp-specialized form (`true`) or
    /// back to the multistage form (`false`, leaving [`conv_wgmma`](Gpu::conv_wgmma) as it
    /// is); an error on a device without wgmma.
    pub fn set_conv_wgmma_ws(&mut self, on: bool) -> Result<(), GpuError> {
        if on {
            self.set_conv_wgmma(true)?;
        }
        self.conv_wgmma_ws = on;
        Ok(())
    }

    /// Free and total memory of the GPU in bytes, or `None` in the emulation (whose buffers
    /// live in host memory).
    pub fn memory(&self) -> Result<Option<(usize, usize)>, GpuError> {
        match &*self.backend {
            Backend::Cuda(c) => c.memory().map(Some),
            Backend::Emu(_) => Ok(None),
        }
    }

    /// How many device buffers this handle (and its clones) allocated so far: a training
    /// step that allocates nothing leaves it unchanged.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn alloc_bytes(&self, bytes: usize, zeroed: bool) -> Result<u64, GpuError> {
        self.allocations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &*self.backend {
            Backend::Cuda(c) => c.alloc(bytes, zeroed),
            Backend::Emu(e) => e.alloc(bytes, zeroed),
        }
    }

    fn free_bytes(&self, ptr: u64) {
        match &*self.backend {
            Backend::Cuda(c) => c.free(ptr),
            Backend::Emu(e) => e.free(ptr),
        }
    }

    fn bytes_of<T: Elem>(len: usize) -> Result<usize, GpuError> {
        len.checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| GpuError::Invalid(format!("a buffer of {len} {} is too large", T::NAME)))
    }

    /// A buffer of `len` elements whose contents are undefined (on emu: poisoned with
    /// 0xFF bytes, which reads as NaN for floats and -1 for integers).
    pub fn alloc<T: Elem>(&self, len: usize) -> Result<GpuBuf<T>, GpuError> {
        let ptr = self.alloc_bytes(Self::bytes_of::<T>(len)?, false)?;
        Ok(GpuBuf { ptr, len, gpu: self.clone(), owned: true, _t: PhantomData })
    }

    /// A buffer over `len` elements at `ptr` that another owner allocated (a PyTorch
    /// tensor's memory, handed over through DLPack): kernels read and write it like any
    /// buffer, and dropping it frees nothing.
    ///
    /// # Safety
    ///
    /// `ptr .. ptr + len` elements must be memory of this device (device memory of the
    /// same context on cuda; host memory on emu), suitably aligned for `T`, and stay
    /// valid, and not be used by its owner in a way that races the queued work, for as
    /// long as work queued on this buffer runs.
    pub unsafe fn borrow<T: Elem>(&self, ptr: u64, len: usize) -> Result<GpuBuf<T>, GpuError> {
        Self::bytes_of::<T>(len)?;
        if !ptr.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(GpuError::Invalid(format!("address {ptr:#x} is not aligned for {}", T::NAME)));
        }
        Ok(GpuBuf { ptr, len, gpu: self.clone(), owned: false, _t: PhantomData })
    }

    /// The stream every launch goes to, as a `CUstream` handle (for DLPack's `stream=`), or
    /// `None` in the emulation, whose work is done when the call returns.
    pub fn stream_handle(&self) -> Option<u64> {
        match &*self.backend {
            Backend::Cuda(c) => Some(c.stream_handle()),
            Backend::Emu(_) => None,
        }
    }

    /// Makes another library's stream `other` (a `CUstream` of the same device, e.g.
    /// PyTorch's current stream) wait for the work queued here so far, without blocking
    /// the host. Nothing to do in the emulation.
    pub fn order_before(&self, other: u64) -> Result<(), GpuError> {
        match &*self.backend {
            Backend::Cuda(c) => c.before_stream(other),
            Backend::Emu(_) => Ok(()),
        }
    }

    /// A buffer of `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<GpuBuf<T>, GpuError> {
        let ptr = self.alloc_bytes(Self::bytes_of::<T>(len)?, true)?;
        Ok(GpuBuf { ptr, len, gpu: self.clone(), owned: true, _t: PhantomData })
    }

    /// A new buffer holding a copy of `data`.
    pub fn upload<T: Elem>(&self, data: &[T]) -> Result<GpuBuf<T>, GpuError> {
        let mut b = self.alloc(data.len())?;
        self.write(&mut b, 0, data)?;
        Ok(b)
    }

    /// Copies `data` into `buf[offset ..]`.
    pub fn write<T: Elem>(&self, buf: &mut GpuBuf<T>, offset: usize, data: &[T]) -> Result<(), GpuError> {
        buf.check_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let dst = buf.ptr + (offset * std::mem::size_of::<T>()) as u64;
        let src: &[u8] = bytemuck::cast_slice(data);
        match &*self.backend {
            Backend::Cuda(c) => c.htod(dst, src),
            Backend::Emu(e) => e.htod(dst, src),
        }
    }

    /// Copies `buf[offset .. offset + out.len()]` into `out` (waits for queued work).
    pub fn read<T: Elem>(&self, buf: &GpuBuf<T>, offset: usize, out: &mut [T]) -> Result<(), GpuError> {
        buf.check_range(offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let src = buf.ptr + (offset * std::mem::size_of::<T>()) as u64;
        let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
        match &*self.backend {
            Backend::Cuda(c) => c.dtoh(dst, src),
            Backend::Emu(e) => e.dtoh(dst, src),
        }
    }

    /// The whole buffer, copied to the host.
    pub fn download<T: Elem>(&self, buf: &GpuBuf<T>) -> Result<Vec<T>, GpuError> {
        let mut v = vec![T::zeroed(); buf.len];
        self.read(buf, 0, &mut v)?;
        Ok(v)
    }

    /// Copies `len` elements from `src[src_offset ..]` to `dst[dst_offset ..]` on the device.
    pub fn copy<T: Elem>(
        &self,
        src: &GpuBuf<T>,
        src_offset: usize,
        dst: &mut GpuBuf<T>,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), GpuError> {
        src.check_range(src_offset, len)?;
        dst.check_range(dst_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let sz = std::mem::size_of::<T>() as u64;
        let (s, d) = (src.ptr + src_offset as u64 * sz, dst.ptr + dst_offset as u64 * sz);
        match &*self.backend {
            Backend::Cuda(c) => c.dtod(d, s, len * sz as usize),
            Backend::Emu(e) => e.dtod(d, s, len * sz as usize),
        }
    }

    /// Sets every byte of the buffer to zero.
    pub fn fill_zero<T: Elem>(&self, buf: &mut GpuBuf<T>) -> Result<(), GpuError> {
        if buf.len == 0 {
            return Ok(());
        }
        let bytes = buf.len * std::mem::size_of::<T>();
        match &*self.backend {
            Backend::Cuda(c) => c.memset_zero(buf.ptr, bytes),
            Backend::Emu(e) => e.memset_zero(buf.ptr, bytes),
        }
    }

    /// Launches `kernel` with the parameter struct `params`.
    ///
    /// # Safety
    /// Every device pointer in `params` must point into live buffers of this `Gpu`, large
    /// enough for everything the kernel reads and writes with this configuration. The
    /// typed wrappers in `crate::ops` check this before they call here.
    pub unsafe fn launch<P: KernelParams>(
        &self,
        kernel: Kernel,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<(), GpuError> {
        let (g, b) = (cfg.grid, cfg.block);
        if g.0 == 0 || g.1 == 0 || g.2 == 0 || b.0 == 0 || b.1 == 0 || b.2 == 0 {
            return Err(GpuError::Invalid(format!(
                "launch of {} with an empty grid {g:?} or block {b:?}",
                kernel.name
            )));
        }
        let bytes = std::slice::from_raw_parts(params as *const P as *const u8, std::mem::size_of::<P>());
        match &*self.backend {
            Backend::Cuda(c) => c.launch(kernel, cfg, params as *const P as *mut std::ffi::c_void, bytes.len()),
            Backend::Emu(e) => e.launch(kernel, cfg, bytes),
        }
    }

    /// Whether [`capture`](Self::capture) works here: on the cuda back end (without
    /// synchronous launches); the emulation runs launches as they come.
    pub fn can_capture(&self) -> bool {
        match &*self.backend {
            Backend::Cuda(c) => c.can_capture(),
            Backend::Emu(_) => false,
        }
    }

    /// Captures every launch, copy and memset that `f` queues on the stream into one CUDA
    /// graph instead of running them (stream capture), and returns `f`'s result with the
    /// graph, which [`replay`](Self::replay) runs. `f` must not wait for the device, read
    /// results back or allocate. An error of `f` ends the capture and is returned. Only on
    /// the cuda back end (see [`can_capture`](Self::can_capture)).
    pub fn capture<R, E: From<GpuError>>(&self, f: impl FnOnce() -> Result<R, E>) -> Result<(R, Graph), E> {
        let Backend::Cuda(c) = &*self.backend else {
            return Err(GpuError::Invalid("graph capture needs the cuda back end".into()).into());
        };
        c.begin_capture()?;
        let r = f();
        let g = c.end_capture();
        let r = r?;
        Ok((r, Graph { graph: g?, backend: self.backend.clone() }))
    }

    /// Queues one run of a graph that [`capture`](Self::capture) made on this device.
    pub fn replay(&self, g: &Graph) -> Result<(), GpuError> {
        if !Arc::ptr_eq(&self.backend, &g.backend) {
            return Err(GpuError::Invalid("the graph was captured on another device".into()));
        }
        match &*self.backend {
            Backend::Cuda(c) => c.launch_graph(&g.graph),
            Backend::Emu(_) => Err(GpuError::Invalid("graph replay needs the cuda back end".into())),
        }
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        match &*self.backend {
            Backend::Cuda(c) => c.synchronize(),
            Backend::Emu(_) => Ok(()),
        }
    }

    /// Records a timing event on the stream (a CUDA event; wall clock on emu, whose
    /// launches are synchronous).
    pub fn record(&self) -> Result<Event, GpuError> {
        match &*self.backend {
            Backend::Cuda(c) => Ok(Event::Cuda(c.record()?)),
            Backend::Emu(_) => Ok(Event::Host(std::time::Instant::now())),
        }
    }

    /// Milliseconds between two recorded events (waits for `end`).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f64, GpuError> {
        match (&*self.backend, start, end) {
            (Backend::Cuda(c), Event::Cuda(s), Event::Cuda(e)) => c.elapsed_ms(s, e),
            (_, Event::Host(s), Event::Host(e)) => Ok(e.duration_since(*s).as_secs_f64() * 1e3),
            _ => Err(GpuError::Invalid("events from different back ends".into())),
        }
    }
}

/// A timing event from [`Gpu::record`].
pub enum Event {
    /// A CUDA event recorded on the stream (cuda back end).
    Cuda(cuda::CudaEvent),
    /// The wall-clock time at recording (emu back end).
    Host(std::time::Instant),
}

/// A typed device buffer; freed when dropped.
pub struct GpuBuf<T: Elem> {
    ptr: u64,
    len: usize,
    gpu: Gpu,
    /// Freed on drop; false for [`Gpu::borrow`]ed memory, which its owner frees.
    owned: bool,
    _t: PhantomData<T>,
}

impl<T: Elem> std::fmt::Debug for GpuBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf<{}>[{}]", T::NAME, self.len)
    }
}

impl<T: Elem> GpuBuf<T> {
    /// The number of elements (not bytes).
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device the buffer lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    /// The device address of the first element, for a kernel's parameter struct.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The device address of element `offset` (which may be `len`, one past the end).
    pub fn ptr_at(&self, offset: usize) -> Result<u64, GpuError> {
        self.check_range(offset, 0)?;
        Ok(self.ptr + (offset * std::mem::size_of::<T>()) as u64)
    }
    fn check_range(&self, offset: usize, len: usize) -> Result<(), GpuError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(GpuError::Invalid(format!(
                "range {offset}..{offset}+{len} is outside a buffer of {} {}",
                self.len,
                T::NAME
            ))),
        }
    }
    /// True if this buffer lives on `gpu` (the same handle or one of its clones).
    pub fn same_gpu(&self, gpu: &Gpu) -> bool {
        Arc::ptr_eq(&self.gpu.backend, &gpu.backend)
    }
}

impl<T: Elem> Drop for GpuBuf<T> {
    fn drop(&mut self) {
        if self.owned {
            self.gpu.free_bytes(self.ptr);
        }
    }
}
