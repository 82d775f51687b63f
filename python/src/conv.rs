//! The CPU convolution kernels (`prunekit::cpu::conv`) on numpy arrays: activations
//! NHWC, weights KRSC, float32, C-contiguous. The inputs are read in place (no copy) and
//! the output is written straight into a new numpy array (from the reused buffers of
//! `buffers`) or the caller's `out`, with the GIL released.

use crate::guarded;
use numpy::{PyArray4, PyArrayMethods, PyReadonlyArray4, PyUntypedArrayMethods};
use prunekit::cpu::conv::{dgrad, fprop, wgrad};
use prunekit::shape::ConvShape;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `obj` as a rank-4, float32, C-contiguous numpy array, or a `ValueError` that says which
/// of the three it is not.
pub(crate) fn array4<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray4<'py, f32>> {
    let Some(dtype) = obj.getattr("dtype").ok() else {
        return Err(PyValueError::new_err(format!("{what}: expected a numpy array, got {}", obj.get_type())));
    };
    let ndim: usize = obj.getattr("ndim")?.extract()?;
    if ndim != 4 {
        return Err(PyValueError::new_err(format!("{what}: expected a rank-4 array, got rank {ndim}")));
    }
    let arr = obj
        .cast::<PyArray4<f32>>()
        .map_err(|_| PyValueError::new_err(format!("{what}: expected float32, got {dtype}")))?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: the array is not C-contiguous (use numpy.ascontiguousarray, or .contiguous() for a tensor)"
        )));
    }
    Ok(arr.readonly())
}

fn dims(a: &PyReadonlyArray4<'_, f32>) -> [usize; 4] {
    a.shape().try_into().expect("rank 4")
}

fn shape(
    n: usize,
    (h, w, c): (usize, usize, usize),
    (k, r, s): (usize, usize, usize),
    stride: usize,
    pad: usize,
) -> PyResult<ConvShape> {
    let sh = ConvShape { n, h, w, c, k, r, s, stride, pad };
    sh.validate().map_err(crate::to_py)?;
    Ok(sh)
}

/// A new output array of `dims` from the reused buffers (its old values never show: the
/// kernels overwrite every element).
fn new_out<'py>(py: Python<'py>, dims: [usize; 4]) -> PyResult<Bound<'py, PyArray4<f32>>> {
    crate::buffers::empty(py, &dims)?.cast_into::<PyArray4<f32>>().map_err(PyErr::from)
}

/// Runs `f` on the output (GIL released): `out` when given (rank 4, float32,
/// C-contiguous, writeable, of the output's shape; overwritten), else a new array.
fn run<'py>(
    py: Python<'py>,
    out_dims: [usize; 4],
    out: Option<&Bound<'py, PyAny>>,
    f: impl FnOnce(&mut [f32]) + Send,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    let out = match out {
        None => new_out(py, out_dims)?,
        Some(o) => {
            let ro = array4(o, "out")?;
            if dims(&ro) != out_dims {
                return Err(PyValueError::new_err(format!("out has shape {:?}, the result {out_dims:?}", ro.shape())));
            }
            drop(ro);
            o.cast::<PyArray4<f32>>().expect("checked").clone()
        }
    };
    {
        // Refused when read-only or overlapping an input (which is borrowed read-only).
        let mut rw = out.try_readwrite().map_err(|e| {
            PyValueError::new_err(format!(
                "out cannot be written ({e}): it must be writeable and share no memory with the inputs"
            ))
        })?;
        let y = rw.as_slice_mut().expect("a new array is contiguous");
        guarded(py, move || {
            f(y);
            Ok(())
        })?;
    }
    Ok(out)
}

/// `y = conv2d(x, w)`: x `[N, H, W, C]`, w `[K, R, S, C]`, y `[N, P, Q, K]` (NHWC).
#[pyfunction]
#[pyo3(signature = (x, w, stride=1, padding=0, out=None))]
fn conv2d<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    stride: usize,
    padding: usize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    crate::catch(|| {
        let (xa, wa) = (array4(x, "x")?, array4(w, "w")?);
        let ([n, h, wd, c], [k, r, s, wc]) = (dims(&xa), dims(&wa));
        if wc != c {
            return Err(PyValueError::new_err(format!("w has {wc} input channels, x has {c} (x is NHWC, w is KRSC)")));
        }
        let sh = shape(n, (h, wd, c), (k, r, s), stride, padding)?;
        let (xs, ws) = (xa.as_slice().expect("checked"), wa.as_slice().expect("checked"));
        run(py, [n, sh.p(), sh.q(), k], out, move |y| fprop(&sh, xs, ws, y))
    })
}

