//! PyTorch's `torch.optim.SGD` step (dampening 0, no Nesterov) on one tensor:
//! `d = grad + weight_decay * param` (just `grad` when weight_decay is 0);
//! `buf = d` on the first step, else `buf = momentum * buf + d` (just `d` when momentum
//! is 0: PyTorch keeps no buffer then); `param -= lr * buf`. The scaled step first
//! multiplies the gradient by a scale (gradient clipping: `torch.nn.utils.clip_grad_norm_`
//! scales the gradients before the optimizer adds the weight decay).

use rayon::prelude::*;

const TASK: usize = 1 << 16;

/// The settings of one SGD step on one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f32,
    /// Momentum (0: none, PyTorch keeps no buffer then).
    pub momentum: f32,
    /// L2 weight decay.
    pub weight_decay: f32,
    /// The first step: the momentum buffer is set to `d`, its old contents not read.
    pub first: bool,
    /// The gradient is multiplied by this first (1: the plain step, bitwise).
    pub grad_scale: f32,
}

impl SgdStep {
    /// A plain step (gradient scale 1).
    pub fn new(lr: f32, momentum: f32, weight_decay: f32, first: bool) -> SgdStep {
        SgdStep { lr, momentum, weight_decay, first, grad_scale: 1.0 }
    }

    /// The same step on the gradient multiplied by `grad_scale`.
    pub fn scaled(self, grad_scale: f32) -> SgdStep {
        SgdStep { grad_scale, ..self }
    }
}

#[inline]
fn step_one(w: &mut f32, g: f32, b: &mut f32, st: &SgdStep) {
    let g = if st.grad_scale != 1.0 { g * st.grad_scale } else { g };
    let d = if st.weight_decay != 0.0 { g + st.weight_decay * *w } else { g };
    *b = if st.momentum != 0.0 && !st.first { st.momentum * *b + d } else { d };
    *w -= st.lr * *b;
}

/// One step in place on f32 parameters and momentum buffer.
pub fn sgd_step(param: &mut [f32], grad: &[f32], buf: &mut [f32], step: &SgdStep) {
    param.par_chunks_mut(TASK).zip(grad.par_chunks(TASK).zip(buf.par_chunks_mut(TASK))).for_each(|(w, (g, b))| {
        for ((w, g), b) in w.iter_mut().zip(g).zip(b.iter_mut()) {
            step_one(w, *g, b, step);
        }
    });
}

/// One step in f64 on copies: returns (param, buf).
pub fn sgd_step_oracle(
    param: &[f64],
    grad: &[f64],
    buf: &[f64],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    first_step: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut p = param.to_vec();
    let mut b = buf.to_vec();
    for i in 0..p.len() {
        let d = if weight_decay != 0.0 { grad[i] + weight_decay * p[i] } else { grad[i] };
        b[i] = if momentum == 0.0 || first_step { d } else { momentum * b[i] + d };
        p[i] -= lr * b[i];
    }
    (p, b)
}
