// Host emulation of the CUDA execution model.
//
// This header lets a C++17 compiler build the unchanged kernels/*.cu files for the
// host. Each CUDA thread is a fiber; a block runs its fibers on one host thread, and
// blocks are spread over a pool of host threads (runtime.cpp). What compute-sanitizer
// would catch is caught here too: reads and writes past the end of a buffer fault on a
// guard page, fresh buffers hold a poison pattern, a barrier that not every thread of
// the block reaches is an error, and the order in which fibers run between barriers
// can be reversed or shuffled so that a missing barrier changes the result.
//
// Supported: __syncthreads, static (`__shared__`) and dynamic shared memory, warp
// shuffles, ballot/any/all, __syncwarp, atomics on global and shared memory,
// __half/__nv_bfloat16 with round-to-nearest-even conversions, the math intrinsics
// the kernels use. Tensor-core and async-copy primitives are emulated in
// kernels/common.cuh on top of pk_emu::warp_exchange and the cp.async queue here.
#pragma once
#ifndef PK_EMU
#error "kernels/emu/emu.h is the host emulation of CUDA: build with -DPK_EMU"
#endif

#include <math.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory is per block. A block runs all its fibers on one host thread
// and a host thread runs one block at a time, so a thread-local is exactly per block.
// Every static shared variable lives in the TLS section pk_shared, which the runtime
// fills with poison at the start of each block (the linker's __start_pk_shared and
// __stop_pk_shared bound this thread's instance of it): a read before the first write
// shows the poison, as on dynamic shared memory.
#define __shared__ static thread_local __attribute__((section("pk_shared")))

// ---------------------------------------------------------------- vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---------------------------------------------------------------- runtime interface
namespace pk_emu {

// The part of a fiber that kernels see (through threadIdx and the warp intrinsics).
struct FiberHead {
  uint3 tid;
  unsigned int linear;  // x + y*bx + z*bx*by
  unsigned int lane;    // linear % 32
  unsigned int warp;    // linear / 32
};

extern thread_local FiberHead* tls_fiber;
extern thread_local uint3 tls_block_idx;
extern thread_local dim3 tls_block_dim;
extern thread_local dim3 tls_grid_dim;
extern thread_local unsigned char* tls_dyn_smem;
extern thread_local size_t tls_dyn_smem_bytes;

void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
// bar.sync id, count (a named barrier, kernels/common.cuh): the calling thread waits until
// `count` threads of the block (a multiple of 32) wait at barrier `id` (1 to 15; 0 is
// __syncthreads'). The threads that are not among them run on, so a part of the block
// (the consumer warpgroups of a warp-specialized kernel) synchronizes without the rest.
void named_barrier_sync(unsigned id, unsigned count, const char* file, int line);
// Every lane in `mask` passes `bytes` (<= 64) bytes; afterwards `all` holds 32 slots of
// `bytes` bytes each, slot i holding lane i's bytes (lanes outside the mask: zeros).
void warp_exchange(unsigned mask, const void* mine, unsigned bytes, void* all, const char* file, int line);
[[noreturn]] void trap(const char* what, const char* file, int line);

// Asynchronous copies (cp.async): queued per fiber, performed when the fiber waits
// for their group, so a kernel that reads shared memory before waiting sees stale data.
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait(int keep_pending_groups);

// Warpgroup MMAs (wgmma.mma_async, kernels/common.cuh): queued per fiber with the group
// they belong to, performed (`run`: reads shared memory and the accumulators, writes the
// accumulators) when the fiber waits for their group, so that a kernel that touches
// either before waiting sees stale or wrong data. The block keeps the shared memory its
// MMAs in flight read ([lo, hi) of A and of B, host addresses): a cp.async into it is an
// error (on the GPU the copy may land before the MMA reads). A fiber that ends with MMAs
// it never waited for is an error.
struct WgmmaOp {
  void (*run)(const WgmmaOp&);
  const unsigned char* lo[2];
  const unsigned char* hi[2];
  float* d;
  uint64_t desc_a, desc_b;
  int scale_d;
  bool trans_a, trans_b;  // MN-major A, B
  unsigned row0;  // 16 * (warp % 4): the first row of D this warp holds
  unsigned lane;
  const char* file;
  int line;
  unsigned group;
};
void wgmma_issue(const WgmmaOp& op);
void wgmma_commit();
void wgmma_wait(int keep_pending_groups);

// mbarrier objects (PTX ISA, "Parallel Synchronization and Communication Instructions:
// mbarrier"; kernels/common.cuh): 8 bytes of shared memory whose state the block keeps
// beside it, from mbar_init on: the arrivals each phase expects, those still pending, the
// transaction bytes still expected (negative while copies have landed before their
// expect_tx) and the phases completed. A phase completes when its pending arrivals and
// its transaction bytes both reach zero; then the next phase expects the same arrivals.
// A wait for the phase of parity P returns once the current phase's parity is not P, as
// try_wait.parity; the fiber waits in the scheduler meanwhile, and a wait that can never
// complete (everybody else waiting or exited) is a deadlock, reported. cp.async's arrive
// and the bulk copy perform their copies at once, before they arrive or complete their
// bytes: a thread that reads the data without waiting for the barrier sees it only if the
// schedule ran the copying thread first.
void mbarrier_init(void* bar, unsigned count, const char* file, int line);
// `count` arrivals, after adding `tx_bytes` to the expected transaction bytes.
void mbarrier_arrive(void* bar, unsigned count, unsigned tx_bytes, const char* file, int line);
bool mbarrier_try_wait(void* bar, unsigned parity, const char* file, int line);
void mbarrier_wait(void* bar, unsigned parity, const char* file, int line);
// cp.async.mbarrier.arrive.noinc: this thread's cp.async copies so far, then an arrival.
void cp_async_mbarrier_arrive(void* bar, const char* file, int line);
// cp.async.bulk (global to shared, completing `bytes` on `bar`).
void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes, void* bar, const char* file, int line);

