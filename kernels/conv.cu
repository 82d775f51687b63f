// Implicit-GEMM convolution: fprop, dgrad and wgrad, activations NHWC, weights KRSC
// (CUTLASS's notation). Wrappers: src/ops/conv.rs; CPU oracle and fast path:
// src/cpu/conv.rs.
//
// ---------------------------------------------------------------- the GEMM view
//   fprop  y[M=N*P*Q, N=K]   = A[M, Kg=R*S*C] * B[Kg, K]   A = im2col(x), B[kk, k] = w[k, kk]
//   dgrad  dx[M=N*H*W, N=C]  = A[M, Kg=R*S*K] * B[Kg, C]   A[(n,h,w), (r,s,k)] = dy[n, p, q, k]
//                                                          where h = p*stride - pad + r (else 0),
//                                                          B[(r,s,k), c] = w[k, r, s, c]
//   wgrad  dw[M=K, N=R*S*C]  = A[M, Kg=N*P*Q] * B[Kg, N]   A[k, npq] = dy[npq, k], B = im2col(x)
// Every operand is read straight from the tensors: no im2col buffer, nothing allocated.
// dgrad with stride > 1 runs as stride^2 phase GEMMs (grid.z, see Geo): the pixels of dx
// with (h % stride, w % stride) fixed only meet the filter taps of one residue class, so
// the taps that a stride skips cost no MMA (a stride-2 dgrad would otherwise multiply
// zeros 3/4 of the time).
// The GEMM-K index kk is ordered with the channel innermost ((r, s, c) for fprop, (r, s, k)
// for dgrad), so runs of 8 consecutive kk are 8 consecutive channels in memory.
//
// Each operand has a "natural" contiguous dimension in global memory: the GEMM-K dimension
// for fprop A and B and dgrad A ("K-contiguous"), the M or N dimension for dgrad B and both
// wgrad operands. The tensor-core kernels keep that layout in shared memory and choose
// ldmatrix or ldmatrix.trans to build the mma fragments, so every global load is a
// contiguous run and no operand is transposed through registers.
//
// ---------------------------------------------------------------- tensor-core kernels (bf16)
// mma.sync m16n8k16 (bf16 in, f32 accumulate), fragments through ldmatrix(.trans),
// operands through a STAGES-deep cp.async pipeline (one barrier per k-tile). Tiles:
//   t128x128: BM=128, BN=128, BK=32, 8 warps (2x4, 64x32 per warp: 4x4 mma tiles),
//             4 stages: the large layers (N*P*Q and K or C of 128 and more).
//   t128x64:  BM=128, BN=64, BK=32, 4 warps (2x2, 64x32 per warp), 4 stages: pruned layers,
//             whose GEMM-N (K in fprop, C in dgrad) is 64 or less, with a large M.
//   t64x64:   BM=64, BN=64, BK=32, 4 warps (2x2, 32x32 per warp), 4 stages: small GEMMs
//             (late stages at small batch, wgrad's M = K) where bigger tiles leave SMs idle.
// Vector path (the fast path): 16-byte cp.async of 8 channels when the channel counts are
// multiples of 8 (fprop: C; dgrad and wgrad: C and K). Runs of 8 never straddle a filter
// tap then, and a run is either all in bounds or all padding (zero-filled by cp.async).
// Scalar path (any width, e.g. the stem's C = 3 or widths pruned without rounding): the
// same kernel with element loads into shared memory (t64x64s).
// Shared memory rows are padded by 8 elements (16 bytes): a K-contiguous tile row is
// BK+8 = 40 elements = 80 bytes, an M/N-contiguous row BM+8 = 136 elements = 272 bytes; the
// 8 rows of every ldmatrix phase then fall in 8 distinct 4-bank groups (conflict-free), and
// every row stays 16-byte aligned for cp.async and ldmatrix.
// Index arithmetic stays out of the inner loop: the M rows' (n, h, w) are decoded once per
// block into a shared table; each thread walks its GEMM-K position incrementally (no
// division per k-tile) for K-contiguous operands, and decodes the others with
// multiply-shift divisions (PkFastDiv).
// wgrad (M = K, N = R*S*C, Kg = N*P*Q: thin output, very long reduction) is split along Kg
// (grid.z); each split adds its partial sums into dw with f32 atomics, after the wrapper has
// zeroed dw (no workspace). With one split, dw is stored directly.
// 1x1 convolutions with stride 1 and no padding are plain GEMMs here: the row table and the
// tap walk reduce to offsets, and every load is a contiguous channel run.
//
// ---------------------------------------------------------------- warpgroup kernels (sm_90a)
//   w128x128, w128x64: the three passes on wgmma, see "warpgroup kernel" below.
//   ws128x128, ws128x64: the same with a producer warpgroup on mbarriers, see
//             "warp-specialized warpgroup kernel".
//
// ---------------------------------------------------------------- SIMT kernels (f32)
// The exact path: the same operand loaders (4-byte cp.async per element, any width),
// shared tiles stored [BK][BM] and [BK][BN], and 8x8 outer products per thread in f32
// FMAs. t128x128 (256 threads) for large GEMMs, t64x64 (64 threads) for small ones; BK=8,
// 3 stages.
#include "layers.cuh"

#include <type_traits>

#define PK_FPROP 0
#define PK_DGRAD 1
#define PK_WGRAD 2

// ---------------------------------------------------------------- helpers
#ifdef PK_EMU
__device__ __forceinline__ uint32_t pk_umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
#else
__device__ __forceinline__ uint32_t pk_umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
#endif

// n / d for 0 <= n < 2^31 (see PkFastDiv).
__device__ __forceinline__ int fdiv(int n, const PkFastDiv& d) {
  return d.mul ? (int)(pk_umulhi((uint32_t)n, d.mul) >> d.shr) : n;
}
__device__ __forceinline__ void fdivmod(int n, const PkFastDiv& d, int& q, int& r) {
  q = fdiv(n, d);
  r = n - q * d.d;
}

// Copies VW consecutive elements from global to shared memory, or zeros them (ok false).
// 16 bytes and 4 bytes go through cp.async; 2-byte elements are loaded and stored.
template <class T, int VW>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src, bool ok) {
  if constexpr (VW * sizeof(T) == 16) {
    cp_async_16(dst, src, ok ? 16u : 0u);
  } else if constexpr (VW * sizeof(T) == 4) {
    cp_async_4(dst, src, ok ? 4u : 0u);
  } else {
    static_assert(VW == 1, "scalar path copies single elements");
    *dst = ok ? *src : from_f32<T>(0.0f);
  }
}

// n / d as a multiply and a shift, built on the device (once per block).
__device__ __forceinline__ PkFastDiv make_fastdiv(int d) {
  PkFastDiv f;
  f.d = d;
  f.pad0 = 0;
  if (d <= 1) {
    f.mul = 0;
    f.shr = 0;
    return f;
  }
  const unsigned l = 32u - (unsigned)__clz(d - 1);  // ceil(log2 d)
  const unsigned sh = 31u + l;
  f.mul = (uint32_t)(((1ull << sh) + (unsigned long long)d - 1ull) / (unsigned long long)d);
  f.shr = sh - 32u;
  return f;
}

// The part of the problem that depends on the block. dgrad with stride > 1 is split into
// stride^2 phases (blockIdx.z = ph * stride + pw): the rows of dx with h % stride == ph
// and w % stride == pw receive contributions only from the filter taps r = r0 + i*stride,
// s = s0 + j*stride, for which the output position is exact: p = hi + c0h - i. Each phase
// is its own implicit GEMM (M = N * hn * wn, K = rn * sn * K), so no MMA is spent on the
// taps that stride skips (3/4 of the work of a 1x1 or 3x3 stride-2 dgrad otherwise).
// Phases without taps (e.g. odd rows of a 1x1 stride-2 dgrad) still write their zeros.
struct Geo {
  int gemm_m, gemm_k;  // this block's GEMM M and K
  int r0, s0, rn, sn;  // dgrad: first tap and number of taps of the phase (else 0, 0, R, S)
  int ph, pw, hn, wn;  // dgrad: the phase and the rows and columns of dx it holds
  int c0h, c0w;        // dgrad: p = hi + c0h - i, q = wi + c0w - j
  PkFastDiv div_sn;    // division by sn
};

template <int PASS>
__device__ __forceinline__ Geo make_geo(const PkConvParams& p) {
  Geo g;
  g.gemm_m = p.gemm_m;
  g.gemm_k = p.gemm_k;
  g.r0 = g.s0 = 0;
  g.rn = p.r;
  g.sn = p.s;
  g.ph = g.pw = 0;
  g.hn = p.h;
  g.wn = p.w;
  g.c0h = g.c0w = p.pad;
  g.div_sn = p.div_s;
  if (PASS == PK_DGRAD) {
    const int st = p.stride, z = (int)blockIdx.z;
    g.ph = z / st;
    g.pw = z % st;
    g.hn = g.ph < p.h ? (p.h - g.ph + st - 1) / st : 0;
    g.wn = g.pw < p.w ? (p.w - g.pw + st - 1) / st : 0;
    g.r0 = (g.ph + p.pad) % st;
    g.s0 = (g.pw + p.pad) % st;
    g.rn = g.r0 < p.r ? (p.r - g.r0 + st - 1) / st : 0;
    g.sn = g.s0 < p.s ? (p.s - g.s0 + st - 1) / st : 0;
    g.c0h = (g.ph + p.pad - g.r0) / st;
    g.c0w = (g.pw + p.pad - g.s0) / st;
    g.gemm_m = p.n * g.hn * g.wn;
    g.gemm_k = g.rn * g.sn * p.k;
    g.div_sn = make_fastdiv(g.sn > 0 ? g.sn : 1);
  }
  return g;
}

// One decoded row of the GEMM: an output pixel (n, p, q) of fprop or an input pixel
// (n, h, w) of dgrad (within the block's phase).
struct RowInfo {
  int base;  // offset of image n in the tensor A reads
  int h0;    // fprop: p*stride - pad; dgrad: hi + c0h
  int w0;    // fprop: q*stride - pad; dgrad: wi + c0w
  int ok;    // row < M
  int out;   // offset of the row in the output (y or dx)
};

