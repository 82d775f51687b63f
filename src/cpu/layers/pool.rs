//! Pooling on NHWC activations: max pool 3x3 stride 2 padding 1 and global average pool.
//!
//! Max pool follows PyTorch exactly: padding is -inf (out-of-range taps are skipped);
//! the window's maximum starts at the first in-range tap and is replaced, in row-major
//! tap order, by every element that is greater or NaN (so the first maximum wins ties and
//! NaN propagates); the backward adds each output's gradient to the input element where
//! that maximum was found, in row-major output order.

use super::Real;
use multiversion::multiversion;
use rayon::prelude::*;

/// Output size of the 3x3 stride 2 padding 1 max pool: `floor((h + 2 - 3) / 2) + 1`
/// (0 for an empty input).
pub fn maxpool_out(h: usize) -> usize {
    if h == 0 {
        0
    } else {
        (h + 2 - 3) / 2 + 1
    }
}

/// Position (ih, iw) of the maximum of window (oy, ox) of one channel of an image, and
/// the maximum; `at(ih, iw)` reads the element (exactly, as f64).
#[inline]
fn window_argmax<F: Fn(usize, usize) -> f64>(h: usize, w: usize, oy: usize, ox: usize, at: F) -> ((usize, usize), f64) {
    let mut best: Option<((usize, usize), f64)> = None;
    for ih in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
        for iw in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
            let v = at(ih, iw);
            match best {
                Some((_, b)) if !(v > b || v.is_nan()) => {}
                _ => best = Some(((ih, iw), v)),
            }
        }
    }
    best.expect("every window has an in-range tap")
}

/// The maxima of window (oy, ox) of every channel into `best` (`c` long), and, with `ARG`,
/// where they are into `arg` (`code(ih, iw)` of the input pixel, 32 bits like the values,
/// so that the selects of both vectorize together): the
/// same rule as [`window_argmax`], over the channels at once (contiguous in NHWC, so the
/// comparisons vectorize).
#[inline(always)]
fn window_max_all<T: Real, const ARG: bool>(
    xi: &[T],
    w: usize,
    c: usize,
    taps: (std::ops::Range<usize>, std::ops::Range<usize>),
    code: impl Fn(usize, usize) -> u32,
    best: &mut [f32],
    arg: &mut [u32],
) {
    let (best, arg) = (&mut best[..c], &mut arg[..if ARG { c } else { 0 }]);
    let mut first = true;
    for ih in taps.0 {
        for iw in taps.1.clone() {
            let t = code(ih, iw);
            let xr = &xi[(ih * w + iw) * c..][..c];
            if first {
                for (b, v) in best.iter_mut().zip(xr) {
                    *b = v.to_f32();
                }
                arg.iter_mut().for_each(|a| *a = t);
                first = false;
            } else if ARG {
                for ((b, a), v) in best.iter_mut().zip(arg.iter_mut()).zip(xr) {
                    let v = v.to_f32();
                    let take = v > *b || v.is_nan();
                    *b = if take { v } else { *b };
                    *a = if take { t } else { *a };
                }
            } else {
                for (b, v) in best.iter_mut().zip(xr) {
                    let v = v.to_f32();
                    *b = if v > *b || v.is_nan() { v } else { *b };
                }
            }
        }
    }
}

/// The input rows and columns that window (oy, ox) reads.
fn window(h: usize, w: usize, oy: usize, ox: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    ((2 * oy).saturating_sub(1)..(2 * oy + 2).min(h), (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w))
}

/// Max pool forward: `[n, h, w, c] -> [n, oh, ow, c]`.
pub fn maxpool_forward<T: Real>(n: usize, h: usize, w: usize, c: usize, x: &[T], y: &mut [T]) {
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    if n * oh * ow * c == 0 {
        return;
    }
    y.par_chunks_mut(ow * c).enumerate().for_each_init(
        || vec![0.0f32; c],
        |best, (row, yr)| {
            let (img, oy) = (row / oh, row % oh);
            let xi = &x[img * h * w * c..(img + 1) * h * w * c];
            for (ox, yo) in yr.chunks_exact_mut(c).enumerate() {
                window_max_all::<T, false>(xi, w, c, window(h, w, oy, ox), |_, _| 0, best, &mut []);
                for (o, b) in yo.iter_mut().zip(best.iter()) {
                    *o = T::from_f32(*b);
                }
            }
        },
    );
}

