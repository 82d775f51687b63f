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

#include <type_traits>
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

// ---------------------------------------------------------------- mbarrier (sm_90)
// An mbarrier is a uint64_t in shared memory (PTX ISA, "mbarrier") that counts arrivals
// and transaction bytes per phase: mbar_init(bar, n) makes each phase wait for n
// arrivals; a phase completes when all have arrived and every byte announced by
// mbar_arrive_expect_tx has landed, and the next phase starts with the same count.
// mbar_wait(bar, parity) returns once the phase of that parity (phase k has parity k % 2)
// has completed, i.e. while the barrier's current phase has the other parity: a fresh
// barrier is in phase 0, so waiting for parity 1 returns at once (a producer's first wait
// for free buffers) and waiting for parity 0 waits for the first phase. Arrivals release
// and completed waits acquire: the writes before an arrival are visible after the wait.
//   mbar_arrive(bar)                    one arrival
//   mbar_arrive_expect_tx(bar, bytes)   the phase also waits for `bytes`, then one arrival
//   cp_async_mbar_arrive(bar)           one arrival once this thread's cp.async copies so
//                                       far have landed (.noinc: it counts against n)
//   bulk_copy_g2s(dst, src, bytes, bar) global to shared (a multiple of 16 bytes, 16-byte
//                                       aligned), landing `bytes` on bar
// Initialize before a __syncthreads and before any other thread uses the barrier. On
// targets below sm_90 these trap: the kernels that use them run on Hopper only.
#ifdef PK_EMU
#define mbar_init(bar, count) ::pk_emu::mbarrier_init((bar), (count), __FILE__, __LINE__)
#define mbar_arrive(bar) ::pk_emu::mbarrier_arrive((bar), 1, 0, __FILE__, __LINE__)
#define mbar_arrive_expect_tx(bar, bytes) ::pk_emu::mbarrier_arrive((bar), 1, (bytes), __FILE__, __LINE__)
#define mbar_try_wait(bar, parity) ::pk_emu::mbarrier_try_wait((bar), (parity), __FILE__, __LINE__)
#define mbar_wait(bar, parity) ::pk_emu::mbarrier_wait((bar), (parity), __FILE__, __LINE__)
#define cp_async_mbar_arrive(bar) ::pk_emu::cp_async_mbarrier_arrive((bar), __FILE__, __LINE__)
#define bulk_copy_g2s(dst, src, bytes, bar) ::pk_emu::bulk_copy_to_shared((dst), (src), (bytes), (bar), __FILE__, __LINE__)
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, unsigned parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
#else
__device__ __forceinline__ void mbar_init(uint64_t*, unsigned) { __trap(); }
__device__ __forceinline__ void mbar_arrive(uint64_t*) { __trap(); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t*, unsigned) { __trap(); }
__device__ __forceinline__ bool mbar_try_wait(uint64_t*, unsigned) {
  __trap();
  return false;
}
__device__ __forceinline__ void mbar_wait(uint64_t*, unsigned) { __trap(); }
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t*) { __trap(); }
__device__ __forceinline__ void bulk_copy_g2s(void*, const void*, unsigned, uint64_t*) { __trap(); }
#endif

