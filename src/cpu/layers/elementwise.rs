//! Elementwise layers: the residual add with its ReLU, the ReLU backward, gradient
//! accumulation and casts between f32 and bf16.

use super::{relu, relu64, relu_grad, relu_grad64, Real};
use rayon::prelude::*;

const TASK: usize = 1 << 16;

/// `out = relu(a + b)`.
pub fn add_relu<T: Real>(a: &[T], b: &[T], out: &mut [T]) {
    out.par_chunks_mut(TASK).zip(a.par_chunks(TASK).zip(b.par_chunks(TASK))).for_each(|(o, (a, b))| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = T::from_f32(relu(a.to_f32() + b.to_f32()));
        }
    });
}

/// `dx = out <= 0 ? 0 : dy` (the gradient through a ReLU with output `out`).
pub fn relu_backward<T: Real>(out: &[T], dy: &[T], dx: &mut [T]) {
    dx.par_chunks_mut(TASK).zip(out.par_chunks(TASK).zip(dy.par_chunks(TASK))).for_each(|(d, (o, g))| {
        for ((d, o), g) in d.iter_mut().zip(o).zip(g) {
            *d = T::from_f32(relu_grad(o.to_f32(), g.to_f32()));
        }
    });
}

/// `dst += src`.
pub fn add_assign<T: Real>(dst: &mut [T], src: &[T]) {
    dst.par_chunks_mut(TASK).zip(src.par_chunks(TASK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d = T::from_f32(d.to_f32() + s.to_f32());
        }
    });
}

/// `dst = src` converted (round to nearest even).
pub fn cast<A: Real, B: Real>(src: &[A], dst: &mut [B]) {
    dst.par_chunks_mut(TASK).zip(src.par_chunks(TASK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d = B::from_f32(s.to_f32());
        }
    });
}

/// `relu(a + b)` in f64.
pub fn add_relu_oracle(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| relu64(a + b)).collect()
}

/// The ReLU backward in f64.
pub fn relu_backward_oracle(out: &[f64], dy: &[f64]) -> Vec<f64> {
    out.iter().zip(dy).map(|(o, g)| relu_grad64(*o, *g)).collect()
}
