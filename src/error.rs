use crate::gpu::GpuError;

/// prunekit's error: every bad input, file or device problem ends up here with a
/// message that says what is wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A bad argument: a shape, a setting, a buffer on the wrong device.
    #[error("{0}")]
    Invalid(String),
    /// A file whose contents are not what they should be.
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Err(Error::Invalid(format!(...)))`.
#[macro_export]
macro_rules! invalid {
    ($($t:tt)*) => { $crate::error::Error::Invalid(format!($($t)*)) };
}

/// Returns `Err(Error::Invalid(...))` unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {
        if !$cond { return Err($crate::invalid!($($t)*)); }
    };
}