template <int PASS>
__device__ __forceinline__ RowInfo decode_row(const PkConvParams& p, const Geo& g, int m) {
  RowInfo ri;
  ri.ok = m < g.gemm_m;
  const int mm = ri.ok ? m : 0;
  int n, rem, a, b;
  if (PASS == PK_FPROP) {
    fdivmod(mm, p.div_pq, n, rem);
    fdivmod(rem, p.div_q, a, b);
    ri.base = n * p.h * p.w * p.c;
    ri.h0 = a * p.stride - p.pad;
    ri.w0 = b * p.stride - p.pad;
    ri.out = mm * p.k;
  } else {  // once per row and block: plain divisions by the phase's sizes
    const int hw = g.hn * g.wn;
    n = mm / hw;
    rem = mm - n * hw;
    a = rem / g.wn;
    b = rem - a * g.wn;
    ri.base = n * p.p * p.q * p.k;
    ri.h0 = a + g.c0h;
    ri.w0 = b + g.c0w;
    ri.out = ((n * p.h + g.ph + a * p.stride) * p.w + g.pw + b * p.stride) * p.c;
  }
  return ri;
}

// ---------------------------------------------------------------- BN on the input (bnin)
// The bnin entry points apply the batch norm (+ ReLU) of the layer before the conv to
// its x operand while it is loaded (see PkConvParams::in_mean): the BN output is never
// written or read. The loads stay cp.async straight into shared memory; after a tile's
// cp_async_wait and before the barrier that publishes it, every thread rewrites in place
// the chunks it loaded itself (its own copies are complete and visible to it then), so no
// extra barrier is needed. A loader remembers per stage which of its chunks were in
// bounds (a bit per chunk, STAGES x NR bits): padding, rows past M and k past the GEMM's
// K were zero-filled and stay zero (bn(0) is not 0). The value is bn_apply_<T>'s:
// fmaf(x - mean, gamma * invstd, beta), the ReLU, rounded to T.
__device__ __forceinline__ float bn_in_value(const PkConvParams& p, float v, float mean, float scale, float beta) {
  const float y = fmaf(v - mean, scale, beta);
  return p.in_relu ? (y < 0.0f ? 0.0f : y) : y;
}

// The per-channel parameters of channels ch .. ch+VW-1.
template <int VW>
struct BnIn {
  float mean[VW], scale[VW], beta[VW];
  __device__ __forceinline__ void load(const PkConvParams& p, int ch) {
#pragma unroll
    for (int i = 0; i < VW; ++i) {
      mean[i] = p.in_mean[ch + i];
      scale[i] = p.in_gamma[ch + i] * p.in_invstd[ch + i];
      beta[i] = p.in_beta[ch + i];
    }
  }
  // Rewrites the VW elements at s (in shared memory) in place.
  template <class T>
  __device__ __forceinline__ void apply(const PkConvParams& p, T* s) const {
    if constexpr (VW * sizeof(T) == 16) {
      uint4 raw = *reinterpret_cast<const uint4*>(s);
      T e[VW];
      memcpy(e, &raw, 16);
#pragma unroll
      for (int i = 0; i < VW; ++i) e[i] = from_f32<T>(bn_in_value(p, to_f32(e[i]), mean[i], scale[i], beta[i]));
      memcpy(&raw, e, 16);
      *reinterpret_cast<uint4*>(s) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < VW; ++i) s[i] = from_f32<T>(bn_in_value(p, to_f32(s[i]), mean[i], scale[i], beta[i]));
    }
  }
};

// ---------------------------------------------------------------- operand loaders
// A loader issues the copies of one BK-deep tile of one operand into shared memory.
// Elements are assigned to threads along the operand's contiguous dimension in chunks of
// VW; SKC says whether the shared tile is stored [MN][LD] (K-contiguous) or [BK][LD].
// `sidx(mn, kk)` is the shared index of element (mn, kk) of the tile.
// LD = PK_SW128: the K-major 128-byte-swizzled tile of the wgmma kernels, [MN][64]
// (sw128_idx in common.cuh); PK_SW128_MN64: the MN-major one, 64 deep (sw128mn_idx).
#define PK_SW128 (-1)
#define PK_SW128_MN64 (-2)
template <bool SKC, int LD>
__device__ __forceinline__ int sidx(int mn, int kk) {
  static_assert(LD != PK_SW128 || SKC, "the K-major swizzled tile");
  static_assert(LD != PK_SW128_MN64 || !SKC, "the MN-major swizzled tile");
  if constexpr (LD == PK_SW128) return sw128_idx(mn, kk);
  if constexpr (LD == PK_SW128_MN64) return sw128mn_idx<64>(mn, kk);
  return SKC ? mn * LD + kk : kk * LD + mn;
}

// K-contiguous operands: fprop A (im2col of x), dgrad A (dy through the filter taps),
// fprop B (w, [K][R*S*C]). Each thread owns one chunk column (fixed kk offset within the
// tile) and walks its kk position (r, s, channel) incrementally from tile to tile.
template <int PASS, bool IS_A, class T, int BMN, int BK, int VW, int NT, bool SKC, int LD, bool PRO>
struct LoaderK {
  static_assert(NT % (BK / VW) == 0, "threads must cover whole chunk columns");
  static constexpr int COLS = BK / VW;
  static constexpr int RSTEP = NT / COLS;
  static_assert(BMN % RSTEP == 0, "rows per thread");
  static constexpr int NR = BMN / RSTEP;
  static_assert(!PRO || (PASS == PK_FPROP && IS_A), "bnin: only fprop's x goes through the BN");
  static_assert(!PRO || NR * 4 <= 64, "bnin: a bit per chunk and stage (4 stages at most)");
  int kcol, row0, kk, r, s, ch, sn, kg;
  const T* g;
  int mn0;
  int cch;          // bnin: the channel of the next tile to transform
  uint64_t vmask;   // bnin: chunks in bounds, NR bits per stage

  __device__ __forceinline__ void init(const PkConvParams& p, const Geo& geo, const T* gptr, int tid, int mn_base,
                                       int kt_begin) {
    g = gptr;
    mn0 = mn_base;
    kcol = (tid % COLS) * VW;
    row0 = tid / COLS;
    kk = kt_begin * BK + kcol;
    sn = geo.sn;
    kg = geo.gemm_k;
    r = s = ch = 0;
    if (IS_A) {
      // kk = (r*sn + s)*Cin + ch with Cin = C (fprop) or K (dgrad); for dgrad r and s
      // count the taps of the block's phase.
      const PkFastDiv& dc = PASS == PK_FPROP ? p.div_c : p.div_k;
      int rs;
      fdivmod(kk, dc, rs, ch);
      fdivmod(rs, geo.div_sn, r, s);
    }
    cch = ch;
    vmask = 0;
  }
  __device__ __forceinline__ void advance(const PkConvParams& p) {
    kk += BK;
    if (IS_A) {
      const int cin = PASS == PK_FPROP ? p.c : p.k;
      ch += BK;
      while (ch >= cin) {
        ch -= cin;
        if (++s == sn) {
          s = 0;
          ++r;
        }
      }
    }
  }
  // Loads the tile at the current position into `sm` (stage `st`), then advances.
  __device__ __forceinline__ void load(const PkConvParams& p, T* sm, const RowInfo* rows, int st) {
    const bool kok = kk < kg;
    uint64_t bits = 0;
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const int ml = row0 + j * RSTEP;
      int off = 0;
      bool ok = kok;
      if (!IS_A) {  // fprop B: w[k][kk]
        const int nn = mn0 + ml;
        ok = ok && nn < p.k;
        off = nn * kg + kk;
      } else {
        const RowInfo ri = rows[ml];
        ok = ok && ri.ok;
        if (PASS == PK_FPROP) {
          const int h = ri.h0 + r, w = ri.w0 + s;
          ok = ok && (unsigned)h < (unsigned)p.h && (unsigned)w < (unsigned)p.w;
          off = ri.base + (h * p.w + w) * p.c + ch;
#ifdef PK_FAULT_CONV_SKIP_LAST_CHANNEL
          // A planted bug, compiled only into an emulation-only test module: the tile
          // drops the chunk that holds the last input channel.
          ok = ok && !(ch <= p.c - 1 && p.c - 1 < ch + VW);
#endif
        } else {
          const int pp = ri.h0 - r, qq = ri.w0 - s;  // exact: the phase has only these taps
          ok = ok && (unsigned)pp < (unsigned)p.p && (unsigned)qq < (unsigned)p.q;
          off = ri.base + (pp * p.q + qq) * p.k + ch;
        }
      }
      copy_chunk<T, VW>(sm + sidx<SKC, LD>(ml, kcol), g + (ok ? off : 0), ok);
      if (PRO) bits |= (uint64_t)ok << j;
    }
    if (PRO) vmask = (vmask & ~(((1ull << NR) - 1) << (st * NR))) | (bits << (st * NR));
    advance(p);
  }
  // bnin: applies the BN to the in-bounds chunks this thread loaded into stage `st` (the
  // next tile in order), after the wait for its copies.
  __device__ __forceinline__ void transform(const PkConvParams& p, T* sm, int st) {
    if (!PRO) return;
    const uint32_t bits = (uint32_t)(vmask >> (st * NR)) & (uint32_t)((1ull << NR) - 1);
    if (bits) {
      BnIn<VW> bn;
      bn.load(p, cch);
#pragma unroll
      for (int j = 0; j < NR; ++j)
        if (bits >> j & 1u) bn.template apply<T>(p, sm + sidx<SKC, LD>(row0 + j * RSTEP, kcol));
    }
    cch += BK;
    while (cch >= p.c) cch -= p.c;
  }
};

