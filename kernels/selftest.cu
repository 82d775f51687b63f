// Kernels that test the execution model rather than compute anything for prunekit:
// the emulation's own tests (tests/emu.rs) run them, and on a GPU the same tests check
// that the emulation and the hardware agree.
#include "common.cuh"

#define ST_TILE 16

// C[m, n] = A[m, k] * B[k, n], row-major f32, 16x16 tiles through shared memory.
// mode 1 leaves out the barrier between loading a tile and using it (a race).
PK_KERNEL(selftest_gemm_f32, PkSelftestParams) {
  __shared__ float as[ST_TILE][ST_TILE];
  __shared__ float bs[ST_TILE][ST_TILE];
  const float* a = static_cast<const float*>(p.a);
  const float* b = static_cast<const float*>(p.b);
  float* c = static_cast<float*>(p.c);
  const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
  const int row = (int)blockIdx.y * ST_TILE + ty, col = (int)blockIdx.x * ST_TILE + tx;
  float acc = 0.0f;
  for (int k0 = 0; k0 < p.k; k0 += ST_TILE) {
    as[ty][tx] = (row < p.m && k0 + tx < p.k) ? a[(int64_t)row * p.k + k0 + tx] : 0.0f;
    bs[ty][tx] = (col < p.n && k0 + ty < p.k) ? b[(int64_t)(k0 + ty) * p.n + col] : 0.0f;
    if (p.mode != 1) __syncthreads();
    for (int kk = 0; kk < ST_TILE; ++kk) acc += as[ty][kk] * bs[kk][tx];
    __syncthreads();
  }
  if (row < p.m && col < p.n) c[(int64_t)row * p.n + col] = acc;
}

// c[0] += sum(a[0 .. m)): warp shuffles, then the warps' sums through shared memory,
// then one atomicAdd per block. mode 1: an atomicAdd per warp instead.
PK_KERNEL(selftest_reduce_f32, PkSelftestParams) {
  __shared__ float warp_sums[32];
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  float v = 0.0f;
  for (int i = (int)(blockIdx.x * blockDim.x + threadIdx.x); i < p.m; i += (int)(gridDim.x * blockDim.x)) v += a[i];
  v = warp_sum(v);
  const int warp = (int)(threadIdx.x / 32), lane = (int)(threadIdx.x % 32);
  if (p.mode == 1) {
    if (lane == 0) atomicAdd(c, v);
    return;
  }
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (int)(blockDim.x / 32);
    float s = lane < nwarps ? warp_sums[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) atomicAdd(c, s);
  }
}

// Integer atomics and ballot: c[0] += number of elements of a (as int) that are odd,
// c[1] = max of them, counted once per warp through a ballot.
PK_KERNEL(selftest_ballot_i32, PkSelftestParams) {
  const int* a = static_cast<const int*>(p.a);
  int* c = static_cast<int*>(p.c);
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  const int v = i < p.m ? a[i] : 0;
  const unsigned odd = __ballot_sync(0xffffffffu, i < p.m && (v & 1));
  if (threadIdx.x % 32 == 0) atomicAdd(&c[0], __popc(odd));
  if (i < p.m) atomicMax(&c[1], v);
}

// Writes c[i] = i for i <= m: one element past the end of a buffer of m floats.
PK_KERNEL(selftest_oob_write_f32, PkSelftestParams) {
  float* c = static_cast<float*>(p.c);
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i <= p.m) c[i] = (float)i;
}

// mode 0: threads below 16 wait at a barrier the others never reach.
// mode 1: threads below 16 return before a barrier the others wait at.
// mode 2: two halves of the block wait at two different barriers.
PK_KERNEL(selftest_divergent_barrier, PkSelftestParams) {
  float* c = static_cast<float*>(p.c);
  const int t = (int)threadIdx.x;
  if (p.mode == 0) {
    if (t < 16) __syncthreads();
  } else if (p.mode == 1) {
    if (t < 16) return;
    __syncthreads();
  } else {
    if (t < 16) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  }
  c[blockIdx.x * blockDim.x + t] = 1.0f;
}

// c[i] = a[i] for i < m: reading a fresh buffer shows its poison.
PK_KERNEL(selftest_copy_f32, PkSelftestParams) {
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < p.m) c[i] = a[i];
}

