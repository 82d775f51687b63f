// Pooling on NHWC activations: max pool 3x3 stride 2 padding 1 (ResNet's stem) and the
// global average pool before the classifier, forward and backward. CPU versions:
// src/cpu/layers/pool.rs; wrappers: src/ops/layers/pool.rs.
//
// Max pool follows PyTorch: padding is -inf (out-of-range taps are skipped), and the
// maximum of a window starts at its first in-range tap in row-major order and is replaced
// by every later element that is greater or NaN. The backward sends each output's gradient
// to that element. It is a gather, not a scatter: the thread of output (oh, ow) owns the
// input cell rows {2oh, 2oh+1} x cols {2ow, 2ow+1}, which only the windows (oh or oh+1,
// ow or ow+1) reach, and sums their gradients in row-major window order (PyTorch's order),
// writing every input element exactly once. maxpool_backward recomputes the windows'
// argmax from x; maxpool_backward_arg reads them from the forward's argmax taps (p.arg,
// one byte per output element: dh * 3 + dw), 4 bytes per window and channel vector
// instead of up to 9 vectors of x.
//
// maxpool_forward_bn applies a batch norm (+ ReLU) to each element as it loads it, with
// bn_apply's operations and rounding (bn.cu), so its output is bitwise bn_apply followed
// by maxpool_forward, and the BN's output is never written: the stem's BN + ReLU + max pool
// read the conv output once and write the pooled tensor and the taps.
#include "layers.cuh"

__device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }

// (image, output row, output column, channel vector) of flat index e.
struct PoolPos {
  int n, y, x, j;
};
__device__ __forceinline__ PoolPos pool_pos(int64_t e, int cv, int oh, int ow) {
  PoolPos q;
  q.j = (int)(e % cv);
  e /= cv;
  q.x = (int)(e % ow);
  e /= ow;
  q.y = (int)(e % oh);
  q.n = (int)(e / oh);
  return q;
}

// V argmax taps (bytes) written at p, V-byte aligned when V > 1 (load_taps: layers.cuh).
template <int V>
__device__ __forceinline__ void store_taps(uint8_t* p, const int* a) {
  if constexpr (V == 1) {
    p[0] = (uint8_t)a[0];
  } else if constexpr (V == 4) {
    *reinterpret_cast<uint32_t*>(p) = (uint32_t)a[0] | ((uint32_t)a[1] << 8) | ((uint32_t)a[2] << 16) | ((uint32_t)a[3] << 24);
  } else {
    static_assert(V == 8, "taps come in vectors of 1, 4 or 8");
    uint2 w;
    w.x = (uint32_t)a[0] | ((uint32_t)a[1] << 8) | ((uint32_t)a[2] << 16) | ((uint32_t)a[3] << 24);
    w.y = (uint32_t)a[4] | ((uint32_t)a[5] << 8) | ((uint32_t)a[6] << 16) | ((uint32_t)a[7] << 24);
    *reinterpret_cast<uint2*>(p) = w;
  }
}

// BN: the batch norm of p.mean .. p.beta (+ ReLU) applied to every loaded element.
template <class T, int V, bool BN>
__device__ __forceinline__ void maxpool_forward(const PkPoolParams& p) {
  const int cv = p.c / V;
  const int64_t total = (int64_t)p.n * p.oh * p.ow * cv;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.out);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const PoolPos q = pool_pos(e, cv, p.oh, p.ow);
    float mean[V], scale[V], beta[V];
    if constexpr (BN) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int ch = q.j * V + k;
        mean[k] = p.mean[ch];
        scale[k] = p.gamma[ch] * p.invstd[ch];
        beta[k] = p.beta[ch];
      }
    }
    float best[V];
    int arg[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      best[k] = neg_inf();
      arg[k] = -1;
    }
    for (int dh = 0; dh < 3; ++dh) {
      const int ih = 2 * q.y - 1 + dh;
      if (ih < 0 || ih >= p.h) continue;
      for (int dw = 0; dw < 3; ++dw) {
        const int iw = 2 * q.x - 1 + dw;
        if (iw < 0 || iw >= p.w) continue;
        float v[V];
        load_vec<T, V>(x + (((int64_t)q.n * p.h + ih) * p.w + iw) * p.c + (int64_t)q.j * V, v);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          if constexpr (BN) {
            float o = fmaf(v[k] - mean[k], scale[k], beta[k]) + 0.0f;
            if (p.relu) o = relu_f(o);
            v[k] = to_f32(from_f32<T>(o));
          }
          if (arg[k] < 0 || v[k] > best[k] || isnan(v[k])) {
            best[k] = v[k];
            arg[k] = dh * 3 + dw;
          }
        }
      }
    }
    store_vec<T, V>(y + e * V, best);
    if (p.arg) store_taps<V>(p.arg + e * V, arg);
  }
}

