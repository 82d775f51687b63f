// Batch normalization over [m, c] activations (c fastest), forward (train and eval) and
// backward, with an optional fused ReLU. CPU versions: src/cpu/layers/bn.rs; wrappers:
// src/ops/layers/bn.rs.
//
// Train forward, three launches:
//   bn_stats_<T>           per (channel vector, row chunk): Welford over the chunk's rows
//                          in each thread, Chan merges over the block's rows; one
//                          (mean, M2) per channel and chunk
//   bn_stats_finalize_f32  per channel, one block: Chan merges over the chunks in a fixed
//                          order; save_mean, save_invstd, running statistics
//   bn_apply_<T>           y = (x - mean) * (gamma * invstd) + beta (+ residual), then
//                          the ReLU
// Fused with the convolution (src/ops/fused.rs): conv2d_fprop_* with bn_stats writes the
// per-row-tile (mean, M2) of its output in its epilogue (conv.cu), in the layout that
// bn_stats_<T> uses, so the train forward is the conv, bn_stats_finalize_f32 and
// bn_apply_<T> (which also adds a bottleneck's residual before the ReLU): the conv output
// is read once instead of twice, and the block's last BN, residual add and ReLU are one pass.
// Eval forward: bn_apply_<T> alone, from the running statistics.
// Backward, three launches:
//   bn_backward_reduce_<T>   per (channel vector, row chunk): sums of g and g * (x - mean),
//                            g = dy masked by the fused ReLU's output, read (relu_out) or,
//                            in the _relu_ variants, recomputed from x as bn_apply computed it
//   bn_backward_finalize_f32 per channel, one block: dbeta = sum g,
//                            dgamma = invstd * sum g (x - mean)
//   bn_backward_dx_<T>       dx = gamma invstd (g - dbeta / m - (x - mean) invstd dgamma / m)
// With grad_out (= dy), the reduce also stores g over dy, in the thread that read it (a
// bottleneck's output gradient through its last ReLU, which the shortcut needs too), and the
// dx pass reads g unmasked: the separate relu_backward pass is gone (src/ops/layers/bn.rs, bn_backward_masking_dy).
// The _maxpool variants (the stem: BN + ReLU + max pool) gather g from the max pool's
// backward as they load: the pool's input gradient at each element is the sum of the
// output gradients of the windows whose argmax tap is that element, in row-major window
// order, rounded to T, exactly as maxpool_backward_arg stores it (pool.cu), so the pool's
// input gradient is never written or read.
// A downsample block's bn3 and shortcut BN (same [m, c], outputs summed): bn_apply_bnres_<T>
// normalizes the residual with the second BN (rounded to T, as its own apply stores it)
// before the add, and the _pair backward variants take both BNs' sums and dx from one read
// of dy per pass (the second BN's partials in dx2's bytes).
// Fused with the convolution (src/ops/fused.rs, conv2d_dgrad_bn_sums): a dgrad whose output
// is g takes the reduce's sums per row tile in its epilogue (conv.cu), so the backward is
// that dgrad, bn_backward_finalize_f32 over its tiles, and bn_backward_dx_<T>.
// Every reduction is in a fixed order: results do not depend on scheduling. The
// per-chunk partials are parked in the bytes of y (dx), which the last launch overwrites,
// so a training step allocates nothing; with one chunk they go to the [c] outputs.
#include "layers.cuh"

#define BN_MAX_THREADS 256

// The thread's channel vector and row range on the per-channel grid.
struct BnPlace {
  int j;       // channel vector
  bool active; // j < c / V
  int64_t r0;  // first row of the thread
  int64_t r1;  // end of the chunk
  int step;    // blockDim.y
};

template <int V>
__device__ __forceinline__ BnPlace bn_place(const PkBnParams& p) {
  BnPlace b;
  b.j = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  b.active = b.j < p.c / V;
  const int64_t c0 = (int64_t)blockIdx.y * p.rows_per_chunk;
  b.r0 = c0 + threadIdx.y;
  b.r1 = min64(p.m, c0 + p.rows_per_chunk);
  b.step = (int)blockDim.y;
  return b;
}