// M/N-contiguous operands: dgrad B (w[k][r][s][c] along c), wgrad A (dy along k), wgrad B
// (im2col of x along c). Each thread owns one chunk column; rows (kk) are decoded per tile.
template <int PASS, bool IS_A, class T, int BMN, int BK, int VW, int NT, bool SKC, int LD, bool PRO>
struct LoaderN {
  static constexpr int COLS = BMN / VW;
  static_assert(NT % COLS == 0, "threads must cover whole chunk columns");
  static constexpr int RSTEP = NT / COLS;
  static_assert(BK % RSTEP == 0, "rows per thread");
  static constexpr int NR = BK / RSTEP;
  static_assert(!PRO || (PASS == PK_WGRAD && !IS_A), "bnin: only wgrad's x goes through the BN");
  static_assert(!PRO || NR * 4 <= 64, "bnin: a bit per chunk and stage (4 stages at most)");
  uint64_t vmask;  // bnin: chunks in bounds, NR bits per stage
  int col, row0, k0, kg;
  int cr, cs, cc;  // wgrad B: the column's filter tap and channel
  bool col_ok;
  const T* g;
  int r0, s0;          // dgrad: the phase's first tap
  PkFastDiv div_sn;  // dgrad: taps per row of the phase

  __device__ __forceinline__ void init(const PkConvParams& p, const Geo& geo, const T* gptr, int tid, int mn_base,
                                       int kt_begin) {
    g = gptr;
    kg = geo.gemm_k;
    r0 = geo.r0;
    s0 = geo.s0;
    div_sn = geo.div_sn;
    col = (tid % COLS) * VW;
    row0 = tid / COLS;
    k0 = kt_begin * BK;
    const int nn = mn_base + col;
    cr = cs = cc = 0;
    vmask = 0;
    if (PASS == PK_DGRAD) {
      col_ok = nn < p.c;
      cc = nn;
    } else if (IS_A) {  // wgrad A
      col_ok = nn < p.k;
      cc = nn;
    } else {  // wgrad B: nn = (r*S + s)*C + c
      col_ok = nn < p.gemm_n;
      int rs;
      fdivmod(col_ok ? nn : 0, p.div_c, rs, cc);
      fdivmod(rs, p.div_s, cr, cs);
    }
  }
  __device__ __forceinline__ void load(const PkConvParams& p, T* sm, const RowInfo*, int st) {
    uint64_t bits = 0;
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const int kl = row0 + j * RSTEP;
      const int kk = k0 + kl;
      bool ok = col_ok && kk < kg;
      const int kq = ok ? kk : 0;
      int off;
      if (PASS == PK_DGRAD) {  // kk = (i*sn + j)*K + k: w[k][r0 + i*st][s0 + j*st][c]
        int rs, k, i, j;
        fdivmod(kq, p.div_k, rs, k);
        fdivmod(rs, div_sn, i, j);
        off = ((k * p.r + r0 + i * p.stride) * p.s + s0 + j * p.stride) * p.c + cc;
      } else if (IS_A) {  // dy[npq][k]
        off = kq * p.k + cc;
      } else {  // x[n][p*st - pad + r][q*st - pad + s][c]
        int n, pq, pp, qq;
        fdivmod(kq, p.div_pq, n, pq);
        fdivmod(pq, p.div_q, pp, qq);
        const int h = pp * p.stride - p.pad + cr, w = qq * p.stride - p.pad + cs;
        ok = ok && (unsigned)h < (unsigned)p.h && (unsigned)w < (unsigned)p.w;
        off = ((n * p.h + h) * p.w + w) * p.c + cc;
      }
      copy_chunk<T, VW>(sm + sidx<SKC, LD>(col, kl), g + (ok ? off : 0), ok);
      if (PRO) bits |= (uint64_t)ok << j;
    }
    if (PRO) vmask = (vmask & ~(((1ull << NR) - 1) << (st * NR))) | (bits << (st * NR));
    k0 += BK;
  }
  // bnin: as LoaderK::transform; the column's channels cc .. cc+VW-1 are fixed.
  __device__ __forceinline__ void transform(const PkConvParams& p, T* sm, int st) {
    if (!PRO) return;
    const uint32_t bits = (uint32_t)(vmask >> (st * NR)) & (uint32_t)((1ull << NR) - 1);
    if (bits) {
      BnIn<VW> bn;
      bn.load(p, cc);
#pragma unroll
      for (int j = 0; j < NR; ++j)
        if (bits >> j & 1u) bn.template apply<T>(p, sm + sidx<SKC, LD>(col, row0 + j * RSTEP));
    }
  }
};

// BNIN: the kernel is a bnin entry point; the operand that is x (fprop A, wgrad B) then
// goes through the BN.
template <int PASS, bool IS_A, class T, int BMN, int BK, int VW, int NT, bool SKC, int LD, bool BNIN>
struct LoaderFor {
  static constexpr bool KC = IS_A ? PASS != PK_WGRAD : PASS == PK_FPROP;
  static constexpr bool PRO = BNIN && (IS_A ? PASS == PK_FPROP : PASS == PK_WGRAD);
  using type = typename std::conditional<KC, LoaderK<PASS, IS_A, T, BMN, BK, VW, NT, SKC, LD, PRO>,
                                         LoaderN<PASS, IS_A, T, BMN, BK, VW, NT, SKC, LD, PRO>>::type;
};

// The two GEMM operands of a pass (see PkConvParams).
template <class T>
__device__ __forceinline__ void operands(const PkConvParams& p, const T*& a, const T*& b) {
  a = static_cast<const T*>(p.a);
  b = static_cast<const T*>(p.b);
}

// The block's range of k-tiles (wgrad splits along grid.z; dgrad's grid.z is its phase).
template <int PASS>
__device__ __forceinline__ void k_range(const PkConvParams& p, const Geo& g, int bk, int& kt0, int& kt1) {
  const int kt = (g.gemm_k + bk - 1) / bk;
  if (PASS == PK_WGRAD) {
    kt0 = (int)blockIdx.z * p.k_tiles_per_split;
    kt1 = min(kt, kt0 + p.k_tiles_per_split);
  } else {
    kt0 = 0;
    kt1 = kt;
  }
}

// A value as an output of element type T holds it.
template <class T>
__device__ __forceinline__ float stored(float v) {
  return to_f32(from_f32<T>(v));
}

// What a dgrad that accumulates into its output reads at two adjacent outputs before it
// stores them: the old values and the mask. The tensor-core epilogue loads a row tile's
// worth ahead of its stores (load_prior), so that those loads are in flight together
// instead of one load-then-store round trip per pair.
template <class T>
struct Prior {
  T old[2];
  bool keep[2];
};