// Adds window (wy, wx)'s gradient g to the cell's elements (2y + a, 2x + b) that are its
// argmax taps arg: element (2y + a, 2x + b) is tap (2y + a - 2wy + 1, 2x + b - 2wx + 1).
template <int V>
__device__ __forceinline__ void maxpool_cell_add(const PoolPos& q, int wy, int wx, const int* arg, const float* g,
                                                 float (*acc)[V]) {
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int dh = 2 * q.y + a - 2 * wy + 1, dw = 2 * q.x + b - 2 * wx + 1;
      if (dh < 0 || dw < 0) continue;
      const int tap = dh * 3 + dw;
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (arg[k] == tap) acc[2 * a + b][k] += g[k];
    }
  }
}

// Stores the cell's sums (the elements inside the image).
template <class T, int V>
__device__ __forceinline__ void maxpool_cell_store(const PkPoolParams& p, const PoolPos& q, float (*acc)[V]) {
  T* dx = static_cast<T*>(p.out);
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int ih = 2 * q.y + a;
    if (ih >= p.h) continue;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int iw = 2 * q.x + b;
      if (iw >= p.w) continue;
      T* dst = dx + (((int64_t)q.n * p.h + ih) * p.w + iw) * p.c + (int64_t)q.j * V;
      store_vec<T, V>(dst, acc[2 * a + b]);
    }
  }
}

// ARG: the windows' argmax taps are read from p.arg; else recomputed from p.x.
template <class T, int V, bool ARG>
__device__ __forceinline__ void maxpool_backward(const PkPoolParams& p) {
  const int cv = p.c / V;
  const int64_t total = (int64_t)p.n * p.oh * p.ow * cv;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const PoolPos q = pool_pos(e, cv, p.oh, p.ow);
    float acc[4][V];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int k = 0; k < V; ++k) acc[a][k] = 0.0f;
    for (int wy = q.y; wy <= q.y + 1 && wy < p.oh; ++wy) {
      for (int wx = q.x; wx <= q.x + 1 && wx < p.ow; ++wx) {
        const int64_t w_off = (((int64_t)q.n * p.oh + wy) * p.ow + wx) * p.c + (int64_t)q.j * V;
        int arg[V];
        if constexpr (ARG) {
          load_taps<V>(p.arg + w_off, arg);
        } else {
          // Argmax of window (wy, wx), as a tap index dh * 3 + dw.
          const T* xn = x + (int64_t)q.n * p.h * p.w * p.c + (int64_t)q.j * V;
          float best[V];
#pragma unroll
          for (int k = 0; k < V; ++k) {
            best[k] = neg_inf();
            arg[k] = -1;
          }
          for (int dh = 0; dh < 3; ++dh) {
            const int ih = 2 * wy - 1 + dh;
            if (ih < 0 || ih >= p.h) continue;
            for (int dw = 0; dw < 3; ++dw) {
              const int iw = 2 * wx - 1 + dw;
              if (iw < 0 || iw >= p.w) continue;
              float v[V];
              load_vec<T, V>(xn + ((int64_t)ih * p.w + iw) * p.c, v);
#pragma unroll
              for (int k = 0; k < V; ++k) {
                if (arg[k] < 0 || v[k] > best[k] || isnan(v[k])) {
                  best[k] = v[k];
                  arg[k] = dh * 3 + dw;
                }
              }
            }
          }
        }
        float g[V];
        load_vec<T, V>(dy + w_off, g);
        maxpool_cell_add<V>(q, wy, wx, arg, g, acc);
      }
    }
    maxpool_cell_store<T, V>(p, q, acc);
  }
}