// Partial statistics of (channel ch, chunk b) when chunks > 1.
__device__ __forceinline__ float2* bn_partials(const PkBnParams& p) { return static_cast<float2*>(p.out); }

// ---------------------------------------------------------------- statistics
template <class T, int V>
__device__ __forceinline__ void bn_stats(const PkBnParams& p) {
  __shared__ float s_n[BN_MAX_THREADS];
  __shared__ float s_mean[BN_MAX_THREADS * V];
  __shared__ float s_m2[BN_MAX_THREADS * V];
  const BnPlace pl = bn_place<V>(p);
  const T* x = static_cast<const T*>(p.x);
  float n = 0.0f, mean[V], m2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) mean[k] = m2[k] = 0.0f;
  if (pl.active) {
    const T* col = x + (int64_t)pl.j * V;
#pragma unroll 2
    for (int64_t r = pl.r0; r < pl.r1; r += pl.step) {
      float v[V];
      load_vec<T, V>(col + r * p.c, v);
      n += 1.0f;
      const float inv = __frcp_rn(n);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = v[k] - mean[k];
        mean[k] = fmaf(d, inv, mean[k]);
        m2[k] = fmaf(d, v[k] - mean[k], m2[k]);
      }
    }
  }
  // Tree over the block's rows: at stride s, row ty < s absorbs row ty + s.
  const int tx = (int)threadIdx.x, ty = (int)threadIdx.y, bx = (int)blockDim.x;
  const int slot = ty * bx + tx;
  s_n[slot] = n;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_mean[slot * V + k] = mean[k];
    s_m2[slot * V + k] = m2[k];
  }
  for (int s = (int)blockDim.y / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
      const int o = (ty + s) * bx + tx;
      const float nb = s_n[o];
      if (nb > 0.0f) {
        const float nt = n + nb, wb = nb / nt, wab = n * wb;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = s_mean[o * V + k] - mean[k];
          mean[k] = fmaf(d, wb, mean[k]);
          m2[k] = m2[k] + s_m2[o * V + k] + d * d * wab;
        }
        n = nt;
      }
      s_n[slot] = n;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        s_mean[slot * V + k] = mean[k];
        s_m2[slot * V + k] = m2[k];
      }
    }
  }
  if (ty == 0 && pl.active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int ch = pl.j * V + k;
      if (p.chunks == 1) {
        p.mean[ch] = mean[k];
        p.invstd[ch] = m2[k];
      } else {
        bn_partials(p)[(int64_t)ch * p.chunks + blockIdx.y] = make_float2(mean[k], m2[k]);
      }
    }
  }
}

// Rows of chunk b.
__device__ __forceinline__ float bn_chunk_rows(const PkBnParams& p, int b) {
  const int64_t r0 = (int64_t)b * p.rows_per_chunk;
  return (float)min64(p.rows_per_chunk, p.m - r0);
}

// The finalize kernels: one block of BN_FINALIZE_THREADS per channel. Thread t takes
// chunks t, t + T, t + 2T, ... in order, loading BN_FINALIZE_BATCH of them before it merges
// them (so that many loads are in flight: with tens of thousands of chunks a loop of one
// load per merge waits out the memory latency at each step); then a tree over the lanes
// of each warp (lane l absorbs lane l + o) and over the warps (warp w absorbs w + o). The
// order is fixed: results do not depend on scheduling.
#define BN_FINALIZE_THREADS 256
#define BN_FINALIZE_BATCH 8

