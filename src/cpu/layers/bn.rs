//! Batch normalization over `[m, c]` activations (c fastest), as PyTorch's
//! `BatchNorm2d`: train mode normalizes with the batch mean and the biased batch variance
//! and updates `running = (1 - momentum) * running + momentum * batch` with the unbiased
//! variance (`m / (m - 1)`); eval mode normalizes with the running statistics.

use super::{relu, relu64, relu_grad, relu_grad64, rows_per_task, Real};
use multiversion::multiversion;
use rayon::prelude::*;

// The fast paths below are written so that the compiler vectorizes them: every per-row
// loop zips slices cut to exactly `c` elements (no bounds checks in the loop), the
// reductions keep a block of channels' sums in registers while they walk the rows
// (instead of loading and storing `c` sums per row; 16 channels, one cache line of f32,
// then 8, 4 and 1 for the rest), are compiled for AVX2 too and picked at run time, and the
// branches (ReLU, residual, mask) are decided once per call through const generics.

/// Runs `$body` for the channel blocks of `$c` channels with `$n` a const block width:
/// 16 while 16 fit, then one of 8 and one of 4 where they fit, then single channels.
macro_rules! channel_blocks {
    ($c:expr, |$n:ident, $ch0:ident| $body:expr) => {{
        let c = $c;
        let mut $ch0 = 0;
        while $ch0 + 16 <= c {
            {
                const $n: usize = 16;
                $body;
            }
            $ch0 += 16;
        }
        if $ch0 + 8 <= c {
            {
                const $n: usize = 8;
                $body;
            }
            $ch0 += 8;
        }
        if $ch0 + 4 <= c {
            {
                const $n: usize = 4;
                $body;
            }
            $ch0 += 4;
        }
        while $ch0 < c {
            {
                const $n: usize = 1;
                $body;
            }
            $ch0 += 1;
        }
    }};
}

/// `K` f64 sums per channel over the rows of `[m, c]` data, as `[K][c]`: the rows are split
/// into rayon tasks of [`rows_per_task`]; `f(first_row, rows, acc)` adds the task's rows
/// into its `acc`, and the tasks' sums are added in task order.
fn channel_sums<const K: usize, F>(m: usize, c: usize, f: F) -> Vec<f64>
where
    F: Fn(usize, usize, &mut [f64]) + Sync,
{
    let rows = rows_per_task(m, c);
    let parts: Vec<Vec<f64>> = (0..m.div_ceil(rows))
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0.0f64; K * c];
            let r0 = t * rows;
            f(r0, rows.min(m - r0), &mut acc);
            acc
        })
        .collect();
    let mut out = vec![0.0f64; K * c];
    for p in &parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// Batch mean and biased variance of every channel, in f64 and one pass over x: the sums
/// of `x - shift` and of its square, shift being the channel's value in the first row (a
/// value of the channel, so the square sum does not cancel when the mean is far from 0).
pub fn batch_stats<T: Real>(m: usize, c: usize, x: &[T]) -> (Vec<f64>, Vec<f64>) {
    batch_stats_by(m, c, x, T::to_f32)
}

/// [`batch_stats`] of elements of any type that `widen` turns exactly into f32 (the
/// convolutions' 16-bit types too, without a widened copy).
pub fn batch_stats_by<T, W>(m: usize, c: usize, x: &[T], widen: W) -> (Vec<f64>, Vec<f64>)
where
    T: Copy + Sync,
    W: Fn(T) -> f32 + Sync,
{
    if m == 0 {
        return (vec![f64::NAN; c], vec![f64::NAN; c]);
    }
    let x = &x[..m * c];
    let shift: Vec<f64> = x[..c].iter().map(|&v| widen(v) as f64).collect();
    let sums =
        channel_sums::<2, _>(m, c, |r0, rows, acc| stats_task(c, &x[r0 * c..(r0 + rows) * c], &shift, &widen, acc));
    let (s1, s2) = sums.split_at(c);
    let mean = s1.iter().zip(&shift).map(|(s, sh)| sh + s / m as f64).collect();
    let var = s1.iter().zip(s2).map(|(s, q)| (q / m as f64 - (s / m as f64) * (s / m as f64)).max(0.0)).collect();
    (mean, var)
}