// Whether the ReLU that masks an accumulated sum keeps the outputs at idx and idx + 1
// (`both`): its output > 0 (acc_mask), or its bit (acc_mask_bits; idx even when both, so
// the two bits share a byte); true without a mask.
template <class T>
__device__ __forceinline__ void relu_keeps(const PkConvParams& p, int64_t idx, bool both, bool pair_aligned,
                                           bool keep[2]) {
  keep[0] = keep[1] = true;
  if (p.acc_mask_bits) {
    const unsigned byte = p.acc_mask_bits[idx >> 3];
    keep[0] = (byte >> (idx & 7)) & 1u;
    if (both) keep[1] = ((idx + 1) & 7) ? (byte >> ((idx + 1) & 7)) & 1u : p.acc_mask_bits[(idx + 1) >> 3] & 1u;
  } else if (p.acc_mask) {
    const T* mk = static_cast<const T*>(p.acc_mask) + idx;
    if (sizeof(T) == 2 && both && pair_aligned) {  // idx even: 4-byte aligned
      struct alignas(4) Pair {
        T x, y;
      };
      const Pair m = *reinterpret_cast<const Pair*>(mk);
      keep[0] = to_f32(m.x) > 0.0f;
      keep[1] = to_f32(m.y) > 0.0f;
      return;
    }
    keep[0] = to_f32(mk[0]) > 0.0f;
    if (both) keep[1] = to_f32(mk[1]) > 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void load_prior(const PkConvParams& p, const RowInfo* rows, int rl, int col, Prior<T>& pr) {
  if (col >= p.gemm_n || !rows[rl].ok) return;
  const int64_t idx = (int64_t)rows[rl].out + col;
  const bool both = col + 1 < p.gemm_n;
  const T* out = static_cast<const T*>(p.out) + idx;
  relu_keeps<T>(p, idx, both, p.gemm_n % 2 == 0, pr.keep);
  if (sizeof(T) == 2 && both && p.gemm_n % 2 == 0) {  // idx even: 4-byte aligned
    struct alignas(4) Pair {
      T x, y;
    };
    const Pair o = *reinterpret_cast<const Pair*>(out);
    pr.old[0] = o.x;
    pr.old[1] = o.y;
    return;
  }
  pr.old[0] = out[0];
  if (both) pr.old[1] = out[1];
}

// Stores one output element (or two adjacent ones: c0, c1 at col, col+1) of GEMM row
// `row` (`rl` within the block). fprop and dgrad find the row's offset in the row table,
// and leave in c0, c1 the values as stored (after the accumulation and the mask, rounded
// to T) for the epilogue's BN sums. A dgrad that accumulates reads the old values and the
// mask from `pr` when `prior` (load_prior of the same row and column), else from memory.
template <int PASS, class T>
__device__ __forceinline__ void store_pair(const PkConvParams& p, const RowInfo* rows, int rl, int row, int col,
                                           float& c0, float& c1, const Prior<T>& pr = Prior<T>{},
                                           bool prior = false) {
  if (col >= p.gemm_n) return;
  int64_t idx;
  if (PASS == PK_WGRAD) {
    if (row >= p.gemm_m) return;
    idx = (int64_t)row * p.gemm_n + col;
  } else {
    const RowInfo ri = rows[rl];
    if (!ri.ok) return;
    idx = (int64_t)ri.out + col;
  }
  const bool both = col + 1 < p.gemm_n;
  if (PASS == PK_WGRAD) {
    float* out = static_cast<float*>(p.out) + idx;
    if (gridDim.z > 1) {
      atomicAdd(out, c0);
      if (both) atomicAdd(out + 1, c1);
    } else if (both && (p.gemm_n % 2 == 0)) {
      *reinterpret_cast<float2*>(out) = make_float2(c0, c1);
    } else {
      out[0] = c0;
      if (both) out[1] = c1;
    }
  } else {
    T* out = static_cast<T*>(p.out) + idx;
    if (PASS == PK_DGRAD && p.accumulate) {  // the old value plus the f32 result, rounded once
      c0 = to_f32(prior ? pr.old[0] : out[0]) + c0;
      if (both) c1 = to_f32(prior ? pr.old[1] : out[1]) + c1;
      if (p.acc_mask || p.acc_mask_bits) {  // then through the ReLU that masks it
        bool keep[2];
        if (prior) {
          keep[0] = pr.keep[0];
          keep[1] = pr.keep[1];
        } else {
          relu_keeps<T>(p, idx, both, p.gemm_n % 2 == 0, keep);
        }
        if (!keep[0]) c0 = 0.0f;
        if (both && !keep[1]) c1 = 0.0f;
      }
    }
    c0 = stored<T>(c0);
    c1 = stored<T>(c1);
    if constexpr (sizeof(T) == 2) {
      if (both && (p.gemm_n % 2 == 0)) {
        struct alignas(4) Pair {
          T x, y;
        };
        *reinterpret_cast<Pair*>(out) = Pair{from_f32<T>(c0), from_f32<T>(c1)};
        return;
      }
    } else {
      if (both && (p.gemm_n % 2 == 0)) {
        *reinterpret_cast<float2*>(out) = make_float2(c0, c1);
        return;
      }
    }
    out[0] = from_f32<T>(c0);
    if (both) out[1] = from_f32<T>(c1);
  }
}

// Fills the block's row table (fprop and dgrad A rows); wgrad has none.
template <int PASS, int BM, int NT>
__device__ __forceinline__ void fill_rows(const PkConvParams& p, const Geo& g, RowInfo* rows, int m0, int tid) {
  if constexpr (PASS != PK_WGRAD)
    for (int i = tid; i < BM; i += NT) rows[i] = decode_row<PASS>(p, g, m0 + i);
}

// ---------------------------------------------------------------- BN statistics
// fprop with p.bn_stats: per-channel statistics of the block's output tile for the batch
// norm that follows, so that its train forward does not read y for them. Two passes over
// the accumulators (still in registers): the tile mean of each column, then the sum of
// squared deviations from it (M2), both over the values as stored (rounded to T) and over
// the tile's valid rows only. Each thread sums its own rows of a column; the threads that
// share a column ("row groups", RG of them) meet in shared memory and one thread per
// column adds them in row-group order, so the result does not depend on scheduling and no
// atomics are used. Tile b's pair goes to bn_part[k * gridDim.x + b] (the layout of
// bn_stats_<T>'s per-chunk partials, with rows_per_chunk = BM), or, with one row tile, to
// bn_mean / bn_m2 (as bn_stats_<T> with one chunk); bn_stats_finalize_f32 merges them.
// `red` is RG * BN + BN floats of shared memory that nothing else uses any more.
// One pass of the column reduction after every thread wrote red[rg * BN + col]; pass 0
// leaves the tile means in cmean, pass 1 writes the results. Barriers around it are the
// caller's.
template <int BN, int RG, int NT>
__device__ __forceinline__ void bn_stats_columns(const PkConvParams& p, const float* red, float* cmean, int tid,
                                                 int n0, int vrows, int pass) {
  for (int c = tid; c < BN; c += NT) {
    float s = 0.0f;
#pragma unroll 4
    for (int g = 0; g < RG; ++g) s += red[g * BN + c];
    if (pass == 0) {
      cmean[c] = s / (float)vrows;
    } else {
      const int col = n0 + c;
      if (col < p.gemm_n) {
        if (gridDim.x == 1) {
          p.bn_mean[col] = cmean[c];
          p.bn_m2[col] = s;
        } else {
          static_cast<float2*>(p.bn_part)[(int64_t)col * gridDim.x + blockIdx.x] = make_float2(cmean[c], s);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- BN backward sums
// dgrad with p.bn_grad: the gradient it stores is that of a batch norm's output (dx of
// conv2 is the gradient of bn1's output, which conv2 loaded through bn1; a block input's
// gradient, summed and masked by the accumulate, is the gradient of the previous block's
// bn3 output). The BN backward needs two sums per channel over that gradient g: sum g and
// sum g * (x - mean), x the BN's input (p.bn_x, same layout as dx). The epilogue takes them
// while g is still in registers, so the BN backward's reduction pass (which read g and x)
// is gone: the epilogue reads x only. With in_relu, g is first masked by the BN's own ReLU,
// its output recomputed from x with bn_apply_<T>'s operations and rounding (as
// bn_backward_reduce_relu_<T> does). g is the value as stored (rounded to T). Each thread
// sums its own rows of each of its columns; the row groups meet in shared memory and one
// thread per column adds them in order (as the BN statistics above). Row tiles are
// numbered across the dgrad's phases: tile = (row tiles of the phases before) + blockIdx.x.
// A second BN without a ReLU may take the same gradient (p.bn2_x): a third sum per column.

// This block's row tile among all phases', and their number.
template <int BM>
__device__ __forceinline__ int grad_tile(const PkConvParams& p, int& tiles) {
  const int st = p.stride, z = (int)blockIdx.z;
  int before = 0, all = 0;
  for (int ph = 0; ph < st; ++ph)
    for (int pw = 0; pw < st; ++pw) {
      const int hn = ph < p.h ? (p.h - ph + st - 1) / st : 0;
      const int wn = pw < p.w ? (p.w - pw + st - 1) / st : 0;
      const int t = (p.n * hn * wn + BM - 1) / BM;
      if (ph * st + pw < z) before += t;
      all += t;
    }
  tiles = all;
  return before + (int)blockIdx.x;
}

// The per-channel constants of the BNs of column `col` (< gemm_n).
struct GradBn {
  float mean, scale, beta, mean2;
  __device__ __forceinline__ void load(const PkConvParams& p, int col) {
    mean = p.in_mean[col];
    scale = p.in_gamma[col] * p.in_invstd[col];
    beta = p.in_beta[col];
    mean2 = p.bn2_x ? p.bn2_mean[col] : 0.0f;
  }
  // Adds g (masked by the recomputed ReLU with in_relu), g * (x - mean) and, with a second
  // BN, g * (x2 - mean2) for the stored gradient g at output offset `idx`.
  template <class T>
  __device__ __forceinline__ void add(const PkConvParams& p, int64_t idx, float g, float* s) const {
    const float x = to_f32(static_cast<const T*>(p.bn_x)[idx]);
    if (p.in_relu) g = relu_grad(stored<T>(relu_f(fmaf(x - mean, scale, beta) + 0.0f)), g);
    s[0] += g;
    s[1] = fmaf(g, x - mean, s[1]);
    if (p.bn2_x) s[2] = fmaf(g, to_f32(static_cast<const T*>(p.bn2_x)[idx]) - mean2, s[2]);
  }
};

// One pass of the column reduction after every thread wrote red[rg * BN + col]: pass 0
// keeps sum g in csum, pass 1 writes the pair of the BN, pass 2 that of the second BN.
// Barriers around it are the caller's.
template <int BN, int RG, int NT>
__device__ __forceinline__ void bn_grad_columns(const PkConvParams& p, const float* red, float* csum, int tid, int n0,
                                                int tile, int tiles, int pass) {
  for (int c = tid; c < BN; c += NT) {
    float s = 0.0f;
#pragma unroll 4
    for (int g = 0; g < RG; ++g) s += red[g * BN + c];
    const int col = n0 + c;
    if (pass == 0) {
      csum[c] = s;
    } else if (col < p.gemm_n) {
      void* part = pass == 1 ? p.bn_part : p.bn2_part;
      if (tiles == 1) {
        (pass == 1 ? p.bn_mean : p.bn2_sum)[col] = csum[c];
        (pass == 1 ? p.bn_m2 : p.bn2_sumx)[col] = s;
      } else {
        static_cast<float2*>(part)[(int64_t)col * tiles + tile] = make_float2(csum[c], s);
      }
    }
  }
}

// ---------------------------------------------------------------- tensor-core kernel
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, bool VEC_, int MIN_BLOCKS_>
struct TcCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 32, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr bool VEC = VEC_;
  static constexpr int NT = WARPS_M * WARPS_N * 32;
  static constexpr int VW = VEC ? 8 : 1;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;  // __launch_bounds__: blocks per SM to fit
};

template <int PASS>
struct TcLayout {
  static constexpr bool A_KC = PASS != PK_WGRAD;  // A stored [BM][BK+8], else [BK][BM+8]
  static constexpr bool B_KC = PASS == PK_FPROP;  // B stored [BN][BK+8], else [BK][BN+8]
};

template <int PASS, class Cfg>
struct TcSmem {
  static constexpr int LDA = TcLayout<PASS>::A_KC ? Cfg::BK + 8 : Cfg::BM + 8;
  static constexpr int LDB = TcLayout<PASS>::B_KC ? Cfg::BK + 8 : Cfg::BN + 8;
  static constexpr int A_ELEMS = TcLayout<PASS>::A_KC ? Cfg::BM * LDA : Cfg::BK * LDA;
  static constexpr int B_ELEMS = TcLayout<PASS>::B_KC ? Cfg::BN * LDB : Cfg::BK * LDB;
  static constexpr int ROWS_BYTES = Cfg::BM * (int)sizeof(RowInfo);
  static constexpr int BYTES = ROWS_BYTES + Cfg::STAGES * (A_ELEMS + B_ELEMS) * 2;
};


// The tensor-core epilogue: stores the block's accumulators (the m16n8 C fragments of
// mma.sync, which wgmma's D fragment repeats: acc[mi][ni][e] at row wm*WTM + mi*16 + g
// (+8 for e >= 2), column wn*WTN + ni*8 + 2t + e%2), then the fprop's BN statistics or the
// dgrad's BN backward sums. `red_smem` is RED_BYTES of shared memory the mainloop is done with
// (after a barrier the epilogue takes itself). The epilogue's Cfg::NT threads meet at
// __syncthreads (BAR = 0), or at named barrier BAR when they are a part of the block.
template <int BAR, int NT>
__device__ __forceinline__ void part_sync() {
  if constexpr (BAR == 0)
    __syncthreads();
  else
    bar_sync(BAR, NT);
}

template <int PASS, class T, class Cfg, int RED_BYTES, int BAR = 0>
__device__ __forceinline__ void tc_epilogue(const PkConvParams& p, float (&acc)[Cfg::BM / Cfg::WARPS_M / 16][Cfg::BN / Cfg::WARPS_N / 8][4],
                                            const RowInfo* rows, void* red_smem, const Geo& geo, int m0, int n0, int tid) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NT = Cfg::NT;
  constexpr int WTM = BM / Cfg::WARPS_M, WTN = BN / Cfg::WARPS_N;
  constexpr int MI = WTM / 16, NI = WTN / 8;
  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp % Cfg::WARPS_M, wn = warp / Cfg::WARPS_M;

  const int g = lane >> 2, t = lane & 3;
  const bool accumulate = PASS == PK_DGRAD && p.accumulate;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    const int rl = wm * WTM + mi * 16 + g;
    Prior<T> pr[NI][2];
    if (accumulate) {  // this row tile's old values and masks, all loads in flight together
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * WTN + ni * 8 + 2 * t;
        load_prior<T>(p, rows, rl, col, pr[ni][0]);
        load_prior<T>(p, rows, rl + 8, col, pr[ni][1]);
      }
    }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int col = n0 + wn * WTN + ni * 8 + 2 * t;
      store_pair<PASS, T>(p, rows, rl, m0 + rl, col, acc[mi][ni][0], acc[mi][ni][1], pr[ni][0], accumulate);
      store_pair<PASS, T>(p, rows, rl + 8, m0 + rl + 8, col, acc[mi][ni][2], acc[mi][ni][3], pr[ni][1], accumulate);
    }
  }
  if (PASS == PK_FPROP && p.bn_stats) {
    // Row group of the thread: (wm, g); its columns: wn * WTN + ni * 8 + 2t + e.
    constexpr int RG = Cfg::WARPS_M * 8;
    static_assert((RG + 1) * BN * 4 <= RED_BYTES, "the statistics fit in the A stages");
    float* red = static_cast<float*>(red_smem);
    float* cmean = red + RG * BN;
    const int vrows = min(BM, geo.gemm_m - m0);
    const int rg = wm * 8 + g;
    part_sync<BAR, NT>();  // every warp is done with the stages
#pragma unroll 1
    for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int cl = wn * WTN + ni * 8 + 2 * t + e;
          const float mu = pass ? cmean[cl] : 0.0f;
          float sum = 0.0f;
#pragma unroll
          for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int rl = wm * WTM + mi * 16 + h * 8 + g;
              const float d = stored<T>(acc[mi][ni][h * 2 + e]) - mu;
              if (rl < vrows) sum = pass ? fmaf(d, d, sum) : sum + d;
            }
          red[rg * BN + cl] = sum;
        }
      part_sync<BAR, NT>();
      bn_stats_columns<BN, RG, NT>(p, red, cmean, tid, n0, vrows, pass);
      part_sync<BAR, NT>();
    }
  }
  if (PASS == PK_DGRAD && p.bn_grad) {
    // Row group of the thread: (wm, g), as for the statistics.
    constexpr int RG = Cfg::WARPS_M * 8;
    static_assert((RG + 1) * BN * 4 <= RED_BYTES, "the sums fit in the A stages");
    float* red = static_cast<float*>(red_smem);
    float* csum = red + RG * BN;
    const int vrows = min(BM, geo.gemm_m - m0);
    const int rg = wm * 8 + g;
    int tiles;
    const int tile = grad_tile<BM>(p, tiles);
    float sums[NI][2][3];  // sum g, sum g (x - mean), sum g (x2 - mean2)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n0 + wn * WTN + ni * 8 + 2 * t + e;
        sums[ni][e][0] = sums[ni][e][1] = sums[ni][e][2] = 0.0f;
        if (col < p.gemm_n) {
          GradBn b;
          b.load(p, col);
#pragma unroll
          for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int rl = wm * WTM + mi * 16 + h * 8 + g;
              if (rl < vrows) b.add<T>(p, (int64_t)rows[rl].out + col, acc[mi][ni][h * 2 + e], sums[ni][e]);
            }
        }
      }
    part_sync<BAR, NT>();  // every warp is done with the stages
    const int passes = p.bn2_x ? 3 : 2;