// Merges of (n, mean, M2) triples: Chan's update.
struct BnMoments {
  float n, mean, m2;
  __device__ __forceinline__ void absorb(float nb, float mb, float m2b) { chan_merge(n, mean, m2, nb, mb, m2b); }
  __device__ __forceinline__ void absorb(const BnMoments& o) { chan_merge(n, mean, m2, o.n, o.mean, o.m2); }
  __device__ __forceinline__ BnMoments shfl_down(int o) const {
    return {__shfl_down_sync(0xffffffffu, n, o), __shfl_down_sync(0xffffffffu, mean, o),
            __shfl_down_sync(0xffffffffu, m2, o)};
  }
};

// Sums of (g, g * (x - mean)) pairs.
struct BnSums {
  float sg, sgx;
  __device__ __forceinline__ void absorb(const BnSums& o) {
    sg += o.sg;
    sgx += o.sgx;
  }
  __device__ __forceinline__ BnSums shfl_down(int o) const {
    return {__shfl_down_sync(0xffffffffu, sg, o), __shfl_down_sync(0xffffffffu, sgx, o)};
  }
};

// The block's tree over its threads' partials; the result in thread 0.
template <class A>
__device__ __forceinline__ A bn_block_tree(A a) {
  __shared__ A s_warp[BN_FINALIZE_THREADS / 32];
  const int lane = (int)(threadIdx.x % 32), warp = (int)(threadIdx.x / 32);
  for (int o = 16; o > 0; o >>= 1) {
    const A b = a.shfl_down(o);
    if (lane < o) a.absorb(b);
  }
  if (lane == 0) s_warp[warp] = a;
  __syncthreads();
  if (warp == 0) {
    const int warps = (int)(blockDim.x / 32);
    a = lane < warps ? s_warp[lane] : A{};
    for (int o = 16; o > 0; o >>= 1) {
      const A b = a.shfl_down(o);
      if (lane < o && lane + o < warps) a.absorb(b);
    }
  }
  return a;
}

// Calls merge(b, partial) for the chunks b = t, t + T, t + 2T, ... of channel ch in order,
// after loading BN_FINALIZE_BATCH of them.
template <class F>
__device__ __forceinline__ void bn_finalize_chunks(const PkBnParams& p, int ch, F merge) {
  const float2* part = bn_partials(p) + (int64_t)ch * p.chunks;
  const int nt = (int)blockDim.x;
  for (int b0 = (int)threadIdx.x; b0 < p.chunks; b0 += BN_FINALIZE_BATCH * nt) {
    float2 v[BN_FINALIZE_BATCH];
#pragma unroll
    for (int i = 0; i < BN_FINALIZE_BATCH; ++i) {
      const int b = b0 + i * nt;
      v[i] = b < p.chunks ? part[b] : make_float2(0.0f, 0.0f);
    }
#pragma unroll
    for (int i = 0; i < BN_FINALIZE_BATCH; ++i)
      if (b0 + i * nt < p.chunks) merge(b0 + i * nt, v[i]);
  }
}

PK_KERNEL(bn_stats_finalize_f32, PkBnParams) {
  const int ch = (int)blockIdx.x, t = (int)threadIdx.x;
  BnMoments a{0.0f, 0.0f, 0.0f};
  if (p.chunks == 1) {
    if (t == 0) a = {(float)p.m, p.mean[ch], p.invstd[ch]};
  } else {
    bn_finalize_chunks(p, ch, [&](int b, float2 v) { a.absorb(bn_chunk_rows(p, b), v.x, v.y); });
  }
  a = bn_block_tree(a);
  if (t == 0) {
    const float mf = (float)p.m;
    const float var = fmaxf(a.m2 / mf, 0.0f);
    const float unbiased = fmaxf(a.m2 / (mf - 1.0f), 0.0f);
    p.mean[ch] = a.mean;
    p.invstd[ch] = 1.0f / sqrtf(var + p.eps);
    p.running_mean[ch] = (1.0f - p.momentum) * p.running_mean[ch] + p.momentum * a.mean;
    p.running_var[ch] = (1.0f - p.momentum) * p.running_var[ch] + p.momentum * unbiased;
  }
}