/// The count, mean and sum of squared deviations from the mean (M2) of every channel of a
/// block of rows: what a convolution's epilogue keeps per block of its output, for
/// [`merge_moments`] to combine into the batch statistics.
#[derive(Clone, Debug)]
pub struct Moments {
    /// Rows.
    pub n: usize,
    /// Mean per channel.
    pub mean: Vec<f64>,
    /// Sum of squared deviations from `mean` per channel.
    pub m2: Vec<f64>,
}

/// The [`Moments`] of `x` (`[rows, c]`, at least one row), from the same shifted sums as
/// [`batch_stats`] (shift: the block's first row), in parallel over rows when it is large.
pub fn block_moments(c: usize, x: &[f32]) -> Moments {
    let n = x.len() / c.max(1);
    assert!(n >= 1 && n * c == x.len(), "block_moments of {} values in rows of {c}", x.len());
    let shift: Vec<f64> = x[..c].iter().map(|&v| v as f64).collect();
    let widen = |v: f32| v;
    let sums =
        channel_sums::<2, _>(n, c, |r0, rows, acc| stats_task(c, &x[r0 * c..(r0 + rows) * c], &shift, &widen, acc));
    let (s1, s2) = sums.split_at(c);
    let mean = s1.iter().zip(&shift).map(|(s, sh)| sh + s / n as f64).collect();
    let m2 = s1.iter().zip(s2).map(|(s, q)| (q - s * s / n as f64).max(0.0)).collect();
    Moments { n, mean, m2 }
}

/// Batch mean and biased variance from the moments of disjoint blocks, combined in the
/// order given (Chan et al.'s pairwise update: deterministic for a fixed order).
pub fn merge_moments<'a>(c: usize, blocks: impl IntoIterator<Item = &'a Moments>) -> (Vec<f64>, Vec<f64>) {
    let (mut n, mut mean, mut m2) = (0usize, vec![0.0f64; c], vec![0.0f64; c]);
    for b in blocks {
        let nn = n + b.n;
        let (fa, fb) = (n as f64, b.n as f64);
        for ch in 0..c {
            let d = b.mean[ch] - mean[ch];
            mean[ch] += d * fb / nn as f64;
            m2[ch] += b.m2[ch] + d * d * fa * fb / nn as f64;
        }
        n = nn;
    }
    if n == 0 {
        return (vec![f64::NAN; c], vec![f64::NAN; c]);
    }
    let var = m2.iter().map(|v| v / n as f64).collect();
    (mean, var)
}

/// The shifted sums of [`batch_stats`] over the rows of `x` (`[rows, c]`) into `acc`
/// (`[2][c]`), for the best vector unit of this CPU.
#[multiversion(targets("x86_64+avx2+fma"))]
fn stats_task<T: Copy, W: Fn(T) -> f32>(c: usize, x: &[T], shift: &[f64], widen: &W, acc: &mut [f64]) {
    let (s1, s2) = acc.split_at_mut(c);
    for x in x.chunks(sub_block(c)) {
        channel_blocks!(c, |N, ch0| {
            let sh: [f64; N] = shift[ch0..ch0 + N].try_into().unwrap();
            let (mut a1, mut a2) = ([0.0f64; N], [0.0f64; N]);
            for xr in x[ch0..].chunks(c) {
                let xr: &[T; N] = xr[..N].try_into().unwrap();
                for l in 0..N {
                    let d = widen(xr[l]) as f64 - sh[l];
                    a1[l] += d;
                    a2[l] += d * d;
                }
            }
            s1[ch0..ch0 + N].iter_mut().zip(a1).for_each(|(s, a)| *s += a);
            s2[ch0..ch0 + N].iter_mut().zip(a2).for_each(|(s, a)| *s += a);
        });
    }
}

