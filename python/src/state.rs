//! State dicts between Python and the crate, and what is done with them: pruning
//! (`prune::prune_state`), FLOP counts (`Arch`), and the model's forward pass.

use crate::{catch, guarded, to_py};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray4, PyUntypedArrayMethods};
use prunekit::model::{Arch, Data, Model, StateDict, Tensor};
use prunekit::prune::{prune_owned_state, Mode, Norm, PruneConfig, Pruned, Sparsity};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::path::PathBuf;

/// A state dict given from Python: a dict of numpy arrays (float32 or int64, C-contiguous
/// or not: they are copied) or a path to a safetensors file. Refuses other dtypes and
/// non-finite float32 values, naming the tensor.
pub(crate) fn state_from_py(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<StateDict> {
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__")? {
        let path: PathBuf = obj.extract()?;
        return guarded(py, move || StateDict::read(&path));
    }
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| PyValueError::new_err("weights: expected a dict of arrays or a path to a .safetensors file"))?;
    let mut sd = StateDict::default();
    for (k, v) in dict.iter() {
        let name: String =
            k.extract().map_err(|_| PyValueError::new_err("weights: every key must be a string (a tensor name)"))?;
        let t = if let Ok(a) = v.cast::<PyArrayDyn<f32>>() {
            let a = a.readonly();
            let data = match a.as_slice() {
                Ok(s) => s.to_vec(),
                Err(_) => a.as_array().iter().copied().collect::<Vec<f32>>(),
            };
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(PyValueError::new_err(format!(
                    "weights: tensor {name} holds a non-finite value ({}) at flat index {i}",
                    data[i]
                )));
            }
            Tensor::f32(a.shape().to_vec(), data)
        } else if let Ok(a) = v.cast::<PyArrayDyn<i64>>() {
            let a = a.readonly();
            let data = match a.as_slice() {
                Ok(s) => s.to_vec(),
                Err(_) => a.as_array().iter().copied().collect(),
            };
            Tensor::i64(a.shape().to_vec(), data)
        } else {
            let dtype = v.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| v.get_type().to_string());
            return Err(PyValueError::new_err(format!(
                "weights: tensor {name} has dtype {dtype}; prunekit takes float32 tensors (and int64 counters/indices)"
            )));
        };
        sd.tensors.insert(name, t);
    }
    Ok(sd)
}

/// A Python dict of numpy arrays (the vectors move into the arrays without a copy).
pub(crate) fn state_to_py<'py>(py: Python<'py>, sd: StateDict) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (name, t) in sd.tensors {
        let flat = match t.data {
            Data::F32(v) => PyArray1::from_vec(py, v).into_any(),
            Data::I64(v) => PyArray1::from_vec(py, v).into_any(),
        };
        // numpy's own reshape: it also makes 0-d arrays (shape [], e.g. num_batches_tracked).
        let arr = flat.call_method1("reshape", (pyo3::types::PyTuple::new(py, &t.shape)?,))?;
        out.set_item(name, arr)?;
    }
    Ok(out)
}

fn parse_mode(mode: &str) -> PyResult<Mode> {
    mode.parse::<Mode>().map_err(to_py)
}

fn parse_criterion(c: &str) -> PyResult<Norm> {
    match c {
        "l1" => Ok(Norm::L1),
        "l2" => Ok(Norm::L2),
        _ => Err(PyValueError::new_err(format!("unknown criterion {c:?}: expected l1 or l2"))),
    }
}

/// A sparsity from a Python float or string: the float's shortest decimal form, exactly
/// as the CLI reads `--sparsity`.
pub(crate) fn parse_sparsity(s: &Bound<'_, PyAny>) -> PyResult<Sparsity> {
    if let Ok(text) = s.extract::<String>() {
        return text.parse::<Sparsity>().map_err(to_py);
    }
    if s.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyValueError::new_err("sparsity must be a number in [0, 1), not a bool"));
    }
    let f: f64 = s.extract().map_err(|_| PyValueError::new_err("sparsity must be a number in [0, 1)"))?;
    Sparsity::from_f64(f).map_err(to_py)
}

