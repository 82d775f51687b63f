//! Batch normalization over `[m, c]` activations (c fastest), as PyTorch's
//! `BatchNorm2d`: train mode normalizes with the batch mean and the biased batch variance
//! and updates `running = (1 - momentum) * running + momentum * batch` with the unbiased
//! variance (`m / (m - 1)`); eval mode normalizes with the running statistics.

use super::{relu, relu64, relu_grad, relu_grad64, rows_per_task, Real};
use rayon::prelude::*;

/// `k` sums per channel over the rows of `[m, c]` data, in f64: `f(rows, acc)` adds the
/// rows of one rayon task into `acc` (`[k, c]`), and the tasks' sums are added.
fn channel_sums<F>(m: usize, c: usize, k: usize, f: F) -> Vec<f64>
where
    F: Fn(std::ops::Range<usize>, &mut [f64]) + Sync,
{
    let rows = rows_per_task(m, c);
    (0..m.div_ceil(rows))
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0.0f64; k * c];
            f(t * rows..((t + 1) * rows).min(m), &mut acc);
            acc
        })
        .reduce(
            || vec![0.0f64; k * c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Batch mean and biased variance of every channel, in f64 and one pass over x: the sums
/// of `x - shift` and of its square, shift being the channel's value in the first row (a
/// value of the channel, so the square sum does not cancel when the mean is far from 0).
pub fn batch_stats<T: Real>(m: usize, c: usize, x: &[T]) -> (Vec<f64>, Vec<f64>) {
    if m == 0 {
        return (vec![f64::NAN; c], vec![f64::NAN; c]);
    }
    let shift: Vec<f64> = x[..c].iter().map(|v| v.to_f32() as f64).collect();
    let sums = channel_sums(m, c, 2, |rows, acc| {
        let (s1, s2) = acc.split_at_mut(c);
        for r in rows {
            for (((a1, a2), v), sh) in s1.iter_mut().zip(s2.iter_mut()).zip(&x[r * c..(r + 1) * c]).zip(&shift) {
                let d = v.to_f32() as f64 - sh;
                *a1 += d;
                *a2 += d * d;
            }
        }
    });
    let (s1, s2) = sums.split_at(c);
    let mean = s1.iter().zip(&shift).map(|(s, sh)| sh + s / m as f64).collect();
    let var = s1.iter().zip(s2).map(|(s, q)| (q / m as f64 - (s / m as f64) * (s / m as f64)).max(0.0)).collect();
    (mean, var)
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
    for ch in 0..c {
        save_mean[ch] = mean[ch] as f32;
        save_invstd[ch] = (1.0 / (var[ch] + eps as f64).sqrt()) as f32;
        let unbiased = (var[ch] * m as f64 / (m as f64 - 1.0)) as f32;
        running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean[ch] as f32;
        running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * unbiased;
    }
    bn_apply(m, c, x, gamma, beta, save_mean, save_invstd, relu, y);
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
    bn_apply(m, c, x, gamma, beta, running_mean, &invstd, relu, y);
}

/// `y = (x - mean) * (gamma * invstd) + beta`, then the ReLU if asked.
#[allow(clippy::too_many_arguments)]
pub fn bn_apply<T: Real>(
    m: usize,
    c: usize,
    x: &[T],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
    relu_after: bool,
    y: &mut [T],
) {
    if m == 0 || c == 0 {
        return;
    }
    let scale: Vec<f32> = gamma.iter().zip(invstd).map(|(g, s)| g * s).collect();
    let rows = rows_per_task(m, c);
    y.par_chunks_mut(rows * c).zip(x.par_chunks(rows * c)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
            for ch in 0..c {
                let v = (xr[ch].to_f32() - mean[ch]) * scale[ch] + beta[ch];
                yr[ch] = T::from_f32(if relu_after { relu(v) } else { v });
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
    // g of row r into `out` (dy masked by the fused ReLU's output).
    let grad_row = |r: usize, out: &mut [f32]| {
        let dyr = &dy[r * c..(r + 1) * c];
        match relu_out {
            Some(o) => {
                for ((g, d), o) in out.iter_mut().zip(dyr).zip(&o[r * c..(r + 1) * c]) {
                    *g = relu_grad(o.to_f32(), d.to_f32());
                }
            }
            None => {
                for (g, d) in out.iter_mut().zip(dyr) {
                    *g = d.to_f32();
                }
            }
        }
    };
    let sums = channel_sums(m, c, 2, |rows, acc| {
        let mut g = vec![0.0f32; c];
        let (sg, sgx) = acc.split_at_mut(c);
        for r in rows {
            grad_row(r, &mut g);
            let xr = &x[r * c..(r + 1) * c];
            for ch in 0..c {
                let gi = g[ch] as f64;
                sg[ch] += gi;
                sgx[ch] += gi * (xr[ch].to_f32() - mean[ch]) as f64;
            }
        }
    });
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
    let rows = rows_per_task(m, c);
    dx.par_chunks_mut(rows * c).enumerate().for_each(|(t, dxc)| {
        let mut g = vec![0.0f32; c];
        for (lr, dxr) in dxc.chunks_exact_mut(c).enumerate() {
            let r = t * rows + lr;
            grad_row(r, &mut g);
            let xr = &x[r * c..(r + 1) * c];
            for ch in 0..c {
                let xc = xr[ch].to_f32() - mean[ch];
                dxr[ch] = T::from_f32(k1[ch] * (g[ch] - k2[ch] - xc * k3[ch]));
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