/// Elements of the row blocks that the reductions walk channel block by channel block: a
/// few KiB, so that every row's cache lines come from memory once and then from L1.
fn sub_block(c: usize) -> usize {
    (2048 / c).max(8) * c
}

/// The buffers of one batch-norm layer of `c` channels, borrowed for one call, and the
/// layer's settings. `B` is `[f32]` for the host functions here and
/// [`crate::device::Buf<f32>`] for [`crate::ops::layers`]; every buffer holds `c` values.
/// Each op reads and writes the fields its documentation names.
pub struct BnLayer<'a, B: ?Sized = [f32]> {
    /// Channels.
    pub c: usize,
    /// Scale.
    pub gamma: &'a B,
    /// Shift.
    pub beta: &'a B,
    /// Running mean: updated by a train-mode forward, read in eval mode.
    pub running_mean: &'a mut B,
    /// Running variance: updated by a train-mode forward, read in eval mode.
    pub running_var: &'a mut B,
    /// Batch mean, written by a train-mode forward for the backward.
    pub save_mean: &'a mut B,
    /// `1 / sqrt(biased batch variance + eps)`, written by a train-mode forward for the
    /// backward.
    pub save_invstd: &'a mut B,
    /// Gradient of gamma, written by the backward.
    pub dgamma: &'a mut B,
    /// Gradient of beta, written by the backward.
    pub dbeta: &'a mut B,
    /// Weight of the batch statistic in the running update:
    /// `running = (1 - momentum) * running + momentum * batch`.
    pub momentum: f32,
    /// Added to the variance before the square root.
    pub eps: f32,
}

impl<B: ?Sized> BnLayer<'_, B> {
    /// The layer's normalization with its saved batch statistics (what a train-mode
    /// forward applies), then the ReLU if `relu`.
    pub fn input(&self, relu: bool) -> BnInput<'_, B> {
        BnInput { c: self.c, gamma: self.gamma, beta: self.beta, mean: self.save_mean, invstd: self.save_invstd, relu }
    }
}

/// A batch norm (+ ReLU) as applied from given statistics, read only:
/// `y = (x - mean) * (gamma * invstd) + beta`, then `max(y, 0)` if `relu`. Built from a
/// [`BnLayer`] by [`BnLayer::input`] (the saved batch statistics); `B` as there.
pub struct BnInput<'a, B: ?Sized = [f32]> {
    /// Channels.
    pub c: usize,
    /// `[c]` scale.
    pub gamma: &'a B,
    /// `[c]` shift.
    pub beta: &'a B,
    /// `[c]` mean.
    pub mean: &'a B,
    /// `[c]` inverse standard deviation.
    pub invstd: &'a B,
    /// A ReLU after the batch norm.
    pub relu: bool,
}

impl<B: ?Sized> Clone for BnInput<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: ?Sized> Copy for BnInput<'_, B> {}

/// Train-mode forward: batch statistics, `bn`'s running statistics updated in place, `y`,
/// `bn.save_mean` and `bn.save_invstd` (`1 / sqrt(var + eps)`) written. Needs `m >= 2`.
pub fn bn_forward_train<T: Real>(m: usize, x: &[T], bn: &mut BnLayer<'_>, relu: bool, y: &mut [T]) {
    let (mean, var) = batch_stats(m, bn.c, x);
    finish_stats(m, &mean, &var, bn);
    bn_apply(m, x, &bn.input(relu), None, y);
}