/// [`maxpool_forward`] that also writes where each maximum is: `taps` (`[n, oh, ow, c]`)
/// gets the window's tap of the maximum, `dh * 3 + dw` (row-major in the 3x3 window, whose
/// tap (0, 0) is input (2 oy - 1, 2 ox - 1)), for [`maxpool_backward_taps`].
pub fn maxpool_forward_taps<T: Real>(n: usize, h: usize, w: usize, c: usize, x: &[T], y: &mut [T], taps: &mut [u8]) {
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    if n * oh * ow * c == 0 {
        return;
    }
    y.par_chunks_mut(ow * c).zip(taps.par_chunks_mut(ow * c)).enumerate().for_each_init(
        || (vec![0.0f32; c], vec![0u32; c]),
        |(best, arg), (row, (yr, tr))| {
            let (img, oy) = (row / oh, row % oh);
            let xi = &x[img * h * w * c..(img + 1) * h * w * c];
            forward_row_taps((h, w, c), oy, xi, yr, tr, best, arg);
        },
    );
}

/// One output row `oy` of [`maxpool_forward_taps`] of one image.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma"))]
fn forward_row_taps<T: Real>(
    (h, w, c): (usize, usize, usize),
    oy: usize,
    xi: &[T],
    yr: &mut [T],
    tr: &mut [u8],
    best: &mut [f32],
    arg: &mut [u32],
) {
    for (ox, (yo, to)) in yr.chunks_exact_mut(c).zip(tr.chunks_exact_mut(c)).enumerate() {
        // (ih, iw) is a tap of window (oy, ox): ih + 1 >= 2 oy, iw + 1 >= 2 ox.
        let tap = |ih: usize, iw: usize| ((ih + 1 - 2 * oy) * 3 + (iw + 1 - 2 * ox)) as u32;
        window_max_all::<T, true>(xi, w, c, window(h, w, oy, ox), tap, best, arg);
        for (o, b) in yo.iter_mut().zip(best.iter()) {
            *o = T::from_f32(*b);
        }
        for (t, a) in to.iter_mut().zip(arg.iter()) {
            *t = *a as u8;
        }
    }
}

/// Max pool backward: `dx` (overwritten) gets each output's gradient at its window's
/// maximum, summed in f32 in row-major output order.
pub fn maxpool_backward<T: Real>(n: usize, h: usize, w: usize, c: usize, x: &[T], dy: &[T], dx: &mut [T]) {
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    if n * h * w * c == 0 {
        return;
    }
    dx.par_chunks_mut(h * w * c).enumerate().for_each_init(
        || (Vec::new(), vec![0.0f32; c], vec![0u32; c]),
        |(acc, best, arg), (img, dxi)| {
            let xi = &x[img * h * w * c..(img + 1) * h * w * c];
            let dyi = &dy[img * oh * ow * c..(img + 1) * oh * ow * c];
            acc.clear();
            acc.resize(h * w * c, 0.0f32);
            backward_image((oh, ow), w, c, xi, dyi, acc, best, arg);
            for (d, a) in dxi.iter_mut().zip(acc.iter()) {
                *d = T::from_f32(*a);
            }
        },
    );
}

/// The gradients of one image's max pool added into `acc` (`[h, w, c]`, f32).
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2+fma"))]
fn backward_image<T: Real>(
    (oh, ow): (usize, usize),
    w: usize,
    c: usize,
    xi: &[T],
    dyi: &[T],
    acc: &mut [f32],
    best: &mut [f32],
    arg: &mut [u32],
) {
    let h = xi.len() / (w * c).max(1);
    for oy in 0..oh {
        for ox in 0..ow {
            window_max_all::<T, true>(xi, w, c, window(h, w, oy, ox), |ih, iw| (ih * w + iw) as u32, best, arg);
            let g = &dyi[(oy * ow + ox) * c..][..c];
            for (ch, (a, gv)) in arg[..c].iter().zip(g).enumerate() {
                acc[*a as usize * c + ch] += gv.to_f32();
            }
        }
    }
}

