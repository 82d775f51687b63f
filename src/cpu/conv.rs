//! Convolution on the CPU, activations NHWC and weights KRSC: the naive direct oracle of
//! every pass (f64 accumulation), and the fast path the CPU device runs (im2col, or
//! nothing for 1x1 convolutions, on top of the `gemm` crate, parallel with rayon).
//!
//! Shapes follow CUTLASS: x is `[N, H, W, C]`, w is `[K, R, S, C]`, y is `[N, P, Q, K]`
//! with `y[n,p,q,k] = sum_{r,s,c} x[n, p*stride-pad+r, q*stride-pad+s, c] * w[k,r,s,c]`.

use crate::{ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// The shape of one 2-D convolution (NHWC activations, KRSC weights, square padding and
/// stride).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels (filters).
    pub k: usize,
    /// Filter height.
    pub r: usize,
    /// Filter width.
    pub s: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (all four sides).
    pub pad: usize,
}

impl ConvShape {
    /// Output height: `(h + 2 pad - r) / stride + 1`, or 0 when the filter does not fit.
    pub fn p(&self) -> usize {
        out_len(self.h, self.r, self.stride, self.pad)
    }
    /// Output width: `(w + 2 pad - s) / stride + 1`, or 0 when the filter does not fit.
    pub fn q(&self) -> usize {
        out_len(self.w, self.s, self.stride, self.pad)
    }
    /// Elements of x (NHWC).
    pub fn x_len(&self) -> usize {
        self.n.saturating_mul(self.h).saturating_mul(self.w).saturating_mul(self.c)
    }
    /// Elements of w (KRSC).
    pub fn w_len(&self) -> usize {
        self.k.saturating_mul(self.r).saturating_mul(self.s).saturating_mul(self.c)
    }
    /// Elements of y (NPQK).
    pub fn y_len(&self) -> usize {
        self.n.saturating_mul(self.p()).saturating_mul(self.q()).saturating_mul(self.k)
    }
    /// A clear error for zero sizes, a zero stride, an empty output or sizes whose element
    /// counts overflow.
    pub fn validate(&self) -> Result<()> {
        let ConvShape { n, h, w, c, k, r, s, stride, pad } = *self;
        ensure!(
            n > 0 && h > 0 && w > 0 && c > 0 && k > 0 && r > 0 && s > 0,
            "convolution {self:?}: every size (n, h, w, c, k, r, s) must be at least 1"
        );
        ensure!(stride > 0, "convolution {self:?}: stride must be at least 1");
        ensure!(
            h.checked_add(pad.saturating_mul(2)).is_some_and(|x| x >= r)
                && w.checked_add(pad.saturating_mul(2)).is_some_and(|x| x >= s),
            "convolution {self:?}: the {r}x{s} filter does not fit the padded {h}x{w} input (empty output)"
        );
        let mul = |v: &[usize]| v.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        ensure!(
            mul(&[n, h, w, c]).is_some()
                && mul(&[k, r, s, c]).is_some()
                && mul(&[n, self.p(), self.q(), k]).is_some()
                && mul(&[n, self.p(), self.q(), r, s, c, k, 2]).is_some(),
            "convolution {self:?}: sizes overflow"
        );
        Ok(())
    }
    /// Multiply-adds times two: `2 N P Q K C R S`.
    pub fn flops(&self) -> f64 {
        2.0 * self.n as f64
            * self.p() as f64
            * self.q() as f64
            * self.k as f64
            * self.c as f64
            * self.r as f64
            * self.s as f64
    }
    /// A 1x1 convolution with stride 1 and no padding: a plain GEMM.
    pub fn is_pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.stride == 1 && self.pad == 0
    }
}

fn out_len(x: usize, f: usize, stride: usize, pad: usize) -> usize {
    match x.checked_add(pad.saturating_mul(2)) {
        Some(padded) if padded >= f && stride > 0 => (padded - f) / stride + 1,
        _ => 0,
    }
}

/// Input coordinate of output position `o`, tap `f`, or None in the padding.
#[inline]
fn in_coord(o: usize, f: usize, stride: usize, pad: usize, len: usize) -> Option<usize> {
    let v = (o * stride + f).checked_sub(pad)?;
    (v < len).then_some(v)
}

// ---------------------------------------------------------------- oracles

