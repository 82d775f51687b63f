/// Everything that can go wrong in the executor.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver: libcuda could not be loaded (use --device cpu or --device emu on a machine without an NVIDIA GPU)")]
    NoDriver,
    #[error("no CUDA device {0} (the driver found none at that ordinal)")]
    NoDevice(usize),
    #[error("the CUDA kernels were built without nvcc, so the cuda device cannot run them: install the pinned compiler with scripts/install-cuda-compiler.sh and rebuild")]
    NoKernels,
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
    #[error("kernel {kernel} failed: {msg}")]
    Launch { kernel: String, msg: String },
    #[error("CUDA driver error in {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    #[error("no kernel {name} in module {module}")]
    UnknownKernel { module: String, name: String },
    #[error("kernel {kernel} takes {expected} bytes of parameters, the caller passed {got}")]
    ParamSize { kernel: String, expected: usize, got: usize },
    #[error("{0}")]
    Invalid(String),
}
