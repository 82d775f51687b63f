//! Softmax cross-entropy with the mean over the batch, as
//! `torch.nn.functional.cross_entropy(logits, targets)`:
//! `loss = mean_n (logsumexp(z_n) - z_n[t_n])` and
//! `dlogits = (softmax(z) - onehot(t)) / n`.

use rayon::prelude::*;

/// Loss and gradient in f32 (row losses summed in f64), the kernel's formula: the row
/// maximum is subtracted before `exp`, and a row's loss is `log1p(s) + (max - z_t)` where
/// `1 + s` is the row's sum (s over the classes other than the first maximum). A
/// target outside `[0, classes)` makes its row's gradients and the loss NaN (the wrapper
/// rejects such targets before they get here).
pub fn softmax_cross_entropy(n: usize, classes: usize, logits: &[f32], targets: &[i32], dlogits: &mut [f32]) -> f32 {
    softmax_cross_entropy_smoothed(n, classes, logits, targets, 0.0, dlogits)
}

/// As [`softmax_cross_entropy`] with label smoothing `e` (PyTorch's `label_smoothing`):
/// the target distribution is `q = (1 - e) onehot(t) + e / classes`, the gradient
/// `dlogits = (softmax(z) - q) / n`, and a row's loss `log1p(s) + (1 - e) (max - z_t) +
/// e (max - mean(z))`; `e = 0` is the plain loss, bit for bit.
pub fn softmax_cross_entropy_smoothed(
    n: usize,
    classes: usize,
    logits: &[f32],
    targets: &[i32],
    e: f32,
    dlogits: &mut [f32],
) -> f32 {
    let (on, off) = (1.0 - e, e / classes.max(1) as f32);
    if n == 0 {
        return f32::NAN; // the mean of nothing, as PyTorch
    }
    let inv_n = 1.0 / n as f32;
    let rows: Vec<f64> = dlogits
        .par_chunks_mut(classes.max(1))
        .zip(logits.par_chunks(classes.max(1)))
        .zip(targets.par_iter())
        .map(|((dz, z), &t)| {
            let valid = t >= 0 && (t as usize) < classes;
            // The first maximum; the others' sum s, so that the row sum is 1 + s.
            let (am, mx) =
                z.iter().enumerate().fold(
                    (usize::MAX, f32::NEG_INFINITY),
                    |(ai, a), (j, &v)| {
                        if v > a {
                            (j, v)
                        } else {
                            (ai, a)
                        }
                    },
                );
            let s: f32 = z.iter().enumerate().filter(|&(j, _)| j != am).map(|(_, &v)| (v - mx).exp()).sum();
            let inv = 1.0 / (1.0 + s);
            for (j, (d, &v)) in dz.iter_mut().zip(z).enumerate() {
                let p = (v - mx).exp() * inv;
                *d = if valid { (p - ((if j as i32 == t { on } else { 0.0 }) + off)) * inv_n } else { f32::NAN };
            }
            if valid && e > 0.0 {
                let mean = z.iter().sum::<f32>() / classes as f32;
                (s.ln_1p() + on * (mx - z[t as usize]) + e * (mx - mean)) as f64
            } else if valid {
                (s.ln_1p() + (mx - z[t as usize])) as f64
            } else {
                f64::NAN
            }
        })
        .collect();
    (rows.iter().sum::<f64>() / n as f64) as f32
}

/// Loss and gradient in f64: (loss, dlogits).
pub fn softmax_cross_entropy_oracle(n: usize, classes: usize, logits: &[f64], targets: &[i32]) -> (f64, Vec<f64>) {
    softmax_cross_entropy_smoothed_oracle(n, classes, logits, targets, 0.0)
}

/// Loss and gradient in f64 with label smoothing `e`, straight from the definition:
/// `-sum_j q_j log softmax(z)_j` with `q = (1 - e) onehot(t) + e / classes`.
pub fn softmax_cross_entropy_smoothed_oracle(
    n: usize,
    classes: usize,
    logits: &[f64],
    targets: &[i32],
    e: f64,
) -> (f64, Vec<f64>) {
    let mut d = vec![0.0; n * classes];
    let mut total = 0.0;
    for r in 0..n {
        let z = &logits[r * classes..(r + 1) * classes];
        let t = targets[r] as usize;
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - mx).exp()).sum();
        let lse = mx + s.ln();
        for j in 0..classes {
            let q = if j == t { 1.0 - e } else { 0.0 } + e / classes as f64;
            total += q * (lse - z[j]);
            d[r * classes + j] = ((z[j] - lse).exp() - q) / n as f64;
        }
    }
    (total / n as f64, d)
}
