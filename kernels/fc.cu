// The fully connected layer as GEMMs on f32: a 64x64 tile per block through shared
// memory, 16 threads x 16 threads each computing 4x4 outputs, K in steps of 16, with
// arbitrary strides on both operands (so one kernel serves y = x w^T + b, dx = dy w and
// dw = dy^T x); tiles load along whichever operand dimension is contiguous. Every output
// is a sequential fma chain over k. CPU version: src/cpu/layers/fc.rs; wrapper:
// src/ops/layers/fc.rs.
#include "layers.cuh"

#define FC_PAD 4

PK_KERNEL_BOUNDS(fc_gemm_f32, PkFcParams, PK_FC_THREADS, 1) {
  __shared__ __align__(16) float As[PK_FC_TILE_K][PK_FC_TILE + FC_PAD];
  __shared__ __align__(16) float Bs[PK_FC_TILE_K][PK_FC_TILE + FC_PAD];
  const int tid = (int)threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int m0 = (int)blockIdx.y * PK_FC_TILE, n0 = (int)blockIdx.x * PK_FC_TILE;
  const bool a_k_fast = p.a_sk == 1, b_j_fast = p.b_sj == 1;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int k0 = 0; k0 < p.k; k0 += PK_FC_TILE_K) {
#pragma unroll
    for (int q = 0; q < PK_FC_TILE * PK_FC_TILE_K / PK_FC_THREADS; ++q) {
      const int e = tid + q * PK_FC_THREADS;
      int i, kk;
      if (a_k_fast) {
        kk = e % PK_FC_TILE_K;
        i = e / PK_FC_TILE_K;
      } else {
        i = e % PK_FC_TILE;
        kk = e / PK_FC_TILE;
      }
      int gi = m0 + i, gk = k0 + kk;
      As[kk][i] = (gi < p.m && gk < p.k) ? p.a[(int64_t)gi * p.a_si + (int64_t)gk * p.a_sk] : 0.0f;
      int j;
      if (b_j_fast) {
        j = e % PK_FC_TILE;
        kk = e / PK_FC_TILE;
      } else {
        kk = e % PK_FC_TILE_K;
        j = e / PK_FC_TILE_K;
      }
      const int gj = n0 + j;
      gk = k0 + kk;
      Bs[kk][j] = (gj < p.n && gk < p.k) ? p.b[(int64_t)gk * p.b_sk + (int64_t)gj * p.b_sj] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < PK_FC_TILE_K; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gi = m0 + ty * 4 + i;
    if (gi >= p.m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gj = n0 + tx * 4 + j;
      if (gj < p.n) p.c[(int64_t)gi * p.n + gj] = acc[i][j] + (p.bias ? p.bias[gj] : 0.0f);
    }
  }
}

// c[j] = sum over i < m of a[i * n + j], in order (the bias gradient: column sums of dy).
PK_KERNEL(fc_bias_grad_f32, PkFcParams) {
  const int j = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= p.n) return;
  float s = 0.0f;
  for (int i = 0; i < p.m; ++i) s += p.a[(int64_t)i * p.n + j];
  p.c[j] = s;
}
