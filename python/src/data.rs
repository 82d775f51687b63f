//! Training data from Python: a data set as the CLI opens it (`--data`, `--val`,
//! `--classes`, `--per-class`, `--val-fraction`, `--normalize`, `--skip-bad`) or from numpy
//! arrays of 8-bit images, and the crate's batch loader as a Python iterator.

use crate::{guarded, to_py};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use prunekit::data::{Augment, ClassSelection, Dataset, Loader, LoaderConfig, Normalize, OpenOptions, Position, Split};
use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// A split from `(images, labels)`: uint8 images `[N, H, W]` (gray) or `[N, H, W, C]`
/// (C = 1 or 3), int labels `[N]` in `0..classes`.
fn split_from_arrays(obj: &Bound<'_, PyAny>, what: &str, classes: Option<&[String]>) -> PyResult<Split> {
    let t = obj.cast::<PyTuple>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: expected a path / idx:IMAGES,LABELS string or an (images, labels) tuple"
        ))
    })?;
    if t.len() != 2 {
        return Err(PyValueError::new_err(format!("{what}: expected (images, labels), got {} items", t.len())));
    }
    let (im, lb) = (t.get_item(0)?, t.get_item(1)?);
    let im = im
        .cast::<PyArrayDyn<u8>>()
        .map_err(|_| PyValueError::new_err(format!("{what}: images must be a uint8 numpy array")))?
        .readonly();
    let (h, w, c) = match im.shape() {
        [_, h, w] => (*h, *w, 1),
        [_, h, w, c] => (*h, *w, *c),
        s => return Err(PyValueError::new_err(format!("{what}: images must be [N, H, W] or [N, H, W, C], not {s:?}"))),
    };
    let labels: Vec<i64> = if let Ok(a) = lb.cast::<PyArrayDyn<i64>>() {
        a.readonly().as_array().iter().copied().collect()
    } else {
        lb.extract::<Vec<i64>>().map_err(|_| PyValueError::new_err(format!("{what}: labels must be int64")))?
    };
    let n_classes = labels.iter().copied().max().map_or(0, |m| m.max(0) as usize + 1);
    let names = match classes {
        Some(c) => c.to_vec(),
        None => (0..n_classes).map(|i| i.to_string()).collect(),
    };
    Split::from_u8(im.as_array().iter().copied().collect(), (h, w, c), labels, names).map_err(to_py)
}

/// A data set with its pixel normalization: what `train`, `evaluate`, `transfer` and
/// `batches` read.
#[pyclass(module = "prunekit._prunekit", frozen)]
pub struct Data {
    pub(crate) ds: Dataset,
    pub(crate) norm: Normalize,
}

#[pymethods]
impl Data {
    /// Opens training data as `prunekit train --data` does (an image folder or
    /// `idx:IMAGES,LABELS`) or takes `(images, labels)` numpy arrays; `val` likewise.
    #[new]
    #[pyo3(signature = (data, val=None, classes=None, per_class=None, val_fraction=0.1, normalize="imagenet", skip_bad=false, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        classes: Option<&str>,
        per_class: Option<usize>,
        val_fraction: f64,
        normalize: &str,
        skip_bad: bool,
        seed: u64,
    ) -> PyResult<Data> {
        crate::catch(|| {
            let norm: Normalize = normalize.parse().map_err(to_py)?;
            norm.check().map_err(to_py)?;
            let sel: Option<ClassSelection> = classes.map(|c| c.parse()).transpose().map_err(to_py)?;
            let mut ds = if let Ok(spec) = data.extract::<String>() {
                let val_spec = match val {
                    None => None,
                    Some(v) => Some(v.extract::<String>().map_err(|_| {
                        PyValueError::new_err("val: with a data path, give the validation data as a path too")
                    })?),
                };
                let opts = OpenOptions { val: val_spec, val_fraction, seed, skip_bad };
                guarded(py, move || Dataset::open(&spec, &opts))?
            } else {
                if !(0.0..1.0).contains(&val_fraction) {
                    return Err(PyValueError::new_err(format!("val fraction {val_fraction} must be in [0, 1)")));
                }
                let train = split_from_arrays(data, "data", None)?;
                let (train, val) = match val {
                    Some(v) => {
                        let vs = split_from_arrays(v, "val", Some(train.classes()))?;
                        (train, vs)
                    }
                    None => train.split_off(val_fraction, seed),
                };
                Dataset { train, val, skipped: Vec::new(), origin: "numpy arrays".into() }
            };
            if let Some(sel) = &sel {
                ds = ds.select(sel).map_err(to_py)?;
            }
            if let Some(n) = per_class {
                ds = ds.per_class(n, seed).map_err(to_py)?;
            }
            Ok(Data { ds, norm })
        })
    }

    /// What the data holds (the line `prunekit train` prints).
    fn summary(&self) -> String {
        self.ds.summary()
    }

    /// Class names, index = label.
    fn classes(&self) -> Vec<String> {
        self.ds.classes().to_vec()
    }

    /// `(training images, validation images)`.
    fn sizes(&self) -> (usize, usize) {
        (self.ds.train.len(), self.ds.val.len())
    }
}

