// Elementwise layers over flat buffers: out = relu(a + b) (the residual add and its
// ReLU), the ReLU backward, dst += src (gradient accumulation), and casts between f32
// and bf16 (either way, round to nearest even, or a copy).
// CPU versions: src/cpu/layers/elementwise.rs; wrappers: src/ops/layers/elementwise.rs.
//
// A grid-stride loop over vectors of 8 elements (16-byte accesses, 32 for f32), then over
// the n % 8 elements left one by one.
#include "layers.cuh"

#define EW_VEC 8

enum EwOp { EW_ADD_RELU, EW_RELU_BACKWARD, EW_ADD, EW_CAST };

template <int OP>
__device__ __forceinline__ float ew_apply(float a, float b) {
  if constexpr (OP == EW_ADD_RELU) return relu_f(a + b);
  if constexpr (OP == EW_RELU_BACKWARD) return relu_grad(a, b);  // a: forward output, b: dy
  if constexpr (OP == EW_ADD) return a + b;
  return a;  // EW_CAST
}

template <int OP, class TA, class TO>
__device__ __forceinline__ void elementwise(const PkElementwiseParams& p) {
  constexpr bool binary = OP != EW_CAST;
  const TA* a = static_cast<const TA*>(p.a);
  const TA* b = static_cast<const TA*>(p.b);
  TO* out = static_cast<TO*>(p.out);
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t nv = p.vec > 1 ? p.n / EW_VEC : 0;
  for (int64_t i = tid; i < nv; i += stride) {
    float va[EW_VEC], vb[EW_VEC];
    load_vec<TA, EW_VEC>(a + i * EW_VEC, va);
    if constexpr (binary) load_vec<TA, EW_VEC>(b + i * EW_VEC, vb);
#pragma unroll
    for (int k = 0; k < EW_VEC; ++k) va[k] = ew_apply<OP>(va[k], binary ? vb[k] : 0.0f);
    store_vec<TO, EW_VEC>(out + i * EW_VEC, va);
  }
  for (int64_t i = nv * EW_VEC + tid; i < p.n; i += stride) {
    const float vb = binary ? to_f32(b[i]) : 0.0f;
    out[i] = from_f32<TO>(ew_apply<OP>(to_f32(a[i]), vb));
  }
}

#define EW_ENTRIES(T, NAME)                                                                                    \
  PK_KERNEL(add_relu_##NAME, PkElementwiseParams) { elementwise<EW_ADD_RELU, T, T>(p); }                       \
  PK_KERNEL(relu_backward_##NAME, PkElementwiseParams) { elementwise<EW_RELU_BACKWARD, T, T>(p); }             \
  PK_KERNEL(add_assign_##NAME, PkElementwiseParams) { elementwise<EW_ADD, T, T>(p); }

EW_ENTRIES(float, f32)
EW_ENTRIES(bf16, bf16)

PK_KERNEL(cast_f32_bf16, PkElementwiseParams) { elementwise<EW_CAST, float, bf16>(p); }
PK_KERNEL(cast_bf16_f32, PkElementwiseParams) { elementwise<EW_CAST, bf16, float>(p); }
PK_KERNEL(cast_f32_f32, PkElementwiseParams) { elementwise<EW_CAST, float, float>(p); }
PK_KERNEL(cast_bf16_bf16, PkElementwiseParams) { elementwise<EW_CAST, bf16, bf16>(p); }
