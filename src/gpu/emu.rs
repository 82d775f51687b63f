//! The emu back end: kernels compiled for the host against kernels/emu, run by the
//! emulation's runtime (kernels/emu/runtime.cpp). Launches are synchronous.
//!
//! In counting mode (`emu:count`) nothing runs: a launch only checks that the kernel
//! exists and takes its parameters, buffers are mapped but never touched by a kernel
//! (they stay zero), and fills and device copies are skipped. The ops layer counts each
//! op's FLOPs and bytes from its shapes as on every device, so a profile of a step in
//! counting mode gives the bytes and FLOPs of any batch and image size without a GPU and
//! without the memory or the time the emulation would need.

use super::{module_source, GpuError, Kernel, LaunchConfig, ModuleSource};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Mutex;

/// The order in which the fibers (CUDA threads) of a block run between two barriers.
/// A kernel that is missing a barrier gives a different answer under another order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Warps, and the lanes inside each warp, in increasing index: thread 0 first.
    Forward,
    /// Warps, and the lanes inside each warp, in decreasing index: the last thread first.
    Reverse,
    /// A seeded shuffle, drawn anew between every two barriers.
    Shuffle(u64),
}

impl Schedule {
    /// From `PK_EMU_SCHEDULE`: `forward` (the default), `reverse` or `shuffle:SEED`.
    pub fn from_env() -> Result<Schedule, GpuError> {
        match std::env::var("PK_EMU_SCHEDULE") {
            Err(_) => Ok(Schedule::Forward),
            Ok(s) => s.parse(),
        }
    }
    fn code(self) -> (i32, u64) {
        match self {
            Schedule::Forward => (0, 0),
            Schedule::Reverse => (1, 0),
            Schedule::Shuffle(seed) => (2, seed),
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = GpuError;
    fn from_str(s: &str) -> Result<Self, GpuError> {
        match s {
            "forward" => Ok(Schedule::Forward),
            "reverse" => Ok(Schedule::Reverse),
            _ => s.strip_prefix("shuffle:").and_then(|n| n.parse().ok()).map(Schedule::Shuffle).ok_or_else(|| {
                GpuError::Invalid(format!("emulation schedule {s:?}: expected forward, reverse or shuffle:SEED"))
            }),
        }
    }
}

#[repr(C)]
struct EmuKernel {
    name: *const c_char,
    entry: *const c_void,
    param_size: usize,
}

#[repr(C)]
struct EmuModuleTable {
    count: i32,
    kernels: [EmuKernel; 512],
}

extern "C" {
    fn pk_emu_alloc(bytes: usize, poison: i32) -> *mut c_void;
    fn pk_emu_free(p: *mut c_void) -> i32;
    fn pk_emu_launch(
        entry: *const c_void,
        params: *const c_void,
        param_size: usize,
        name: *const c_char,
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        dyn_smem: usize,
        order: i32,
        seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

#[derive(Clone, Copy)]
struct Entry {
    entry: usize,
    param_size: usize,
    name: &'static CStr,
}

pub struct EmuBackend {
    schedule: Schedule,
    entries: Mutex<HashMap<Kernel, Entry>>,
    /// A module replaced by a variant with a planted bug (tests only).
    fault: Option<(&'static str, &'static ModuleSource)>,
    /// Counting mode: launches, fills and device copies do nothing.
    count_only: bool,
    /// Launches per kernel name, for tests that check which kernels ran.
    launches: Mutex<HashMap<&'static str, u64>>,
}

impl EmuBackend {
    pub fn new(schedule: Schedule) -> Self {
        EmuBackend {
            schedule,
            entries: Mutex::new(HashMap::new()),
            fault: None,
            count_only: false,
            launches: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_fault(schedule: Schedule, module: &'static str, variant: &'static ModuleSource) -> Self {
        EmuBackend { fault: Some((module, variant)), ..EmuBackend::new(schedule) }
    }

    /// Counting mode: see the module's documentation.
    pub fn counting() -> Self {
        EmuBackend { count_only: true, ..EmuBackend::new(Schedule::Forward) }
    }

    pub fn counts_only(&self) -> bool {
        self.count_only
    }

    /// How many times each kernel was launched.
    pub fn launches(&self) -> HashMap<&'static str, u64> {
        self.launches.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn name(&self) -> String {
        if self.count_only {
            return "emu:count (counts the ops' FLOPs and bytes; runs no kernel)".to_string();
        }
        let s = match self.schedule {
            Schedule::Forward => "forward".to_string(),
            Schedule::Reverse => "reverse".to_string(),
            Schedule::Shuffle(seed) => format!("shuffle:{seed}"),
        };
        match self.fault {
            Some((_, v)) => format!("emu (host emulation of CUDA, {s} fiber order, planted bug {})", v.name),
            None => format!("emu (host emulation of CUDA, {s} fiber order)"),
        }
    }

    pub fn alloc(&self, bytes: usize, zeroed: bool) -> Result<u64, GpuError> {
        // SAFETY: plain allocation; the runtime maps fresh pages (zero) and poisons them
        // unless asked for zeros.
        // Counting mode never poisons: its buffers' pages are then never touched.
        let p = unsafe { pk_emu_alloc(bytes, if zeroed || self.count_only { 0 } else { 1 }) };
        if p.is_null() {
            return Err(GpuError::OutOfMemory { bytes });
        }
        Ok(p as u64)
    }

    pub fn free(&self, ptr: u64) {
        // SAFETY: ptr came from pk_emu_alloc and is freed once (GpuBuf's Drop).
        let rc = unsafe { pk_emu_free(ptr as *mut c_void) };
        debug_assert_eq!(rc, 0, "pk_emu_free of an unknown pointer");
    }

    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<(), GpuError> {
        // SAFETY: the caller checked that dst .. dst + len lies inside one live buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    pub fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), GpuError> {
        // SAFETY: as htod.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        if self.count_only {
            return Ok(());
        }
        // SAFETY: as htod; distinct buffers or ranges may overlap only if the same buffer
        // is passed twice, so copy as memmove.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        if self.count_only {
            return Ok(());
        }
        // SAFETY: as htod.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    fn entry(&self, kernel: Kernel) -> Result<Entry, GpuError> {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&kernel) {
            return Ok(*e);
        }
        let unknown = || GpuError::UnknownKernel { module: kernel.module.to_string(), name: kernel.name.to_string() };
        let src = match self.fault {
            Some((m, v)) if m == kernel.module => v,
            _ => module_source(kernel.module).ok_or_else(unknown)?,
        };
        // SAFETY: the generated table points at the module's static table, which lives
        // for the whole program and is filled before main by static constructors.
        let table = unsafe { &*((src.emu)() as *const EmuModuleTable) };
        for k in &table.kernels[..table.count.max(0) as usize] {
            // SAFETY: names are string literals in the kernel sources.
            let name = unsafe { CStr::from_ptr(k.name) };
            if name.to_bytes() == kernel.name.as_bytes() {
                let e = Entry { entry: k.entry as usize, param_size: k.param_size, name };
                map.insert(kernel, e);
                return Ok(e);
            }
        }
        Err(unknown())
    }

    pub fn launch(&self, kernel: Kernel, cfg: LaunchConfig, params: &[u8]) -> Result<(), GpuError> {
        let e = self.entry(kernel)?;
        if e.param_size != params.len() {
            return Err(GpuError::ParamSize {
                kernel: kernel.name.to_string(),
                expected: e.param_size,
                got: params.len(),
            });
        }
        *self.launches.lock().unwrap_or_else(|e| e.into_inner()).entry(kernel.name).or_default() += 1;
        if self.count_only {
            return Ok(());
        }
        let (order, seed) = self.schedule.code();
        let mut err = vec![0 as c_char; 4096];
        // SAFETY: entry is a trampoline of this module taking a pointer to a parameter
        // struct of param_size bytes; the caller vouched for the pointers inside it.
        let rc = unsafe {
            pk_emu_launch(
                e.entry as *const c_void,
                params.as_ptr() as *const c_void,
                params.len(),
                e.name.as_ptr(),
                cfg.grid.0,
                cfg.grid.1,
                cfg.grid.2,
                cfg.block.0,
                cfg.block.1,
                cfg.block.2,
                cfg.shared_mem_bytes as usize,
                order,
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the runtime wrote a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(GpuError::Launch { kernel: kernel.name.to_string(), msg });
        }
        Ok(())
    }
}
