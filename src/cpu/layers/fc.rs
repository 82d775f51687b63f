//! The fully connected layer `y[n, o] = sum_i x[n, i] * w[o, i] + b[o]` (w is
//! torchvision's `fc.weight`, `[out, in]`) and its gradients.
//!
//! The fast paths use plain multiply-adds (not `mul_add`, which is a libm call on CPUs
//! built without FMA) so that the compiler vectorizes them, and split the work over the
//! outputs so that a batch of one still uses every core.

use rayon::prelude::*;

/// Dot product with eight independent f32 accumulators.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ra.iter().zip(rb).fold(0.0f32, |s, (x, y)| s + x * y);
    for v in acc {
        s += v;
    }
    s
}

/// `y += alpha * x`.
#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * *x;
    }
}

/// Forward: `y = x w^T + b`, x `[n, cin]`, w `[cout, cin]`, y `[n, cout]`.
pub fn fc_forward(n: usize, cin: usize, cout: usize, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    if n * cout == 0 {
        return;
    }
    y.par_iter_mut().enumerate().with_min_len(64).for_each(|(e, v)| {
        let (r, o) = (e / cout, e % cout);
        *v = dot(&x[r * cin..(r + 1) * cin], &w[o * cin..(o + 1) * cin]) + b[o];
    });
}

/// Backward: `dx = dy w`, `dw = dy^T x`, `db = sum_n dy` (all overwritten).
#[allow(clippy::too_many_arguments)]
pub fn fc_backward(
    n: usize,
    cin: usize,
    cout: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    if cin > 0 {
        const COLS: usize = 512;
        dx.par_chunks_mut(cin).enumerate().for_each(|(r, dxr)| {
            dxr.par_chunks_mut(COLS).enumerate().for_each(|(k, part)| {
                part.fill(0.0);
                let i0 = k * COLS;
                for o in 0..cout {
                    axpy(dy[r * cout + o], &w[o * cin + i0..o * cin + i0 + part.len()], part);
                }
            });
        });
        dw.par_chunks_mut(cin).enumerate().for_each(|(o, dwr)| {
            dwr.fill(0.0);
            for r in 0..n {
                axpy(dy[r * cout + o], &x[r * cin..(r + 1) * cin], dwr);
            }
        });
    }
    for (o, d) in db.iter_mut().enumerate() {
        *d = (0..n).map(|r| dy[r * cout + o]).sum();
    }
}

/// Forward in f64.
pub fn fc_forward_oracle(n: usize, cin: usize, cout: usize, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; n * cout];
    for r in 0..n {
        for o in 0..cout {
            let mut s = b[o];
            for i in 0..cin {
                s += x[r * cin + i] * w[o * cin + i];
            }
            y[r * cout + o] = s;
        }
    }
    y
}

/// Backward in f64: (dx, dw, db).
pub fn fc_backward_oracle(
    n: usize,
    cin: usize,
    cout: usize,
    x: &[f64],
    w: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dw, mut db) = (vec![0.0; n * cin], vec![0.0; cout * cin], vec![0.0; cout]);
    for r in 0..n {
        for o in 0..cout {
            let g = dy[r * cout + o];
            db[o] += g;
            for i in 0..cin {
                dx[r * cin + i] += g * w[o * cin + i];
                dw[o * cin + i] += g * x[r * cin + i];
            }
        }
    }
    (dx, dw, db)
}
