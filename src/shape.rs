//! The shape of a 2-D convolution and its three passes: the vocabulary the CPU
//! implementations ([`crate::cpu::conv`]), the kernel wrappers ([`crate::ops::conv`]) and
//! the profile's counts ([`crate::ops::profile`]) share.
//!
//! Shapes follow CUTLASS: x is `[N, H, W, C]`, w is `[K, R, S, C]`, y is `[N, P, Q, K]`.

use crate::{ensure, invalid, Result};

/// The shape of one 2-D convolution (NHWC activations, KRSC weights, square padding and
/// stride).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels (filters).
    pub k: usize,
    /// Filter height.
    pub r: usize,
    /// Filter width.
    pub s: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (all four sides).
    pub pad: usize,
}

impl ConvShape {
    /// Output height: `(h + 2 pad - r) / stride + 1`, or 0 when the filter does not fit.
    pub fn p(&self) -> usize {
        out_len(self.h, self.r, self.stride, self.pad)
    }
    /// Output width: `(w + 2 pad - s) / stride + 1`, or 0 when the filter does not fit.
    pub fn q(&self) -> usize {
        out_len(self.w, self.s, self.stride, self.pad)
    }
    /// Elements of x (NHWC).
    pub fn x_len(&self) -> usize {
        self.n.saturating_mul(self.h).saturating_mul(self.w).saturating_mul(self.c)
    }
    /// Elements of w (KRSC).
    pub fn w_len(&self) -> usize {
        self.k.saturating_mul(self.r).saturating_mul(self.s).saturating_mul(self.c)
    }
    /// Elements of y (NPQK).
    pub fn y_len(&self) -> usize {
        self.n.saturating_mul(self.p()).saturating_mul(self.q()).saturating_mul(self.k)
    }
    /// A clear error for zero sizes, a zero stride, an empty output or sizes whose element
    /// counts overflow.
    pub fn validate(&self) -> Result<()> {
        let ConvShape { n, h, w, c, k, r, s, stride, pad } = *self;
        ensure!(
            n > 0 && h > 0 && w > 0 && c > 0 && k > 0 && r > 0 && s > 0,
            "convolution {self:?}: every size (n, h, w, c, k, r, s) must be at least 1"
        );
        ensure!(stride > 0, "convolution {self:?}: stride must be at least 1");
        ensure!(
            h.checked_add(pad.saturating_mul(2)).is_some_and(|x| x >= r)
                && w.checked_add(pad.saturating_mul(2)).is_some_and(|x| x >= s),
            "convolution {self:?}: the {r}x{s} filter does not fit the padded {h}x{w} input (empty output)"
        );
        let mul = |v: &[usize]| v.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        ensure!(
            mul(&[n, h, w, c]).is_some()
                && mul(&[k, r, s, c]).is_some()
                && mul(&[n, self.p(), self.q(), k]).is_some()
                && mul(&[n, self.p(), self.q(), r, s, c, k, 2]).is_some(),
            "convolution {self:?}: sizes overflow"
        );
        Ok(())
    }
    /// Multiply-adds times two: `2 N P Q K C R S`.
    pub fn flops(&self) -> f64 {
        2.0 * self.n as f64
            * self.p() as f64
            * self.q() as f64
            * self.k as f64
            * self.c as f64
            * self.r as f64
            * self.s as f64
    }
    /// A 1x1 convolution with stride 1 and no padding: a plain GEMM.
    pub fn is_pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.stride == 1 && self.pad == 0
    }
}

fn out_len(x: usize, f: usize, stride: usize, pad: usize) -> usize {
    match x.checked_add(pad.saturating_mul(2)) {
        Some(padded) if padded >= f && stride > 0 => (padded - f) / stride + 1,
        _ => 0,
    }
}

/// A convolution pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// `y = conv(x, w)`.
    Fprop,
    /// `dx = dL/dx` from `dy` and `w`.
    Dgrad,
    /// `dw = dL/dw` from `x` and `dy`.
    Wgrad,
}

impl Pass {
    /// All three, in order.
    pub const ALL: [Pass; 3] = [Pass::Fprop, Pass::Dgrad, Pass::Wgrad];
    /// "fprop", "dgrad" or "wgrad".
    pub fn name(self) -> &'static str {
        match self {
            Pass::Fprop => "fprop",
            Pass::Dgrad => "dgrad",
            Pass::Wgrad => "wgrad",
        }
    }
    /// The pass named `s`.
    pub fn parse(s: &str) -> Result<Pass> {
        match s {
            "fprop" => Ok(Pass::Fprop),
            "dgrad" => Ok(Pass::Dgrad),
            "wgrad" => Ok(Pass::Wgrad),
            _ => Err(invalid!("unknown pass {s:?}: expected fprop, dgrad or wgrad")),
        }
    }
    /// (M, N, K) of the implicit GEMM of this pass for `sh`.
    pub fn gemm(self, sh: &ConvShape) -> (usize, usize, usize) {
        let (pq, rs) = (sh.p() * sh.q(), sh.r * sh.s);
        match self {
            Pass::Fprop => (sh.n * pq, sh.k, rs * sh.c),
            Pass::Dgrad => (sh.n * sh.h * sh.w, sh.c, rs * sh.k),
            Pass::Wgrad => (sh.k, rs * sh.c, sh.n * pq),
        }
    }
}