#pragma unroll 1
    for (int pass = 0; pass < passes; ++pass) {
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float* v = sums[ni][e];  // constant indices: the sums stay in registers
          red[rg * BN + wn * WTN + ni * 8 + 2 * t + e] = pass == 0 ? v[0] : pass == 1 ? v[1] : v[2];
        }
      part_sync<BAR, NT>();
      bn_grad_columns<BN, RG, NT>(p, red, csum, tid, n0, tile, tiles, pass);
      part_sync<BAR, NT>();
    }
  }
}

template <int PASS, class T, class Cfg, bool BNIN>
__device__ __forceinline__ void conv_tc(const PkConvParams& p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, NT = Cfg::NT, VW = Cfg::VW;
  constexpr bool A_KC = TcLayout<PASS>::A_KC, B_KC = TcLayout<PASS>::B_KC;
  using S = TcSmem<PASS, Cfg>;
  constexpr int WTM = BM / Cfg::WARPS_M, WTN = BN / Cfg::WARPS_N;
  constexpr int MI = WTM / 16, NI = WTN / 8;
  static_assert(NI % 2 == 0, "B fragments load two n8 tiles at a time");
  static_assert(S::ROWS_BYTES % 16 == 0 && (S::A_ELEMS * 2) % 16 == 0 && (S::B_ELEMS * 2) % 16 == 0, "alignment");

  PK_DYNAMIC_SMEM(unsigned char, smem);
  RowInfo* rows = reinterpret_cast<RowInfo*>(smem);
  T* As = reinterpret_cast<T*>(smem + S::ROWS_BYTES);
  T* Bs = As + STAGES * S::A_ELEMS;

  const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % Cfg::WARPS_M, wn = warp / Cfg::WARPS_M;
  const int m0 = (int)blockIdx.x * BM, n0 = (int)blockIdx.y * BN;
  const Geo geo = make_geo<PASS>(p);
  if (m0 >= geo.gemm_m) return;  // a dgrad phase with fewer rows: the whole block leaves
  int kt0, kt1;
  k_range<PASS>(p, geo, BK, kt0, kt1);

  const T *ga, *gb;
  operands<T>(p, ga, gb);
  typename LoaderFor<PASS, true, T, BM, BK, VW, NT, A_KC, S::LDA, BNIN>::type la;
  typename LoaderFor<PASS, false, T, BN, BK, VW, NT, B_KC, S::LDB, BNIN>::type lb;
  la.init(p, geo, ga, tid, m0, kt0);
  lb.init(p, geo, gb, tid, n0, kt0);
  fill_rows<PASS, BM, NT>(p, geo, rows, m0, tid);
  __syncthreads();

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int nkt = kt1 - kt0;
  // Prologue: the first STAGES-1 tiles in flight (one commit group each, even if empty).
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < nkt) {
      la.load(p, As + st * S::A_ELEMS, rows, st);
      lb.load(p, Bs + st * S::B_ELEMS, rows, st);
    }
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 2>();
    if (BNIN) {  // this thread's copies of tile `it` are complete: the BN on them
      const int cs = it % STAGES;
      la.transform(p, As + cs * S::A_ELEMS, cs);
      lb.transform(p, Bs + cs * S::B_ELEMS, cs);
    }
    __syncthreads();  // tile `it` is visible; everyone is done with tile it-1's stage
    {
      const int nxt = it + STAGES - 1;
      if (nxt < nkt) {
        const int st = nxt % STAGES;
        la.load(p, As + st * S::A_ELEMS, rows, st);
        lb.load(p, Bs + st * S::B_ELEMS, rows, st);
      }
      cp_async_commit();
    }
    const T* a_s = As + (it % STAGES) * S::A_ELEMS;
    const T* b_s = Bs + (it % STAGES) * S::B_ELEMS;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int rm = wm * WTM + mi * 16;
        if (A_KC)
          ldmatrix_x4(af[mi], a_s + (rm + (lane & 15)) * S::LDA + ks + (lane >> 4) * 8);
        else
          ldmatrix_x4_trans(af[mi], a_s + (ks + (lane & 7) + (lane >> 4) * 8) * S::LDA + rm + ((lane >> 3) & 1) * 8);
      }
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        const int rn = wn * WTN + ni * 8;
        uint32_t t4[4];
        if (B_KC)
          ldmatrix_x4(t4, b_s + (rn + (lane & 7) + (lane >> 4) * 8) * S::LDB + ks + ((lane >> 3) & 1) * 8);
        else
          ldmatrix_x4_trans(t4, b_s + (ks + (lane & 7) + ((lane >> 3) & 1) * 8) * S::LDB + rn + (lane >> 4) * 8);
        bf[ni][0] = t4[0];
        bf[ni][1] = t4[1];
        bf[ni + 1][0] = t4[2];
        bf[ni + 1][1] = t4[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          if constexpr (std::is_same<T, bf16>::value)
            mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
          else
            mma_m16n8k16_f16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
    }
  }
  cp_async_wait<0>();
  tc_epilogue<PASS, T, Cfg, STAGES * S::A_ELEMS * 2>(p, acc, rows, As, geo, m0, n0, tid);
}

