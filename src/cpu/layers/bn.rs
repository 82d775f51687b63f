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

/// Train-mode forward: batch statistics, running statistics updated in place, `y`,
/// `save_mean` and `save_invstd` (`1 / sqrt(var + eps)`) written. Needs `m >= 2`.
#[allow(clippy::too_many_arguments)]
pub fn bn_forward_train<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    momentum: f32,
    eps: f32,
    relu: bool,
    y: &mut [T],
    save_mean: &mut [f32],
    save_invstd: &mut [f32],
) {
    let (mean, var) = batch_stats(m, c, x);
    finish_stats(m, &mean, &var, momentum, eps, running_mean, running_var, save_mean, save_invstd);
    bn_apply(m, c, x, gamma, beta, save_mean, save_invstd, None, relu, y);
}

/// From the batch mean and biased variance of `m` values per channel: `save_mean`,
/// `save_invstd = 1 / sqrt(var + eps)`, and the running statistics updated with
/// `momentum` (the variance unbiased, `m / (m - 1)`).
#[allow(clippy::too_many_arguments)]
pub fn finish_stats(
    m: usize,
    mean: &[f64],
    var: &[f64],
    momentum: f32,
    eps: f32,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    save_mean: &mut [f32],
    save_invstd: &mut [f32],
) {
    for ch in 0..mean.len() {
        save_mean[ch] = mean[ch] as f32;
        save_invstd[ch] = (1.0 / (var[ch] + eps as f64).sqrt()) as f32;
        let unbiased = (var[ch] * m as f64 / (m as f64 - 1.0)) as f32;
        running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean[ch] as f32;
        running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * unbiased;
    }
}

/// Eval-mode forward: normalizes with the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn bn_forward_eval<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    relu: bool,
    y: &mut [T],
) {
    let invstd: Vec<f32> = running_var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    bn_apply(m, c, x, gamma, beta, running_mean, &invstd, None, relu, y);
}

/// `y = (x - mean) * (gamma * invstd) + beta`, plus `residual` if given, then the ReLU
/// if asked: one pass over the rows.
#[allow(clippy::too_many_arguments)]
pub fn bn_apply<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
    residual: Option<&[T]>,
    relu_after: bool,
    y: &mut [T],
) {
    if m == 0 || c == 0 {
        return;
    }
    let scale: Vec<f32> = gamma[..c].iter().zip(&invstd[..c]).map(|(g, s)| g * s).collect();
    let k = Coef { mean: &mean[..c], scale: &scale, beta: &beta[..c] };
    let (x, y) = (&x[..m * c], &mut y[..m * c]);
    match (residual, relu_after) {
        (None, false) => apply_rows::<T, false, false>(c, x, x, k, y),
        (None, true) => apply_rows::<T, false, true>(c, x, x, k, y),
        (Some(r), false) => apply_rows::<T, true, false>(c, x, &r[..m * c], k, y),
        (Some(r), true) => apply_rows::<T, true, true>(c, x, &r[..m * c], k, y),
    }
}

/// Per-channel coefficients of [`bn_apply`], each `c` long.
#[derive(Clone, Copy)]
struct Coef<'a> {
    mean: &'a [f32],
    scale: &'a [f32],
    beta: &'a [f32],
}

fn apply_rows<T: Real, const RES: bool, const RELU: bool>(c: usize, x: &[T], r: &[T], k: Coef<'_>, y: &mut [T]) {
    let chunk = rows_per_task(x.len() / c, c) * c;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk).zip(r.par_chunks(chunk))).for_each(|(yc, (xc, rc))| {
        for ((yr, xr), rr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).zip(rc.chunks_exact(c)) {
            let coef = k.mean.iter().zip(k.scale).zip(k.beta);
            for (((o, v), res), ((mu, s), b)) in yr.iter_mut().zip(xr).zip(rr).zip(coef) {
                let mut v = (v.to_f32() - mu) * s + b;
                if RES {
                    v += res.to_f32();
                }
                *o = T::from_f32(if RELU { relu(v) } else { v });
            }
        }
    });
}

/// Backward of train mode with the saved statistics: `dbeta = sum g`,
/// `dgamma = sum g * xhat`, `dx = gamma * invstd * (g - dbeta / m - xhat * dgamma / m)`,
/// where `g` is `dy` masked by `relu_out` (the output of a fused ReLU) when given.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    relu_out: Option<&[T]>,
    dy: &[T],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let (x, dy) = (&x[..m * c], &dy[..m * c]);
    let sums = match relu_out {
        Some(o) => grad_sums::<T, true>(m, c, x, &o[..m * c], dy, mean),
        None => grad_sums::<T, false>(m, c, x, dy, dy, mean),
    };
    backward_finish(m, c, x, relu_out, dy, gamma, mean, invstd, &sums, dx, dgamma, dbeta);
}

/// [`bn_backward`] of `g = relu_out > 0 ? dy : 0`, written over `dy` by the reduction
/// (a bottleneck's last BN, whose masked gradient also goes to the shortcut): the same
/// `dx`, `dgamma` and `dbeta` as [`bn_backward`] with `relu_out`, and `dy` holds `g`.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_masking_dy<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    relu_out: &[T],
    dy: &mut [T],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let (x, relu_out, dy) = (&x[..m * c], &relu_out[..m * c], &mut dy[..m * c]);
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
    let dy = &*dy;
    backward_finish(m, c, x, None, dy, gamma, mean, invstd, &sums, dx, dgamma, dbeta);
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

/// The parameter gradients from the sums, then the dx pass.
#[allow(clippy::too_many_arguments)]
fn backward_finish<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    relu_out: Option<&[T]>,
    dy: &[T],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    sums: &[f64],
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    for ch in 0..c {
        dbeta[ch] = sums[ch] as f32;
        dgamma[ch] = (sums[c + ch] * invstd[ch] as f64) as f32;
    }
    if m == 0 || c == 0 {
        return;
    }
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
