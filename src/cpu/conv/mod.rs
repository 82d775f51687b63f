//! Convolution on the CPU, activations NHWC and weights KRSC: the naive direct oracle of
//! every pass (f64 accumulation, in oracle.rs), and the fast path the CPU device runs
//! (im2col over the filter taps that read the image, or nothing for 1x1 convolutions, on
//! top of the `gemm` crate, parallel with rayon: over row blocks when there are many rows,
//! inside the GEMM, over its columns too, when there are few). The dgrad of a stride-1
//! convolution with enough input positions is the fprop of dy with the filter flipped; the
//! others scatter (col2im).
//!
//! Shapes follow CUTLASS: x is `[N, H, W, C]`, w is `[K, R, S, C]`, y is `[N, P, Q, K]`
//! with `y[n,p,q,k] = sum_{r,s,c} x[n, p*stride-pad+r, q*stride-pad+s, c] * w[k,r,s,c]`.

use super::gemm::{sgemm, threads, Mat};
use crate::shape::ConvShape;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::Cell;

mod oracle;

pub use oracle::{dgrad_oracle, fprop_oracle, wgrad_oracle};

/// Input coordinate of output position `o`, tap `f`, or None in the padding.
#[inline]
fn in_coord(o: usize, f: usize, stride: usize, pad: usize, len: usize) -> Option<usize> {
    let v = (o * stride + f).checked_sub(pad)?;
    (v < len).then_some(v)
}

// ---------------------------------------------------------------- fast path

// Scratch buffers (im2col, compacted weights, partial sums), kept per thread and slot so
// that a training step allocates nothing once its shapes have been seen. A buffer is taken
// out of its slot while in use and put back when dropped: a rayon task that runs on the same
// thread in the meantime (a parallel GEMM lets the waiting thread steal work) finds the slot
// empty and allocates its own.
thread_local! {
    static SCRATCH: [Cell<Vec<f32>>; 4] =
        const { [Cell::new(Vec::new()), Cell::new(Vec::new()), Cell::new(Vec::new()), Cell::new(Vec::new())] };
}

/// A scratch buffer of at least `len` elements, its contents unspecified.
struct Scratch {
    slot: usize,
    buf: Vec<f32>,
}

fn scratch(slot: usize, len: usize) -> Scratch {
    let mut buf = SCRATCH.with(|s| s[slot].take());
    if buf.len() < len {
        buf.clear();
        buf.resize(len, 0.0);
    }
    Scratch { slot, buf }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // Keep the larger of this buffer and one a nested task may have put back meanwhile.
        let _ = SCRATCH.try_with(|s| {
            let old = s[self.slot].take();
            s[self.slot].set(if old.capacity() > buf.capacity() { old } else { buf });
        });
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
}

/// The filter taps `[t0, t1)` along one dimension that read the input at some output
/// position; on small images (layer4 of a 32x32 input) the others only ever see padding,
/// and the GEMMs leave them out. Empty (`t0 == t1`) when every tap reads padding.
fn live(out: usize, len: usize, f: usize, stride: usize, pad: usize) -> (usize, usize) {
    let hit = |t: usize| (0..out).any(|o| in_coord(o, t, stride, pad, len).is_some());
    let t0 = (0..f).find(|&t| hit(t)).unwrap_or(f);
    let t1 = (t0..f).rev().find(|&t| hit(t)).map_or(t0, |t| t + 1);
    (t0, t1)
}

/// The live taps of a convolution: rows `r0..r1`, columns `s0..s1` of the filter.
#[derive(Clone, Copy, Debug)]
struct Taps {
    r0: usize,
    r1: usize,
    s0: usize,
    s1: usize,
}