// ---------------------------------------------------------------- warpgroup kernel (sm_90a)
// The three passes on Hopper's warpgroup MMA (see wgmma in common.cuh): BM = 64 rows per
// warpgroup (two warpgroups: 128 x BN), BN = 128 or 64, BK = 64. Each operand keeps its
// natural layout (see TcLayout): a K-contiguous one goes to shared memory K-major, an
// M/N-contiguous one MN-major (the MMA's transpose flag), both 128-byte-swizzled as the
// MMA reads them through descriptors (sw128_idx, sw128mn_idx), with the same loaders and
// 16-byte cp.async as the mma.sync kernels, and the same epilogue (wgmma's D fragment is
// mma.sync's C fragment repeated along N). The tiles start at the first 1024-byte
// boundary after the row table, as the swizzle needs.
// Pipeline, STAGES deep, one barrier per k-tile: tile `it` is read by the MMAs of
// iteration `it`, which stay in flight while iteration it+1 waits for its tile and issues
// its MMAs (wgmma_wait<1>); the stage a load overwrites in iteration `it` is that of tile
// it-2, whose MMAs every thread has waited for before that iteration's barrier. So
// STAGES-2 tiles are in flight ahead of the one being multiplied.
template <int BM_, int BN_, int STAGES_>
struct WgCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 64, STAGES = STAGES_;
  static constexpr int WARPS_M = BM / 16, WARPS_N = 1;  // warp w holds rows 16w .. 16w+15
  static constexpr int NT = BM / 64 * 128;
  static constexpr int VW = 8;
  static constexpr int ROWS_BYTES = BM * (int)sizeof(RowInfo);
  static constexpr int A_ELEMS = BM * BK, B_ELEMS = BN * BK;
  static constexpr int BYTES = ROWS_BYTES + 1024 + STAGES * (A_ELEMS + B_ELEMS) * 2;
  static_assert(STAGES >= 3, "a stage for the tile in the MMAs, one for the MMAs before, one loading");
  static_assert(BM % 64 == 0 && (BN == 64 || BN == 128), "wgmma m64n64 or m64n128 per warpgroup");
};

// Issues, as one committed group, warpgroup `wg`'s MMAs of one k-tile: its 64 rows of the
// A tile at `a` (8 atoms of K-major rows, or one MN-major block) times the B tile at `b`,
// into the accumulators d (Cfg::BN / 2 per thread). The caller waits for the group.
template <int PASS, class T, class Cfg>
__device__ __forceinline__ void wg_tile_mma(float* d, const T* a, const T* b, int wg) {
  constexpr int BN = Cfg::BN, BK = Cfg::BK, NI = BN / 8;
  constexpr bool A_KC = TcLayout<PASS>::A_KC, B_KC = TcLayout<PASS>::B_KC;
  constexpr uint32_t MN_LBO = BK * 128;  // MN-major: bytes from 64 M/N elements to the next 64
  static_assert(BK == 64, "the MN-major tiles are 64 deep");
  const uint32_t a_addr = smem_u32(a) + (uint32_t)wg * (A_KC ? 64u * 128u : MN_LBO);
  const uint32_t b_addr = smem_u32(b);
#pragma unroll
  for (int j = 0; j < NI * 4; ++j) wgmma_fence_acc(d[j]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    // k16 slice ks: 32 bytes along a K-major row, two 8-row atoms (2048 bytes) MN-major.
    const uint64_t da = A_KC ? wgmma_desc_sw128(a_addr + 32u * (uint32_t)ks)
                             : wgmma_desc_sw128_mn(a_addr + 2048u * (uint32_t)ks, MN_LBO);
    const uint64_t db = B_KC ? wgmma_desc_sw128(b_addr + 32u * (uint32_t)ks)
                             : wgmma_desc_sw128_mn(b_addr + 2048u * (uint32_t)ks, MN_LBO);
    if constexpr (BN == 128)
      wgmma_m64n128k16<T, A_KC ? 0 : 1, B_KC ? 0 : 1>(d, da, db, 1);
    else
      wgmma_m64n64k16<T, A_KC ? 0 : 1, B_KC ? 0 : 1>(d, da, db, 1);
  }
  wgmma_commit();
#pragma unroll
  for (int j = 0; j < NI * 4; ++j) wgmma_fence_acc(d[j]);
}

template <int PASS, class T, class Cfg>
__device__ __forceinline__ void conv_wg(const PkConvParams& p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, NT = Cfg::NT, VW = Cfg::VW;
  constexpr int NI = BN / 8;
  constexpr bool A_KC = TcLayout<PASS>::A_KC, B_KC = TcLayout<PASS>::B_KC;
  constexpr int LDA = A_KC ? PK_SW128 : PK_SW128_MN64, LDB = B_KC ? PK_SW128 : PK_SW128_MN64;

  PK_DYNAMIC_SMEM(unsigned char, smem);
  RowInfo* rows = reinterpret_cast<RowInfo*>(smem);
  const uint32_t s0 = smem_u32(smem);
  const uint32_t t0 = (s0 + (uint32_t)Cfg::ROWS_BYTES + 1023u) & ~1023u;
  T* As = reinterpret_cast<T*>(smem + (t0 - s0));
  T* Bs = As + STAGES * Cfg::A_ELEMS;

  const int tid = (int)threadIdx.x, wg = tid >> 7;
  const int m0 = (int)blockIdx.x * BM, n0 = (int)blockIdx.y * BN;
  const Geo geo = make_geo<PASS>(p);
  if (m0 >= geo.gemm_m) return;  // a dgrad phase with fewer rows: the whole block leaves
  int kt0, kt1;
  k_range<PASS>(p, geo, BK, kt0, kt1);

  const T *ga, *gb;
  operands<T>(p, ga, gb);
  typename LoaderFor<PASS, true, T, BM, BK, VW, NT, A_KC, LDA, false>::type la;
  typename LoaderFor<PASS, false, T, BN, BK, VW, NT, B_KC, LDB, false>::type lb;
  la.init(p, geo, ga, tid, m0, kt0);
  lb.init(p, geo, gb, tid, n0, kt0);
  fill_rows<PASS, BM, NT>(p, geo, rows, m0, tid);
  __syncthreads();

  float acc[1][NI][4];
#pragma unroll
  for (int j = 0; j < NI; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][j][e] = 0.0f;
  float* d = &acc[0][0][0];

  const int nkt = kt1 - kt0;
#pragma unroll
  for (int st = 0; st < STAGES - 2; ++st) {
    if (st < nkt) {
      la.load(p, As + st * Cfg::A_ELEMS, rows, st);
      lb.load(p, Bs + st * Cfg::B_ELEMS, rows, st);
    }
    cp_async_commit();
  }
  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();  // this thread's copies of tile `it`, before the MMAs read them
    __syncthreads();      // tile `it` complete; every thread has waited for tile it-2's MMAs
    {
      const int nxt = it + STAGES - 2;
      if (nxt < nkt) {
        const int st = nxt % STAGES;
        la.load(p, As + st * Cfg::A_ELEMS, rows, st);
        lb.load(p, Bs + st * Cfg::B_ELEMS, rows, st);
      }
      cp_async_commit();
    }
    wg_tile_mma<PASS, T, Cfg>(d, As + (it % STAGES) * Cfg::A_ELEMS, Bs + (it % STAGES) * Cfg::B_ELEMS, wg);
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < NI * 4; ++j) wgmma_fence_acc(d[j]);
  cp_async_wait<0>();
  tc_epilogue<PASS, T, Cfg, STAGES * Cfg::A_ELEMS * 2>(p, acc, rows, As, geo, m0, n0, tid);
}

// ---------------------------------------------------------------- warp-specialized warpgroup kernel (sm_90a)
// conv_wg's tiles, MMAs and epilogue with the loads in a warpgroup of their own: threads
// 0-255 (warpgroups 0 and 1) multiply, 64 rows each; threads 256-383 (the producer) load.
// Stage s has two mbarriers: full[s] (128 arrivals: each producer thread's
// cp.async.mbarrier.arrive.noinc, which arrives once that thread's copies have landed) and
// empty[s] (256 arrivals: each consumer thread, once the MMAs that read the stage are
// done). The producer fills k-tile `it` into stage it % STAGES after waiting for the
// stage's previous round to be released (at once in the first round); a consumer waits
// for the tile, issues its MMAs, waits until only they are in flight (wgmma_wait<1>), and
// releases the stage of the tile before. So STAGES - 1 tiles load while one is multiplied,
// no copy waits on another thread's copies, and nothing waits on the whole block inside
// the loop. Each consumer fences the async proxy after its wait (the copies were made
// through the generic proxy; wgmma reads through the async one). The producer leaves
// after its last tile; the epilogue's barriers are named (bar.sync 1, 256).
template <int BM_, int BN_, int STAGES_, int MIN_BLOCKS_>
struct WsCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 64, STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int WARPS_M = BM / 16, WARPS_N = 1;  // consumer warp w holds rows 16w .. 16w+15
  static constexpr int NT = BM / 64 * 128;               // the consumers (the epilogue's threads)
  static constexpr int NT_LOAD = 128;                    // the producer warpgroup
  static constexpr int NT_ALL = NT + NT_LOAD;
  // Registers per thread after setmaxnreg: the launch gives 65536 / 384 (168); the
  // producer keeps 56, the MMA warpgroups take 224 (the accumulators, and the epilogue's
  // loads ahead of its stores).
  static constexpr int REGS_LOAD = 56, REGS_MMA = 224;
  static_assert(MIN_BLOCKS == 1 && REGS_LOAD * NT_LOAD + REGS_MMA * NT <= 65536, "the register file");
  static constexpr int VW = 8;
  static constexpr int ROWS_BYTES = BM * (int)sizeof(RowInfo);
  static constexpr int BAR_BYTES = 2 * STAGES * 8;
  static constexpr int A_ELEMS = BM * BK, B_ELEMS = BN * BK;
  static constexpr int BYTES = ROWS_BYTES + BAR_BYTES + 1024 + STAGES * (A_ELEMS + B_ELEMS) * 2;
  static_assert(ROWS_BYTES % 8 == 0, "the barriers follow the row table");
  static_assert(STAGES >= 2, "a stage multiplied, one loading");
  static_assert(BM % 64 == 0 && (BN == 64 || BN == 128), "wgmma m64n64 or m64n128 per warpgroup");
};