/// Max pool backward from the taps [`maxpool_forward_taps`] wrote: `dx` (overwritten) gets
/// each output's gradient at its tap, summed in f32 in row-major output order (the bits of
/// [`maxpool_backward`] on the input that wrote the taps). A tap that is not an in-range
/// tap of its window (9 or more, or off the image) sends nothing.
pub fn maxpool_backward_taps<T: Real>(n: usize, h: usize, w: usize, c: usize, taps: &[u8], dy: &[T], dx: &mut [T]) {
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    if n * h * w * c == 0 {
        return;
    }
    dx.par_chunks_mut(h * w * c).enumerate().for_each_init(Vec::new, |acc, (img, dxi)| {
        let ti = &taps[img * oh * ow * c..(img + 1) * oh * ow * c];
        let dyi = &dy[img * oh * ow * c..(img + 1) * oh * ow * c];
        acc.clear();
        acc.resize(h * w * c, 0.0f32);
        for oy in 0..oh {
            for ox in 0..ow {
                let at = (oy * ow + ox) * c;
                for (ch, (t, g)) in ti[at..at + c].iter().zip(&dyi[at..at + c]).enumerate() {
                    let (dh, dw) = (*t as usize / 3, *t as usize % 3);
                    let (ih, iw) = ((2 * oy + dh).wrapping_sub(1), (2 * ox + dw).wrapping_sub(1));
                    if *t < 9 && ih < h && iw < w {
                        acc[(ih * w + iw) * c + ch] += g.to_f32();
                    }
                }
            }
        }
        for (d, a) in dxi.iter_mut().zip(acc.iter()) {
            *d = T::from_f32(*a);
        }
    });
}

/// Global average pool forward: `[n, hw, c] -> [n, c]` in f32 (sums in row order).
pub fn avgpool_forward<T: Real>(n: usize, hw: usize, c: usize, x: &[T], y: &mut [f32]) {
    if n * c == 0 {
        return;
    }
    y.par_chunks_mut(c).enumerate().for_each(|(img, yr)| {
        yr.iter_mut().for_each(|v| *v = 0.0);
        for row in x[img * hw * c..(img + 1) * hw * c].chunks_exact(c) {
            for (s, v) in yr.iter_mut().zip(row) {
                *s += v.to_f32();
            }
        }
        yr.iter_mut().for_each(|v| *v /= hw as f32);
    });
}

/// Global average pool backward: `dx[n, i, c] = dy[n, c] / hw`.
pub fn avgpool_backward<T: Real>(n: usize, hw: usize, c: usize, dy: &[f32], dx: &mut [T]) {
    if n * hw * c == 0 {
        return;
    }
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(img, dxi)| {
        for row in dxi.chunks_exact_mut(c) {
            for (d, g) in row.iter_mut().zip(&dy[img * c..(img + 1) * c]) {
                *d = T::from_f32(g / hw as f32);
            }
        }
    });
}

/// Max pool forward in f64.
pub fn maxpool_forward_oracle(n: usize, h: usize, w: usize, c: usize, x: &[f64]) -> Vec<f64> {
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    let mut y = vec![0.0; n * oh * ow * c];
    for img in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let (_, v) = window_argmax(h, w, oy, ox, |ih, iw| x[((img * h + ih) * w + iw) * c + ch]);
                    y[((img * oh + oy) * ow + ox) * c + ch] = v;
                }
            }
        }
    }
    y
}

/// Max pool backward in f64.
pub fn maxpool_backward_oracle(n: usize, h: usize, w: usize, c: usize, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let (oh, ow) = (maxpool_out(h), maxpool_out(w));
    let mut dx = vec![0.0; n * h * w * c];
    for img in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let ((ih, iw), _) = window_argmax(h, w, oy, ox, |ih, iw| x[((img * h + ih) * w + iw) * c + ch]);
                    dx[((img * h + ih) * w + iw) * c + ch] += dy[((img * oh + oy) * ow + ox) * c + ch];
                }
            }
        }
    }
    dx
}

/// Global average pool forward in f64.
pub fn avgpool_forward_oracle(n: usize, hw: usize, c: usize, x: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; n * c];
    for img in 0..n {
        for i in 0..hw {
            for ch in 0..c {
                y[img * c + ch] += x[(img * hw + i) * c + ch];
            }
        }
    }
    y.iter_mut().for_each(|v| *v /= hw as f64);
    y
}

/// Global average pool backward in f64.
pub fn avgpool_backward_oracle(n: usize, hw: usize, c: usize, dy: &[f64]) -> Vec<f64> {
    let mut dx = vec![0.0; n * hw * c];
    for img in 0..n {
        for i in 0..hw {
            for ch in 0..c {
                dx[(img * hw + i) * c + ch] = dy[img * c + ch] / hw as f64;
            }
        }
    }
    dx
}
