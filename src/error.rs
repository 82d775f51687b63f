//! The crate's error type, [`Error`], its [`Result`] alias, and the [`invalid!`](crate::invalid)
//! and [`ensure!`](crate::ensure) macros that build [`Error::Invalid`].

use crate::gpu::GpuError;

/// prunekit's error: every bad input, file or device problem ends up here with a
/// message that says what is wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A failure of the executor (driver, kernel launch, device memory); see [`GpuError`].
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A bad argument: a shape, a setting, a buffer on the wrong device.
    #[error("{0}")]
    Invalid(String),
    /// A file whose contents are not what they should be.
    #[error("{path}: {msg}")]
    Format {
        /// The file, as the user named it.
        path: String,
        /// What is wrong with its contents.
        msg: String,
    },
    /// Bad training data: a data set root, a class folder, an image or an IDX file that
    /// cannot be used as it is (see [`crate::data`]).
    #[error("{path}: {msg}")]
    Data {
        /// The file or folder, as the user named it (or as found under the data set root).
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file, as the user named it.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// `std::result::Result` with prunekit's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Error::Invalid(format!(...))`: builds the error (wrap it in `Err` to return it).
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