/// From the batch mean and biased variance of `m` values per channel: `bn.save_mean`,
/// `bn.save_invstd = 1 / sqrt(var + eps)`, and the running statistics updated with
/// `bn.momentum` (the variance unbiased, `m / (m - 1)`).
pub fn finish_stats(m: usize, mean: &[f64], var: &[f64], bn: &mut BnLayer<'_>) {
    let (momentum, eps) = (bn.momentum, bn.eps);
    for ch in 0..mean.len() {
        bn.save_mean[ch] = mean[ch] as f32;
        bn.save_invstd[ch] = (1.0 / (var[ch] + eps as f64).sqrt()) as f32;
        let unbiased = (var[ch] * m as f64 / (m as f64 - 1.0)) as f32;
        bn.running_mean[ch] = (1.0 - momentum) * bn.running_mean[ch] + momentum * mean[ch] as f32;
        bn.running_var[ch] = (1.0 - momentum) * bn.running_var[ch] + momentum * unbiased;
    }
}

/// Eval-mode forward: normalizes with `bn`'s running statistics.
pub fn bn_forward_eval<T: Real>(m: usize, x: &[T], bn: &BnLayer<'_>, relu: bool, y: &mut [T]) {
    let invstd: Vec<f32> = bn.running_var.iter().map(|v| 1.0 / (v + bn.eps).sqrt()).collect();
    let norm = BnInput { c: bn.c, gamma: bn.gamma, beta: bn.beta, mean: bn.running_mean, invstd: &invstd, relu };
    bn_apply(m, x, &norm, None, y);
}

/// `y = (x - mean) * (gamma * invstd) + beta`, plus `residual` if given, then the ReLU
/// if `bn.relu`: one pass over the rows.
pub fn bn_apply<T: Real>(m: usize, x: &[T], bn: &BnInput<'_>, residual: Option<&[T]>, y: &mut [T]) {
    bn_apply_by(m, x, residual, bn, y, (T::to_f32, T::from_f32));
}

/// [`bn_apply`] of elements of any type, through a widen/narrow pair: `widen` turns an
/// input element exactly into f32, `narrow` the f32 result into an output element (the
/// convolutions' 16-bit types too, and an output type other than the input's).
pub fn bn_apply_by<X, Y, W, N>(m: usize, x: &[X], residual: Option<&[X]>, bn: &BnInput<'_>, y: &mut [Y], pair: (W, N))
where
    X: Copy + Sync,
    Y: Send,
    W: Fn(X) -> f32 + Sync,
    N: Fn(f32) -> Y + Sync,
{
    let c = bn.c;
    if m == 0 || c == 0 {
        return;
    }
    let scale: Vec<f32> = bn.gamma[..c].iter().zip(&bn.invstd[..c]).map(|(g, s)| g * s).collect();
    let k = Coef { mean: &bn.mean[..c], scale: &scale, beta: &bn.beta[..c] };
    let (x, y) = (&x[..m * c], &mut y[..m * c]);
    match (residual, bn.relu) {
        (None, false) => apply_rows::<X, Y, W, N, false, false>(c, x, x, k, y, &pair),
        (None, true) => apply_rows::<X, Y, W, N, false, true>(c, x, x, k, y, &pair),
        (Some(r), false) => apply_rows::<X, Y, W, N, true, false>(c, x, &r[..m * c], k, y, &pair),
        (Some(r), true) => apply_rows::<X, Y, W, N, true, true>(c, x, &r[..m * c], k, y, &pair),
    }
}

/// [`bn_apply`] of `x` with `bn`, plus the residual `r` through its own batch norm `rbn`
/// (no ReLU; its output rounded to `T`), in one pass: bitwise `bn_apply` of `r` with `rbn`
/// into a buffer, then of `x` with that buffer as the residual.
pub fn bn_apply_bn_residual<T: Real>(m: usize, x: &[T], bn: &BnInput<'_>, r: &[T], rbn: &BnInput<'_>, y: &mut [T]) {
    let c = bn.c;
    if m == 0 || c == 0 {
        return;
    }
    let scale = |b: &BnInput<'_>| -> Vec<f32> { (0..c).map(|ch| b.gamma[ch] * b.invstd[ch]).collect() };
    let (s, s2) = (scale(bn), scale(rbn));
    let k = Coef { mean: &bn.mean[..c], scale: &s, beta: &bn.beta[..c] };
    let k2 = Coef { mean: &rbn.mean[..c], scale: &s2, beta: &rbn.beta[..c] };
    let (x, r, y) = (&x[..m * c], &r[..m * c], &mut y[..m * c]);
    if bn.relu {
        bn_residual_rows::<T, true>(c, x, r, (k, k2), y);
    } else {
        bn_residual_rows::<T, false>(c, x, r, (k, k2), y);
    }
}

fn bn_residual_rows<T: Real, const RELU: bool>(c: usize, x: &[T], r: &[T], (k, k2): (Coef<'_>, Coef<'_>), y: &mut [T]) {
    let chunk = rows_per_task(x.len() / c, c) * c;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk).zip(r.par_chunks(chunk))).for_each(|(yc, (xc, rc))| {
        for ((yr, xr), rr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).zip(rc.chunks_exact(c)) {
            let coef = k.mean.iter().zip(k.scale).zip(k.beta);
            let coef2 = k2.mean.iter().zip(k2.scale).zip(k2.beta);
            for (((o, &v), &res), (((mu, s), b), ((mu2, s2), b2))) in yr.iter_mut().zip(xr).zip(rr).zip(coef.zip(coef2))
            {
                let short = T::from_f32((res.to_f32() - mu2) * s2 + b2).to_f32();
                let v = (v.to_f32() - mu) * s + b + short;
                *o = T::from_f32(if RELU { relu(v) } else { v });
            }
        }
    });
}