/// Naive direct fprop in f64: `y[n,p,q,k]` (NPQK).
pub fn fprop_oracle(sh: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (p_, q_) = (sh.p(), sh.q());
    let mut y = vec![0.0f32; sh.y_len()];
    for n in 0..sh.n {
        for p in 0..p_ {
            for q in 0..q_ {
                for k in 0..sh.k {
                    let mut acc = 0.0f64;
                    for r in 0..sh.r {
                        let Some(h) = in_coord(p, r, sh.stride, sh.pad, sh.h) else { continue };
                        for s in 0..sh.s {
                            let Some(wi) = in_coord(q, s, sh.stride, sh.pad, sh.w) else { continue };
                            for c in 0..sh.c {
                                acc += x[((n * sh.h + h) * sh.w + wi) * sh.c + c] as f64
                                    * w[((k * sh.r + r) * sh.s + s) * sh.c + c] as f64;
                            }
                        }
                    }
                    y[((n * p_ + p) * q_ + q) * sh.k + k] = acc as f32;
                }
            }
        }
    }
    y
}

/// Naive dgrad in f64 (the adjoint of fprop in x): `dx[n,h,w,c]` (NHWC).
pub fn dgrad_oracle(sh: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (p_, q_) = (sh.p(), sh.q());
    let mut dx = vec![0.0f64; sh.x_len()];
    for n in 0..sh.n {
        for p in 0..p_ {
            for q in 0..q_ {
                for k in 0..sh.k {
                    let g = dy[((n * p_ + p) * q_ + q) * sh.k + k] as f64;
                    for r in 0..sh.r {
                        let Some(h) = in_coord(p, r, sh.stride, sh.pad, sh.h) else { continue };
                        for s in 0..sh.s {
                            let Some(wi) = in_coord(q, s, sh.stride, sh.pad, sh.w) else { continue };
                            for c in 0..sh.c {
                                dx[((n * sh.h + h) * sh.w + wi) * sh.c + c] +=
                                    g * w[((k * sh.r + r) * sh.s + s) * sh.c + c] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    dx.into_iter().map(|v| v as f32).collect()
}

/// Naive wgrad in f64 (the adjoint of fprop in w): `dw[k,r,s,c]` (KRSC).
pub fn wgrad_oracle(sh: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (p_, q_) = (sh.p(), sh.q());
    let mut dw = vec![0.0f64; sh.w_len()];
    for n in 0..sh.n {
        for p in 0..p_ {
            for q in 0..q_ {
                for k in 0..sh.k {
                    let g = dy[((n * p_ + p) * q_ + q) * sh.k + k] as f64;
                    for r in 0..sh.r {
                        let Some(h) = in_coord(p, r, sh.stride, sh.pad, sh.h) else { continue };
                        for s in 0..sh.s {
                            let Some(wi) = in_coord(q, s, sh.stride, sh.pad, sh.w) else { continue };
                            for c in 0..sh.c {
                                dw[((k * sh.r + r) * sh.s + s) * sh.c + c] +=
                                    g * x[((n * sh.h + h) * sh.w + wi) * sh.c + c] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    dw.into_iter().map(|v| v as f32).collect()
}

// ---------------------------------------------------------------- fast path

/// A matrix operand for [`sgemm`]: base pointer, row stride, column stride (elements).
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}
// SAFETY: a Mat is a read-only view of a slice that outlives the parallel loop using it.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `dst[m x n] (row stride ldd) = (acc ? dst : 0) + a[m x k] * b[k x n]`.
///
/// # Safety
/// Every operand must cover the elements its strides address.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(m: usize, n: usize, k: usize, dst: *mut f32, ldd: usize, acc: bool, a: Mat, b: Mat, par: Parallelism) {
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

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// im2col of output rows `m0 .. m0 + rows` (m = (n, p, q)) into `col` (`[rows][R*S*C]`).
fn im2col(sh: &ConvShape, x: &[f32], m0: usize, rows: usize, col: &mut [f32]) {
    let (p_, q_) = (sh.p(), sh.q());
    let rsc = sh.r * sh.s * sh.c;
    for i in 0..rows {
        let m = m0 + i;
        let (n, pq) = (m / (p_ * q_), m % (p_ * q_));
        let (p, q) = (pq / q_, pq % q_);
        let dst = &mut col[i * rsc..(i + 1) * rsc];
        for r in 0..sh.r {
            let h = in_coord(p, r, sh.stride, sh.pad, sh.h);
            for s in 0..sh.s {
                let d = &mut dst[(r * sh.s + s) * sh.c..][..sh.c];
                match (h, in_coord(q, s, sh.stride, sh.pad, sh.w)) {
                    (Some(h), Some(w)) => d.copy_from_slice(&x[((n * sh.h + h) * sh.w + w) * sh.c..][..sh.c]),
                    _ => d.fill(0.0),
                }
            }
        }
    }
}

/// Rows of the output per task: enough work per GEMM call, about 4 tasks per thread.
fn row_block(rows: usize) -> usize {
    rows.div_ceil(4 * threads()).clamp(64, 512)
}

/// True when there are enough output rows for independent row blocks on every thread;
/// otherwise each GEMM is parallel inside (the weights dominate and are packed once).
fn rows_parallel(rows: usize) -> bool {
    rows >= 1024 * threads()
}

/// The fast fprop: `y = conv(x, w)` (overwrites y).
pub fn fprop(sh: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (k, rsc) = (sh.k, sh.r * sh.s * sh.c);
    let m = sh.n * sh.p() * sh.q();
    debug_assert!(x.len() == sh.x_len() && w.len() == sh.w_len() && y.len() == sh.y_len());
    // B[kk][k] = w[k][kk], transposed once so that the GEMM reads it row-major.
    let mut wt = vec![0.0f32; w.len()];
    transpose(w, &mut wt, 1, k, rsc);
    let b = Mat { ptr: wt.as_ptr(), rs: k as isize, cs: 1 };
    let pointwise = sh.is_pointwise();
    let block = |m0: usize, yb: &mut [f32], col: &mut Vec<f32>, par: Parallelism| {
        let rows = yb.len() / k;
        let a = if pointwise {
            Mat { ptr: x[m0 * rsc..].as_ptr(), rs: rsc as isize, cs: 1 }
        } else {
            col.resize(rows * rsc, 0.0);
            im2col(sh, x, m0, rows, col);
            Mat { ptr: col.as_ptr(), rs: rsc as isize, cs: 1 }
        };
        // SAFETY: a is rows x rsc, b is rsc x k, yb is rows x k.
        unsafe { sgemm(rows, k, rsc, yb.as_mut_ptr(), k, false, a, b, par) };
    };
    if rows_parallel(m) {
        let mb = row_block(m);
        y.par_chunks_mut(mb * k)
            .enumerate()
            .for_each_init(Vec::new, |col, (bi, yb)| block(bi * mb, yb, col, Parallelism::None));
    } else {
        // Blocks of at most ~16 MB of im2col, one after the other, each GEMM parallel.
        let mb = if pointwise { m } else { (4 << 20) / rsc.max(1) }.max(256);
        let mut col = Vec::new();
        for (bi, yb) in y.chunks_mut(mb * k).enumerate() {
            block(bi * mb, yb, &mut col, Parallelism::Rayon(threads()));
        }
    }
}

/// The fast dgrad: `dx = dgrad(dy, w)` (overwrites dx).
pub fn dgrad(sh: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (k, c, rsc) = (sh.k, sh.c, sh.r * sh.s * sh.c);
    let (p_, q_) = (sh.p(), sh.q());
    let pq = p_ * q_;
    debug_assert!(dy.len() == sh.y_len() && w.len() == sh.w_len() && dx.len() == sh.x_len());
    if sh.is_pointwise() {
        // dx[m][c] = dy[m][k] * w[k][c]
        let m = sh.n * pq;
        let mb = row_block(m);
        let b = Mat { ptr: w.as_ptr(), rs: c as isize, cs: 1 };
        dx.par_chunks_mut(mb * c).enumerate().for_each(|(bi, db)| {
            let rows = db.len() / c;
            let a = Mat { ptr: dy[bi * mb * k..].as_ptr(), rs: k as isize, cs: 1 };
            // SAFETY: a is rows x k, b is k x c, db is rows x c.
            unsafe { sgemm(rows, c, k, db.as_mut_ptr(), c, false, a, b, Parallelism::None) };
        });
        return;
    }
    // Per image: dcol[pq][rsc] = dy[pq][k] * w[k][rsc], then col2im adds dcol into dx.
    let hwc = sh.h * sh.w * c;
    let per_image = |n: usize, dxi: &mut [f32], dcol: &mut Vec<f32>, par: Parallelism| {
        dcol.resize(pq * rsc, 0.0);
        let a = Mat { ptr: dy[n * pq * k..].as_ptr(), rs: k as isize, cs: 1 };
        let b = Mat { ptr: w.as_ptr(), rs: rsc as isize, cs: 1 };
        // SAFETY: a is pq x k, b is k x rsc, dcol is pq x rsc.
        unsafe { sgemm(pq, rsc, k, dcol.as_mut_ptr(), rsc, false, a, b, par) };
        dxi.fill(0.0);
        for p in 0..p_ {
            for q in 0..q_ {
                let src = &dcol[(p * q_ + q) * rsc..][..rsc];
                for r in 0..sh.r {
                    let Some(h) = in_coord(p, r, sh.stride, sh.pad, sh.h) else { continue };
                    for s in 0..sh.s {
                        let Some(wi) = in_coord(q, s, sh.stride, sh.pad, sh.w) else { continue };
                        let d = &mut dxi[(h * sh.w + wi) * c..][..c];
                        for (o, v) in d.iter_mut().zip(&src[(r * sh.s + s) * c..][..c]) {
                            *o += v;
                        }
                    }
                }
            }
        }
    };
    if sh.n >= threads() {
        dx.par_chunks_mut(hwc)
            .enumerate()
            .for_each_init(Vec::new, |dcol, (n, dxi)| per_image(n, dxi, dcol, Parallelism::None));
    } else {
        let mut dcol = Vec::new();
        for (n, dxi) in dx.chunks_mut(hwc).enumerate() {
            per_image(n, dxi, &mut dcol, Parallelism::Rayon(threads()));
        }
    }
}

/// The fast wgrad: `dw = wgrad(x, dy)` (overwrites dw).
pub fn wgrad(sh: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (k, rsc) = (sh.k, sh.r * sh.s * sh.c);
    let pq = sh.p() * sh.q();
    let m = sh.n * pq;
    debug_assert!(x.len() == sh.x_len() && dy.len() == sh.y_len() && dw.len() == sh.w_len());
    // dw[k][kk] += dyT[k][rows] * col[rows][kk] over blocks of rows (m = (n, p, q)).
    let pointwise = sh.is_pointwise();
    let t = threads();
    let block = |m0: usize, rows: usize, acc: &mut [f32], col: &mut Vec<f32>, first: bool, par: Parallelism| {
        let b = if pointwise {
            Mat { ptr: x[m0 * rsc..].as_ptr(), rs: rsc as isize, cs: 1 }
        } else {
            col.resize(rows * rsc, 0.0);
            im2col(sh, x, m0, rows, col);
            Mat { ptr: col.as_ptr(), rs: rsc as isize, cs: 1 }
        };
        let a = Mat { ptr: dy[m0 * k..].as_ptr(), rs: 1, cs: k as isize };
        // SAFETY: a is k x rows (dy transposed), b is rows x rsc, acc is k x rsc.
        unsafe { sgemm(k, rsc, rows, acc.as_mut_ptr(), rsc, !first, a, b, par) };
    };
    // Few long reductions: one partial sum per task, then a tree sum.
    let mb = 256.max(m.div_ceil(8 * t)).min(4096);
    let nblocks = m.div_ceil(mb);
    if nblocks < t {
        let mut col = Vec::new();
        for bi in 0..nblocks {
            let m0 = bi * mb;
            block(m0, mb.min(m - m0), dw, &mut col, bi == 0, Parallelism::Rayon(t));
        }
        return;
    }
    let per_task = nblocks.div_ceil(t);
    let partials: Vec<Vec<f32>> = (0..t)
        .into_par_iter()
        .filter_map(|ti| {
            let (b0, b1) = (ti * per_task, ((ti + 1) * per_task).min(nblocks));
            if b0 >= b1 {
                return None;
            }
            let mut acc = vec![0.0f32; k * rsc];
            let mut col = Vec::new();
            for bi in b0..b1 {
                let m0 = bi * mb;
                block(m0, mb.min(m - m0), &mut acc, &mut col, bi == b0, Parallelism::None);
            }
            Some(acc)
        })
        .collect();
    dw.copy_from_slice(&partials[0]);
    for part in &partials[1..] {
        dw.par_chunks_mut(4096).zip(part.par_chunks(4096)).for_each(|(d, s)| {
            for (o, v) in d.iter_mut().zip(s) {
                *o += v;
            }
        });
    }
}

// ---------------------------------------------------------------- layouts

/// `dst[b][j][i] = src[b][i][j]` for `batch` matrices of `rows x cols` (NCHW <-> NHWC,
/// OIHW <-> KRSC).
pub fn transpose<T: Copy + Send + Sync>(src: &[T], dst: &mut [T], batch: usize, rows: usize, cols: usize) {
    let plane = rows * cols;
    if plane == 0 {
        return;
    }
    dst.par_chunks_mut(plane).zip(src.par_chunks(plane)).take(batch).for_each(|(d, s)| {
        const B: usize = 32;
        for i0 in (0..rows).step_by(B) {
            for j0 in (0..cols).step_by(B) {
                for i in i0..(i0 + B).min(rows) {
                    for j in j0..(j0 + B).min(cols) {
                        d[j * rows + i] = s[i * cols + j];
                    }
                }
            }
        }
    });
}