/// The pruning settings the CLI's `--mode`, `--sparsity`, `--round-to`, `--criterion` give.
pub(crate) fn prune_config(
    mode: &str,
    sparsity: &Bound<'_, PyAny>,
    round_to: usize,
    criterion: &str,
) -> PyResult<PruneConfig> {
    PruneConfig::new(parse_mode(mode)?, parse_sparsity(sparsity)?, round_to, parse_criterion(criterion)?).map_err(to_py)
}

/// The result of a pruning (`prune::Pruned`): the compacted state, the kept indices per
/// group, the plan's widths.
#[pyclass(module = "prunekit._prunekit", frozen)]
pub struct PruneResult {
    pruned: Pruned,
}

#[pymethods]
impl PruneResult {
    /// The compacted model: torchvision's names, numpy arrays (float32, and int64 counters).
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        state_to_py(py, self.pruned.state.clone())
    }

    /// The kept indices of the dense model per group (`layer1.0.conv1`, ...), int64 arrays.
    fn keep<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (g, idx) in &self.pruned.keep {
            out.set_item(g, PyArray1::from_vec(py, idx.clone()))?;
        }
        Ok(out)
    }

    /// The groups as `(name, width, kept, producers)` tuples, in network order.
    fn groups(&self) -> Vec<(String, usize, usize, Vec<String>)> {
        self.pruned.plan.groups.iter().map(|g| (g.name.clone(), g.width, g.kept, g.producers.clone())).collect()
    }

    /// FLOPs and parameters before and after: a dict with `flops_before`, `flops_after`
    /// (forward FLOPs per `size` x `size` image: 2 x multiply-adds of the convolutions and
    /// the classifier), `train_flops_before`, `train_flops_after`, `params_before`,
    /// `params_after`.
    #[pyo3(signature = (size=224))]
    fn counts<'py>(&self, py: Python<'py>, size: usize) -> PyResult<Bound<'py, PyDict>> {
        let (b, a) = (&self.pruned.plan.before, &self.pruned.plan.after);
        let d = PyDict::new(py);
        d.set_item("flops_before", b.flops_forward(size, size))?;
        d.set_item("flops_after", a.flops_forward(size, size))?;
        d.set_item("train_flops_before", b.flops_train(size, size))?;
        d.set_item("train_flops_after", a.flops_train(size, size))?;
        d.set_item("params_before", b.params())?;
        d.set_item("params_after", a.params())?;
        Ok(d)
    }

    /// The plan's table (what `prunekit prune` prints) for `size` x `size` images.
    #[pyo3(signature = (size=224))]
    fn table(&self, size: usize) -> String {
        self.pruned.plan.table(size, size)
    }

    /// The settings: `(mode, sparsity, round_to, criterion)`.
    fn settings(&self) -> (String, String, usize, String) {
        let c = &self.pruned.plan.config;
        let crit = match c.criterion {
            Norm::L1 => "l1",
            Norm::L2 => "l2",
        };
        (c.mode.to_string(), c.sparsity.to_string(), c.round_to, crit.to_string())
    }

    /// Writes the file `prunekit prune --out` writes: the model, `keep.<group>` tensors and
    /// the settings as metadata (atomically).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let st = self.pruned.to_file_state();
        guarded(py, move || {
            prunekit::limits::check_output_path("path", &path)?;
            st.write(&path)
        })
    }

    /// The state `save` writes, as a dict of numpy arrays (model, `keep.*`), and its metadata.
    fn file_state<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
        let st = self.pruned.to_file_state();
        let meta = PyDict::new(py);
        for (k, v) in &st.metadata {
            meta.set_item(k, v)?;
        }
        Ok((state_to_py(py, st)?, meta))
    }
}

/// Prunes a bottleneck ResNet zero-shot by weight magnitude: the crate's
/// `prune::prune_owned_state` pipeline on `device` (the CPU by default).
#[pyfunction]
#[pyo3(signature = (weights, mode="filters", sparsity=None, round_to=8, criterion="l1", device="cpu"))]
fn prune(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    mode: &str,
    sparsity: Option<&Bound<'_, PyAny>>,
    round_to: usize,
    criterion: &str,
    device: &str,
) -> PyResult<PruneResult> {
    catch(|| {
        let half = 0.5f64.into_pyobject(py)?.into_any();
        let config = prune_config(mode, sparsity.unwrap_or(&half), round_to, criterion)?;
        let dev = crate::device(device)?;
        let sd = state_from_py(py, weights)?;
        let pruned = guarded(py, move || prune_owned_state(&dev, sd, &config))?;
        Ok(PruneResult { pruned })
    })
}

