/// Everything that can go wrong in the executor.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver: libcuda could not be loaded (use --device cpu or --device emu on a machine without an NVIDIA GPU)")]
    NoDriver,
    #[error("no CUDA device {0} (the driver found none at that ordinal)")]
    /// The driver has no device at this ordinal.
    NoDevice(usize),
    /// The crate was built without nvcc, so there are no fatbins for the cuda back end.
    #[error("the CUDA kernels were built without nvcc, so the cuda device cannot run them: install the pinned compiler with scripts/install-cuda-compiler.sh and rebuild")]
    NoKernels,
    #[error("out of device memory allocating {bytes} bytes")]
    /// An allocation failed for lack of device memory (host memory on emu).
    OutOfMemory {
        /// The size of the failed allocation (0 where the driver did not say).
        bytes: usize,
    },
    #[error("kernel {kernel} failed: {msg}")]
    /// A kernel launch failed (on emu: the emulation's report, e.g. an out-of-bounds
    /// access or a barrier error).
    Launch {
        /// The kernel's name.
        kernel: String,
        /// What went wrong.
        msg: String,
    },
    #[error("CUDA driver error in {op}: {msg}")]
    /// Any other error of a CUDA driver call.
    Driver {
        /// The driver function that failed, e.g. `cuMemsetD8`.
        op: &'static str,
        /// The driver's error name and description.
        msg: String,
    },
    #[error("no kernel {name} in module {module}")]
    /// No such kernel module, or no such kernel in it.
    UnknownKernel {
        /// The module, `kernels/<module>.cu`.
        module: String,
        /// The kernel's name (empty when the module itself is unknown).
        name: String,
    },
    #[error("kernel {kernel} takes {expected} bytes of parameters, the caller passed {got}")]
    /// The parameter struct's size does not match the kernel's parameter.
    ParamSize {
        /// The kernel's name.
        kernel: String,
        /// The size of the kernel's parameter, in bytes.
        expected: usize,
        /// The size of the struct the caller passed, in bytes.
        got: usize,
    },
    /// A bad request to the executor: a buffer too large to address, a range outside a
    /// buffer, an empty launch grid, events of different back ends, an unknown emulation
    /// schedule.
    #[error("{0}")]
    Invalid(String),
}