template <int PASS, class T, class Cfg>
__device__ __forceinline__ void conv_ws(const PkConvParams& p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, NT = Cfg::NT, VW = Cfg::VW;
  constexpr int NI = BN / 8;
  constexpr bool A_KC = TcLayout<PASS>::A_KC, B_KC = TcLayout<PASS>::B_KC;
  constexpr int LDA = A_KC ? PK_SW128 : PK_SW128_MN64, LDB = B_KC ? PK_SW128 : PK_SW128_MN64;

  PK_DYNAMIC_SMEM(unsigned char, smem);
  RowInfo* rows = reinterpret_cast<RowInfo*>(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Cfg::ROWS_BYTES);
  uint64_t* empty = full + STAGES;
  const uint32_t s0 = smem_u32(smem);
  const uint32_t t0 = (s0 + (uint32_t)(Cfg::ROWS_BYTES + Cfg::BAR_BYTES) + 1023u) & ~1023u;
  T* As = reinterpret_cast<T*>(smem + (t0 - s0));
  T* Bs = As + STAGES * Cfg::A_ELEMS;

  const int tid = (int)threadIdx.x;
  const int m0 = (int)blockIdx.x * BM, n0 = (int)blockIdx.y * BN;
  const Geo geo = make_geo<PASS>(p);
  if (m0 >= geo.gemm_m) return;  // a dgrad phase with fewer rows: the whole block leaves
  int kt0, kt1;
  k_range<PASS>(p, geo, BK, kt0, kt1);
  const int nkt = kt1 - kt0;

  if (tid == 0) {
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(&full[st], (unsigned)Cfg::NT_LOAD);
      mbar_init(&empty[st], (unsigned)NT);
    }
  }
  fill_rows<PASS, BM, Cfg::NT_ALL>(p, geo, rows, m0, tid);
  __syncthreads();  // the barriers initialized, the row table filled

  if (tid >= NT) {  // the producer
    setmaxnreg_dec<Cfg::REGS_LOAD>();
    const int ptid = tid - NT;
    const T *ga, *gb;
    operands<T>(p, ga, gb);
    typename LoaderFor<PASS, true, T, BM, BK, VW, Cfg::NT_LOAD, A_KC, LDA, false>::type la;
    typename LoaderFor<PASS, false, T, BN, BK, VW, Cfg::NT_LOAD, B_KC, LDB, false>::type lb;
    la.init(p, geo, ga, ptid, m0, kt0);
    lb.init(p, geo, gb, ptid, n0, kt0);
    for (int it = 0; it < nkt; ++it) {
      const int st = it % STAGES;
      mbar_wait(&empty[st], ((unsigned)(it / STAGES) & 1u) ^ 1u);  // the stage's last round released
      la.load(p, As + st * Cfg::A_ELEMS, rows, st);
      lb.load(p, Bs + st * Cfg::B_ELEMS, rows, st);
      cp_async_mbar_arrive(&full[st]);
    }
    return;
  }

  setmaxnreg_inc<Cfg::REGS_MMA>();
  const int wg = tid >> 7;
  float acc[1][NI][4];
#pragma unroll
  for (int j = 0; j < NI; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][j][e] = 0.0f;
  float* d = &acc[0][0][0];
  for (int it = 0; it < nkt; ++it) {
    const int st = it % STAGES;
    mbar_wait(&full[st], (unsigned)(it / STAGES) & 1u);
    fence_proxy_async();  // the tile's copies (generic proxy), before the MMAs read them
    wg_tile_mma<PASS, T, Cfg>(d, As + st * Cfg::A_ELEMS, Bs + st * Cfg::B_ELEMS, wg);
#ifdef PK_FAULT_CONV_WS_EARLY_RELEASE
    mbar_arrive(&empty[st]);  // planted bug (emulation only): released while its MMAs run
    wgmma_wait<1>();
#else
    wgmma_wait<1>();  // the MMAs of tile it-1 are done: its stage goes back to the producer
    if (it > 0) mbar_arrive(&empty[(it - 1) % STAGES]);
#endif
  }
  wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < NI * 4; ++j) wgmma_fence_acc(d[j]);
  tc_epilogue<PASS, T, Cfg, STAGES * Cfg::A_ELEMS * 2, 1>(p, acc, rows, As, geo, m0, n0, tid);
}

// ---------------------------------------------------------------- SIMT kernel (f32)
template <int BM_, int BN_>
struct SimtCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 8, TM = 8, TN = 8, STAGES = 3;
  static constexpr int NT = (BM / TM) * (BN / TN);
  static constexpr int LDA = BM + 4, LDB = BN + 4;
  static constexpr int ROWS_BYTES = BM * (int)sizeof(RowInfo);
  static constexpr int BYTES = ROWS_BYTES + STAGES * BK * (LDA + LDB) * 4;
};

template <int PASS, class Cfg, bool BNIN>
__device__ __forceinline__ void conv_simt(const PkConvParams& p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, NT = Cfg::NT;
  constexpr int TM = Cfg::TM, TN = Cfg::TN, LDA = Cfg::LDA, LDB = Cfg::LDB;
  PK_DYNAMIC_SMEM(unsigned char, smem);
  RowInfo* rows = reinterpret_cast<RowInfo*>(smem);
  float* As = reinterpret_cast<float*>(smem + Cfg::ROWS_BYTES);
  float* Bs = As + STAGES * BK * LDA;

  const int tid = (int)threadIdx.x;
  const int tx = tid % (BN / TN), ty = tid / (BN / TN);
  const int m0 = (int)blockIdx.x * BM, n0 = (int)blockIdx.y * BN;
  const Geo geo = make_geo<PASS>(p);
  if (m0 >= geo.gemm_m) return;  // a dgrad phase with fewer rows: the whole block leaves
  int kt0, kt1;
  k_range<PASS>(p, geo, BK, kt0, kt1);
  const float *ga, *gb;
  operands<float>(p, ga, gb);
  typename LoaderFor<PASS, true, float, BM, BK, 1, NT, false, LDA, BNIN>::type la;
  typename LoaderFor<PASS, false, float, BN, BK, 1, NT, false, LDB, BNIN>::type lb;
  la.init(p, geo, ga, tid, m0, kt0);
  lb.init(p, geo, gb, tid, n0, kt0);
  fill_rows<PASS, BM, NT>(p, geo, rows, m0, tid);
  __syncthreads();

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  const int nkt = kt1 - kt0;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < nkt) {
      la.load(p, As + st * BK * LDA, rows, st);
      lb.load(p, Bs + st * BK * LDB, rows, st);
    }
    cp_async_commit();
  }
  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 2>();
    if (BNIN) {  // as in conv_tc
      const int cs = it % STAGES;
      la.transform(p, As + cs * BK * LDA, cs);
      lb.transform(p, Bs + cs * BK * LDB, cs);
    }
    __syncthreads();
    {
      const int nxt = it + STAGES - 1;
      if (nxt < nkt) {
        const int st = nxt % STAGES;
        la.load(p, As + st * BK * LDA, rows, st);
        lb.load(p, Bs + st * BK * LDB, rows, st);
      }
      cp_async_commit();
    }
    const float* a_s = As + (it % STAGES) * BK * LDA;
    const float* b_s = Bs + (it % STAGES) * BK * LDB;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(a_s + kk * LDA + ty * TM + i);
        a[i] = v.x;
        a[i + 1] = v.y;
        a[i + 2] = v.z;
        a[i + 3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < TN; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(b_s + kk * LDB + tx * TN + j);
        b[j] = v.x;
        b[j + 1] = v.y;
        b[j + 2] = v.z;
        b[j + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; j += 2)
      store_pair<PASS, float>(p, rows, ty * TM + i, m0 + ty * TM + i, n0 + tx * TN + j, acc[i][j], acc[i][j + 1]);
  if (PASS == PK_FPROP && p.bn_stats) {
    // Row group of the thread: ty; its columns: tx * TN + j.
    constexpr int RG = BM / TM;
    static_assert((RG + 1) * BN <= STAGES * BK * LDA, "the statistics fit in the A stages");
    float* red = As;
    float* cmean = red + RG * BN;
    const int vrows = min(BM, geo.gemm_m - m0);
    __syncthreads();  // every thread is done with the stages
#pragma unroll 1
    for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int cl = tx * TN + j;
        const float mu = pass ? cmean[cl] : 0.0f;
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float d = acc[i][j] - mu;
          if (ty * TM + i < vrows) sum = pass ? fmaf(d, d, sum) : sum + d;
        }
        red[ty * BN + cl] = sum;
      }
      __syncthreads();
      bn_stats_columns<BN, RG, NT>(p, red, cmean, tid, n0, vrows, pass);
      __syncthreads();
    }
  }
  if (PASS == PK_DGRAD && p.bn_grad) {
    // Row group of the thread: ty; its columns: tx * TN + j (as conv_tc).
    constexpr int RG = BM / TM;
    static_assert((RG + 1) * BN <= STAGES * BK * LDA, "the sums fit in the A stages");
    float* red = As;
    float* csum = red + RG * BN;
    const int vrows = min(BM, geo.gemm_m - m0);
    int tiles;
    const int tile = grad_tile<BM>(p, tiles);
    float sums[TN][3];  // as conv_tc
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int col = n0 + tx * TN + j;
      sums[j][0] = sums[j][1] = sums[j][2] = 0.0f;
      if (col < p.gemm_n) {
        GradBn b;
        b.load(p, col);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int rl = ty * TM + i;
          if (rl < vrows) b.add<float>(p, (int64_t)rows[rl].out + col, acc[i][j], sums[j]);
        }
      }
    }
    __syncthreads();  // every thread is done with the stages
    const int passes = p.bn2_x ? 3 : 2;
