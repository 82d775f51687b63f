//! Tensors as they live in files: safetensors with torchvision's names and layouts
//! (OIHW conv weights), on the host. Reading checks the format and the dtypes; writing
//! goes to a temporary file that is renamed, so a failure never leaves half a file.

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// The elements of a tensor: f32 (weights, statistics, inputs) or i64 (class targets,
/// kept indices, BN's `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// safetensors' F32 elements.
    F32(Vec<f32>),
    /// safetensors' I64 elements.
    I64(Vec<i64>),
}

/// A host tensor: a shape and its elements in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The dimensions, outermost first (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The elements, `shape.iter().product()` of them.
    pub data: Data,
}

impl Tensor {
    /// An f32 tensor; `data` must hold exactly the shape's number of elements.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data: Data::F32(data) }
    }
    /// An i64 tensor; `data` must hold exactly the shape's number of elements.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data: Data::I64(data) }
    }
    /// The number of elements: the product of the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The safetensors dtype name, `F32` or `I64`, for messages.
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "F32",
            Data::I64(_) => "I64",
        }
    }
    /// The f32 elements, or None for an i64 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }
    /// The i64 elements, or None for an f32 tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            Data::F32(_) => None,
        }
    }
}

/// Named tensors and string metadata, as in one safetensors file. Names are sorted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    /// The tensors by name (torchvision's names for a model).
    pub tensors: BTreeMap<String, Tensor>,
    /// The file's `__metadata__`: free-form string pairs (e.g. the pruning settings).
    pub metadata: BTreeMap<String, String>,
}

fn format_err(path: &str, msg: impl Into<String>) -> Error {
    Error::Format { path: path.to_string(), msg: msg.into() }
}

impl StateDict {
    /// Reads a safetensors file. F32 and I64 tensors only; anything else is an error that
    /// names the tensor.
    pub fn read(path: &Path) -> Result<StateDict> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
        StateDict::from_bytes(&bytes, &shown)
    }

    /// Parses the bytes of a safetensors file (`what` names it in errors).
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<StateDict> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format_err(what, format!("not a valid safetensors file ({e})")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| format_err(what, format!("not a valid safetensors file ({e})")))?;
        let mut sd = StateDict::default();
        if let Some(m) = meta.metadata() {
            sd.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        for (name, view) in st.iter() {
            let shape = view.shape().to_vec();
            let data = match view.dtype() {
                Dtype::F32 => Data::F32(bytemuck::pod_collect_to_vec(view.data())),
                Dtype::I64 => Data::I64(bytemuck::pod_collect_to_vec(view.data())),
                other => {
                    return Err(format_err(
                        what,
                        format!("tensor {name} has dtype {other:?}; prunekit reads F32 tensors (and I64 indices)"),
                    ))
                }
            };
            sd.tensors.insert(name.to_string(), Tensor { shape, data });
        }
        Ok(sd)
    }

    /// Writes a safetensors file through a temporary file in the same folder, renamed over
    /// `path` once complete: a failure (or a kill) never leaves half a file, and an existing
    /// file stays as it was until the new one is whole.
    pub fn write(&self, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let meta: std::collections::HashMap<String, String> =
            self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let meta = if meta.is_empty() { None } else { Some(meta) };
        let name = path.file_name().ok_or_else(|| format_err(&shown, "cannot write: not a file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let done = safetensors::serialize_to_file(self.tensors.iter().map(|(k, v)| (k.as_str(), v)), meta, &tmp)
            .map_err(|e| format_err(&shown, format!("cannot write: {e}")))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: shown.clone(), source }));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    /// The tensor `name`, which must exist.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| crate::invalid!("missing tensor {name}"))
    }

    /// Moves every tensor whose name starts with `prefix` into a new dict, without the prefix.
    pub fn split_prefix(&mut self, prefix: &str) -> StateDict {
        let names: Vec<String> = self.tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        let mut out = StateDict::default();
        for n in names {
            let t = self.tensors.remove(&n).expect("listed");
            out.tensors.insert(n[prefix.len()..].to_string(), t);
        }
        out
    }
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) => Dtype::F32,
            Data::I64(_) => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match &self.data {
            Data::F32(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::I64(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
        }
    }
    fn data_len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len() * 4,
            Data::I64(v) => v.len() * 8,
        }
    }
}