/// Per-channel coefficients of [`bn_apply_by`], each `c` long.
#[derive(Clone, Copy)]
struct Coef<'a> {
    mean: &'a [f32],
    scale: &'a [f32],
    beta: &'a [f32],
}

fn apply_rows<X, Y, W, N, const RES: bool, const RELU: bool>(
    c: usize,
    x: &[X],
    r: &[X],
    k: Coef<'_>,
    y: &mut [Y],
    (widen, narrow): &(W, N),
) where
    X: Copy + Sync,
    Y: Send,
    W: Fn(X) -> f32 + Sync,
    N: Fn(f32) -> Y + Sync,
{
    let chunk = rows_per_task(x.len() / c, c) * c;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk).zip(r.par_chunks(chunk))).for_each(|(yc, (xc, rc))| {
        for ((yr, xr), rr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).zip(rc.chunks_exact(c)) {
            let coef = k.mean.iter().zip(k.scale).zip(k.beta);
            for (((o, &v), &res), ((mu, s), b)) in yr.iter_mut().zip(xr).zip(rr).zip(coef) {
                let mut v = (widen(v) - mu) * s + b;
                if RES {
                    v += widen(res);
                }
                *o = narrow(if RELU { relu(v) } else { v });
            }
        }
    });
}

/// Backward of train mode with `bn`'s saved statistics: `bn.dbeta = sum g`,
/// `bn.dgamma = sum g * xhat`, `dx = gamma * invstd * (g - dbeta / m - xhat * dgamma / m)`,
/// where `g` is `dy` masked by `relu_out` (the output of a fused ReLU) when given.
pub fn bn_backward<T: Real>(m: usize, x: &[T], relu_out: Option<&[T]>, dy: &[T], bn: &mut BnLayer<'_>, dx: &mut [T]) {
    let c = bn.c;
    let (x, dy) = (&x[..m * c], &dy[..m * c]);
    bn_backward_params(m, x, relu_out, dy, bn);
    bn_backward_dx(m, x, relu_out, dy, &bn.input(false), (bn.dbeta, bn.dgamma), dx);
}

/// The parameter gradients of [`bn_backward`] alone: `bn.dbeta = sum g` and
/// `bn.dgamma = invstd * sum g * (x - mean)` (sums in f64), `g = dy` masked by
/// `relu_out > 0` when given. [`bn_backward_dx`] then gives dx.
pub fn bn_backward_params<T: Real>(m: usize, x: &[T], relu_out: Option<&[T]>, dy: &[T], bn: &mut BnLayer<'_>) {
    let c = bn.c;
    let (x, dy) = (&x[..m * c], &dy[..m * c]);
    let sums = match relu_out {
        Some(o) => grad_sums::<T, true>(m, c, x, &o[..m * c], dy, bn.save_mean),
        None => grad_sums::<T, false>(m, c, x, dy, dy, bn.save_mean),
    };
    set_grad_params(bn, &sums);
}