// ---------------------------------------------------------------- normalization
// relu_bits: also the ReLU's decisions, a bit per element (flat index).
// BNRES: the residual goes through the second batch norm first (mean2, gamma2 * invstd2,
// beta2, no ReLU), rounded to T: exactly what bn_apply without a residual stores for it,
// so the sum is bitwise that of the two applies, without the residual's BN output being
// written and read.
template <class T, int V, bool BNRES>
__device__ __forceinline__ void bn_apply(const PkBnParams& p) {
  const BnPlace pl = bn_place<V>(p);
  if (!pl.active) return;  // no barriers below
  float mean[V], scale[V], beta[V], mean2[BNRES ? V : 1], scale2[BNRES ? V : 1], beta2[BNRES ? V : 1];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int ch = pl.j * V + k;
    const float is = p.eval ? 1.0f / sqrtf(p.invstd[ch] + p.eps) : p.invstd[ch];
    mean[k] = p.mean[ch];
    scale[k] = p.gamma[ch] * is;
    beta[k] = p.beta[ch];
    if constexpr (BNRES) {
      const float is2 = p.eval ? 1.0f / sqrtf(p.invstd2[ch] + p.eps) : p.invstd2[ch];
      mean2[k] = p.mean2[ch];
      scale2[k] = p.gamma2[ch] * is2;
      beta2[k] = p.beta2[ch];
    }
  }
  const T* x = static_cast<const T*>(p.x) + (int64_t)pl.j * V;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + (int64_t)pl.j * V : nullptr;
  T* y = static_cast<T*>(p.out) + (int64_t)pl.j * V;
#pragma unroll 2
  for (int64_t r = pl.r0; r < pl.r1; r += pl.step) {
    float v[V], a[V];
    load_vec<T, V>(x + r * p.c, v);
    if (BNRES || res) {
      load_vec<T, V>(res + r * p.c, a);
      if constexpr (BNRES) {
#pragma unroll
        for (int k = 0; k < V; ++k) a[k] = to_f32(from_f32<T>(fmaf(a[k] - mean2[k], scale2[k], beta2[k]) + 0.0f));
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = fmaf(v[k] - mean[k], scale[k], beta[k]) + a[k];
      if (p.relu) v[k] = relu_f(v[k]);
    }
    store_vec<T, V>(y + r * p.c, v);
    if (p.relu_bits) {
      // The ReLU's decisions on the stored values, bit i of the flat index i: a whole byte
      // per 8-element vector; narrower vectors share bytes, so they OR their bits into
      // the (zeroed) 32-bit words.
      unsigned bits = 0;
#pragma unroll
      for (int k = 0; k < V; ++k) bits |= (to_f32(from_f32<T>(v[k])) > 0.0f ? 1u : 0u) << k;
      const int64_t i = r * p.c + (int64_t)pl.j * V;
      if constexpr (V == 8)
        p.relu_bits[i >> 3] = (uint8_t)bits;
      else
        atomicOr(reinterpret_cast<unsigned*>(p.relu_bits) + (i >> 5), bits << (i & 31));
    }
  }
}

// ---------------------------------------------------------------- backward
// The per-channel constants of the forward's apply: mean, gamma * invstd, and beta where
// the backward recomputes the ReLU's output from x (RECOMPUTE; else 0, unused).
template <int V, bool RECOMPUTE>
__device__ __forceinline__ void bn_apply_consts(const PkBnParams& p, int j, float* mean, float* scale, float* beta) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int ch = j * V + k;
    mean[k] = p.mean[ch];
    scale[k] = p.gamma[ch] * p.invstd[ch];
    beta[k] = RECOMPUTE ? p.beta[ch] : 0.0f;
  }
}

// The max pool input position (image, row, column) of a BN row in the _maxpool variants,
// followed along a thread's rows without a division per row.
struct PoolRow {
  int64_t img;
  int ih, iw;
};

