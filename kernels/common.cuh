// Shared by every kernels/*.cu: the entry-point macro, dynamic shared memory, element
// conversions, and the tensor-core and async-copy primitives. Each primitive has a CUDA
// implementation (inline PTX) and a host implementation for the emulation (kernels/emu),
// the latter following the fragment layouts exactly as NVIDIA's PTX ISA documents them.
#pragma once

#ifdef PK_EMU
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "params.h"

// ---------------------------------------------------------------- entry points
// Every entry point takes one parameter struct (declared in params.h and mirrored in
// src/ops/params.rs) by value, named `p`.
#ifdef PK_EMU
#define PK_KERNEL(name, P) PK_EMU_KERNEL(name, P)
#define PK_KERNEL_BOUNDS(name, P, max_threads, min_blocks) PK_EMU_KERNEL(name, P)
#define PK_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::pk_emu::tls_dyn_smem)
#else
#define PK_KERNEL(name, P) extern "C" __global__ void name(const P p)
#define PK_KERNEL_BOUNDS(name, P, max_threads, min_blocks) \
  extern "C" __global__ void __launch_bounds__(max_threads, min_blocks) name(const P p)
#define PK_DYNAMIC_SMEM(T, name)                             \
  extern __shared__ __align__(16) unsigned char pk_dyn_smem[]; \
  T* name = reinterpret_cast<T*>(pk_dyn_smem)
#endif

// ---------------------------------------------------------------- element conversions
// to_f32/from_f32 for the element types a kernel family is instantiated for.
typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
  return __float2half_rn(x);
}

// ---------------------------------------------------------------- tensor cores
// D = A * B + C for one m16n8k16 tile, A row-major 16x16, B column-major 16x8, 16-bit
// inputs packed two per 32-bit register, f32 accumulators. Fragment layout (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"), with g = lane >> 2 and
// t = lane % 4:
//   A: a[r] holds two elements, row g (+8 for r = 1, 3), columns 2t, 2t+1 (+8 for r >= 2)
//   B: b[r] holds two elements, rows 2t, 2t+1 (+8 for r = 1), column g
//   C, D: c[i] at row g (+8 for i >= 2), column 2t + (i & 1)
#ifdef PK_EMU
namespace pk_emu {
template <class T>
inline float half_bits_to_f32(unsigned short b);
template <>
inline float half_bits_to_f32<bf16>(unsigned short b) {
  return pk_bf16_bits_to_f32(b);
}
template <>
inline float half_bits_to_f32<f16>(unsigned short b) {
  return pk_f16_bits_to_f32(b);
}
struct MmaFrag {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};
template <class T>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
                         int line) {
  MmaFrag mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, c, sizeof(mine.c));
  MmaFrag all[32];
  warp_exchange(0xffffffffu, &mine, sizeof(MmaFrag), all, file, line);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + ((r & 1) ? 8 : 0);
      const int col = 2 * t + ((r & 2) ? 8 : 0);
      A[row][col] = half_bits_to_f32<T>((unsigned short)(all[lane].a[r] & 0xffffu));
      A[row][col + 1] = half_bits_to_f32<T>((unsigned short)(all[lane].a[r] >> 16));
    }
    for (int r = 0; r < 2; ++r) {
      const int row = 2 * t + (r ? 8 : 0);
      B[row][g] = half_bits_to_f32<T>((unsigned short)(all[lane].b[r] & 0xffffu));
      B[row + 1][g] = half_bits_to_f32<T>((unsigned short)(all[lane].b[r] >> 16));
    }
  }
  const int lane = (int)tls_fiber->lane;
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0);
    const int col = 2 * t + (i & 1);
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] = acc + c[i];
  }
}
}  // namespace pk_emu
#define mma_m16n8k16_bf16(d, a, b, c) ::pk_emu::mma_m16n8k16<bf16>((d), (a), (b), (c), __FILE__, __LINE__)
#define mma_m16n8k16_f16(d, a, b, c) ::pk_emu::mma_m16n8k16<f16>((d), (a), (b), (c), __FILE__, __LINE__)
#else
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
#endif

// ldmatrix: loads 8x8 matrices of 16-bit elements from shared memory. Lanes 8j..8j+7
// give the addresses of the 8 rows (16 bytes each, 16-byte aligned) of matrix j. After
// the load, register j of lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j
// (with .trans: column l/4, rows 2(l%4) and 2(l%4)+1). x1 uses lanes 0-7, x2 lanes 0-15.
#ifdef PK_EMU
namespace pk_emu {
template <int N, bool TRANS>
inline void ldmatrix(uint32_t* r, const void* row_addr, const char* file, int line) {
  // Every row an active lane names is 16 bytes and must be 16-byte aligned.
  const unsigned lane_id = tls_fiber->lane;
  if (lane_id < 8u * N && (reinterpret_cast<uintptr_t>(row_addr) & 15u) != 0)
    trap("ldmatrix row address not 16-byte aligned", file, line);
  const void* all[32];
  warp_exchange(0xffffffffu, &row_addr, sizeof(row_addr), all, file, line);
  const int lane = (int)tls_fiber->lane;
  for (int j = 0; j < N; ++j) {
    unsigned short e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = TRANS ? 2 * (lane & 3) + h : lane >> 2;
      const int col = TRANS ? lane >> 2 : 2 * (lane & 3) + h;
      const auto* p = static_cast<const unsigned short*>(all[8 * j + row]);
      e[h] = p[col];
    }
    r[j] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
  }
}
}  // namespace pk_emu
#define ldmatrix_x1(r, p) ::pk_emu::ldmatrix<1, false>((r), (p), __FILE__, __LINE__)
#define ldmatrix_x2(r, p) ::pk_emu::ldmatrix<2, false>((r), (p), __FILE__, __LINE__)
#define ldmatrix_x4(r, p) ::pk_emu::ldmatrix<4, false>((r), (p), __FILE__, __LINE__)
#define ldmatrix_x2_trans(r, p) ::pk_emu::ldmatrix<2, true>((r), (p), __FILE__, __LINE__)
#define ldmatrix_x4_trans(r, p) ::pk_emu::ldmatrix<4, true>((r), (p), __FILE__, __LINE__)
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
#endif

// cp.async: copies `bytes` (4, 8 or 16) from global to shared memory without going
// through registers. Only the first `src_bytes` are read; the rest is zero-filled
// (src_bytes = 0 reads nothing, which is how out-of-range tiles are padded).
// Copies become visible after cp_async_commit() and cp_async_wait<N>() (which waits
// until at most N committed groups are still in flight) and, for other threads, a
// __syncthreads().
#ifdef PK_EMU
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, unsigned src_bytes) {
  ::pk_emu::cp_async(smem, gmem, 16, src_bytes);
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem, unsigned src_bytes) {
  ::pk_emu::cp_async(smem, gmem, 8, src_bytes);
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, unsigned src_bytes) {
  ::pk_emu::cp_async(smem, gmem, 4, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::pk_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::pk_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, unsigned src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem, unsigned src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, unsigned src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// ---------------------------------------------------------------- reductions
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