/// [`bn_backward`] of `g = relu_out > 0 ? dy : 0`, written over `dy` by the reduction
/// (a bottleneck's last BN, whose masked gradient also goes to the shortcut): the same
/// `dx`, `dgamma` and `dbeta` as [`bn_backward`] with `relu_out`, and `dy` holds `g`.
pub fn bn_backward_masking_dy<T: Real>(
    m: usize,
    x: &[T],
    relu_out: &[T],
    dy: &mut [T],
    bn: &mut BnLayer<'_>,
    dx: &mut [T],
) {
    let c = bn.c;
    let (x, relu_out, dy) = (&x[..m * c], &relu_out[..m * c], &mut dy[..m * c]);
    let mean: &[f32] = bn.save_mean;
    // The reduction's tasks mask their rows of dy in place, an L1-sized block at a time,
    // and sum that block while it is in cache: one pass over x, relu_out and dy.
    let chunk = rows_per_task(m, c) * c;
    let parts: Vec<Vec<f64>> = dy
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(relu_out.par_chunks(chunk)))
        .map(|(g, (xc, oc))| {
            let mut acc = vec![0.0f64; 2 * c];
            let sub = sub_block(c);
            for (g, (xs, os)) in g.chunks_mut(sub).zip(xc.chunks(sub).zip(oc.chunks(sub))) {
                for (g, o) in g.iter_mut().zip(os) {
                    *g = T::from_f32(relu_grad(o.to_f32(), g.to_f32()));
                }
                grad_task::<T, false>(c, xs, xs, g, mean, &mut acc);
            }
            acc
        })
        .collect();
    let mut sums = vec![0.0f64; 2 * c];
    for p in &parts {
        sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    set_grad_params(bn, &sums);
    bn_backward_dx(m, x, None, dy, &bn.input(false), (bn.dbeta, bn.dgamma), dx);
}

/// `[sum g; sum g * (x - mean)]` per channel (`[2][c]`), `g = MASK ? (o > 0 ? dy : 0) : dy`.
fn grad_sums<T: Real, const MASK: bool>(m: usize, c: usize, x: &[T], o: &[T], dy: &[T], mean: &[f32]) -> Vec<f64> {
    channel_sums::<2, _>(m, c, |r0, rows, acc| {
        let rows = r0 * c..(r0 + rows) * c;
        grad_task::<T, MASK>(c, &x[rows.clone()], &o[rows.clone()], &dy[rows], mean, acc)
    })
}

/// The sums of [`grad_sums`] over the rows of one task (`[rows, c]` each) into `acc`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn grad_task<T: Real, const MASK: bool>(c: usize, x: &[T], o: &[T], dy: &[T], mean: &[f32], acc: &mut [f64]) {
    let (sg, sgx) = acc.split_at_mut(c);
    let sub = sub_block(c);
    for ((x, o), dy) in x.chunks(sub).zip(o.chunks(sub)).zip(dy.chunks(sub)) {
        channel_blocks!(c, |N, ch0| {
            let mu: [f32; N] = mean[ch0..ch0 + N].try_into().unwrap();
            let (mut a1, mut a2) = ([0.0f64; N], [0.0f64; N]);
            for i in (ch0..x.len()).step_by(c) {
                let xr: &[T; N] = x[i..][..N].try_into().unwrap();
                let dr: &[T; N] = dy[i..][..N].try_into().unwrap();
                let or: &[T; N] = o[i..][..N].try_into().unwrap();
                for l in 0..N {
                    let g = if MASK { relu_grad(or[l].to_f32(), dr[l].to_f32()) } else { dr[l].to_f32() };
                    a1[l] += g as f64;
                    a2[l] += g as f64 * (xr[l].to_f32() - mu[l]) as f64;
                }
            }
            sg[ch0..ch0 + N].iter_mut().zip(a1).for_each(|(s, a)| *s += a);
            sgx[ch0..ch0 + N].iter_mut().zip(a2).for_each(|(s, a)| *s += a);
        });
    }
}