impl Taps {
    fn of(sh: &ConvShape) -> Taps {
        let (r0, r1) = live(sh.p(), sh.h, sh.r, sh.stride, sh.pad);
        let (s0, s1) = live(sh.q(), sh.w, sh.s, sh.stride, sh.pad);
        Taps { r0, r1, s0, s1 }
    }
    fn all(&self, sh: &ConvShape) -> bool {
        self.r0 == 0 && self.r1 == sh.r && self.s0 == 0 && self.s1 == sh.s
    }
    /// The GEMM's reduction length over these taps: `R' S' C`.
    fn width(&self, c: usize) -> usize {
        (self.r1 - self.r0) * (self.s1 - self.s0) * c
    }
    /// `wc[k][r'][s'][c] = w[k][r0 + r'][s0 + s'][c]`.
    fn gather(&self, sh: &ConvShape, w: &[f32], wc: &mut [f32]) {
        let (run, width) = ((self.s1 - self.s0) * sh.c, self.width(sh.c));
        wc[..sh.k * width].par_chunks_mut(width).enumerate().for_each(|(k, d)| {
            for (i, r) in (self.r0..self.r1).enumerate() {
                d[i * run..][..run].copy_from_slice(&w[((k * sh.r + r) * sh.s + self.s0) * sh.c..][..run]);
            }
        });
    }
    /// The inverse of `gather`, with zeros at the dead taps.
    fn scatter(&self, sh: &ConvShape, wc: &[f32], w: &mut [f32]) {
        let (run, width, rsc) = ((self.s1 - self.s0) * sh.c, self.width(sh.c), sh.r * sh.s * sh.c);
        w.par_chunks_mut(rsc).enumerate().for_each(|(k, d)| {
            d.fill(0.0);
            for (i, r) in (self.r0..self.r1).enumerate() {
                d[(r * sh.s + self.s0) * sh.c..][..run].copy_from_slice(&wc[k * width + i * run..][..run]);
            }
        });
    }
}

/// The live taps `[s0, s1)` of a tap range that read the input at output column `q`
/// (the others read padding): `in_coord(q, s) = q stride - pad + s` is in `[0, len)`.
#[inline]
fn tap_range(q: usize, stride: usize, pad: usize, len: usize, s0: usize, s1: usize) -> (usize, usize) {
    let base = q * stride; // in_coord(q, s) = base + s - pad
    let lo = pad.saturating_sub(base).clamp(s0, s1);
    let hi = (len + pad).saturating_sub(base).clamp(lo, s1);
    (lo, hi)
}

/// im2col of output rows `m0 .. m0 + rows` (m = (n, p, q)) over the live taps into `col`
/// (`[rows][R' S' C]`). The taps of one filter row that read the image read consecutive
/// input columns, so each filter row is one contiguous copy of `S'' C` elements (the stem's
/// 3 channels would otherwise be 7 copies of 3).
fn im2col(sh: &ConvShape, t: Taps, x: &[f32], m0: usize, rows: usize, col: &mut [f32]) {
    let (p_, q_, c) = (sh.p(), sh.q(), sh.c);
    let (ss, width) = (t.s1 - t.s0, t.width(c));
    let (mut n, mut p, mut q) = {
        let pq = m0 % (p_ * q_);
        (m0 / (p_ * q_), pq / q_, pq % q_)
    };
    for dst in col[..rows * width].chunks_exact_mut(width) {
        let (sa, sb) = tap_range(q, sh.stride, sh.pad, sh.w, t.s0, t.s1);
        for r in t.r0..t.r1 {
            let d = &mut dst[(r - t.r0) * ss * c..][..ss * c];
            match in_coord(p, r, sh.stride, sh.pad, sh.h) {
                Some(h) if sa < sb => {
                    d[..(sa - t.s0) * c].fill(0.0);
                    let w0 = q * sh.stride + sa - sh.pad;
                    d[(sa - t.s0) * c..(sb - t.s0) * c]
                        .copy_from_slice(&x[((n * sh.h + h) * sh.w + w0) * c..][..(sb - sa) * c]);
                    d[(sb - t.s0) * c..].fill(0.0);
                }
                _ => d.fill(0.0),
            }
        }
        q += 1;
        if q == q_ {
            q = 0;
            p += 1;
            if p == p_ {
                p = 0;
                n += 1;
            }
        }
    }
}

/// [`im2col`] split over the threads (for a GEMM that is parallel inside).
fn im2col_par(sh: &ConvShape, t: Taps, x: &[f32], m0: usize, rows: usize, col: &mut [f32]) {
    let width = t.width(sh.c);
    let chunk = 32.max(rows.div_ceil(4 * threads()));
    col[..rows * width]
        .par_chunks_mut(chunk * width)
        .enumerate()
        .for_each(|(i, cb)| im2col(sh, t, x, m0 + i * chunk, cb.len() / width, cb));
}