template <bool POOL>
__device__ __forceinline__ PoolRow pool_row(const PkBnParams& p, int64_t r) {
  PoolRow q{0, 0, 0};
  if constexpr (POOL) {
    const int64_t hw = (int64_t)p.pool_h * p.pool_w;
    q.img = r / hw;
    const int64_t rem = r - q.img * hw;
    q.ih = (int)(rem / p.pool_w);
    q.iw = (int)(rem - (int64_t)q.ih * p.pool_w);
  }
  return q;
}

template <bool POOL>
__device__ __forceinline__ void pool_row_advance(const PkBnParams& p, PoolRow& q, int step) {
  if constexpr (POOL) {
    q.iw += step;
    while (q.iw >= p.pool_w) {
      q.iw -= p.pool_w;
      if (++q.ih == p.pool_h) {
        q.ih = 0;
        ++q.img;
      }
    }
  }
}

// The max pool's input gradient at q, channel vector j: window (wy, wx) reaches row ih iff
// 2 wy - 1 <= ih <= 2 wy + 1, i.e. wy in [ih / 2, (ih + 1) / 2]; its tap of (ih, iw) is
// (ih - 2 wy + 1) * 3 + (iw - 2 wx + 1).
template <class T, int V>
__device__ __forceinline__ void maxpool_grad_at(const PkBnParams& p, const PoolRow& q, int j, float* g) {
  const int oh = (p.pool_h - 1) / 2 + 1, ow = (p.pool_w - 1) / 2 + 1;
  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0.0f;
  const int wy1 = min((q.ih + 1) / 2, oh - 1), wx1 = min((q.iw + 1) / 2, ow - 1);
  for (int wy = q.ih / 2; wy <= wy1; ++wy) {
    for (int wx = q.iw / 2; wx <= wx1; ++wx) {
      const int64_t w_off = ((q.img * oh + wy) * ow + wx) * p.c + (int64_t)j * V;
      const int tap = (q.ih - 2 * wy + 1) * 3 + (q.iw - 2 * wx + 1);
      int arg[V];
      float d[V];
      load_taps<V>(p.pool_taps + w_off, arg);
      load_vec<T, V>(static_cast<const T*>(p.dy) + w_off, d);
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (arg[k] == tap) acc[k] += d[k];
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = to_f32(from_f32<T>(acc[k]));
}

// g = dy masked by the fused ReLU: by its stored output (p.relu_out), or (RECOMPUTE) by
// that output recomputed from x (v) exactly as bn_apply computed it (the same operations,
// the ReLU, the rounding to T), which saves reading an [m, c] tensor twice. POOL: dy is
// the max pool's input gradient at q, gathered (maxpool_grad_at).
template <class T, int V, bool RECOMPUTE, bool POOL>
__device__ __forceinline__ void bn_load_grad(const PkBnParams& p, int64_t off, const PoolRow& q, int j,
                                             const float* v, const float* mean, const float* scale,
                                             const float* beta, float* g) {
  if constexpr (POOL)
    maxpool_grad_at<T, V>(p, q, j, g);
  else
    load_vec<T, V>(static_cast<const T*>(p.dy) + off, g);
  if (RECOMPUTE) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float o = to_f32(from_f32<T>(relu_f(fmaf(v[k] - mean[k], scale[k], beta[k]) + 0.0f)));
      g[k] = relu_grad(o, g[k]);
    }
  } else if (p.relu_out) {
    float o[V];
    load_vec<T, V>(static_cast<const T*>(p.relu_out) + off, o);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = relu_grad(o[k], g[k]);
  }
}

