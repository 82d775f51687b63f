//! prunekit's Python bindings: the compiled module `prunekit._prunekit`.
//!
//! Glue only: every computation is the `prunekit` crate's library code, run on the CPU
//! device (or the device the caller names) with the GIL released. Every error becomes a
//! Python exception of the fitting class carrying the crate's message, and a panic never
//! crosses into Python (it becomes a `RuntimeError`). The Python package
//! (`python/prunekit/`) wraps these functions for PyTorch users.

mod buffers;
mod conv;
mod data;
mod dlpack;
mod jobs;
mod state;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Maps the crate's error to the Python exception that fits it: a bad argument, file
/// contents or data are `ValueError`, a missing file `FileNotFoundError`, another I/O
/// failure `OSError`, a device failure `RuntimeError`.
pub(crate) fn to_py(e: prunekit::Error) -> PyErr {
    use prunekit::Error;
    let msg = e.to_string();
    match e {
        Error::Invalid(_) | Error::Format { .. } | Error::Data { .. } => PyValueError::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Gpu(_) => PyRuntimeError::new_err(msg),
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Runs `f` (with the GIL released) and turns a panic into a `RuntimeError`.
pub(crate) fn guarded<T: Send>(py: Python<'_>, f: impl FnOnce() -> prunekit::Result<T> + Send) -> PyResult<T> {
    let r = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match r {
        Ok(v) => v.map_err(to_py),
        Err(p) => Err(PyRuntimeError::new_err(format!("prunekit failed internally: {}", panic_text(&*p)))),
    }
}

/// Runs `f` with the GIL held and turns a panic into a `RuntimeError` (for code that
/// builds Python objects).
pub(crate) fn catch<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => Err(PyRuntimeError::new_err(format!("prunekit failed internally: {}", panic_text(&*p)))),
    }
}

/// Parses a device name (`cpu`, `emu`, `cuda`, `cuda:N`, `auto`).
pub(crate) fn device(name: &str) -> PyResult<prunekit::Device> {
    prunekit::Device::parse(name).map_err(to_py)
}

/// Parses a precision (`f32`, `bf16`); `None` picks bf16 on cuda, else f32, as the CLI.
pub(crate) fn precision(p: Option<&str>, dev: &prunekit::Device) -> PyResult<prunekit::model::PrecisionKind> {
    use prunekit::model::PrecisionKind;
    match p {
        Some(s) => s.parse::<PrecisionKind>().map_err(|e| PyValueError::new_err(format!("precision: {e}"))),
        None => Ok(if dev.kind() == "cuda" { PrecisionKind::Bf16 } else { PrecisionKind::F32 }),
    }
}

/// `prunekit verify`: checks the training stack on `device` against a PyTorch reference
/// file, with the BN fusions `bn_fusion` (all, load, dgrad, none). Returns `(text, ok,
/// failed_groups)`.
#[pyfunction]
#[pyo3(signature = (reference, device="cpu", precision="f32", bn_fusion="none"))]
fn verify(
    py: Python<'_>,
    reference: std::path::PathBuf,
    device: &str,
    precision: &str,
    bn_fusion: &str,
) -> PyResult<(String, bool, Vec<String>)> {
    let dev = crate::device(device)?;
    let prec = crate::precision(Some(precision), &dev)?;
    let fusion = bn_fusion.parse::<prunekit::model::BnFusion>().map_err(to_py)?;
    guarded(py, move || {
        let report = prunekit::verify::verify(&reference, &dev, prec, fusion)?;
        let text = format!(
            "verify {} on {} ({}, --bn-fusion {fusion})\n{report}",
            reference.display(),
            report.device,
            report.precision_kind
        );
        let failed = report.failed_groups().iter().map(|g| g.name().to_string()).collect();
        Ok((text, report.ok(), failed))
    })
}

/// Panics on purpose, inside the GIL-released compute (`released=True`) or with the GIL
/// held: the tests' proof that a panic reaches Python as a `RuntimeError`.
#[pyfunction]
#[pyo3(signature = (released=true))]
fn _panic_for_tests(py: Python<'_>, released: bool) -> PyResult<()> {
    if released {
        guarded(py, || -> prunekit::Result<()> { panic!("a deliberate panic (released)") })
    } else {
        catch(|| -> PyResult<()> { panic!("a deliberate panic (held)") })
    }
}

/// The crate's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The compiled part of the `prunekit` Python package.
#[pymodule]
fn _prunekit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    state::register(m)?;
    buffers::register(m)?;
    conv::register(m)?;
    data::register(m)?;
    dlpack::register(m)?;
    jobs::register(m)?;
    Ok(())
}