// One warp: D[16, 8] = A[16, 16] * B[16, 8] with A row-major and B given as Bt[8][16]
// (bf16), through cp.async into shared memory, ldmatrix and mma.sync. D is row-major
// f32. Shared memory is dynamic (768 bytes), so that the emulation poisons it: mode 1
// reads it without waiting for the copies and sees the poison.
PK_KERNEL(selftest_mma_bf16, PkSelftestParams) {
  PK_DYNAMIC_SMEM(bf16, smem);
  bf16(*as)[16] = reinterpret_cast<bf16(*)[16]>(smem);
  bf16(*bts)[16] = reinterpret_cast<bf16(*)[16]>(smem + 256);
  const bf16* a = static_cast<const bf16*>(p.a);
  const bf16* bt = static_cast<const bf16*>(p.b);
  float* d = static_cast<float*>(p.c);
  const int lane = (int)threadIdx.x;
  // 16x16 bf16 = 32 chunks of 16 bytes (8 elements): one per lane; Bt: 16 chunks.
  cp_async_16(&as[lane / 2][(lane % 2) * 8], a + lane * 8, 16);
  if (lane < 16) cp_async_16(&bts[lane / 2][(lane % 2) * 8], bt + lane * 8, 16);
  cp_async_commit();
  if (p.mode != 1) cp_async_wait<0>();
  __syncthreads();
  uint32_t af[4], bf[2];
  ldmatrix_x4(af, &as[lane % 16][(lane / 16) * 8]);
  ldmatrix_x2(bf, &bts[lane % 8][((lane / 8) % 2) * 8]);
  float c0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc[4];
  mma_m16n8k16_bf16(acc, af, bf, c0);
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// As selftest_mma_bf16, but B given row-major B[16][8] and loaded with ldmatrix.trans.
PK_KERNEL(selftest_mma_trans_f16, PkSelftestParams) {
  __shared__ __align__(16) f16 as[16][16];
  __shared__ __align__(16) f16 bs[16][8];
  const f16* a = static_cast<const f16*>(p.a);
  const f16* b = static_cast<const f16*>(p.b);
  float* d = static_cast<float*>(p.c);
  const int lane = (int)threadIdx.x;
  for (int i = lane; i < 256; i += 32) as[i / 16][i % 16] = a[i];
  for (int i = lane; i < 128; i += 32) bs[i / 8][i % 8] = b[i];
  __syncthreads();
  uint32_t af[4], bf[2];
  ldmatrix_x4(af, &as[lane % 16][(lane / 16) * 8]);
  ldmatrix_x2_trans(bf, &bs[lane % 16][0]);
  float c0[4] = {1.0f, 1.0f, 1.0f, 1.0f}, acc[4];
  mma_m16n8k16_f16(acc, af, bf, c0);
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// Warp shuffles: for every lane l with value v = a[l]:
//   c[4l]   = __shfl_sync(v, (l + 3) % 32)      c[4l+1] = __shfl_down_sync(v, 5)
//   c[4l+2] = __shfl_up_sync(v, 7)              c[4l+3] = __shfl_xor_sync(v, 9, width 16)
PK_KERNEL(selftest_shfl_i32, PkSelftestParams) {
  const int* a = static_cast<const int*>(p.a);
  int* c = static_cast<int*>(p.c);
  const int l = (int)threadIdx.x;
  const int v = a[l];
  c[4 * l] = __shfl_sync(0xffffffffu, v, (l + 3) % 32);
  c[4 * l + 1] = __shfl_down_sync(0xffffffffu, v, 5);
  c[4 * l + 2] = __shfl_up_sync(0xffffffffu, v, 7);
  c[4 * l + 3] = __shfl_xor_sync(0xffffffffu, v, 9, 16);
}


// Each thread writes its value to shared memory, the warp runs a collective, then each
// thread reads a value written by the other warp: c[t] = a[(t + 32) % 64] with 64
// threads. mode 1 leaves out the __syncthreads between the write and the read; a warp
// collective must not hide that.
PK_KERNEL(selftest_warp_race_f32, PkSelftestParams) {
  PK_DYNAMIC_SMEM(float, s);
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int t = (int)threadIdx.x;
  s[t] = a[t];
  if (p.mode != 1) __syncthreads();
  const float v = __shfl_xor_sync(0xffffffffu, s[t], 1);
  c[t] = s[(t + 32) % (int)blockDim.x] + 0.0f * v;
}

// c[0..4) = the float4 at a + m: a misaligned vector load unless m is a multiple of 4.
PK_KERNEL(selftest_vector_load_f32, PkSelftestParams) {
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const float4 v = *reinterpret_cast<const float4*>(a + p.m);
  c[0] = v.x;
  c[1] = v.y;
  c[2] = v.z;
  c[3] = v.w;
}

// ---------------------------------------------------------------- sanitizer selftests
// Each of these does one thing wrong (unless its mode says otherwise); tests/emu_sanitize.rs
// checks that the instrumented emulation reports it with the kernel's name.

// c[i] = a[i - 1] for i < m: thread 0 reads the element just before the buffer.
PK_KERNEL(selftest_read_before_f32, PkSelftestParams) {
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < p.m) c[i] = a[i - 1];
}

// Thread 0 writes c[-300]: 1200 bytes before the buffer.
PK_KERNEL(selftest_write_before_f32, PkSelftestParams) {
  float* c = static_cast<float*>(p.c);
  if (blockIdx.x == 0 && threadIdx.x == 0) c[-300] = 1.0f;
}

// c[i] = a[i] for i <= m: one element past the end of a (m elements), in the slack up to
// the next multiple of 16 bytes when m is not a multiple of 4.
PK_KERNEL(selftest_read_past_end_f32, PkSelftestParams) {
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i <= p.m) c[i] = a[i];
}

