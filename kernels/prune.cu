// The pruning kernels: filter scores, group sums, top-k selection and compaction, each
// covering the whole network in one launch. CPU versions: src/cpu/prune.rs (oracle and
// fast path); wrappers: src/ops/prune.rs.
#include "common.cuh"

__device__ __forceinline__ float acc_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double acc_abs(double x) { return fabs(x); }
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------- filter norms
// One warp per filter: lane l sums elements l, l+32, ... in order, then an xor-butterfly
// adds the 32 partial sums. The CPU fast path does exactly the same, so both give the
// same bits and the same selection. Acc is double for f32 weights, float for 16-bit ones.
template <class T, class Acc>
__device__ __forceinline__ void filter_norms(const PkFilterNormsParams& p) {
  const int warps_per_block = (int)(blockDim.x / 32);
  const int f = (int)blockIdx.x * warps_per_block + (int)(threadIdx.x / 32);
  const int lane = (int)(threadIdx.x % 32);
  if (f >= p.total_filters) return;  // whole warps leave together
  const PkNormSegment seg = p.segments[last_starting_by(p.segments, p.num_segments, &PkNormSegment::out_offset, f)];
  const T* w = static_cast<const T*>(seg.weights) + (int64_t)(f - seg.out_offset) * seg.filter_len;
  Acc acc = 0;
  if (p.norm == 1) {
    for (int i = lane; i < seg.filter_len; i += 32) acc += acc_abs((Acc)to_f32(w[i]));
  } else {
    for (int i = lane; i < seg.filter_len; i += 32) {
      const Acc x = (Acc)to_f32(w[i]);
      acc = acc_fma(x, x, acc);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) p.scores[f] = p.norm == 1 ? (double)acc : sqrt((double)acc);
}

PK_KERNEL(filter_norms_f32, PkFilterNormsParams) { filter_norms<float, double>(p); }
PK_KERNEL(filter_norms_bf16, PkFilterNormsParams) { filter_norms<bf16, float>(p); }
PK_KERNEL(filter_norms_f16, PkFilterNormsParams) { filter_norms<f16, float>(p); }

// ---------------------------------------------------------------- group sums
// blockIdx.y is the group; each thread sums one channel over the group's members, in
// member order.
PK_KERNEL(group_sums_f64, PkGroupSumsParams) {
  const int g = (int)blockIdx.y;
  const int c = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= p.num_groups || c >= p.width[g]) return;
  double s = 0.0;
  for (int m = p.member_start[g]; m < p.member_start[g + 1]; ++m) s += p.scores[p.member_offset[m] + c];
  p.scores[p.dst_offset[g] + c] = s;
}

// ---------------------------------------------------------------- top-k
// Element j ranks before element i: larger scores first, NaN last, ties to the lower
// index. This is a strict total order, so the ranks are a permutation.
__device__ __forceinline__ bool ranks_before(double a, int j, double b, int i) {
  const bool an = isnan(a), bn = isnan(b);
  if (an != bn) return bn;
  if (!an && a != b) return a > b;
  return j < i;
}

// One block per segment. Each element counts the elements ranked before it: it is kept
// if fewer than n are; its place in the output is the number of kept elements before it.
PK_KERNEL(topk_f64, PkTopkParams) {
  __shared__ double s[PK_TOPK_MAX_WIDTH];
  __shared__ unsigned char kept[PK_TOPK_MAX_WIDTH];
  const PkTopkSegment seg = p.segments[blockIdx.x];
  for (int i = (int)threadIdx.x; i < seg.width; i += (int)blockDim.x) s[i] = p.scores[seg.offset + i];
  __syncthreads();
  for (int i = (int)threadIdx.x; i < seg.width; i += (int)blockDim.x) {
    const double si = s[i];
    int rank = 0;
    for (int j = 0; j < seg.width; ++j) rank += ranks_before(s[j], j, si, i) ? 1 : 0;
    kept[i] = rank < seg.n ? 1 : 0;
  }
  __syncthreads();
  for (int i = (int)threadIdx.x; i < seg.width; i += (int)blockDim.x) {
    if (!kept[i]) continue;
    int pos = 0;
    for (int j = 0; j < i; ++j) pos += kept[j];
    p.keep[seg.keep_offset + pos] = i;
  }
}

// ---------------------------------------------------------------- compaction
// blockIdx.y is the job; the blocks along x stride over its elements.
template <class T>
__device__ __forceinline__ void gather(const PkGatherParams& p) {
  const PkGatherJob job = p.jobs[blockIdx.y];
  const int64_t plane = (int64_t)job.n_mid * job.n_cols;
  const int64_t total = (int64_t)job.n_rows * plane;
  const T* src = static_cast<const T*>(job.src);
  T* dst = static_cast<T*>(job.dst);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = e / plane;
    const int64_t rem = e - i * plane;
    const int64_t j = rem / job.n_cols;
    const int64_t l = rem - j * job.n_cols;
    const int64_t si = job.rows ? job.rows[i] : i;
    const int64_t sj = job.mids ? job.mids[j] : j;
    const int64_t sl = job.cols ? job.cols[l] : l;
    dst[e] = src[(si * job.src_mid + sj) * job.src_cols + sl];
  }
}

PK_KERNEL(gather_f32, PkGatherParams) { gather<float>(p); }
PK_KERNEL(gather_bf16, PkGatherParams) { gather<bf16>(p); }
PK_KERNEL(gather_f16, PkGatherParams) { gather<f16>(p); }
