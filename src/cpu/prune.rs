//! Pruning on the CPU: filter norms, group sums, top-k selection and gathers.
//!
//! The fast path of the filter norms sums in exactly the order of the kernel (32
//! strided lanes, then an xor butterfly), so the CPU and kernel devices produce the same
//! bits and the same selection. The oracles are plain sequential loops in f64.

use half::{bf16, f16};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Which norm scores a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// The sum of absolute values.
    L1,
    /// The square root of the sum of squares.
    L2,
}

impl Norm {
    /// 1 or 2, as the kernels take it.
    pub fn code(self) -> i32 {
        match self {
            Norm::L1 => 1,
            Norm::L2 => 2,
        }
    }
}

/// The accumulator of a filter norm: f64 for f32 weights, f32 for 16-bit weights.
pub trait Acc: Copy + Send + Sync {
    /// Zero, the empty sum.
    const ZERO: Self;
    /// `self + o`.
    fn add(self, o: Self) -> Self;
    /// The absolute value.
    fn abs(self) -> Self;
    /// `a * b + c` with one rounding (fused multiply-add).
    fn fma(a: Self, b: Self, c: Self) -> Self;
    /// The value as f64 (exact).
    fn to_f64(self) -> f64;
}
impl Acc for f64 {
    const ZERO: Self = 0.0;
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn fma(a: Self, b: Self, c: Self) -> Self {
        a.mul_add(b, c)
    }
    fn to_f64(self) -> f64 {
        self
    }
}
impl Acc for f32 {
    const ZERO: Self = 0.0;
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn fma(a: Self, b: Self, c: Self) -> Self {
        a.mul_add(b, c)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

/// Weight element types that can be scored.
pub trait NormInput: Copy + Send + Sync {
    /// The accumulator type the kernel sums this type in.
    type A: Acc;
    /// The value converted to the accumulator type (exact).
    fn acc(self) -> Self::A;
    /// The value as f64 (exact), for the oracle.
    fn to_f64(self) -> f64;
}
impl NormInput for f32 {
    type A = f64;
    fn acc(self) -> f64 {
        self as f64
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl NormInput for bf16 {
    type A = f32;
    fn acc(self) -> f32 {
        self.to_f32()
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
}
impl NormInput for f16 {
    type A = f32;
    fn acc(self) -> f32 {
        self.to_f32()
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
}

/// Norm of every row of `w` ([k, len / k]), in the kernel's summation order.
pub fn filter_norms<T: NormInput>(w: &[T], k: usize, norm: Norm) -> Vec<f64> {
    if k == 0 {
        return Vec::new();
    }
    let len = w.len() / k;
    (0..k)
        .into_par_iter()
        .map(|f| {
            let mut lanes = [T::A::ZERO; 32];
            for (i, x) in w[f * len..(f + 1) * len].iter().enumerate() {
                let x = x.acc();
                let l = &mut lanes[i % 32];
                *l = match norm {
                    Norm::L1 => l.add(x.abs()),
                    Norm::L2 => T::A::fma(x, x, *l),
                };
            }
            for o in [16, 8, 4, 2, 1] {
                let old = lanes;
                for (l, v) in lanes.iter_mut().enumerate() {
                    *v = old[l].add(old[l ^ o]);
                }
            }
            match norm {
                Norm::L1 => lanes[0].to_f64(),
                Norm::L2 => lanes[0].to_f64().sqrt(),
            }
        })
        .collect()
}

/// The oracle: sequential sums in f64.
pub fn filter_norms_oracle<T: NormInput>(w: &[T], k: usize, norm: Norm) -> Vec<f64> {
    if k == 0 {
        return Vec::new();
    }
    let len = w.len() / k;
    (0..k)
        .map(|f| {
            let row = &w[f * len..(f + 1) * len];
            match norm {
                Norm::L1 => row.iter().map(|x| x.to_f64().abs()).sum(),
                Norm::L2 => row.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>().sqrt(),
            }
        })
        .collect()
}

/// `a` ranks before `b` (scores sa, sb at indices ia, ib): larger first, NaN last, ties
/// to the lower index. A strict total order.
pub fn rank_order(sa: f64, ia: usize, sb: f64, ib: usize) -> Ordering {
    match (sa.is_nan(), sb.is_nan()) {
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        (false, false) if sa != sb => sb.partial_cmp(&sa).expect("not NaN"),
        _ => ia.cmp(&ib),
    }
}

/// The indices of the `n` best scores, ascending.
pub fn topk(scores: &[f64], n: usize) -> Vec<i32> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| rank_order(scores[a], a, scores[b], b));
    let mut kept: Vec<i32> = idx[..n.min(idx.len())].iter().map(|&i| i as i32).collect();
    kept.sort_unstable();
    kept
}

/// `dst[i, j, l] = src[rows[i], mids[j], cols[l]]` with `src` of shape `[*, src_mid, src_cols]`.
pub fn gather<T: Copy + Send + Sync>(
    src: &[T],
    src_mid: usize,
    src_cols: usize,
    rows: &[usize],
    mids: &[usize],
    cols: &[usize],
) -> Vec<T> {
    let mut dst = Vec::with_capacity(rows.len() * mids.len() * cols.len());
    for &r in rows {
        for &j in mids {
            let base = (r * src_mid + j) * src_cols;
            dst.extend(cols.iter().map(|&c| src[base + c]));
        }
    }
    dst
}