// PAIR: a second batch norm of the same dy (unmasked), input x2: its sum of g is the first
// one's (the same values in the same order), its sum of g (x2 - mean2) is taken beside,
// and its partials go to dx2's bytes (or dbeta2, dgamma2): bitwise a reduction of its own.
template <class T, int V, bool RECOMPUTE, bool POOL, bool PAIR>
__device__ __forceinline__ void bn_backward_reduce(const PkBnParams& p) {
  constexpr int V2 = PAIR ? V : 1;
  __shared__ float s_g[BN_MAX_THREADS * V];
  __shared__ float s_gx[BN_MAX_THREADS * V];
  __shared__ float s_gx2[BN_MAX_THREADS * V2];
  const BnPlace pl = bn_place<V>(p);
  float sg[V], sgx[V], mean[V], scale[V], beta[V], sgx2[V2], mean2[V2];
#pragma unroll
  for (int k = 0; k < V; ++k) sg[k] = sgx[k] = 0.0f;
#pragma unroll
  for (int k = 0; k < V2; ++k) sgx2[k] = mean2[k] = 0.0f;
  if (pl.active) {
    bn_apply_consts<V, RECOMPUTE>(p, pl.j, mean, scale, beta);
    if constexpr (PAIR) {
#pragma unroll
      for (int k = 0; k < V; ++k) mean2[k] = p.mean2[pl.j * V + k];
    }
    const T* x = static_cast<const T*>(p.x);
    PoolRow q = pool_row<POOL>(p, pl.r0);
#pragma unroll 2
    for (int64_t r = pl.r0; r < pl.r1; r += pl.step, pool_row_advance<POOL>(p, q, pl.step)) {
#ifdef PK_FAULT_BN_DROP_ROW
      // A planted bug, compiled only into an emulation-only test module: the reduction
      // drops the last row.
      if (r == p.m - 1) continue;
#endif
      const int64_t off = r * p.c + (int64_t)pl.j * V;
      float v[V], g[V];
      load_vec<T, V>(x + off, v);
      bn_load_grad<T, V, RECOMPUTE, POOL>(p, off, q, pl.j, v, mean, scale, beta, g);
      if (p.grad_out) store_vec<T, V>(static_cast<T*>(p.grad_out) + off, g);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sg[k] += g[k];
        sgx[k] = fmaf(g[k], v[k] - mean[k], sgx[k]);
      }
      if constexpr (PAIR) {
        load_vec<T, V>(static_cast<const T*>(p.x2) + off, v);
#pragma unroll
        for (int k = 0; k < V; ++k) sgx2[k] = fmaf(g[k], v[k] - mean2[k], sgx2[k]);
      }
    }
  }
  const int tx = (int)threadIdx.x, ty = (int)threadIdx.y, bx = (int)blockDim.x;
  const int slot = ty * bx + tx;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_g[slot * V + k] = sg[k];
    s_gx[slot * V + k] = sgx[k];
    if constexpr (PAIR) s_gx2[slot * V + k] = sgx2[k];
  }
  for (int s = (int)blockDim.y / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
      const int o = (ty + s) * bx + tx;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sg[k] += s_g[o * V + k];
        sgx[k] += s_gx[o * V + k];
        s_g[slot * V + k] = sg[k];
        s_gx[slot * V + k] = sgx[k];
        if constexpr (PAIR) {
          sgx2[k] += s_gx2[o * V + k];
          s_gx2[slot * V + k] = sgx2[k];
        }
      }
    }
  }
  if (ty == 0 && pl.active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int ch = pl.j * V + k;
      if (p.chunks == 1) {
        p.dbeta[ch] = sg[k];
        p.dgamma[ch] = sgx[k];
        if constexpr (PAIR) {
          p.dbeta2[ch] = sg[k];
          p.dgamma2[ch] = sgx2[k];
        }
      } else {
        const int64_t at = (int64_t)ch * p.chunks + blockIdx.y;
        bn_partials(p)[at] = make_float2(sg[k], sgx[k]);
        if constexpr (PAIR) static_cast<float2*>(p.out2)[at] = make_float2(sg[k], sgx2[k]);
      }
    }
  }
}

