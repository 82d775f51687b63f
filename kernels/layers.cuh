// Helpers shared by the layer kernels (bn.cu, elementwise.cu, pool.cu, loss.cu, fc.cu,
// sgd.cu; conv.cu's BN epilogues use the ReLU's): vectors of elements converted to and from f32, ReLU with PyTorch's NaN rules,
// and Chan's merge of (count, mean, M2) triples.
#pragma once

#include "common.cuh"

// ---------------------------------------------------------------- vectors
// load_vec<T, V>(p, f) reads V consecutive elements at p into f[0 .. V) as f32;
// store_vec<T, V>(p, f) writes them back, rounding to nearest even for bf16. V == 1 is a
// scalar access; otherwise V * sizeof(T) must be a multiple of 16 and p 16-byte aligned,
// and the access is done with 16-byte loads and stores.
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, float* f) {
  if constexpr (V == 1) {
    f[0] = to_f32(p[0]);
  } else {
    static_assert((V * sizeof(T)) % 16 == 0, "vectors are whole 16-byte words");
    constexpr int Q = (int)(V * sizeof(T) / 16);
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      const uint4 r = q[i];
      const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (sizeof(T) == 4) {
          f[4 * i + k] = __uint_as_float(w[k]);
        } else {  // bf16: the upper 16 bits of an f32
          f[8 * i + 2 * k] = __uint_as_float(w[k] << 16);
          f[8 * i + 2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
      }
    }
  }
}

__device__ __forceinline__ uint32_t bf16_bits(float x) { return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(x)); }

template <class T, int V>
__device__ __forceinline__ void store_vec(T* p, const float* f) {
  if constexpr (V == 1) {
    p[0] = from_f32<T>(f[0]);
  } else {
    static_assert((V * sizeof(T)) % 16 == 0, "vectors are whole 16-byte words");
    constexpr int Q = (int)(V * sizeof(T) / 16);
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (sizeof(T) == 4) {
          w[k] = __float_as_uint(f[4 * i + k]);
        } else {
          w[k] = bf16_bits(f[8 * i + 2 * k]) | (bf16_bits(f[8 * i + 2 * k + 1]) << 16);
        }
      }
      q[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// V max pool argmax taps (bytes; pool.cu) read from p, V-byte aligned when V > 1.
template <int V>
__device__ __forceinline__ void load_taps(const uint8_t* p, int* a) {
  if constexpr (V == 1) {
    a[0] = p[0];
  } else if constexpr (V == 4) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = (int)((w >> (8 * k)) & 0xffu);
  } else {
    static_assert(V == 8, "taps come in vectors of 1, 4 or 8");
    const uint2 w = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      a[k] = (int)((w.x >> (8 * k)) & 0xffu);
      a[4 + k] = (int)((w.y >> (8 * k)) & 0xffu);
    }
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Elements per 16-byte vector.
template <class T>
struct VecWidth {
  static constexpr int value = (int)(16 / sizeof(T));
};

// ---------------------------------------------------------------- ReLU
// Forward: max(v, 0) with NaN kept (torch.relu propagates NaN).
__device__ __forceinline__ float relu_f(float v) { return v < 0.0f ? 0.0f : v; }
// Backward through a ReLU whose output is `out`: PyTorch's threshold_backward,
// out <= 0 ? 0 : dy (a NaN output lets the gradient through).
__device__ __forceinline__ float relu_grad(float out, float dy) { return out <= 0.0f ? 0.0f : dy; }

// ---------------------------------------------------------------- statistics
// Chan et al.'s merge of two (count, mean, M2) summaries: (n, mean, m2) absorbs
// (nb, mb, m2b). Either side may be empty.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.0f) return;
  if (n == 0.0f) {
    n = nb;
    mean = mb;
    m2 = m2b;
    return;
  }
  const float nt = n + nb;
  const float wb = nb / nt;
  const float d = mb - mean;
  mean = fmaf(d, wb, mean);
  m2 = m2 + m2b + d * d * (n * wb);
  n = nt;
}
