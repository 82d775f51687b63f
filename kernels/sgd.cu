// PyTorch's SGD with momentum and weight decay (dampening 0, no Nesterov), in place on
// f32 parameters: d = grad + wd * param (grad first multiplied by grad_scale unless it is
// 1: the scale torch.nn.utils.clip_grad_norm_ applies to the gradients); buf = d on the first step, else
// buf = momentum * buf + d; param -= lr * buf. With weight_decay == 0 d is grad, and with
// momentum == 0 the step uses d (as PyTorch, which keeps no buffer then; buf is set to d).
// CPU version: src/cpu/layers/sgd.rs; wrapper: src/ops/layers/sgd.rs.
#include "layers.cuh"

__device__ __forceinline__ void sgd_one(const PkSgdParams& p, float& w, float g, float& b) {
  if (p.grad_scale != 1.0f) g *= p.grad_scale;
  const float d = p.weight_decay != 0.0f ? g + p.weight_decay * w : g;
  if (p.momentum != 0.0f) {
    b = p.first ? d : p.momentum * b + d;
  } else {
    b = d;
  }
  w = w - p.lr * b;
}

PK_KERNEL(sgd_step_f32, PkSgdParams) {
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t nv = p.n / 4;
  float4* w4 = reinterpret_cast<float4*>(p.param);
  const float4* g4 = reinterpret_cast<const float4*>(p.grad);
  float4* b4 = reinterpret_cast<float4*>(p.buf);
  for (int64_t i = tid; i < nv; i += stride) {
    float4 w = w4[i], b = p.first ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : b4[i];
    const float4 g = g4[i];
    sgd_one(p, w.x, g.x, b.x);
    sgd_one(p, w.y, g.y, b.y);
    sgd_one(p, w.z, g.z, b.z);
    sgd_one(p, w.w, g.w, b.w);
    w4[i] = w;
    b4[i] = b;
  }
  for (int64_t i = nv * 4 + tid; i < p.n; i += stride) {
    float w = p.param[i], b = p.first ? 0.0f : p.buf[i];
    sgd_one(p, w, p.grad[i], b);
    p.param[i] = w;
    p.buf[i] = b;
  }
}