/// `dxi = col2im(dcol)` for one image: the sum of every live tap's column into the input
/// position it read (overwrites dxi).
fn col2im(sh: &ConvShape, t: Taps, dcol: &[f32], dxi: &mut [f32]) {
    let (q_, c) = (sh.q(), sh.c);
    let (ss, width) = (t.s1 - t.s0, t.width(c));
    dxi.fill(0.0);
    for p in 0..sh.p() {
        for q in 0..q_ {
            let src = &dcol[(p * q_ + q) * width..][..width];
            for r in t.r0..t.r1 {
                let Some(h) = in_coord(p, r, sh.stride, sh.pad, sh.h) else { continue };
                for s in t.s0..t.s1 {
                    let Some(wi) = in_coord(q, s, sh.stride, sh.pad, sh.w) else { continue };
                    let d = &mut dxi[(h * sh.w + wi) * c..][..c];
                    for (o, v) in d.iter_mut().zip(&src[((r - t.r0) * ss + s - t.s0) * c..][..c]) {
                        *o += v;
                    }
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
/// otherwise each GEMM is parallel inside, over its columns too (the weights dominate and
/// are packed once; thin GEMMs of small images and batches).
fn rows_parallel(rows: usize) -> bool {
    rows >= 1024 * threads()
}

/// The weights of the live taps: `w` itself when every tap is live, else a compact copy.
fn live_weights<'a>(sh: &ConvShape, t: Taps, w: &'a [f32], store: &'a mut Option<Scratch>) -> &'a [f32] {
    if t.all(sh) {
        return w;
    }
    let wc = store.insert(scratch(1, sh.k * t.width(sh.c)));
    t.gather(sh, w, wc);
    &wc[..sh.k * t.width(sh.c)]
}

/// The fast fprop: `y = conv(x, w)` (overwrites y).
pub fn fprop(sh: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    fprop_then(sh, x, w, y, &|_, _| {});
}

/// [`fprop`] that calls `after(m0, rows)` on every block of output rows (`[rows, K]`, `m0`
/// its first row) as soon as the GEMM has written it, while it is still in cache: the
/// place for an epilogue such as the batch statistics of a BN that follows. The blocks are
/// disjoint, cover `y`, and may be handed over from several threads at once, in any order.
pub fn fprop_then(sh: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32], after: &(dyn Fn(usize, &[f32]) + Sync)) {
    debug_assert!(x.len() == sh.x_len() && w.len() == sh.w_len() && y.len() == sh.y_len());
    let t = Taps::of(sh);
    let (k, width) = (sh.k, t.width(sh.c));
    let m = sh.n * sh.p() * sh.q();
    if width == 0 {
        y.fill(0.0);
        if m > 0 {
            after(0, y);
        }
        return;
    }
    let mut store = None;
    let wc = live_weights(sh, t, w, &mut store);
    // B[kk][k] = wc[k][kk]: a strided view that the GEMM packs (no transposed copy).
    let b = Mat { ptr: wc.as_ptr(), rs: 1, cs: width as isize };
    // A 1x1 stride-1 convolution reads x itself (NHWC is the GEMM's A); the others gather.
    let pointwise = sh.is_pointwise();
    let block = |m0: usize, yb: &mut [f32], par: Parallelism| {
        let rows = yb.len() / k;
        let mut col = None;
        let a = if pointwise {
            Mat { ptr: x[m0 * width..].as_ptr(), rs: width as isize, cs: 1 }
        } else {
            let col = col.insert(scratch(0, rows * width));
            match par {
                Parallelism::None => im2col(sh, t, x, m0, rows, col),
                _ => im2col_par(sh, t, x, m0, rows, col),
            }
            Mat { ptr: col.as_ptr(), rs: width as isize, cs: 1 }
        };
        // SAFETY: a is rows x width, b is width x k, yb is rows x k.
        unsafe { sgemm(rows, k, width, yb.as_mut_ptr(), k, false, a, b, par) };
        after(m0, yb);
    };
    if rows_parallel(m) {
        let mb = row_block(m);
        y.par_chunks_mut(mb * k).enumerate().for_each(|(bi, yb)| block(bi * mb, yb, Parallelism::None));
    } else {
        // Blocks of at most ~16 MB of im2col, one after the other, each GEMM parallel.
        let mb = if pointwise { m } else { (4 << 20) / width }.max(256);
        for (bi, yb) in y.chunks_mut(mb * k).enumerate() {
            block(bi * mb, yb, Parallelism::Rayon(threads()));
        }
    }
}

/// The fast dgrad: `dx = dgrad(dy, w)` (overwrites dx).
pub fn dgrad(sh: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    debug_assert!(dy.len() == sh.y_len() && w.len() == sh.w_len() && dx.len() == sh.x_len());
    let t = Taps::of(sh);
    let (k, c, width) = (sh.k, sh.c, t.width(sh.c));
    let pq = sh.p() * sh.q();
    if width == 0 {
        dx.fill(0.0);
        return;
    }
    let mut store = None;
    let wc = live_weights(sh, t, w, &mut store);
    let b = Mat { ptr: wc.as_ptr(), rs: width as isize, cs: 1 };
    if sh.is_pointwise() {
        // dx[m][c] = dy[m][k] * w[k][c]
        let m = sh.n * pq;
        let a = |m0: usize| Mat { ptr: dy[m0 * k..].as_ptr(), rs: k as isize, cs: 1 };
        if rows_parallel(m) {
            let mb = row_block(m);
            dx.par_chunks_mut(mb * c).enumerate().for_each(|(bi, db)| {
                // SAFETY: a is rows x k, b is k x c, db is rows x c.
                unsafe { sgemm(db.len() / c, c, k, db.as_mut_ptr(), c, false, a(bi * mb), b, Parallelism::None) };
            });
        } else {
            // SAFETY: as above, over all rows.
            unsafe { sgemm(m, c, k, dx.as_mut_ptr(), c, false, a(0), b, Parallelism::Rayon(threads())) };
        }
        return;
    }
    if let Some(tsh) = dgrad_as_fprop(sh).filter(|_| sh.n * sh.h * sh.w >= 4 * sh.k) {
        // Stride 1: dx is the fprop of dy with the filter turned by 180 degrees and its K and
        // C swapped: one GEMM of reduction R S K per input position (a short, wide output
        // instead of R S times dx's size to scatter back), no col2im. Worth its weight
        // transpose when there are enough input positions per filter (not on layer4's 7x7
        // and 4x4 images, where the transpose costs as much as the GEMM saves).
        dgrad_flipped(sh, &tsh, dy, w, dx);
        return;
    }
    // dcol[rows][width] = dy[rows][k] * wc[k][width], then col2im adds dcol into dx.
    let hwc = sh.h * sh.w * c;
    if sh.n >= threads() && pq >= 256 {
        // Large images: one image per task.
        dx.par_chunks_mut(hwc).enumerate().for_each(|(n, dxi)| {
            let mut dcol = scratch(0, pq * width);
            let a = Mat { ptr: dy[n * pq * k..].as_ptr(), rs: k as isize, cs: 1 };
            // SAFETY: a is pq x k, b is k x width, dcol is pq x width.
            unsafe { sgemm(pq, width, k, dcol.as_mut_ptr(), width, false, a, b, Parallelism::None) };
            col2im(sh, t, &dcol, dxi);
        });
    } else {
        // Small images: the rows of a block of images in one GEMM that is parallel inside
        // (the weights are read once per block, not once per image), then col2im per image.
        let nb = ((4 << 20) / (pq * width).max(1)).clamp(1, sh.n);
        let mut dcol = scratch(0, nb * pq * width);
        for (bi, dxb) in dx.chunks_mut(nb * hwc).enumerate() {
            let imgs = dxb.len() / hwc;
            let a = Mat { ptr: dy[bi * nb * pq * k..].as_ptr(), rs: k as isize, cs: 1 };
            // SAFETY: a is (imgs pq) x k, b is k x width, dcol holds (imgs pq) x width.
            unsafe { sgemm(imgs * pq, width, k, dcol.as_mut_ptr(), width, false, a, b, Parallelism::Rayon(threads())) };
            let dcol = &dcol[..imgs * pq * width];
            dxb.par_chunks_mut(hwc).zip(dcol.par_chunks(pq * width)).for_each(|(dxi, d)| col2im(sh, t, d, dxi));
        }
    }
}

/// The convolution whose fprop is the dgrad of `sh`, when `sh` has stride 1 and a square
/// filter with `pad < r` (every 3x3 and 7x7 of ResNet with stride 1): input dy
/// (`[N, P, Q, K]`), output dx (`[N, H, W, C]`), padding `r - 1 - pad`, weights
/// [`flip_weights`]. `dx[h][w][c] = sum_{p,q,k} dy[p][q][k] w[k][h + pad - p][w + pad - q][c]`
/// over the taps inside the filter, which with `r' = r - 1 - (h + pad - p)` is the fprop
/// `sum dy[h - pad' + r'][..] wt[c][r'][s'][k]`, `pad' = r - 1 - pad`. None otherwise
/// (1x1 convolutions have their own GEMM, strided ones scatter).
fn dgrad_as_fprop(sh: &ConvShape) -> Option<ConvShape> {
    if sh.stride != 1 || sh.r != sh.s || sh.pad >= sh.r || sh.is_pointwise() {
        return None;
    }
    let t = ConvShape {
        n: sh.n,
        h: sh.p(),
        w: sh.q(),
        c: sh.k,
        k: sh.c,
        r: sh.r,
        s: sh.s,
        stride: 1,
        pad: sh.r - 1 - sh.pad,
    };
    (t.p() == sh.h && t.q() == sh.w).then_some(t)
}

/// dgrad as the fprop `tsh` ([`dgrad_as_fprop`]) of dy with [`flip_weights`].
fn dgrad_flipped(sh: &ConvShape, tsh: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let mut wt = scratch(3, sh.w_len());
    flip_weights(sh, w, &mut wt[..sh.w_len()]);
    fprop(tsh, dy, &wt[..sh.w_len()], dx);
}

/// `wt[c][r][s][k] = w[k][R-1-r][S-1-s][c]`: the weights of [`dgrad_as_fprop`].
fn flip_weights(sh: &ConvShape, w: &[f32], wt: &mut [f32]) {
    let (k_, c_, rs) = (sh.k, sh.c, sh.r * sh.s);
    // Per tap, the transpose of a K x C matrix into a C x K one, in 16 x 16 tiles (16
    // cache lines read, 16 written); one task per block of 16 output channels c.
    const B: usize = 16;
    wt.par_chunks_mut(B * rs * k_).enumerate().for_each(|(bi, d)| {
        let c0 = bi * B;
        let cn = d.len() / (rs * k_);
        for t in 0..rs {
            let src_t = rs - 1 - t;
            for k0 in (0..k_).step_by(B) {
                for j in 0..cn {
                    let dst = &mut d[(j * rs + t) * k_..][k0..(k0 + B).min(k_)];
                    for (i, o) in dst.iter_mut().enumerate() {
                        *o = w[((k0 + i) * rs + src_t) * c_ + c0 + j];
                    }
                }
            }
        }
    });
}

/// The fast wgrad: `dw = wgrad(x, dy)` (overwrites dw).
pub fn wgrad(sh: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    debug_assert!(x.len() == sh.x_len() && dy.len() == sh.y_len() && dw.len() == sh.w_len());
    let t = Taps::of(sh);
    if t.all(sh) {
        wgrad_taps(sh, t, x, dy, dw);
    } else {
        let mut dwc = scratch(1, sh.k * t.width(sh.c));
        let dwc = &mut dwc[..sh.k * t.width(sh.c)];
        wgrad_taps(sh, t, x, dy, dwc);
        t.scatter(sh, dwc, dw);
    }
}

/// wgrad of the live taps `t` into `dw` (`[K][R' S' C]`).
fn wgrad_taps(sh: &ConvShape, t: Taps, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (k, width) = (sh.k, t.width(sh.c));
    let m = sh.n * sh.p() * sh.q();
    if width == 0 {
        return;
    }
    // dw[k][kk] += dyT[k][rows] * col[rows][kk] over blocks of rows (m = (n, p, q)).
    let pointwise = sh.is_pointwise();
    let nt = threads();
    let block = |m0: usize, rows: usize, acc: &mut [f32], first: bool, par: Parallelism| {
        let mut col = None;
        let b = if pointwise {
            Mat { ptr: x[m0 * width..].as_ptr(), rs: width as isize, cs: 1 }
        } else {
            let col = col.insert(scratch(0, rows * width));
            match par {
                Parallelism::None => im2col(sh, t, x, m0, rows, col),
                _ => im2col_par(sh, t, x, m0, rows, col),
            }
            Mat { ptr: col.as_ptr(), rs: width as isize, cs: 1 }
        };
        let a = Mat { ptr: dy[m0 * k..].as_ptr(), rs: 1, cs: k as isize };
        // SAFETY: a is k x rows (dy transposed), b is rows x width, acc is k x width.
        unsafe { sgemm(k, width, rows, acc.as_mut_ptr(), width, !first, a, b, par) };
    };
    // Few long reductions: one partial sum per task, then a tree sum.
    let mb = 256.max(m.div_ceil(8 * nt)).min(4096);
    let nblocks = m.div_ceil(mb);
    if nblocks < nt {
        for bi in 0..nblocks {
            let m0 = bi * mb;
            block(m0, mb.min(m - m0), dw, bi == 0, Parallelism::Rayon(nt));
        }
        return;
    }
    let per_task = nblocks.div_ceil(nt);
    let partials: Vec<Scratch> = (0..nt)
        .into_par_iter()
        .filter_map(|ti| {
            let (b0, b1) = (ti * per_task, ((ti + 1) * per_task).min(nblocks));
            if b0 >= b1 {
                return None;
            }
            let mut acc = scratch(2, k * width);
            for bi in b0..b1 {
                let m0 = bi * mb;
                block(m0, mb.min(m - m0), &mut acc[..k * width], bi == b0, Parallelism::None);
            }
            Some(acc)
        })
        .collect();
    dw.copy_from_slice(&partials[0][..k * width]);
    for part in &partials[1..] {
        dw.par_chunks_mut(4096).zip(part[..k * width].par_chunks(4096)).for_each(|(d, s)| {
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

/// `dst[b][j][i] = i < rows ? src[b][i][j] : 0` for `i < ld` (the padded layout conversion
/// of `ops::conv`, before its rounding to the destination's type).
pub fn transpose_pad(src: &[f32], dst: &mut [f32], batch: usize, rows: usize, cols: usize, ld: usize) {
    let keep = rows.min(ld);
    if cols * ld == 0 {
        return;
    }
    dst.par_chunks_mut(cols * ld).take(batch).enumerate().for_each(|(b, d)| {
        let s = &src[b * rows * cols..(b + 1) * rows * cols];
        for (j, row) in d.chunks_mut(ld).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = if i < keep { s[i * cols + j] } else { 0.0 };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut v = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                v ^= v << 13;
                v ^= v >> 7;
                v ^= v << 17;
                (v >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(n: usize, h: usize, w: usize, c: usize, k: usize, r: usize, stride: usize, pad: usize) -> ConvShape {
        ConvShape { n, h, w, c, k, r, s: r, stride, pad }
    }

    /// The f32 tolerance of tests/conv.rs: atol 1e-5 sqrt(reduction length), rtol 1e-5.
    fn check_close(what: &str, got: &[f32], want: &[f32], kg: usize) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let (atol, rtol) = (1e-5 * (kg as f32).sqrt(), 1e-5);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs();
            let tol = atol + rtol * w.abs();
            assert!(err <= tol, "{what}: element {i} is {g}, expected {w} (error {err} > tolerance {tol})");
        }
    }

    /// In a pool of 1 thread (row blocks from 1024 rows on) and of 3 (GEMMs parallel inside
    /// below 3072 rows), so that both branches of every fast path run.
    fn in_pools(f: impl Fn(usize) + Sync) {
        for nt in [1, 3] {
            rayon::ThreadPoolBuilder::new().num_threads(nt).build().unwrap().install(|| f(nt));
        }
    }

    /// Shapes for the new paths: the stem (C = 3, 7x7, stride 2, pad 3), 3x3 with odd widths
    /// (3, 5, 13), stride 2 with odd H and W, batch 1, 5x5 with pad 1 (dgrad's padding 3) and
    /// 3x3 with pad 0 (dgrad's padding 2), 7x7 pad 3 at stride 1, 3x3 on a 1x1 and a 2x3 image
    /// (dead taps), and enough rows for the row-block branch on one thread.
    fn shapes() -> Vec<ConvShape> {
        vec![
            shape(1, 13, 11, 3, 8, 7, 2, 3),
            shape(2, 25, 23, 3, 5, 3, 1, 1),
            shape(1, 9, 7, 13, 5, 3, 1, 1),
            shape(3, 7, 9, 5, 13, 3, 2, 1),
            shape(2, 8, 11, 5, 3, 5, 1, 1),
            shape(1, 6, 7, 13, 3, 3, 1, 0),
            shape(2, 9, 8, 3, 5, 7, 1, 3),
            shape(3, 1, 1, 13, 5, 3, 1, 1),
            shape(2, 2, 3, 5, 13, 3, 1, 1),
            shape(2, 33, 31, 5, 3, 3, 1, 1),
            shape(2, 31, 33, 13, 8, 1, 2, 0),
        ]
    }

    /// im2col at any first row (mid-image, mid-row) against a gather written out per element.
    #[test]
    fn im2col_matches_a_naive_gather() {
        for (i, sh) in shapes().iter().enumerate() {
            let x = rand_vec(sh.x_len(), 10 + i as u64);
            let t = Taps::of(sh);
            let (m, width) = (sh.n * sh.p() * sh.q(), t.width(sh.c));
            for m0 in [0, 1, sh.q() + 2, m / 2, m - 1] {
                let rows = m - m0;
                let mut col = vec![f32::NAN; rows * width];
                im2col(sh, t, &x, m0, rows, &mut col);
                let mut want = Vec::with_capacity(rows * width);
                for mm in m0..m {
                    let (n, p, q) = (mm / (sh.p() * sh.q()), mm / sh.q() % sh.p(), mm % sh.q());
                    for r in t.r0..t.r1 {
                        for s in t.s0..t.s1 {
                            for c in 0..sh.c {
                                let h = in_coord(p, r, sh.stride, sh.pad, sh.h);
                                let w = in_coord(q, s, sh.stride, sh.pad, sh.w);
                                want.push(match (h, w) {
                                    (Some(h), Some(w)) => x[((n * sh.h + h) * sh.w + w) * sh.c + c],
                                    _ => 0.0,
                                });
                            }
                        }
                    }
                }
                assert_eq!(col, want, "{sh:?} from row {m0}");
            }
        }
    }

    /// dgrad as the fprop of dy with flipped weights, forced on every stride-1 shape (the
    /// fast path takes it only above a size), against the oracle.
    #[test]
    fn dgrad_as_fprop_matches_oracle() {
        let mut covered = 0;
        for (i, sh) in shapes().iter().enumerate() {
            let Some(tsh) = dgrad_as_fprop(sh) else {
                assert!(sh.stride != 1 || sh.r == 1, "{sh:?} should have a flipped dgrad");
                continue;
            };
            covered += 1;
            assert_eq!(tsh.y_len(), sh.x_len());
            let dy = rand_vec(sh.y_len(), 20 + i as u64);
            let w = rand_vec(sh.w_len(), 30 + i as u64);
            let want = dgrad_oracle(sh, &dy, &w);
            in_pools(|nt| {
                let mut dx = vec![f32::NAN; sh.x_len()];
                dgrad_flipped(sh, &tsh, &dy, &w, &mut dx);
                check_close(&format!("flipped dgrad {sh:?}, {nt} threads"), &dx, &want, sh.k * sh.r * sh.s);
            });
        }
        assert_eq!(covered, 8);
    }

    /// Every pass of the fast path on the same shapes against the oracles.
    #[test]
    fn fast_passes_match_oracles() {
        for (i, sh) in shapes().iter().enumerate() {
            let x = rand_vec(sh.x_len(), 40 + i as u64);
            let w = rand_vec(sh.w_len(), 50 + i as u64);
            let dy = rand_vec(sh.y_len(), 60 + i as u64);
            let (y0, dx0, dw0) = (fprop_oracle(sh, &x, &w), dgrad_oracle(sh, &dy, &w), wgrad_oracle(sh, &x, &dy));
            in_pools(|nt| {
                let (mut y, mut dx, mut dw) =
                    (vec![f32::NAN; sh.y_len()], vec![f32::NAN; sh.x_len()], vec![f32::NAN; sh.w_len()]);
                fprop(sh, &x, &w, &mut y);
                dgrad(sh, &dy, &w, &mut dx);
                wgrad(sh, &x, &dy, &mut dw);
                check_close(&format!("fprop {sh:?}, {nt} threads"), &y, &y0, sh.c * sh.r * sh.s);
                check_close(&format!("dgrad {sh:?}, {nt} threads"), &dx, &dx0, sh.k * sh.r * sh.s);
                check_close(&format!("wgrad {sh:?}, {nt} threads"), &dw, &dw0, sh.n * sh.p() * sh.q());
            });
        }
    }
}
