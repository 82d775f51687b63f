//! The naive direct convolution of every pass, accumulated in f64: the oracle the fast
//! path and the kernels are tested against.

use super::in_coord;
use crate::shape::ConvShape;

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
