// PyTorch's SGD with momentum and weight decay (dampening 0, no Nesterov), in place on
// f32 parameters: d = grad + wd * param (grad first multiplied by grad_scale unless it is
// 1: the scale torch.nn.utils.clip_grad_norm_ applies to the gradients); buf = d on the first step, else
// buf = momentum * buf + d; param -= lr * buf. With weight_decay == 0 d is grad, and with
// momentum == 0 the step uses d (as PyTorch, which keeps no buffer then; buf is set to d).
// sgd_multi_<low> does the same on every tensor of a table in one launch, and writes each
// updated parameter's low-precision copy where the tensor has one (the cast kernel's
// rounding: nearest even).
// CPU version: src/cpu/layers/sgd.rs; wrapper: src/ops/layers/sgd.rs.
#include "layers.cuh"

// P is PkSgdParams or PkSgdMultiParams: the same hyperparameter fields.
template <class P>
__device__ __forceinline__ void sgd_one(const P& p, float& w, float g, float& b) {
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

// ---------------------------------------------------------------- multi-tensor
// Tensor s covers chunks [segs[s].chunk0, segs[s + 1].chunk0) of p.chunk parameters
// (its last chunk partial); block b takes chunks b, b + gridDim.x, ... Within a chunk the
// threads take float4s (the tensors are 16-byte aligned, chunks start at multiples of 4),
// then the n % 4 parameters left at the tensor's end one by one.
template <class L>
__device__ __forceinline__ void sgd_multi(const PkSgdMultiParams& p) {
  for (int c = (int)blockIdx.x; c < p.nchunks; c += (int)gridDim.x) {
    const PkSgdSeg s = p.segs[last_starting_by(p.segs, p.nseg, &PkSgdSeg::chunk0, c)];
    L* low = static_cast<L*>(s.low);
    const int64_t base = (int64_t)(c - s.chunk0) * p.chunk;
    const int64_t end = base + p.chunk < s.n ? base + p.chunk : s.n;
    const int64_t vend = base + ((end - base) & ~(int64_t)3);
    for (int64_t i = base + 4 * (int64_t)threadIdx.x; i < vend; i += 4 * (int64_t)blockDim.x) {
      float4 w = *reinterpret_cast<const float4*>(s.param + i);
      float4 b = p.first ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : *reinterpret_cast<const float4*>(s.buf + i);
      const float4 g = *reinterpret_cast<const float4*>(s.grad + i);
      sgd_one(p, w.x, g.x, b.x);
      sgd_one(p, w.y, g.y, b.y);
      sgd_one(p, w.z, g.z, b.z);
      sgd_one(p, w.w, g.w, b.w);
      *reinterpret_cast<float4*>(s.param + i) = w;
      *reinterpret_cast<float4*>(s.buf + i) = b;
      if (low != nullptr) {
        low[i] = from_f32<L>(w.x);
        low[i + 1] = from_f32<L>(w.y);
        low[i + 2] = from_f32<L>(w.z);
        low[i + 3] = from_f32<L>(w.w);
      }
    }
    for (int64_t i = vend + threadIdx.x; i < end; i += blockDim.x) {
      float w = s.param[i], b = p.first ? 0.0f : s.buf[i];
      sgd_one(p, w, s.grad[i], b);
      s.param[i] = w;
      s.buf[i] = b;
      if (low != nullptr) low[i] = from_f32<L>(w);
    }
  }
}

PK_KERNEL(sgd_multi_f32, PkSgdMultiParams) { sgd_multi<float>(p); }
PK_KERNEL(sgd_multi_bf16, PkSgdMultiParams) { sgd_multi<bf16>(p); }