// Global average pool: p.h is h * w, p.w is 1; one thread per (image, channel vector)
// sums the rows in order.
template <class T, int V>
__device__ __forceinline__ void avgpool_forward(const PkPoolParams& p) {
  const int cv = p.c / V;
  const int64_t total = (int64_t)p.n * cv;
  const T* x = static_cast<const T*>(p.x);
  float* y = static_cast<float*>(p.out);
  const float hw = (float)p.h;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = e / cv, j = e % cv;
    float s[V];
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = 0.0f;
    const T* src = x + n * p.h * p.c + j * V;
    for (int i = 0; i < p.h; ++i) {
      float v[V];
      load_vec<T, V>(src + (int64_t)i * p.c, v);
#pragma unroll
      for (int k = 0; k < V; ++k) s[k] += v[k];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) y[e * V + k] = s[k] / hw;
  }
}

template <class T, int V>
__device__ __forceinline__ void avgpool_backward(const PkPoolParams& p) {
  const int cv = p.c / V;
  const int64_t total = (int64_t)p.n * p.h * cv;
  const float* dy = static_cast<const float*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  const float hw = (float)p.h;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = e % cv, n = e / cv / p.h;
    float g[V];
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = dy[(n * cv + j) * V + k] / hw;
    store_vec<T, V>(dx + e * V, g);
  }
}

// The vector width of a launch: 16 bytes when p.vec > 1, else one element.
template <class T, bool BN>
__device__ __forceinline__ void maxpool_forward_any(const PkPoolParams& p) {
  if (p.vec > 1)
    maxpool_forward<T, VecWidth<T>::value, BN>(p);
  else
    maxpool_forward<T, 1, BN>(p);
}
template <class T, bool ARG>
__device__ __forceinline__ void maxpool_backward_any(const PkPoolParams& p) {
  if (p.vec > 1)
    maxpool_backward<T, VecWidth<T>::value, ARG>(p);
  else
    maxpool_backward<T, 1, ARG>(p);
}
template <class T>
__device__ __forceinline__ void avgpool_forward_any(const PkPoolParams& p) {
  if (p.vec > 1)
    avgpool_forward<T, VecWidth<T>::value>(p);
  else
    avgpool_forward<T, 1>(p);
}
template <class T>
__device__ __forceinline__ void avgpool_backward_any(const PkPoolParams& p) {
  if (p.vec > 1)
    avgpool_backward<T, VecWidth<T>::value>(p);
  else
    avgpool_backward<T, 1>(p);
}

// At least 4 blocks of 256 threads per SM (64 registers); 2 for the max pool backward
// from x, which holds the gradients of a 2x2 input cell and a window's argmax per channel,
// and for the forward with the BN, which holds three per-channel constants per element.
#define POOL_THREADS 256
#define POOL_ENTRIES(T, NAME)                                                                                          \
  PK_KERNEL_BOUNDS(maxpool_forward_##NAME, PkPoolParams, POOL_THREADS, 4) { maxpool_forward_any<T, false>(p); }        \
  PK_KERNEL_BOUNDS(maxpool_forward_bn_##NAME, PkPoolParams, POOL_THREADS, 2) { maxpool_forward_any<T, true>(p); }      \
  PK_KERNEL_BOUNDS(maxpool_backward_##NAME, PkPoolParams, POOL_THREADS, 2) { maxpool_backward_any<T, false>(p); }      \
  PK_KERNEL_BOUNDS(maxpool_backward_arg_##NAME, PkPoolParams, POOL_THREADS, 4) { maxpool_backward_any<T, true>(p); }   \
  PK_KERNEL_BOUNDS(avgpool_forward_##NAME, PkPoolParams, POOL_THREADS, 4) { avgpool_forward_any<T>(p); }               \
  PK_KERNEL_BOUNDS(avgpool_backward_##NAME, PkPoolParams, POOL_THREADS, 4) { avgpool_backward_any<T>(p); }

POOL_ENTRIES(float, f32)
POOL_ENTRIES(bf16, bf16)