// The finalize of the backward's sums (see bn_stats_finalize_f32 for the order).
PK_KERNEL(bn_backward_finalize_f32, PkBnParams) {
  const int ch = (int)blockIdx.x, t = (int)threadIdx.x;
  BnSums a{0.0f, 0.0f};
  if (p.chunks == 1) {
    if (t == 0) a = {p.dbeta[ch], p.dgamma[ch]};
  } else {
    bn_finalize_chunks(p, ch, [&](int, float2 v) { a.absorb({v.x, v.y}); });
  }
  a = bn_block_tree(a);
  if (t == 0) {
    p.dbeta[ch] = a.sg;
    p.dgamma[ch] = a.sgx * p.invstd[ch];
  }
}

// PAIR: also dx2 of the second batch norm (x2, its statistics and gradients) from the same
// g, with the same operations as its own dx pass.
template <class T, int V, bool RECOMPUTE, bool POOL, bool PAIR>
__device__ __forceinline__ void bn_backward_dx(const PkBnParams& p) {
  constexpr int V2 = PAIR ? V : 1;
  const BnPlace pl = bn_place<V>(p);
  if (!pl.active) return;  // no barriers below
  const float inv_m = 1.0f / (float)p.m;
  float mean[V], k1[V], k2[V], k3[V], beta[V], mean2[V2], l1[V2], l2[V2], l3[V2];
  bn_apply_consts<V, RECOMPUTE>(p, pl.j, mean, k1, beta);  // k1 = gamma * invstd
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int ch = pl.j * V + k;
    const float is = p.invstd[ch];
    k2[k] = p.dbeta[ch] * inv_m;         // mean of g
    k3[k] = p.dgamma[ch] * is * inv_m;   // invstd^2 * mean of g (x - mean)
    if constexpr (PAIR) {
      const float is2 = p.invstd2[ch];
      mean2[k] = p.mean2[ch];
      l1[k] = p.gamma2[ch] * is2;
      l2[k] = p.dbeta2[ch] * inv_m;
      l3[k] = p.dgamma2[ch] * is2 * inv_m;
    }
  }
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.out);
  PoolRow q = pool_row<POOL>(p, pl.r0);
#pragma unroll 2
  for (int64_t r = pl.r0; r < pl.r1; r += pl.step, pool_row_advance<POOL>(p, q, pl.step)) {
    const int64_t off = r * p.c + (int64_t)pl.j * V;
    float v[V], g[V];
    load_vec<T, V>(x + off, v);
    bn_load_grad<T, V, RECOMPUTE, POOL>(p, off, q, pl.j, v, mean, k1, beta, g);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = k1[k] * (g[k] - k2[k] - (v[k] - mean[k]) * k3[k]);
    store_vec<T, V>(dx + off, v);
    if constexpr (PAIR) {
      load_vec<T, V>(static_cast<const T*>(p.x2) + off, v);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = l1[k] * (g[k] - l2[k] - (v[k] - mean2[k]) * l3[k]);
      store_vec<T, V>(static_cast<T*>(p.out2) + off, v);
    }
  }
}