// Every thread adds 1 to the counter c[0]: mode 0 with a plain read-modify-write (a
// data race: a GPU loses most of the updates), mode 1 with atomicAdd.
PK_KERNEL(selftest_counter_i32, PkSelftestParams) {
  int* c = static_cast<int*>(p.c);
  if (p.mode == 1)
    atomicAdd(&c[0], 1);
  else
    c[0] = c[0] + 1;
}

// Thread 0 of block b writes c[b] = a[b], then reads c[b ^ 1], which the neighbouring
// block writes: nothing orders two blocks of one launch (mode 0, a race). Mode 1 reads
// its own block's c[b] after a barrier. c[gridDim.x + b] receives what was read.
PK_KERNEL(selftest_cross_block_f32, PkSelftestParams) {
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const unsigned b = blockIdx.x;
  if (threadIdx.x == 0) c[b] = a[b];
  __syncthreads();
  if (threadIdx.x == 0) c[gridDim.x + b] = c[p.mode == 1 ? b : (b ^ 1u)];
}

// c[g] = s[t] (g the thread's index in the grid) for a static shared array that nobody
// wrote (mode 0): the poison on the emulation. Mode 1 writes s[t] = a[t] first.
PK_KERNEL(selftest_static_smem_f32, PkSelftestParams) {
  __shared__ float s[256];
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int t = (int)threadIdx.x;
  if (p.mode == 1) s[t] = a[t];
  __syncthreads();
  c[blockIdx.x * blockDim.x + t] = s[t];
}

// __syncwarp() without a mask (all lanes): each lane writes s[t] = a[t], then reads its
// neighbour's: c[g] = s[t ^ 1] (g the thread's index in the grid).
PK_KERNEL(selftest_syncwarp_f32, PkSelftestParams) {
  __shared__ float s[256];
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int t = (int)threadIdx.x;
  s[t] = a[t];
  __syncwarp();
  c[blockIdx.x * blockDim.x + t] = s[t ^ 1];
}