#pragma unroll 1
    for (int pass = 0; pass < passes; ++pass) {
#pragma unroll
      for (int j = 0; j < TN; ++j) red[ty * BN + tx * TN + j] = pass == 0 ? sums[j][0] : pass == 1 ? sums[j][1] : sums[j][2];
      __syncthreads();
      bn_grad_columns<BN, RG, NT>(p, red, csum, tid, n0, tile, tiles, pass);
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------- entry points
// conv2d_<pass>_<tile>_<dtype>; the wrapper picks the tile (see the top of this file) and
// launches Cfg::NT threads with Cfg::BYTES of dynamic shared memory.
// t128x128 asks for 2 blocks per SM (at most 128 registers per thread; ptxas reports no
// spills): 16 warps and 2 x 84 KB of shared memory per SM.
typedef TcCfg<128, 128, 2, 4, 4, true, 2> TcL;
typedef TcCfg<128, 64, 2, 2, 4, true, 1> TcM;
typedef TcCfg<64, 64, 2, 2, 4, true, 1> TcS;
typedef TcCfg<64, 64, 2, 2, 3, false, 1> TcG;  // scalar loads: any width
typedef SimtCfg<128, 128> SimtL;
typedef SimtCfg<64, 64> SimtS;

// conv2d_fprop_bnin_<tile>_<dtype> and conv2d_wgrad_bnin_<tile>_<dtype>: the same with the
// BN (+ ReLU) applied to x as it is loaded (see "BN on the input").
#define PK_CONV_TC(pass, PASS, tile, Cfg, dt, T, BNIN) \
  PK_KERNEL_BOUNDS(conv2d_##pass##_##tile##_##dt, PkConvParams, Cfg::NT, Cfg::MIN_BLOCKS) { conv_tc<PASS, T, Cfg, BNIN>(p); }
#define PK_CONV_TC_ALL(pass, PASS, dt, T, BNIN)  \
  PK_CONV_TC(pass, PASS, t128x128, TcL, dt, T, BNIN) \
  PK_CONV_TC(pass, PASS, t128x64, TcM, dt, T, BNIN)  \
  PK_CONV_TC(pass, PASS, t64x64, TcS, dt, T, BNIN)   \
  PK_CONV_TC(pass, PASS, t64x64s, TcG, dt, T, BNIN)
#define PK_CONV_SIMT(pass, PASS, BNIN)                                                        \
  PK_KERNEL_BOUNDS(conv2d_##pass##_t128x128_f32, PkConvParams, SimtL::NT, 1) {                \
    conv_simt<PASS, SimtL, BNIN>(p);                                                          \
  }                                                                                           \
  PK_KERNEL_BOUNDS(conv2d_##pass##_t64x64_f32, PkConvParams, SimtS::NT, 1) { conv_simt<PASS, SimtS, BNIN>(p); }

PK_CONV_TC_ALL(fprop, PK_FPROP, bf16, bf16, false)
PK_CONV_TC_ALL(dgrad, PK_DGRAD, bf16, bf16, false)
PK_CONV_TC_ALL(wgrad, PK_WGRAD, bf16, bf16, false)
PK_CONV_TC_ALL(fprop, PK_FPROP, f16, f16, false)
PK_CONV_TC_ALL(dgrad, PK_DGRAD, f16, f16, false)
PK_CONV_TC_ALL(wgrad, PK_WGRAD, f16, f16, false)
PK_CONV_SIMT(fprop, PK_FPROP, false)
PK_CONV_SIMT(dgrad, PK_DGRAD, false)
PK_CONV_SIMT(wgrad, PK_WGRAD, false)
// conv2d_<pass>_w<tile>_<dtype>: the warpgroup kernel (sm_90a; it traps on other targets).
// Two warpgroups and 4 stages of 64 KB (w128x64: 48 KB) + the row table: one block per SM
// for w128x128, two for w128x64.
typedef WgCfg<128, 128, 4> WgL;
typedef WgCfg<128, 64, 4> WgM;
#define PK_CONV_WG(pass, PASS, tile, Cfg, dt, T) \
  PK_KERNEL_BOUNDS(conv2d_##pass##_##tile##_##dt, PkConvParams, Cfg::NT, 1) { conv_wg<PASS, T, Cfg>(p); }
#define PK_CONV_WG_ALL(pass, PASS)                  \
  PK_CONV_WG(pass, PASS, w128x128, WgL, bf16, bf16) \
  PK_CONV_WG(pass, PASS, w128x64, WgM, bf16, bf16)  \
  PK_CONV_WG(pass, PASS, w128x128, WgL, f16, f16)   \
  PK_CONV_WG(pass, PASS, w128x64, WgM, f16, f16)
PK_CONV_WG_ALL(fprop, PK_FPROP)
PK_CONV_WG_ALL(dgrad, PK_DGRAD)
PK_CONV_WG_ALL(wgrad, PK_WGRAD)
// conv2d_<pass>_ws<tile>_<dtype>: the warp-specialized warpgroup kernel (sm_90a; it traps on
// other targets). Three warpgroups, one block per SM; ws128x128: 5 stages of 32 KB,
// ws128x64: 6 stages of 24 KB.
typedef WsCfg<128, 128, 5, 1> WsL;
typedef WsCfg<128, 64, 6, 1> WsM;
#define PK_CONV_WS(pass, PASS, tile, Cfg, dt, T) \
  PK_KERNEL_BOUNDS(conv2d_##pass##_##tile##_##dt, PkConvParams, Cfg::NT_ALL, Cfg::MIN_BLOCKS) { conv_ws<PASS, T, Cfg>(p); }
#define PK_CONV_WS_ALL(pass, PASS)                   \
  PK_CONV_WS(pass, PASS, ws128x128, WsL, bf16, bf16) \
  PK_CONV_WS(pass, PASS, ws128x64, WsM, bf16, bf16)  \
  PK_CONV_WS(pass, PASS, ws128x128, WsL, f16, f16)   \
  PK_CONV_WS(pass, PASS, ws128x64, WsM, f16, f16)
PK_CONV_WS_ALL(fprop, PK_FPROP)
PK_CONV_WS_ALL(dgrad, PK_DGRAD)
PK_CONV_WS_ALL(wgrad, PK_WGRAD)
PK_CONV_TC_ALL(fprop_bnin, PK_FPROP, bf16, bf16, true)
PK_CONV_TC_ALL(wgrad_bnin, PK_WGRAD, bf16, bf16, true)
PK_CONV_TC_ALL(fprop_bnin, PK_FPROP, f16, f16, true)
PK_CONV_TC_ALL(wgrad_bnin, PK_WGRAD, f16, f16, true)
PK_CONV_SIMT(fprop_bnin, PK_FPROP, true)
PK_CONV_SIMT(wgrad_bnin, PK_WGRAD, true)

// ---------------------------------------------------------------- layout conversions
// transpose_<dtype>: dst[b][j][i] = src[b][i][j] for `batch` matrices of rows x cols.
// NCHW -> NHWC is (batch N, rows C, cols H*W); NHWC -> NCHW is (N, H*W, C); OIHW <-> KRSC
// are the same with (K, C, R*S). 32x32 tiles through shared memory (padded to 33 columns:
// conflict-free in both directions), 32x8 threads, coalesced on both sides. grid.z walks
// the batch in steps of gridDim.z.
template <class T>
__device__ __forceinline__ void transpose(const PkTransposeParams& p) {
  __shared__ T tile[32][33];
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const int i0 = (int)blockIdx.y * 32, j0 = (int)blockIdx.x * 32;
  const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
  const int64_t plane = (int64_t)p.rows * p.cols;
  for (int b = (int)blockIdx.z; b < p.batch; b += (int)gridDim.z) {
    const T* s = src + b * plane;
    T* d = dst + b * plane;
    for (int y = ty; y < 32; y += 8) {
      const int i = i0 + y, j = j0 + tx;
      if (i < p.rows && j < p.cols) tile[y][tx] = s[(int64_t)i * p.cols + j];
    }
    __syncthreads();
    for (int y = ty; y < 32; y += 8) {
      const int j = j0 + y, i = i0 + tx;
      if (i < p.rows && j < p.cols) d[(int64_t)j * p.rows + i] = tile[tx][y];
    }
    __syncthreads();
  }
}

PK_KERNEL(transpose_f32, PkTransposeParams) { transpose<float>(p); }
PK_KERNEL(transpose_bf16, PkTransposeParams) { transpose<bf16>(p); }
PK_KERNEL(transpose_f16, PkTransposeParams) { transpose<f16>(p); }

// transpose_pad_f32_<dtype>: dst[b][j][i] = i < rows ? (dtype)src[b][i][j] : 0 for i < ld
// (ld <= PK_PAD_MAX), for `batch` f32 matrices of rows x cols. The stem's input: NCHW f32
// images to NHWC in the conv's type with C = 3 padded to 8, so that the stem runs the
// 16-byte loads of the other convs; with cols = 1 it pads (or cuts) the rows of a KRSC
// weight or gradient instead. One thread per output row (b, j): the reads are coalesced
// along j, the row is written as 16-byte words where ld elements make whole words, else
// element by element.
template <class T>
__device__ __forceinline__ void transpose_pad(const PkTransposePadParams& p) {
  T* dst = static_cast<T*>(p.dst);
  const int64_t total = (int64_t)p.batch * p.cols;
  const int64_t plane = (int64_t)p.rows * p.cols;
  const int keep = p.rows < p.ld ? p.rows : p.ld;
  constexpr bool vec_type = sizeof(T) == 4 || std::is_same<T, bf16>::value;  // store_vec's types
  const bool words = vec_type && (p.ld * (int)sizeof(T)) % 16 == 0 && ((uintptr_t)dst & 15) == 0;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = t / p.cols;
    const int64_t j = t - b * p.cols;
    const float* s = p.src + b * plane + j;
    float v[PK_PAD_MAX];
#pragma unroll
    for (int i = 0; i < PK_PAD_MAX; ++i) v[i] = i < keep ? s[(int64_t)i * p.cols] : 0.0f;
    T* d = dst + t * p.ld;
    if constexpr (vec_type) {
      if (words) {
        constexpr int V = 16 / (int)sizeof(T);  // elements per 16-byte word
#pragma unroll
        for (int q = 0; q < PK_PAD_MAX / V; ++q)
          if (q * V < p.ld) store_vec<T, V>(d + q * V, v + q * V);
        continue;
      }
    }
#pragma unroll
    for (int i = 0; i < PK_PAD_MAX; ++i)
      if (i < p.ld) d[i] = from_f32<T>(v[i]);
  }
}

PK_KERNEL(transpose_pad_f32_f32, PkTransposePadParams) { transpose_pad<float>(p); }
PK_KERNEL(transpose_pad_f32_bf16, PkTransposePadParams) { transpose_pad<bf16>(p); }
PK_KERNEL(transpose_pad_f32_f16, PkTransposePadParams) { transpose_pad<f16>(p); }