// ---------------------------------------------------------------- named barriers
// bar_sync(id, count): waits until `count` threads (a multiple of 32, whole warps) of the
// block wait at barrier `id` (1 to 15; __syncthreads is barrier 0 with every thread), so
// that a part of the block synchronizes while the rest runs on or has exited (the
// consumer warpgroups of a warp-specialized kernel). Every thread that uses a barrier id
// must give it the same count.
#ifdef PK_EMU
#define bar_sync(id, count) ::pk_emu::named_barrier_sync((id), (count), __FILE__, __LINE__)
#else
__device__ __forceinline__ void bar_sync(unsigned id, unsigned count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
#endif

// ---------------------------------------------------------------- warpgroup MMA (sm_90a)
// wgmma.mma_async: a warpgroup (4 consecutive warps, the first one's index a multiple of
// 4) computes D[64 x N] (+)= A[64 x 16] * B[N x 16]^T, A and B read from shared memory
// through 64-bit matrix descriptors, D in registers: f32 accumulators, 16-bit inputs. The
// instruction is asynchronous: wgmma_commit() closes a group of issued MMAs,
// wgmma_wait<N>() waits until at most N groups are pending; until then neither the
// accumulators nor the shared memory the MMAs read may be touched. wgmma_fence() comes
// before the first MMA that uses accumulators written by other instructions.
// Fragment of D (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts",
// wgmma .m64nNk16): warp w of the warpgroup holds rows 16w .. 16w+15; with g = lane >> 2,
// t = lane % 4, d[j] is row 16w + g (+8 when j % 4 >= 2), column 8 (j / 4) + 2t + j % 2:
// the m16n8 C fragment of mma.sync repeated along N.
// Descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4, 16-29
// leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base
// offset, 62-63 swizzle (0 none, 1 128-byte, 2 64-byte, 3 32-byte). The kernels use the
// 128-byte swizzle ("Canonical Layouts", CuTe notation, T = 8 16-bit elements per 16
// bytes), whose atom is 8 rows of 128 bytes (1024 bytes, 1024-byte aligned) with the
// 16-byte chunk c of row r stored at chunk c ^ (r % 8): the swizzle is a function of the
// shared-memory address itself, bits 4-6 ^= bits 7-9.
//   K-major  ((8,m),(T,2k)):((8T,SBO),(1,T)): a row is an M/N index with 64 K elements,
//            atoms of 8 rows SBO = 1024 bytes apart; an MMA's k16 slice starts 32 bytes
//            further per step (the leading offset is unused).
//   MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)): a row is a K index with 64 M/N
//            elements, atoms of 8 K rows SBO = 1024 bytes apart, the next 64 M/N elements
//            LBO bytes further; an MMA's k16 slice starts 2048 bytes further per step.
// On targets without wgmma (anything but sm_90a) these helpers trap: the ops layer never
// launches the kernels that use them there.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_HAS_WGMMA 1
#endif
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t saddr) {
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | (1ull << 16) | ((uint64_t)(1024u >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ uint64_t wgmma_desc_sw128_mn(uint32_t saddr, uint32_t lbo) {
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(1024u >> 4) << 32) |
         (1ull << 62);
}
// Element (r, k) of a K-major 128-byte-swizzled tile of 16-bit elements, [rows][64], whose
// base is 1024-byte aligned in shared memory: its index from the base.
__device__ __forceinline__ int sw128_idx(int r, int k) {
  return (r >> 3) * 512 + (r & 7) * 64 + ((((k >> 3) ^ r) & 7) << 3) + (k & 7);
}
// Element (mn, k) of an MN-major 128-byte-swizzled tile of 16-bit elements, BK deep: blocks
// of 64 M/N elements, each BK / 8 atoms of 8 K rows (LBO = BK * 128 bytes).
template <int BK>
__device__ __forceinline__ int sw128mn_idx(int mn, int k) {
  return ((mn >> 6) * (BK / 8) + (k >> 3)) * 512 + (k & 7) * 64 + ((((mn >> 3) ^ k) & 7) << 3) + (mn & 7);
}
#ifdef PK_EMU
namespace pk_emu {
// The emulated shared-memory address of dynamic shared memory's first byte: deliberately
// not a multiple of 1024, so that a kernel that takes its own base as aligned for the
// swizzle reads the wrong elements.
constexpr uint32_t kDynSmemAddr = 0x410;
inline uint32_t smem_addr(const void* p, const char* file, int line) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (tls_dyn_smem == nullptr || b < tls_dyn_smem || b >= tls_dyn_smem + tls_dyn_smem_bytes)
    trap("shared-memory address of a pointer outside dynamic shared memory", file, line);
  return kDynSmemAddr + (uint32_t)(b - tls_dyn_smem);
}
// The 16-bit element at shared-memory address `a`.
inline unsigned short smem_u16_at(uint32_t a, const char* file, int line) {
  if (a < kDynSmemAddr || a + 2 > kDynSmemAddr + tls_dyn_smem_bytes)
    trap("wgmma reads outside dynamic shared memory", file, line);
  unsigned short v;
  std::memcpy(&v, tls_dyn_smem + (a - kDynSmemAddr), 2);
  return v;
}
// Address of element (r, k), r the M/N index, k < 16, of the operand that descriptor `d`
// names, K-major or MN-major: the canonical layouts above (without swizzle: 8x16-byte core
// matrices; K-major ((8,m),(T,2k)):((T,SBO),(1,LBO)), MN-major ((T,1,m),(8,k)):((1,T,SBO),
// (T,LBO))).
inline uint32_t wgmma_elem_addr(uint64_t d, bool mn_major, int r, int k, const char* file, int line) {
  const uint32_t start = (uint32_t)(d & 0x3FFFu) << 4;
  const uint32_t lbo = (uint32_t)((d >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = (uint32_t)((d >> 32) & 0x3FFFu) << 4;
  const unsigned base_offset = (unsigned)((d >> 49) & 7u), mode = (unsigned)(d >> 62);
  const uint32_t ur = (uint32_t)r, uk = (uint32_t)k;
  if (base_offset != 0) trap("wgmma descriptor: a base offset is not emulated", file, line);
  if (mode == 0) {
    if (mn_major) return start + (ur >> 3) * sbo + (uk >> 3) * lbo + (uk & 7) * 16u + (ur & 7) * 2u;
    return start + (ur >> 3) * sbo + (uk >> 3) * lbo + (ur & 7) * 16u + (uk & 7) * 2u;
  }
  if (mode != 1) trap("wgmma descriptor: the 64- and 32-byte swizzles are not emulated", file, line);
  uint32_t a;
  if (mn_major) {
    if ((start & 127u) != 0) trap("wgmma descriptor: an MN-major slice that does not start a 128-byte row", file, line);
    a = start + (ur >> 6) * lbo + (uk >> 3) * sbo + (uk & 7) * 128u + (ur & 63) * 2u;
  } else {
    if ((start & 127u) + 32u > 128u) trap("wgmma descriptor: a k16 slice crosses a 128-byte row", file, line);
    a = start + (ur >> 3) * sbo + (ur & 7) * 128u + uk * 2u;
  }
  return a ^ (((a >> 7) & 7u) << 4);
}
// The shared memory [lo, hi) (host addresses) that an MMA reads through descriptor `d`:
// `rows` M/N indices (64 of A, N of B) of 16 K elements each.
inline void wgmma_read_range(uint64_t d, bool mn_major, int rows, const unsigned char*& lo, const unsigned char*& hi,
                             const char* file, int line) {
  const uint32_t start = (uint32_t)(d & 0x3FFFu) << 4;
  const uint32_t lbo = (uint32_t)((d >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = (uint32_t)((d >> 32) & 0x3FFFu) << 4;
  const unsigned mode = (unsigned)(d >> 62);
  const uint32_t r = (uint32_t)rows;
  // 128-byte swizzle: the XOR permutes chunks within each 128-byte row of an 8-row atom.
  const uint32_t a = mode == 1 ? start & ~127u : start;
  uint32_t end;
  if (mode == 1)
    end = mn_major ? a + (r / 64 - 1) * lbo + sbo + 8u * 128u : a + (r / 8 - 1) * sbo + 8u * 128u;
  else
    end = mn_major ? a + (r / 8 - 1) * sbo + lbo + 128u : a + (r / 8 - 1) * sbo + lbo + 128u;
  if (a < kDynSmemAddr || end > kDynSmemAddr + tls_dyn_smem_bytes)
    trap("wgmma reads outside dynamic shared memory", file, line);
  lo = tls_dyn_smem + (a - kDynSmemAddr);
  hi = tls_dyn_smem + (end - kDynSmemAddr);
}
template <class T, int N>
inline void wgmma_run(const WgmmaOp& op) {
  const int g = (int)(op.lane >> 2), t = (int)(op.lane & 3);
  for (int j = 0; j < N / 2; ++j) {
    const int row = (int)op.row0 + g + (((j >> 1) & 1) ? 8 : 0);
    const int col = 8 * (j >> 2) + 2 * t + (j & 1);
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const uint32_t aa = wgmma_elem_addr(op.desc_a, op.trans_a, row, k, op.file, op.line);
      const uint32_t ba = wgmma_elem_addr(op.desc_b, op.trans_b, col, k, op.file, op.line);
      acc += half_bits_to_f32<T>(smem_u16_at(aa, op.file, op.line)) * half_bits_to_f32<T>(smem_u16_at(ba, op.file, op.line));
    }
    op.d[j] = (op.scale_d ? op.d[j] : 0.0f) + acc;
  }
}
// Issue: the descriptors must be the same in every lane of the warp (checked), the block a
// whole number of warpgroups; the MMA is performed, reading shared memory and the
// accumulators, when the thread waits for its group.
template <class T, int N>
inline void wgmma(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d, int trans_a, int trans_b, const char* file,
                  int line) {
  if ((tls_block_dim.x * tls_block_dim.y * tls_block_dim.z) % 128u != 0)
    trap("wgmma in a block that is not a whole number of warpgroups", file, line);
  const uint64_t mine[2] = {desc_a, desc_b};
  uint64_t all[32 * 2];
  warp_exchange(0xffffffffu, mine, sizeof(mine), all, file, line);
  for (int i = 0; i < 32; ++i)
    if (all[2 * i] != desc_a || all[2 * i + 1] != desc_b) trap("wgmma descriptors differ between lanes", file, line);
  WgmmaOp op;
  op.run = &wgmma_run<T, N>;
  op.d = d;
  op.desc_a = desc_a;
  op.desc_b = desc_b;
  op.scale_d = scale_d;
  op.trans_a = trans_a != 0;
  op.trans_b = trans_b != 0;
  op.row0 = 16u * (tls_fiber->warp % 4u);
  op.lane = tls_fiber->lane;
  op.file = file;
  op.line = line;
  wgmma_read_range(desc_a, op.trans_a, 64, op.lo[0], op.hi[0], file, line);
  wgmma_read_range(desc_b, op.trans_b, N, op.lo[1], op.hi[1], file, line);
  wgmma_issue(op);
}
}  // namespace pk_emu
namespace pk_emu {
template <int N>
struct WgmmaAt {
  const char* file;
  int line;
  template <class T, int TA = 0, int TB = 0>
  void call(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) const {
    wgmma<T, N>(d, desc_a, desc_b, scale_d, TA, TB, file, line);
  }
};
}  // namespace pk_emu
#define smem_u32(p) ::pk_emu::smem_addr((p), __FILE__, __LINE__)
// wgmma_m64n<N>k16<T, TA, TB>(d, desc_a, desc_b, scale_d), as on the GPU.
#define wgmma_m64n64k16 ::pk_emu::WgmmaAt<64>{__FILE__, __LINE__}.call
#define wgmma_m64n128k16 ::pk_emu::WgmmaAt<128>{__FILE__, __LINE__}.call
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_fence_acc(float&) {}
__device__ __forceinline__ void wgmma_commit() { ::pk_emu::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  ::pk_emu::wgmma_wait(N);
}
// The proxy fence orders this thread's generic-proxy writes to shared memory before the
// async proxy's reads (wgmma): the emulation has one proxy, and does not check it.
__device__ __forceinline__ void fence_proxy_async() {}
#else
#ifdef PK_HAS_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#else
__device__ __forceinline__ void wgmma_fence() { __trap(); }
__device__ __forceinline__ void wgmma_commit() { __trap(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  __trap();
}
__device__ __forceinline__ void fence_proxy_async() { __trap(); }
#endif
// Keeps the compiler from moving accesses to an accumulator across the asynchronous MMAs.
__device__ __forceinline__ void wgmma_fence_acc(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// wgmma.mma_async m64n64k16 with f32 accumulators and inputs of type TY ("bf16", "f16").
#define PK_WGMMA_M64N64K16(TY)                                                        \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                      \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                    \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
      "}, %32, %33, p, 1, 1, %35, %36;\n}\n"                                   \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TA), "n"(TB))
// D[64 x 64] (+)= A[64 x 16] * B[64 x 16]^T: this thread's 32 accumulators in d; TA, TB:
// A and B MN-major (imm-trans-a, imm-trans-b = 1) instead of K-major.
template <class T, int TA = 0, int TB = 0>
__device__ __forceinline__ void wgmma_m64n64k16(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
#ifdef PK_HAS_WGMMA
  if constexpr (std::is_same<T, bf16>::value)
    PK_WGMMA_M64N64K16("bf16");
  else
    PK_WGMMA_M64N64K16("f16");
#else
  __trap();
#endif
}
// wgmma.mma_async m64n128k16 with f32 accumulators and inputs of type TY ("bf16", "f16").
#define PK_WGMMA_M64N128K16(TY)                                                        \
  asm volatile(                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                      \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                    \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
      "}, %64, %65, p, 1, 1, %67, %68;\n}\n"                                   \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TA), "n"(TB))
// D[64 x 128] (+)= A[64 x 16] * B[128 x 16]^T: this thread's 64 accumulators in d; TA, TB:
// A and B MN-major (imm-trans-a, imm-trans-b = 1) instead of K-major.
template <class T, int TA = 0, int TB = 0>
__device__ __forceinline__ void wgmma_m64n128k16(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
#ifdef PK_HAS_WGMMA
  if constexpr (std::is_same<T, bf16>::value)
    PK_WGMMA_M64N128K16("bf16");
  else
    PK_WGMMA_M64N128K16("f16");
#else
  __trap();
#endif
}
#endif

// setmaxnreg_dec<N>() / setmaxnreg_inc<N>(): the warpgroup gives back registers or takes
// more, N per thread (24 to 256, a multiple of 8; every thread of the warpgroup executes
// it). A warp-specialized kernel launched with few registers per thread moves them from
// its producer warpgroup to its MMA warpgroups; code after the instruction is compiled
// for the new limit. The emulation checks N; sm_90a only (it traps elsewhere).
#ifdef PK_EMU
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24 to 256 registers, a multiple of 8");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24 to 256 registers, a multiple of 8");
}
#elif defined(PK_HAS_WGMMA)
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24 to 256 registers, a multiple of 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24 to 256 registers, a multiple of 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#else
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  __trap();
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  __trap();
}
#endif

// ---------------------------------------------------------------- reductions
// The index of the last of n >= 1 records, in order of their field `start`, whose start is
// at or before x (records[0].start <= x): a binary search.
template <class R, class K>
__device__ __forceinline__ int last_starting_by(const R* records, int n, K R::*start, int64_t x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if ((int64_t)(records[mid].*start) <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
