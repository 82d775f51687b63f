//! The cuda back end: cudarc's driver API, loaded at run time. One non-blocking stream
//! per `Gpu`; modules are the fatbins that build.rs embedded, loaded lazily, once.

use super::{module_source, GpuError, Kernel, LaunchConfig};
use cudarc::driver::{result, sys, CudaContext, DriverError};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

fn driver_err(op: &'static str, e: DriverError) -> GpuError {
    if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        return GpuError::OutOfMemory { bytes: 0 };
    }
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    GpuError::Driver { op, msg: format!("{name}: {text}") }
}

struct Func {
    f: sys::CUfunction,
    max_dyn_smem: u32,
}
// SAFETY: CUfunction handles may be used from any thread that binds the context.
unsafe impl Send for Func {}

pub struct CudaEvent(sys::CUevent);
// SAFETY: events may be used from any thread that binds the context.
unsafe impl Send for CudaEvent {}
unsafe impl Sync for CudaEvent {}
impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: created by event::create, destroyed once.
        unsafe {
            let _ = result::event::destroy(self.0);
        }
    }
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    async_alloc: bool,
    name: String,
    cc: (i32, i32),
    modules: Mutex<HashMap<&'static str, sys::CUmodule>>,
    funcs: Mutex<HashMap<Kernel, Func>>,
    sync_launches: bool,
}
// SAFETY: the stream and module handles are used only with the context bound, and the
// maps are behind mutexes.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        if super::generated::MODULES.iter().any(|m| m.fatbin.is_none()) {
            return Err(GpuError::NoKernels);
        }
        let count = CudaContext::device_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::NoDevice(ordinal));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_err("cuDeviceGetAttribute", e))?;
        let name = format!("{} (sm_{major}{minor})", ctx.name().unwrap_or_else(|_| "CUDA device".into()));
        Ok(CudaBackend {
            async_alloc: ctx.has_async_alloc(),
            ctx,
            stream,
            name,
            cc: (major, minor),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            sync_launches: std::env::var_os("PK_SYNC_LAUNCHES").is_some(),
        })
    }

    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        self.bind()?;
        result::mem_get_info().map_err(|e| driver_err("cuMemGetInfo", e))
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))
    }

    pub fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64, GpuError> {
        self.bind()?;
        // cuMemAlloc refuses 0 bytes; an empty buffer still gets a distinct address.
        let n = bytes.max(1);
        // SAFETY: plain allocation on our stream.
        let r = unsafe {
            if self.async_alloc {
                result::malloc_async(self.stream, n)
            } else {
                result::malloc_sync(n)
            }
        };
        let ptr = r.map_err(|e| match driver_err("cuMemAlloc", e) {
            GpuError::OutOfMemory { .. } => GpuError::OutOfMemory { bytes },
            other => other,
        })?;
        if zeroed {
            self.memset_zero(ptr, bytes)?;
        }
        Ok(ptr)
    }

    pub fn free(&self, ptr: u64) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: ptr came from alloc; stream-ordered free after all queued work.
        unsafe {
            let _ = if self.async_alloc { result::free_async(ptr, self.stream) } else { result::free_sync(ptr) };
        }
    }

    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: the caller checked the range; a copy from pageable memory has read the
        // source by the time it returns.
        unsafe { result::memcpy_htod_async(dst, src, self.stream) }.map_err(|e| driver_err("cuMemcpyHtoD", e))
    }

    pub fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: the caller checked the range; we wait before returning.
        unsafe {
            result::memcpy_dtoh_async(dst, src, self.stream).map_err(|e| driver_err("cuMemcpyDtoH", e))?;
        }
        self.synchronize()
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: the caller checked both ranges.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream) }.map_err(|e| driver_err("cuMemcpyDtoD", e))
    }

    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller checked the range.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream) }.map_err(|e| driver_err("cuMemsetD8", e))
    }

    fn module(&self, name: &'static str) -> Result<sys::CUmodule, GpuError> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(name) {
            return Ok(*m);
        }
        let unknown = || GpuError::UnknownKernel { module: name.to_string(), name: String::new() };
        let src = module_source(name).ok_or_else(unknown)?;
        let fatbin = src.fatbin.ok_or(GpuError::NoKernels)?;
        // The driver reads the fatbin's header in place: give it 8-byte alignment.
        let mut aligned = vec![0u64; fatbin.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..fatbin.len()].copy_from_slice(fatbin);
        // SAFETY: a fatbin image that nvcc produced; the driver copies what it needs.
        let m = unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) }
            .map_err(|e| driver_err("cuModuleLoadData", e))?;
        mods.insert(name, m);
        Ok(m)
    }

    pub fn launch(
        &self,
        kernel: Kernel,
        cfg: LaunchConfig,
        params: *mut c_void,
        param_size: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let launch_err = |msg: String| GpuError::Launch { kernel: kernel.name.to_string(), msg };
        let mut funcs = self.funcs.lock().unwrap_or_else(|e| e.into_inner());
        let func = match funcs.entry(kernel) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let m = self.module(kernel.module)?;
                let cname = CString::new(kernel.name).map_err(|_| launch_err("bad kernel name".into()))?;
                // SAFETY: m is a loaded module.
                let f = unsafe { result::module::get_function(m, cname) }.map_err(|_| GpuError::UnknownKernel {
                    module: kernel.module.to_string(),
                    name: kernel.name.to_string(),
                })?;
                let (mut offset, mut size) = (0usize, 0usize);
                // SAFETY: f is a valid function; one parameter (index 0) by convention.
                let r = unsafe { sys::cuFuncGetParamInfo(f, 0, &mut offset, &mut size) };
                if r == sys::cudaError_enum::CUDA_SUCCESS && size != param_size {
                    return Err(GpuError::ParamSize {
                        kernel: kernel.name.to_string(),
                        expected: size,
                        got: param_size,
                    });
                }
                e.insert(Func { f, max_dyn_smem: 48 * 1024 })
            }
        };
        if cfg.shared_mem_bytes > func.max_dyn_smem {
            // SAFETY: raising the opt-in limit of a valid function.
            unsafe {
                result::function::set_function_attribute(
                    func.f,
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_mem_bytes as i32,
                )
            }
            .map_err(|e| launch_err(format!("{} bytes of dynamic shared memory: {e:?}", cfg.shared_mem_bytes)))?;
            func.max_dyn_smem = cfg.shared_mem_bytes;
        }
        let f = func.f;
        drop(funcs);
        let mut args = [params];
        // SAFETY: the caller vouched for the parameter struct (see Gpu::launch).
        unsafe {
            result::launch_kernel(f, cfg.grid, cfg.block, cfg.shared_mem_bytes, self.stream, &mut args)
                .map_err(|e| launch_err(format!("{}", driver_err("cuLaunchKernel", e))))?;
        }
        if self.sync_launches {
            self.synchronize().map_err(|e| launch_err(e.to_string()))?;
        }
        Ok(())
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(|e| driver_err("cuStreamSynchronize", e))
    }

    pub fn record(&self) -> Result<CudaEvent, GpuError> {
        self.bind()?;
        let ev =
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| driver_err("cuEventCreate", e))?;
        let ev = CudaEvent(ev);
        // SAFETY: a fresh event on our stream.
        unsafe { result::event::record(ev.0, self.stream) }.map_err(|e| driver_err("cuEventRecord", e))?;
        Ok(ev)
    }

    /// Our stream's handle (a `CUstream` as an integer, for DLPack's `stream=`).
    pub fn stream_handle(&self) -> u64 {
        self.stream as u64
    }

    /// Makes the stream `other` (another library's, same context) wait for the work
    /// queued on ours so far, without blocking the host.
    pub fn before_stream(&self, other: u64) -> Result<(), GpuError> {
        self.bind()?;
        let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| driver_err("cuEventCreate", e))?;
        let ev = CudaEvent(ev);
        // SAFETY: a fresh event recorded on our stream; `other` is a live stream of this
        // context (the caller's promise). Destroying an event that a wait refers to is
        // allowed: the wait keeps what it needs.
        unsafe {
            result::event::record(ev.0, self.stream).map_err(|e| driver_err("cuEventRecord", e))?;
            result::stream::wait_event(other as sys::CUstream, ev.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|e| driver_err("cuStreamWaitEvent", e))
        }
    }

    pub fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64, GpuError> {
        self.bind()?;
        // SAFETY: both events were recorded on our stream.
        unsafe {
            result::event::synchronize(end.0).map_err(|e| driver_err("cuEventSynchronize", e))?;
            result::event::elapsed(start.0, end.0).map(|ms| ms as f64).map_err(|e| driver_err("cuEventElapsedTime", e))
        }
    }
}