/// The gradient of conv2d's input: dx `[N, H, W, C]` from dy `[N, P, Q, K]` and w
/// `[K, R, S, C]`; `input_size` is `(H, W)`.
#[pyfunction]
#[pyo3(signature = (dy, w, input_size, stride=1, padding=0, out=None))]
fn conv2d_backward_input<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    input_size: (usize, usize),
    stride: usize,
    padding: usize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    crate::catch(|| {
        let (da, wa) = (array4(dy, "dy")?, array4(w, "w")?);
        let ([n, p, q, k], [wk, r, s, c]) = (dims(&da), dims(&wa));
        if wk != k {
            return Err(PyValueError::new_err(format!("w has {wk} filters, dy has {k} channels")));
        }
        let sh = shape(n, (input_size.0, input_size.1, c), (k, r, s), stride, padding)?;
        if (sh.p(), sh.q()) != (p, q) {
            return Err(PyValueError::new_err(format!(
                "dy is {p}x{q}, the convolution of a {}x{} input gives {}x{}",
                input_size.0,
                input_size.1,
                sh.p(),
                sh.q()
            )));
        }
        let (ds, ws) = (da.as_slice().expect("checked"), wa.as_slice().expect("checked"));
        run(py, [n, sh.h, sh.w, c], out, move |dx| dgrad(&sh, ds, ws, dx))
    })
}

/// The gradient of conv2d's weight: dw `[K, R, S, C]` from x `[N, H, W, C]` and dy
/// `[N, P, Q, K]`; `kernel_size` is `(R, S)`.
#[pyfunction]
#[pyo3(signature = (x, dy, kernel_size, stride=1, padding=0, out=None))]
fn conv2d_backward_weight<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    kernel_size: (usize, usize),
    stride: usize,
    padding: usize,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    crate::catch(|| {
        let (xa, da) = (array4(x, "x")?, array4(dy, "dy")?);
        let ([n, h, wd, c], [dn, p, q, k]) = (dims(&xa), dims(&da));
        if dn != n {
            return Err(PyValueError::new_err(format!("dy has batch {dn}, x has {n}")));
        }
        let sh = shape(n, (h, wd, c), (k, kernel_size.0, kernel_size.1), stride, padding)?;
        if (sh.p(), sh.q()) != (p, q) {
            return Err(PyValueError::new_err(format!(
                "dy is {p}x{q}, the convolution of x gives {}x{}",
                sh.p(),
                sh.q()
            )));
        }
        let (xs, ds) = (xa.as_slice().expect("checked"), da.as_slice().expect("checked"));
        run(py, [k, sh.r, sh.s, c], out, move |dw| wgrad(&sh, xs, ds, dw))
    })
}

/// Both gradients of conv2d in one call (what an autograd backward asks for): dx
/// `[N, H, W, C]` when `input`, dw `[K, R, S, C]` when `weight`, from x `[N, H, W, C]`, w
/// `[K, R, S, C]` and dy `[N, P, Q, K]`, in new arrays; the two kernels run one after the
/// other with the GIL released once.
#[pyfunction]
#[pyo3(signature = (x, w, dy, stride=1, padding=0, input=true, weight=true))]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn conv2d_backward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    stride: usize,
    padding: usize,
    input: bool,
    weight: bool,
) -> PyResult<(Option<Bound<'py, PyArray4<f32>>>, Option<Bound<'py, PyArray4<f32>>>)> {
    crate::catch(|| {
        let (xa, wa, da) = (array4(x, "x")?, array4(w, "w")?, array4(dy, "dy")?);
        let ([n, h, wd, c], [k, r, s, wc], [dn, p, q, dk]) = (dims(&xa), dims(&wa), dims(&da));
        if wc != c {
            return Err(PyValueError::new_err(format!("w has {wc} input channels, x has {c} (x is NHWC, w is KRSC)")));
        }
        let sh = shape(n, (h, wd, c), (k, r, s), stride, padding)?;
        if [dn, p, q, dk] != [n, sh.p(), sh.q(), k] {
            return Err(PyValueError::new_err(format!(
                "dy has shape {:?}, the convolution's output is {:?}",
                [dn, p, q, dk],
                [n, sh.p(), sh.q(), k]
            )));
        }
        let dx = if input { Some(new_out(py, [n, h, wd, c])?) } else { None };
        let dw = if weight { Some(new_out(py, [k, r, s, c])?) } else { None };
        {
            let mut dx_rw = dx.as_ref().map(|a| a.readwrite());
            let mut dw_rw = dw.as_ref().map(|a| a.readwrite());
            let dx_s = dx_rw.as_mut().map(|a| a.as_slice_mut().expect("a new array is contiguous"));
            let dw_s = dw_rw.as_mut().map(|a| a.as_slice_mut().expect("a new array is contiguous"));
            let (xs, ws, ds) =
                (xa.as_slice().expect("checked"), wa.as_slice().expect("checked"), da.as_slice().expect("checked"));
            guarded(py, move || {
                if let Some(dx) = dx_s {
                    dgrad(&sh, ds, ws, dx);
                }
                if let Some(dw) = dw_s {
                    wgrad(&sh, xs, ds, dw);
                }
                Ok(())
            })?;
        }
        Ok((dx, dw))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(conv2d, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward_input, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward_weight, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward, m)?)?;
    Ok(())
}