// ---------------------------------------------------------------- entry points
// At least 4 blocks of 256 threads per SM (64 registers), 3 for dx (85), which holds four
// per-channel constants per element of its vector.
#define BN_ENTRIES(T, NAME)                                                                      \
  PK_KERNEL_BOUNDS(bn_stats_##NAME, PkBnParams, BN_MAX_THREADS, 4) {                             \
    if (p.vec > 1)                                                                               \
      bn_stats<T, VecWidth<T>::value>(p);                                                        \
    else                                                                                         \
      bn_stats<T, 1>(p);                                                                         \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_apply_##NAME, PkBnParams, BN_MAX_THREADS, 4) {                             \
    if (p.vec > 1)                                                                               \
      bn_apply<T, VecWidth<T>::value, false>(p);                                                 \
    else                                                                                         \
      bn_apply<T, 1, false>(p);                                                                  \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_backward_reduce_##NAME, PkBnParams, BN_MAX_THREADS, 4) {                   \
    if (p.vec > 1)                                                                               \
      bn_backward_reduce<T, VecWidth<T>::value, false, false, false>(p);                         \
    else                                                                                         \
      bn_backward_reduce<T, 1, false, false, false>(p);                                          \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_backward_dx_##NAME, PkBnParams, BN_MAX_THREADS, 3) {                       \
    if (p.vec > 1)                                                                               \
      bn_backward_dx<T, VecWidth<T>::value, false, false, false>(p);                             \
    else                                                                                         \
      bn_backward_dx<T, 1, false, false, false>(p);                                              \
  }                                                                                              \
  /* Through the BN's own ReLU, its output recomputed from x: three more per-channel */          \
  /* constants per vector element, so 3 blocks per SM (85 registers) for both. */                \
  PK_KERNEL_BOUNDS(bn_backward_reduce_relu_##NAME, PkBnParams, BN_MAX_THREADS, 3) {              \
    if (p.vec > 1)                                                                               \
      bn_backward_reduce<T, VecWidth<T>::value, true, false, false>(p);                          \
    else                                                                                         \
      bn_backward_reduce<T, 1, true, false, false>(p);                                           \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_backward_dx_relu_##NAME, PkBnParams, BN_MAX_THREADS, 3) {                  \
    if (p.vec > 1)                                                                               \
      bn_backward_dx<T, VecWidth<T>::value, true, false, false>(p);                              \
    else                                                                                         \
      bn_backward_dx<T, 1, true, false, false>(p);                                               \
  }                                                                                              \
  /* The same, g gathered from a max pool's backward (the stem): 2 blocks per SM (128 */         \
  /* registers; at 3, 80 registers spill in bf16). */                                            \
  PK_KERNEL_BOUNDS(bn_backward_reduce_relu_maxpool_##NAME, PkBnParams, BN_MAX_THREADS, 2) {      \
    if (p.vec > 1)                                                                               \
      bn_backward_reduce<T, VecWidth<T>::value, true, true, false>(p);                           \
    else                                                                                         \
      bn_backward_reduce<T, 1, true, true, false>(p);                                            \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_backward_dx_relu_maxpool_##NAME, PkBnParams, BN_MAX_THREADS, 2) {          \
    if (p.vec > 1)                                                                               \
      bn_backward_dx<T, VecWidth<T>::value, true, true, false>(p);                               \
    else                                                                                         \
      bn_backward_dx<T, 1, true, true, false>(p);                                                \
  }                                                                                              \
  /* Two batch norms side by side (a downsample block's bn3 and shortcut BN): the */             \
  /* apply with the residual through its BN, and the backward of both from one dy. */            \
  /* Twice the per-channel constants: 3 blocks per SM for the reduce, 2 for the apply */         \
  /* (at 3 its bits spill in bf16) and the dx pass (eight constants per vector element). */      \
  PK_KERNEL_BOUNDS(bn_apply_bnres_##NAME, PkBnParams, BN_MAX_THREADS, 2) {                       \
    if (p.vec > 1)                                                                               \
      bn_apply<T, VecWidth<T>::value, true>(p);                                                  \
    else                                                                                         \
      bn_apply<T, 1, true>(p);                                                                   \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_backward_reduce_pair_##NAME, PkBnParams, BN_MAX_THREADS, 3) {              \
    if (p.vec > 1)                                                                               \
      bn_backward_reduce<T, VecWidth<T>::value, false, false, true>(p);                          \
    else                                                                                         \
      bn_backward_reduce<T, 1, false, false, true>(p);                                           \
  }                                                                                              \
  PK_KERNEL_BOUNDS(bn_backward_dx_pair_##NAME, PkBnParams, BN_MAX_THREADS, 2) {                  \
    if (p.vec > 1)                                                                               \
      bn_backward_dx<T, VecWidth<T>::value, false, false, true>(p);                              \
    else                                                                                         \
      bn_backward_dx<T, 1, false, false, true>(p);                                               \
  }

BN_ENTRIES(float, f32)
BN_ENTRIES(bf16, bf16)