/// FLOPs and parameters of a bottleneck ResNet given by its weights: a dict with `forward`
/// (2 x multiply-adds of the convolutions and the classifier per `size` x `size` image),
/// `train` (forward, and backward at twice that, less the stem's input gradient), `params`,
/// `layers`, `classes`, `fc_in`.
#[pyfunction]
#[pyo3(signature = (weights, size=224))]
fn flops<'py>(py: Python<'py>, weights: &Bound<'py, PyAny>, size: usize) -> PyResult<Bound<'py, PyDict>> {
    catch(|| {
        if size == 0 {
            return Err(PyValueError::new_err("size must be at least 1"));
        }
        let sd = state_from_py(py, weights)?;
        let arch = Arch::from_state(&sd).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("forward", arch.flops_forward(size, size))?;
        d.set_item("train", arch.flops_train(size, size))?;
        d.set_item("params", arch.params())?;
        d.set_item("layers", arch.layers().to_vec())?;
        d.set_item("classes", arch.classes)?;
        d.set_item("fc_in", arch.fc_in())?;
        let convs = PyList::empty(py);
        for c in arch.convs(size, size) {
            convs.append((c.name.clone(), c.cin, c.cout, c.kernel, c.stride, c.pad, c.h, c.w, c.flops()))?;
        }
        d.set_item("convs", convs)?;
        Ok(d)
    })
}

/// The model's logits for `images` (NCHW float32, C-contiguous): prunekit's forward pass,
/// eval-mode batch norm (running statistics) unless `train`, on `device`.
#[pyfunction]
#[pyo3(signature = (weights, images, train=false, device="cpu", precision=None))]
fn logits<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyAny>,
    images: &Bound<'py, PyAny>,
    train: bool,
    device: &str,
    precision: Option<&str>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    catch(|| {
        let x: PyReadonlyArray4<f32> = crate::conv::array4(images, "images")?;
        let [n, c, h, w]: [usize; 4] = x.shape().try_into().expect("rank 4");
        if c != 3 {
            return Err(PyValueError::new_err(format!(
                "images: expected NCHW with 3 channels, got shape {:?}",
                x.shape()
            )));
        }
        let dev = crate::device(device)?;
        let prec = crate::precision(precision, &dev)?;
        let sd = state_from_py(py, weights)?;
        let xs = x.as_slice().map_err(|_| PyValueError::new_err("images: not C-contiguous"))?;
        let (out, classes) = guarded(py, move || {
            let mut model = Model::from_state(&dev, &sd, prec)?;
            let mut ws = model.workspace(n, h, w)?;
            model.set_batch(&mut ws, xs, None)?;
            model.forward(&mut ws, train)?;
            Ok((model.logits(&ws)?, model.arch().classes))
        })?;
        PyArray1::from_vec(py, out).reshape(vec![n, classes])
    })
}

/// Fresh weights of a bottleneck ResNet (blocks per stage, base width: 64 is
/// torchvision's), initialised as torchvision initialises it, seeded.
#[pyfunction]
#[pyo3(signature = (layers=[3, 4, 6, 3], width=64, classes=1000, seed=0))]
fn init_weights<'py>(
    py: Python<'py>,
    layers: [usize; 4],
    width: usize,
    classes: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    catch(|| {
        if layers.contains(&0) || width == 0 || classes == 0 {
            return Err(PyValueError::new_err("layers, width and classes must be at least 1"));
        }
        let sd = guarded(py, move || {
            Ok(prunekit::model::init::torchvision_init(&Arch::bottleneck_width(layers, width, classes), seed))
        })?;
        state_to_py(py, sd)
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PruneResult>()?;
    m.add_function(wrap_pyfunction!(init_weights, m)?)?;
    m.add_function(wrap_pyfunction!(prune, m)?)?;
    m.add_function(wrap_pyfunction!(flops, m)?)?;
    m.add_function(wrap_pyfunction!(logits, m)?)?;
    Ok(())
}