/// One batch: images NCHW float32 and int64 targets.
type BatchPair<'py> = (Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArray1<i64>>);

/// The crate's training (or evaluation) loader as an iterator of `(images, targets)`:
/// images NCHW float32 normalized, targets int64; exactly the batches `train` takes with the
/// same settings.
#[pyclass(module = "prunekit._prunekit", unsendable)]
pub struct Batches {
    loader: Loader,
    batch: prunekit::data::Batch,
    left: Option<usize>,
    dims: [usize; 4],
}

#[pymethods]
impl Batches {
    /// A loader over `data`'s training split (or its validation split with `split="val"`).
    #[new]
    #[pyo3(signature = (data, batch=32, size=32, seed=0, augment="crop-flip", steps=None, split="train"))]
    fn new(
        data: &Data,
        batch: usize,
        size: usize,
        seed: u64,
        augment: &str,
        steps: Option<usize>,
        split: &str,
    ) -> PyResult<Batches> {
        crate::catch(|| {
            if batch == 0 || size == 0 {
                return Err(PyValueError::new_err("batch and size must be at least 1"));
            }
            let augment: Augment = augment.parse().map_err(to_py)?;
            let lc = LoaderConfig { batch, size, augment, norm: data.norm, seed, ..LoaderConfig::default() };
            let loader = match split {
                "train" => Loader::train(&data.ds.train, &lc, Position::default()),
                "val" => Loader::eval(&data.ds.val, &lc),
                _ => return Err(PyValueError::new_err(format!("split {split:?}: expected train or val"))),
            }
            .map_err(to_py)?;
            let b = loader.new_batch();
            Ok(Batches { loader, batch: b, left: steps, dims: [batch, 3, size, size] })
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<BatchPair<'py>> {
        crate::catch(|| {
            if self.left == Some(0) {
                return Err(PyStopIteration::new_err(()));
            }
            // The loader's threads are its own; this call only waits for the next batch.
            let more = self.loader.next(&mut self.batch).map_err(to_py)?;
            if !more {
                return Err(PyStopIteration::new_err(()));
            }
            if let Some(l) = self.left.as_mut() {
                *l -= 1;
            }
            let images = PyArray1::from_slice(py, &self.batch.images).reshape(self.dims.to_vec())?;
            let n = self.batch.valid;
            let images = if n < self.dims[0] {
                images.call_method1("__getitem__", (pyo3::types::PySlice::new(py, 0, n as isize, 1),))?.cast_into()?
            } else {
                images
            };
            let targets = PyArray1::from_slice(py, &self.batch.targets[..n]);
            Ok((images, targets))
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Data>()?;
    m.add_class::<Batches>()?;
    Ok(())
}
