//! Output buffers for the convolutions, reused across calls.
//!
//! A new float32 array of a few MiB is, with glibc's allocator, fresh memory from the
//! kernel on most calls: every page faults in (and is zeroed by the kernel) on its first
//! write, which costs the convolution kernels that write it 5-40% on this project's CPUs.
//! A training loop asks for the same output sizes step after step, so the arrays made
//! here keep their memory when Python frees them: it goes back to an idle list, and the
//! next request of the same length gets it back, already mapped and likely in cache. This
//! is what PyTorch's caching allocator does for CUDA memory.
//!
//! The idle list holds at most [`IDLE_LIMIT`] bytes (the oldest blocks are freed first);
//! blocks under [`MIN_BYTES`] are not kept (the allocator serves those from its own heap).
//! `empty_cache()` frees every idle block.

use numpy::ndarray::ArrayViewMutD;
use numpy::PyArrayDyn;
use pyo3::prelude::*;
use std::collections::VecDeque;
use std::sync::Mutex;

/// The most idle bytes kept for reuse.
pub(crate) const IDLE_LIMIT: usize = 1 << 30;
/// Blocks smaller than this are freed, not kept.
pub(crate) const MIN_BYTES: usize = 256 << 10;

#[derive(Default)]
struct Idle {
    blocks: VecDeque<Vec<f32>>,
    bytes: usize,
    hits: u64,
    misses: u64,
}

static IDLE: Mutex<Idle> = Mutex::new(Idle { blocks: VecDeque::new(), bytes: 0, hits: 0, misses: 0 });

fn idle() -> std::sync::MutexGuard<'static, Idle> {
    // A panic while the lock is held leaves the list consistent (every update is one
    // push or remove), so a poisoned lock is still usable.
    IDLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A block of `len` floats: an idle one of that length if there is one, else a new one
/// (zeroed), or `MemoryError` when it cannot be allocated. The contents of a reused block
/// are whatever its last user left: callers overwrite every element.
fn take(len: usize) -> PyResult<Vec<f32>> {
    if len * 4 >= MIN_BYTES {
        let mut i = idle();
        if let Some(pos) = i.blocks.iter().rposition(|b| b.len() == len) {
            let b = i.blocks.remove(pos).expect("found");
            i.bytes -= len * 4;
            i.hits += 1;
            return Ok(b);
        }
        i.misses += 1;
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| pyo3::exceptions::PyMemoryError::new_err(format!("cannot allocate {len} floats")))?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Gives a block back for reuse (or frees it: small, or over the limit).
fn give(block: Vec<f32>) {
    let bytes = block.len() * 4;
    if !(MIN_BYTES..=IDLE_LIMIT).contains(&bytes) {
        return;
    }
    let mut freed = Vec::new();
    {
        let mut i = idle();
        while i.bytes + bytes > IDLE_LIMIT {
            let old = i.blocks.pop_front().expect("bytes > 0 means a block");
            i.bytes -= old.len() * 4;
            freed.push(old);
        }
        i.bytes += bytes;
        i.blocks.push_back(block);
    }
    drop(freed); // freed outside the lock
}

/// The owner of an array's memory: the block returns to the idle list when Python frees
/// the array (and every view of it, tensors made by `torch.from_numpy` included).
#[pyclass(module = "prunekit._prunekit")]
struct Block {
    data: Vec<f32>,
}

impl Drop for Block {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.data));
    }
}

/// A writeable, C-contiguous float32 array of `shape` whose memory is reused after it is
/// freed. Its contents are unspecified (zeros when new, else a previous array's values).
pub(crate) fn empty<'py>(py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let len =
        shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= isize::MAX as usize / 4).ok_or_else(
            || pyo3::exceptions::PyValueError::new_err(format!("an array of shape {shape:?} is too large")),
        )?;
    let owner = Bound::new(py, Block { data: take(len)? })?;
    let ptr = owner.borrow_mut().data.as_mut_ptr();
    // SAFETY: `ptr` points at `len` floats owned by `owner`, which the array keeps alive as
    // its base object; the block is never resized while it lives.
    unsafe {
        let view = ArrayViewMutD::from_shape_ptr(shape.to_vec(), ptr);
        Ok(PyArrayDyn::borrow_from_array(&view, owner.into_any()))
    }
}

/// `empty(shape)`: a float32 array of `shape` with unspecified contents, whose memory is
/// kept for the next array of the same size when it is freed.
#[pyfunction]
#[pyo3(name = "empty")]
fn empty_py<'py>(py: Python<'py>, shape: Vec<usize>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    empty(py, &shape)
}

/// `(idle_bytes, idle_blocks, hits, misses)` of the buffer cache.
#[pyfunction]
fn buffer_cache() -> (usize, usize, u64, u64) {
    let i = idle();
    (i.bytes, i.blocks.len(), i.hits, i.misses)
}

/// Frees every idle block of the buffer cache (arrays in use are not touched).
#[pyfunction]
fn empty_buffer_cache() {
    let blocks = {
        let mut i = idle();
        i.bytes = 0;
        std::mem::take(&mut i.blocks)
    };
    drop(blocks);
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(empty_py, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_cache, m)?)?;
    m.add_function(wrap_pyfunction!(empty_buffer_cache, m)?)?;
    Ok(())
}