// Module table: one per translation unit (kernels/<module>.cu), filled by registrars.
struct Kernel {
  const char* name;
  void (*entry)(const void*);
  size_t param_size;
};
constexpr int kMaxKernelsPerModule = 512;
struct Module {
  int count;
  Kernel kernels[kMaxKernelsPerModule];
};
struct Registrar {
  Registrar(Module* m, const char* name, void (*entry)(const void*), size_t param_size);
};

}  // namespace pk_emu

// Each translation unit (one kernels/*.cu) gets its own table.
static pk_emu::Module pk_tu_module;

#define PK_EMU_KERNEL(name, P)                                                                  \
  static void name(const P p);                                                                  \
  static void pk_tramp_##name(const void* a) { name(*static_cast<const P*>(a)); }               \
  static ::pk_emu::Registrar pk_reg_##name(&pk_tu_module, #name, &pk_tramp_##name, sizeof(P)); \
  static void name(const P p)

#define threadIdx (::pk_emu::tls_fiber->tid)
#define blockIdx (::pk_emu::tls_block_idx)
#define blockDim (::pk_emu::tls_block_dim)
#define gridDim (::pk_emu::tls_grid_dim)
#define warpSize 32

#define __syncthreads() ::pk_emu::syncthreads(__FILE__, __LINE__)
// `__syncwarp()` without a mask means every lane, as in CUDA.
#define __syncwarp(...) (::pk_emu::SyncWarpAt{__FILE__, __LINE__}(__VA_ARGS__))
#define __trap() ::pk_emu::trap("__trap()", __FILE__, __LINE__)
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)

namespace pk_emu {
struct SyncWarpAt {
  const char* file;
  int line;
  void operator()(unsigned mask = 0xffffffffu) const { syncwarp(mask, file, line); }
};

template <class T>
inline T shfl_impl(const char* file, int line, unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "__shfl_*_sync: at most 8 bytes");
  unsigned char all[32 * sizeof(T)];
  warp_exchange(mask, &v, sizeof(T), all, file, line);
  src &= 31;
  if (!((mask >> src) & 1u)) trap("__shfl_*_sync reads a lane outside its mask", file, line);
  T out;
  std::memcpy(&out, all + src * sizeof(T), sizeof(T));
  return out;
}
template <class T>
inline T shfl_sync(const char* file, int line, unsigned mask, T v, int src, int width = 32) {
  const int lane = (int)tls_fiber->lane;
  const int base = lane & ~(width - 1);
  return shfl_impl(file, line, mask, v, base + (src & (width - 1)));
}
template <class T>
inline T shfl_down_sync(const char* file, int line, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)tls_fiber->lane;
  const int base = lane & ~(width - 1);
  int src = lane + (int)delta;
  if (src >= base + width) src = lane;
  return shfl_impl(file, line, mask, v, src);
}
template <class T>
inline T shfl_up_sync(const char* file, int line, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)tls_fiber->lane;
  const int base = lane & ~(width - 1);
  int src = lane - (int)delta;
  if (src < base) src = lane;
  return shfl_impl(file, line, mask, v, src);
}
template <class T>
inline T shfl_xor_sync(const char* file, int line, unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = (int)tls_fiber->lane;
  const int base = lane & ~(width - 1);
  int src = lane ^ lane_mask;
  if (src >= base + width) src = lane;
  return shfl_impl(file, line, mask, v, src);
}
inline unsigned ballot_sync(const char* file, int line, unsigned mask, int pred) {
  unsigned char mine = pred ? 1 : 0;
  unsigned char all[32];
  warp_exchange(mask, &mine, 1, all, file, line);
  unsigned out = 0;
  for (int i = 0; i < 32; ++i)
    if (((mask >> i) & 1u) && all[i]) out |= 1u << i;
  return out;
}
}  // namespace pk_emu