// One warpgroup: D[64, n] = A[64, 64] * B[n, 64]^T, n = p.n (64 or 128), bf16 inputs
// K-major in global memory, through cp.async into 128-byte-swizzled shared memory
// (sw128_idx) at a 1024-byte boundary, then four wgmma k16 steps through descriptors. D
// row-major f32 [64][n]. Dynamic shared memory: 1024 + 128 + (64 + n) * 128 bytes.
// mode 1: overwrites A's tile with zeros after issuing the MMAs, before waiting for them
//         (a race: the emulation performs the MMAs at the wait, so they read the zeros);
// mode 2: the tiles start 128 bytes past the boundary (the swizzle, a function of the
//         address, then pairs other chunks with each row: a different product);
// mode 3: never waits for the MMAs (an error in the emulation);
// mode 4: copies A's tile again (cp.async) before waiting for the MMAs that read it (an
//         error in the emulation: on the GPU the copy may land first);
// mode 5: A and B MN-major in shared memory (sw128mn_idx, element by element), the MMAs
//         with both transpose flags.
PK_KERNEL(selftest_wgmma_bf16, PkSelftestParams) {
  PK_DYNAMIC_SMEM(unsigned char, smem);
  const uint32_t s0 = smem_u32(smem);
  const uint32_t t0 = ((s0 + 1023u) & ~1023u) + (p.mode == 2 ? 128u : 0u);
  bf16* as = reinterpret_cast<bf16*>(smem + (t0 - s0));
  bf16* bs = as + 64 * 64;
  const bf16* a = static_cast<const bf16*>(p.a);
  const bf16* b = static_cast<const bf16*>(p.b);
  float* d = static_cast<float*>(p.c);
  const int tid = (int)threadIdx.x;
  const bool mn = p.mode == 5;
  if (mn) {
    for (int i = tid; i < 64 * 64; i += 128) as[sw128mn_idx<64>(i / 64, i % 64)] = a[i];
    for (int i = tid; i < p.n * 64; i += 128) bs[sw128mn_idx<64>(i / 64, i % 64)] = b[i];
  } else {
    for (int i = tid; i < 64 * 8; i += 128) cp_async_16(as + sw128_idx(i / 8, (i % 8) * 8), a + i * 8, 16);
    for (int i = tid; i < p.n * 8; i += 128) cp_async_16(bs + sw128_idx(i / 8, (i % 8) * 8), b + i * 8, 16);
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  float acc[64];
#pragma unroll
  for (int j = 0; j < 64; ++j) acc[j] = 0.0f;
  wgmma_fence();
  for (int ks = 0; ks < 4; ++ks) {
    if (mn) {  // 64-deep MN-major tiles: a k16 slice is two 8-row atoms further
      const uint64_t da = wgmma_desc_sw128_mn(smem_u32(as) + 2048u * (uint32_t)ks, 64u * 128u);
      const uint64_t db = wgmma_desc_sw128_mn(smem_u32(bs) + 2048u * (uint32_t)ks, 64u * 128u);
      if (p.n == 128)
        wgmma_m64n128k16<bf16, 1, 1>(acc, da, db, 1);
      else
        wgmma_m64n64k16<bf16, 1, 1>(acc, da, db, 1);
    } else {
      const uint64_t da = wgmma_desc_sw128(smem_u32(as) + 32u * (uint32_t)ks);
      const uint64_t db = wgmma_desc_sw128(smem_u32(bs) + 32u * (uint32_t)ks);
      if (p.n == 128)
        wgmma_m64n128k16<bf16>(acc, da, db, 1);
      else
        wgmma_m64n64k16<bf16>(acc, da, db, 1);
    }
  }
  wgmma_commit();
  if (p.mode == 1) {
    for (int i = tid; i < 64 * 64; i += 128) as[i] = __float2bfloat16(0.0f);
    __syncthreads();
  }
  if (p.mode == 4) {
    for (int i = tid; i < 64 * 8; i += 128) cp_async_16(as + sw128_idx(i / 8, (i % 8) * 8), a + i * 8, 16);
    cp_async_commit();
  }
  if (p.mode != 3) wgmma_wait<0>();
  const int w = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
#pragma unroll
  for (int j = 0; j < 64; ++j) {
    const int row = 16 * w + g + (((j >> 1) & 1) ? 8 : 0);
    const int col = 8 * (j >> 2) + 2 * t + (j & 1);
    if (j < p.n / 2) d[row * p.n + col] = acc[j];
  }
}

// A producer/consumer pipeline on mbarriers: c[i] = 2 a[i] + 1 for i < m, the input
// passing through a ring of 3 shared-memory stages of 128 floats. Warp 0 produces: it
// waits until consumers have freed a stage (`empty`, 64 arrivals), fills it and arrives on
// `full`; warps 1 and 2 consume: they wait on `full`, write their outputs and arrive on
// `empty`. 96 threads, 64 + 3 * 512 bytes of dynamic shared memory.
// mode 0: each producer lane copies 16 bytes with cp.async (the tail zero-filled) and
//         arrives when they land (full: 32 arrivals).
// mode 1: lane 0 announces the stage's bytes and copies them with one bulk copy (full: 1
//         arrival; m % 4 == 0, the bulk copy's 16-byte granularity).
// mode 2: as 0, but the consumers neither wait on `full` (a race) nor arrive on `empty`
//         (m <= 384: one round of the ring).
// mode 3: as 0, but the producer leaves out the last chunk (a deadlock).
// mode 4: as 0, but `empty` is never initialized.
PK_KERNEL(selftest_mbarrier_f32, PkSelftestParams) {
  constexpr int STAGES = 3, CHUNK = 128;
  PK_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + STAGES;
  float* ring = reinterpret_cast<float*>(smem + 64);
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nch = (p.m + CHUNK - 1) / CHUNK;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], p.mode == 1 ? 1u : 32u);
      if (p.mode != 4) mbar_init(&empty[s], 64u);
    }
  }
  __syncthreads();
  if (warp == 0) {
    const int last = p.mode == 3 ? nch - 1 : nch;
    for (int ch = 0; ch < last; ++ch) {
      const int s = ch % STAGES;
      const unsigned ph = (unsigned)(ch / STAGES) & 1u;
      mbar_wait(&empty[s], ph ^ 1u);  // the stage's previous round consumed (at once in round 0)
      float* dst = ring + s * CHUNK;
      const int i0 = ch * CHUNK;
      if (p.mode == 1) {
        if (lane == 0) {
          const unsigned bytes = (unsigned)min(CHUNK, p.m - i0) * 4u;
          mbar_arrive_expect_tx(&full[s], bytes);
          bulk_copy_g2s(dst, a + i0, bytes, &full[s]);
        }
      } else {
        const int i = i0 + lane * 4;
        const unsigned src_bytes = (unsigned)max(0, min(4, p.m - i)) * 4u;
        cp_async_16(dst + lane * 4, src_bytes ? a + i : a, src_bytes);
        cp_async_mbar_arrive(&full[s]);
      }
    }
  } else {
    const int ctid = tid - 32;
    for (int ch = 0; ch < nch; ++ch) {
      const int s = ch % STAGES;
      const unsigned ph = (unsigned)(ch / STAGES) & 1u;
      if (p.mode != 2) mbar_wait(&full[s], ph);
      for (int j = ctid; j < CHUNK; j += 64) {
        const int i = ch * CHUNK + j;
        if (i < p.m) c[i] = 2.0f * ring[s * CHUNK + j] + 1.0f;
      }
      if (p.mode != 2) mbar_arrive(&empty[s]);
    }
  }
}

