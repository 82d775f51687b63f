// Pooling on NHWC activations: max pool 3x3 stride 2 padding 1 (ResNet's stem) and the
// global average pool before the classifier, forward and backward. CPU versions:
// src/cpu/layers/pool.rs; wrappers: src/ops/layers/pool.rs.
//
// Max pool follows PyTorch: padding is -inf (out-of-range taps are skipped), and the
// maximum of a window is updated by every element that is greater or NaN, starting from
// the first in-range tap in row-major order. The backward sends each output's gradient to
// that element. It is a gather, not a scatter: the thread of output (oh, ow) owns the
// input cell rows {2oh, 2oh+1} x cols {2ow, 2ow+1}, which only the windows (oh or oh+1,
// ow or ow+1) reach; it recomputes their argmax and sums their gradients in row-major
// window order (PyTorch's order), writing every input element exactly once.
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

template <class T, int V>
__device__ __forceinline__ void maxpool_forward(const PkPoolParams& p) {
  const int cv = p.c / V;
  const int64_t total = (int64_t)p.n * p.oh * p.ow * cv;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.out);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const PoolPos q = pool_pos(e, cv, p.oh, p.ow);
    float best[V];
#pragma unroll
    for (int k = 0; k < V; ++k) best[k] = neg_inf();
    for (int dh = 0; dh < 3; ++dh) {
      const int ih = 2 * q.y - 1 + dh;
      if (ih < 0 || ih >= p.h) continue;
      for (int dw = 0; dw < 3; ++dw) {
        const int iw = 2 * q.x - 1 + dw;
        if (iw < 0 || iw >= p.w) continue;
        float v[V];
        load_vec<T, V>(x + (((int64_t)q.n * p.h + ih) * p.w + iw) * p.c + (int64_t)q.j * V, v);
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (v[k] > best[k] || isnan(v[k])) best[k] = v[k];
      }
    }
    store_vec<T, V>(y + e * V, best);
  }
}

template <class T, int V>
__device__ __forceinline__ void maxpool_backward(const PkPoolParams& p) {
  const int cv = p.c / V;
  const int64_t total = (int64_t)p.n * p.oh * p.ow * cv;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const PoolPos q = pool_pos(e, cv, p.oh, p.ow);
    const T* xn = x + (int64_t)q.n * p.h * p.w * p.c + (int64_t)q.j * V;
    float acc[4][V];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int k = 0; k < V; ++k) acc[a][k] = 0.0f;
    for (int wy = q.y; wy <= q.y + 1 && wy < p.oh; ++wy) {
      for (int wx = q.x; wx <= q.x + 1 && wx < p.ow; ++wx) {
        // Argmax of window (wy, wx), as a tap index dh * 3 + dw.
        float best[V];
        int arg[V];
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
        float g[V];
        load_vec<T, V>(dy + ((((int64_t)q.n * p.oh + wy) * p.ow + wx) * cv + q.j) * V, g);
        // The cell's element (2y + a, 2x + b) is tap (2y + a - 2wy + 1, 2x + b - 2wx + 1).
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
    }
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

// At least 4 blocks of 256 threads per SM (64 registers); 2 for the max pool backward,
// which holds the gradients of a 2x2 input cell and a window's argmax per channel.
#define POOL_THREADS 256
#define POOL_ENTRY(OP, T, NAME, MIN_BLOCKS)                                   \
  PK_KERNEL_BOUNDS(OP##_##NAME, PkPoolParams, POOL_THREADS, MIN_BLOCKS) {    \
    if (p.vec > 1)                                                            \
      OP<T, VecWidth<T>::value>(p);                                           \
    else                                                                      \
      OP<T, 1>(p);                                                            \
  }
#define POOL_ENTRIES(T, NAME)                 \
  POOL_ENTRY(maxpool_forward, T, NAME, 4)     \
  POOL_ENTRY(maxpool_backward, T, NAME, 2)    \
  POOL_ENTRY(avgpool_forward, T, NAME, 4)     \
  POOL_ENTRY(avgpool_backward, T, NAME, 4)

POOL_ENTRIES(float, f32)
POOL_ENTRIES(bf16, bf16)