/// The parameter gradients from the sums `[sum g; sum g (x - mean)]` (into `bn.dbeta`,
/// `bn.dgamma`).
fn set_grad_params(bn: &mut BnLayer<'_>, sums: &[f64]) {
    let c = bn.c;
    for ch in 0..c {
        bn.dbeta[ch] = sums[ch] as f32;
        bn.dgamma[ch] = (sums[c + ch] * bn.save_invstd[ch] as f64) as f32;
    }
}

/// The input gradient of [`bn_backward`] from the parameter gradients `(dbeta, dgamma)`
/// (from [`bn_backward_params`] or a convolution's epilogue) and the BN's gamma and saved
/// statistics (`bn`, from [`BnLayer::input`]; its ReLU flag is not used):
/// `dx = gamma invstd (g - dbeta / m - (x - mean) invstd dgamma / m)`, `g` as there.
pub fn bn_backward_dx<T: Real>(
    m: usize,
    x: &[T],
    relu_out: Option<&[T]>,
    dy: &[T],
    bn: &BnInput<'_>,
    (dbeta, dgamma): (&[f32], &[f32]),
    dx: &mut [T],
) {
    let c = bn.c;
    let (gamma, mean, invstd): (&[f32], &[f32], &[f32]) = (bn.gamma, bn.mean, bn.invstd);
    if m == 0 || c == 0 {
        return;
    }
    let (x, dy) = (&x[..m * c], &dy[..m * c]);
    let inv_m = 1.0 / m as f32;
    let k1: Vec<f32> = (0..c).map(|ch| gamma[ch] * invstd[ch]).collect();
    let k2: Vec<f32> = (0..c).map(|ch| dbeta[ch] * inv_m).collect();
    let k3: Vec<f32> = (0..c).map(|ch| dgamma[ch] * invstd[ch] * inv_m).collect();
    let k = DxCoef { mean: &mean[..c], k1: &k1, k2: &k2, k3: &k3 };
    let dx = &mut dx[..m * c];
    match relu_out {
        Some(o) => dx_rows::<T, true>(c, x, &o[..m * c], dy, k, dx),
        None => dx_rows::<T, false>(c, x, dy, dy, k, dx),
    }
}

/// Per-channel coefficients of the dx pass, each `c` long.
#[derive(Clone, Copy)]
struct DxCoef<'a> {
    mean: &'a [f32],
    k1: &'a [f32],
    k2: &'a [f32],
    k3: &'a [f32],
}

fn dx_rows<T: Real, const MASK: bool>(c: usize, x: &[T], o: &[T], dy: &[T], k: DxCoef<'_>, dx: &mut [T]) {
    let chunk = rows_per_task(x.len() / c, c) * c;
    let ins = x.par_chunks(chunk).zip(o.par_chunks(chunk).zip(dy.par_chunks(chunk)));
    dx.par_chunks_mut(chunk).zip(ins).for_each(|(dc, (xc, (oc, gc)))| {
        let rows = dc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).zip(oc.chunks_exact(c).zip(gc.chunks_exact(c)));
        for ((dr, xr), (or, gr)) in rows {
            let coef = k.mean.iter().zip(k.k1).zip(k.k2.iter().zip(k.k3));
            for (((d, xv), (ov, gv)), ((mu, k1), (k2, k3))) in dr.iter_mut().zip(xr).zip(or.iter().zip(gr)).zip(coef) {
                let g = if MASK { relu_grad(ov.to_f32(), gv.to_f32()) } else { gv.to_f32() };
                *d = T::from_f32(k1 * (g - k2 - (xv.to_f32() - mu) * k3));
            }
        }
    });
}

