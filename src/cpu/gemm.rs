//! The fast paths' one entry to the `gemm` crate: row-major f32 GEMM on strided views.

use gemm::Parallelism;

/// A matrix operand for [`sgemm`]: base pointer, row stride, column stride (elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}
// SAFETY: a Mat is a read-only view of a slice that outlives the parallel loop using it.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `dst[m x n] (row stride ldd) = (acc ? dst : 0) + a[m x k] * b[k x n]`. The crate packs
/// both operands whatever their strides, so a transposed operand needs no copy, and with
/// `Parallelism::Rayon` it splits rows and columns of the output over the threads, which
/// keeps thin GEMMs (few rows, many columns) parallel.
///
/// # Safety
/// Every operand must cover the elements its strides address.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ldd: usize,
    acc: bool,
    a: Mat,
    b: Mat,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        acc,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}

/// The threads of the current rayon pool.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