// Named barriers: two groups of two warps each synchronize on their own barrier (group g
// on barrier 1 + g, 64 threads). In round r every thread stores v + r, the group meets,
// and each thread takes the value its mirror thread in the group stored (local index
// 63 - i), then the group meets again before the next round overwrites the slots. Group
// 0 runs n rounds and exits; group 1 runs n + 2, so its last rounds meet while group 0
// has exited. c[tid] = the final v. 128 threads, 512 bytes of dynamic shared memory.
// mode 1: the first barrier of each round left out (a race).
// mode 2: warp 3 exits before group 1's last round (a deadlock: 32 of 64 threads arrive).
// mode 3: warp 3 gives barrier 2 the count 96 (two counts for one barrier).
// mode 4: both groups use barrier 1 (128 threads at a barrier of 64).
PK_KERNEL(selftest_named_barrier_f32, PkSelftestParams) {
  PK_DYNAMIC_SMEM(float, slot);
  const float* a = static_cast<const float*>(p.a);
  float* c = static_cast<float*>(p.c);
  const int tid = (int)threadIdx.x, warp = tid >> 5, group = warp >> 1, local = tid & 63;
  const unsigned id = p.mode == 4 ? 1u : 1u + (unsigned)group;
  const unsigned count = p.mode == 3 && warp == 3 ? 96u : 64u;
  const int rounds = group == 0 ? p.n : p.n + 2;
  float v = a[tid];
  for (int r = 0; r < rounds; ++r) {
    if (p.mode == 2 && warp == 3 && r == rounds - 1) return;
    slot[tid] = v + (float)r;
    if (p.mode != 1) bar_sync(id, count);
    v = slot[group * 64 + 63 - local];
    bar_sync(id, count);
  }
  c[tid] = v;
}