/// What the train-mode oracle computes.
#[derive(Clone, Debug)]
pub struct BnTrainOracle {
    /// The output, `[m, c]`.
    pub y: Vec<f64>,
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// `1 / sqrt(biased variance + eps)` per channel.
    pub invstd: Vec<f64>,
    /// Updated running mean.
    pub running_mean: Vec<f64>,
    /// Updated running variance (with the unbiased batch variance).
    pub running_var: Vec<f64>,
}

/// Train-mode forward in f64, straight from the definition.
#[allow(clippy::too_many_arguments)]
pub fn bn_forward_train_oracle(
    m: usize,
    c: usize,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    momentum: f64,
    eps: f64,
    relu: bool,
) -> BnTrainOracle {
    let mut out = BnTrainOracle {
        y: vec![0.0; m * c],
        mean: vec![0.0; c],
        invstd: vec![0.0; c],
        running_mean: vec![0.0; c],
        running_var: vec![0.0; c],
    };
    for ch in 0..c {
        let col: Vec<f64> = (0..m).map(|r| x[r * c + ch]).collect();
        let mean = col.iter().sum::<f64>() / m as f64;
        let ss: f64 = col.iter().map(|v| (v - mean) * (v - mean)).sum();
        let var = ss / m as f64;
        let unbiased = ss / (m as f64 - 1.0);
        let invstd = 1.0 / (var + eps).sqrt();
        for r in 0..m {
            let v = (x[r * c + ch] - mean) * invstd * gamma[ch] + beta[ch];
            out.y[r * c + ch] = if relu { relu64(v) } else { v };
        }
        out.mean[ch] = mean;
        out.invstd[ch] = invstd;
        out.running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean;
        out.running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * unbiased;
    }
    out
}

/// Eval-mode forward in f64.
#[allow(clippy::too_many_arguments)]
pub fn bn_forward_eval_oracle(
    m: usize,
    c: usize,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
    relu: bool,
) -> Vec<f64> {
    let mut y = vec![0.0; m * c];
    for r in 0..m {
        for ch in 0..c {
            let v = (x[r * c + ch] - running_mean[ch]) / (running_var[ch] + eps).sqrt() * gamma[ch] + beta[ch];
            y[r * c + ch] = if relu { relu64(v) } else { v };
        }
    }
    y
}

/// Gradients of a batch norm.
#[derive(Clone, Debug)]
pub struct BnGrads {
    /// Gradient of the input, `[m, c]`.
    pub dx: Vec<f64>,
    /// Gradient of gamma, `[c]`.
    pub dgamma: Vec<f64>,
    /// Gradient of beta, `[c]`.
    pub dbeta: Vec<f64>,
}

/// Train-mode backward in f64 from the saved mean and invstd: the textbook formula.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_oracle(
    m: usize,
    c: usize,
    x: &[f64],
    relu_out: Option<&[f64]>,
    dy: &[f64],
    gamma: &[f64],
    mean: &[f64],
    invstd: &[f64],
) -> BnGrads {
    let mut out = BnGrads { dx: vec![0.0; m * c], dgamma: vec![0.0; c], dbeta: vec![0.0; c] };
    let g = |i: usize| match relu_out {
        Some(o) => relu_grad64(o[i], dy[i]),
        None => dy[i],
    };
    for ch in 0..c {
        let mut sg = 0.0;
        let mut sgx = 0.0;
        for r in 0..m {
            let i = r * c + ch;
            let xhat = (x[i] - mean[ch]) * invstd[ch];
            sg += g(i);
            sgx += g(i) * xhat;
        }
        out.dbeta[ch] = sg;
        out.dgamma[ch] = sgx;
        for r in 0..m {
            let i = r * c + ch;
            let xhat = (x[i] - mean[ch]) * invstd[ch];
            out.dx[i] = gamma[ch] * invstd[ch] / m as f64 * (m as f64 * g(i) - sg - xhat * sgx);
        }
    }
    out
}
