//! The fully connected layer `y[n, o] = sum_i x[n, i] * w[o, i] + b[o]` (w is
//! torchvision's `fc.weight`, `[out, in]`) and its gradients.
//!
//! The fast paths are GEMMs of the `gemm` crate on the operands as they lie (no transposed
//! copies), parallel inside over rows and columns, so that a batch of one still uses every
//! core.

use crate::cpu::gemm::{sgemm, threads, Mat};
use gemm::Parallelism;

/// Forward: `y = x w^T + b`, x `[n, cin]`, w `[cout, cin]`, y `[n, cout]`.
pub fn fc_forward(n: usize, cin: usize, cout: usize, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    if n * cout == 0 {
        return;
    }
    for row in y.chunks_mut(cout) {
        row.copy_from_slice(&b[..cout]);
    }
    let a = Mat { ptr: x.as_ptr(), rs: cin as isize, cs: 1 };
    let wt = Mat { ptr: w.as_ptr(), rs: 1, cs: cin as isize };
    // SAFETY: x is n x cin, w^T is cin x cout (w read transposed), y is n x cout.
    unsafe { sgemm(n, cout, cin, y.as_mut_ptr(), cout, true, a, wt, Parallelism::Rayon(threads())) };
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
        let par = Parallelism::Rayon(threads());
        let g = Mat { ptr: dy.as_ptr(), rs: cout as isize, cs: 1 };
        let gt = Mat { ptr: dy.as_ptr(), rs: 1, cs: cout as isize };
        // SAFETY: dy is n x cout, w is cout x cin, dx is n x cin.
        unsafe {
            sgemm(n, cin, cout, dx.as_mut_ptr(), cin, false, g, Mat { ptr: w.as_ptr(), rs: cin as isize, cs: 1 }, par)
        };
        if n == 0 {
            dw.fill(0.0);
        } else {
            // SAFETY: dy^T is cout x n, x is n x cin, dw is cout x cin.
            unsafe {
                sgemm(
                    cout,
                    cin,
                    n,
                    dw.as_mut_ptr(),
                    cin,
                    false,
                    gt,
                    Mat { ptr: x.as_ptr(), rs: cin as isize, cs: 1 },
                    par,
                )
            };
        }
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