/// An instantiated CUDA graph (captured from the stream).
pub struct CudaGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}
// SAFETY: graph handles may be used from any thread that binds the context.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}
impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: created by end_capture, destroyed once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

impl CudaBackend {
    /// Whether launches can be captured (not with synchronous launches, which wait on the
    /// stream).
    pub fn can_capture(&self) -> bool {
        !self.sync_launches
    }

    /// Starts capturing the stream's work into a graph (relaxed mode: the lazy module
    /// loading of a first launch is allowed meanwhile).
    pub fn begin_capture(&self) -> Result<(), GpuError> {
        if !self.can_capture() {
            return Err(GpuError::Invalid("cannot capture a graph with synchronous launches (PK_CUDA_SYNC)".into()));
        }
        self.bind()?;
        // SAFETY: our stream.
        unsafe { result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .map_err(|e| driver_err("cuStreamBeginCapture", e))
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<CudaGraph, GpuError> {
        self.bind()?;
        // SAFETY: our stream, capturing; the graph is instantiated once and owned by the
        // returned value.
        unsafe {
            let graph = result::stream::end_capture(self.stream).map_err(|e| driver_err("cuStreamEndCapture", e))?;
            match result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) {
                Ok(exec) => Ok(CudaGraph { graph, exec }),
                Err(e) => {
                    let _ = result::graph::destroy(graph);
                    Err(driver_err("cuGraphInstantiate", e))
                }
            }
        }
    }

    /// Queues one replay of `g` on the stream.
    pub fn launch_graph(&self, g: &CudaGraph) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: an instantiated graph of this context, our stream.
        unsafe { result::graph::launch(g.exec, self.stream) }.map_err(|e| driver_err("cuGraphLaunch", e))?;
        if self.sync_launches {
            self.synchronize()?;
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: our handles, released once.
            unsafe {
                let _ = result::stream::synchronize(self.stream);
                for m in self.modules.lock().unwrap_or_else(|e| e.into_inner()).values() {
                    let _ = result::module::unload(*m);
                }
                let _ = result::stream::destroy(self.stream);
            }
        }
    }
}