#define __shfl_sync(...) ::pk_emu::shfl_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::pk_emu::shfl_down_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::pk_emu::shfl_up_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::pk_emu::shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::pk_emu::ballot_sync(__FILE__, __LINE__, (mask), (pred))
#define __any_sync(mask, pred) (::pk_emu::ballot_sync(__FILE__, __LINE__, (mask), (pred)) != 0u)
#define __all_sync(mask, pred) \
  (::pk_emu::ballot_sync(__FILE__, __LINE__, (mask), (pred)) == (unsigned)(mask))

// ---------------------------------------------------------------- atomics
// Fibers of one block never preempt each other inside an atomic, and blocks on
// different host threads use the hardware atomics below.
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
template <class F, class U>
inline F pk_atomic_float_op(F* a, F v, F (*op)(F, F)) {
  static_assert(sizeof(F) == sizeof(U), "size");
  U* ua = reinterpret_cast<U*>(a);
  U old = __atomic_load_n(ua, __ATOMIC_RELAXED);
  for (;;) {
    F oldf;
    std::memcpy(&oldf, &old, sizeof(F));
    F newf = op(oldf, v);
    U newu;
    std::memcpy(&newu, &newf, sizeof(F));
    if (__atomic_compare_exchange_n(ua, &old, newu, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return oldf;
  }
}
inline float atomicAdd(float* a, float v) {
  return pk_atomic_float_op<float, uint32_t>(a, v, [](float x, float y) { return x + y; });
}
inline double atomicAdd(double* a, double v) {
  return pk_atomic_float_op<double, uint64_t>(a, v, [](double x, double y) { return x + y; });
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* a, float v) {
  uint32_t u, o;
  std::memcpy(&u, &v, 4);
  o = __atomic_exchange_n(reinterpret_cast<uint32_t*>(a), u, __ATOMIC_RELAXED);
  float r;
  std::memcpy(&r, &o, 4);
  return r;
}
template <class T>
inline T pk_atomic_cas(T* a, T compare, T val) {
  __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // holds the old value either way
}
inline int atomicCAS(int* a, int c, int v) { return pk_atomic_cas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return pk_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
  return pk_atomic_cas(a, c, v);
}
template <class T>
inline T pk_atomic_minmax(T* a, T v, bool is_max) {
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  for (;;) {
    T nv = is_max ? (v > old ? v : old) : (v < old ? v : old);
    if (__atomic_compare_exchange_n(a, &old, nv, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}
inline int atomicMax(int* a, int v) { return pk_atomic_minmax(a, v, true); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return pk_atomic_minmax(a, v, true); }
inline int atomicMin(int* a, int v) { return pk_atomic_minmax(a, v, false); }
inline unsigned atomicMin(unsigned* a, unsigned v) { return pk_atomic_minmax(a, v, false); }
inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAnd(unsigned* a, unsigned v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }

// ---------------------------------------------------------------- math intrinsics
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) {
  int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------- 16-bit floats
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline unsigned short pk_f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}
inline float pk_bf16_bits_to_f32(unsigned short b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned short pk_f32_to_f16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((absx >> 13) & 0x3ffu));  // NaN
  if (absx >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // overflow to inf (RNE)
  if (absx < 0x38800000u) {
    // Subnormal half or zero: value = m * 2^-24 with m = round(|f| * 2^24).
    if (absx < 0x33000000u) return (unsigned short)sign;  // below half the smallest subnormal
    const uint32_t e = absx >> 23;
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14 + (112 - e) ... maps to 24-bit mantissa
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return (unsigned short)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent: 127 -> 15
  r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  return (unsigned short)(sign | r);
}
inline float pk_f16_bits_to_f32(unsigned short h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {
      int shift = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++shift;
      }
      m &= 0x3ffu;
      u = sign | ((uint32_t)(127 - 15 + 1 - shift) << 23) | (m << 13);
    }
  } else if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{pk_f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return pk_bf16_bits_to_f32(b.__x); }
inline __half __float2half(float f) { return __half{pk_f32_to_f16_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return pk_f16_bits_to_f32(h.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return make_float2(__bfloat162float(v.x), __bfloat162float(v.y));
}
inline float2 __half22float2(__half2 v) { return make_float2(__half2float(v.x), __half2float(v.y)); }
