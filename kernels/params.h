// Parameter structs of the kernel entry points, one per kernel family.
//
// Each struct is mirrored field by field in src/ops/params.rs (#[repr(C)]); a test
// compares sizes and offsets against the table in kernels/emu/layout.cpp. Rules that
// keep the layout identical everywhere: device pointers are `const void*`/`void*`
// (8 bytes), counts are int32_t or int64_t, 8-byte fields first, and every struct is
// padded by hand to a multiple of 8 bytes.
#pragma once
#ifdef PK_EMU
#include <cstdint>
#else
#include <stdint.h>
#endif

// ---------------------------------------------------------------- prune.cu
// One conv weight (KRSC) whose filter norms go to scores[out_offset .. out_offset + k).
typedef struct {
  const void* weights;  // k * filter_len elements of the entry point's dtype
  int32_t k;            // filters (rows)
  int32_t filter_len;   // elements per filter: R*S*C
  int32_t out_offset;   // index of the first score of this segment
  int32_t pad0;
} PkNormSegment;

// filter_norms_<dtype>: scores[out_offset + k] = ||W[k, :]||_1 or _2 for every segment.
typedef struct {
  const PkNormSegment* segments;
  double* scores;
  int32_t num_segments;
  int32_t total_filters;  // sum of k over the segments
  int32_t norm;           // 1 (L1) or 2 (L2)
  int32_t pad0;
} PkFilterNormsParams;

// group_sums_f64: scores[dst_offset[g] + c] = sum over members m of group g of
// scores[member_offset[m] + c], for c < width[g]. Members of group g are
// member_offset[member_start[g] .. member_start[g + 1]).
typedef struct {
  double* scores;
  const int32_t* dst_offset;    // [num_groups]
  const int32_t* width;         // [num_groups]
  const int32_t* member_start;  // [num_groups + 1]
  const int32_t* member_offset; // [member_start[num_groups]]
  int32_t num_groups;
  int32_t max_width;
} PkGroupSumsParams;

// One selection: keep the n largest of scores[offset .. offset + width), ties to the
// lower index, kept indices (relative to offset) in ascending order to
// keep[keep_offset .. keep_offset + n).
typedef struct {
  int32_t offset;
  int32_t width;
  int32_t n;
  int32_t keep_offset;
} PkTopkSegment;

// topk_f64: one block per segment, width <= PK_TOPK_MAX_WIDTH.
typedef struct {
  const double* scores;
  const PkTopkSegment* segments;
  int32_t* keep;
  int32_t num_segments;
  int32_t pad0;
} PkTopkParams;
#define PK_TOPK_MAX_WIDTH 4096
#define PK_TOPK_THREADS 1024

// One gather: dst[i, j, l] = src[rows[i], mids[j], cols[l]] with src of shape
// [*, src_mid, src_cols] and dst of shape [n_rows, n_mid, n_cols]; a null index array
// means the identity. An OIHW weight is [O, I, H*W] (rows and mids), a KRSC weight
// [K, R*S, C] (rows and cols), a vector [n, 1, 1].
typedef struct {
  const void* src;
  void* dst;
  const int32_t* rows;
  const int32_t* mids;
  const int32_t* cols;
  int32_t n_rows;
  int32_t n_mid;
  int32_t n_cols;
  int32_t src_mid;
  int32_t src_cols;
  int32_t pad0;
} PkGatherJob;

// gather_<dtype>: every job of the table in one launch; blockIdx.y is the job.
typedef struct {
  const PkGatherJob* jobs;
  int32_t num_jobs;
  int32_t pad0;
} PkGatherParams;

// ---------------------------------------------------------------- selftest.cu
// Kernels that exercise the emulation itself (and, on a GPU, the primitives).
typedef struct {
  const void* a;
  const void* b;
  void* c;
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t mode;
} PkSelftestParams;

// ---------------------------------------------------------------- conv.cu
// Division by a runtime constant d as a multiply and a shift, for 0 <= n < 2^31:
// n / d = umulhi(n, mul) >> shr (mul = 0 means d = 1). Computed by src/ops/conv.rs.
typedef struct {
  int32_t d;
  uint32_t mul;
  uint32_t shr;
  int32_t pad0;
} PkFastDiv;

// conv2d_<pass>_<tile>_<dtype>: one implicit-GEMM convolution pass (see conv.cu).
//   fprop: a = x (NHWC), b = w (KRSC), out = y (NPQK)
//   dgrad: a = dy (NPQK), b = w (KRSC), out = dx (NHWC)
//   wgrad: a = dy (NPQK), b = x (NHWC), out = dw (KRSC, f32; zeroed first when split)
typedef struct {
  const void* a;
  const void* b;
  void* out;
  int32_t n, h, w, c, k, r, s, stride, pad, p, q;
  int32_t gemm_m, gemm_n, gemm_k;
  int32_t k_tiles_per_split;  // k-tiles per blockIdx.z (all of them when not split)
  int32_t pad0;
  PkFastDiv div_c, div_k, div_s, div_q, div_pq, div_w, div_hw;
  // fprop with bn_stats = 1: the epilogue also writes per-channel statistics of the stored
  // y over each block's rows (see conv.cu, "BN statistics"): with one row tile
  // (gridDim.x == 1) the tile mean to bn_mean[k] and its M2 to bn_m2[k], else the pair
  // (mean, M2) of row tile b to bn_part[k * gridDim.x + b]. bn_stats_finalize_f32 merges them.
  void* bn_part;   // [K][gridDim.x] float2, or null
  float* bn_mean;  // [K], or null
  float* bn_m2;    // [K], or null
  int32_t bn_stats;
  // dgrad with accumulate = 1: dx += the pass's result (the stored value read, the sum
  // rounded once), for a gradient that already holds another branch's. Each element is
  // stored by one block, so the read-modify-write needs no atomics.
  int32_t accumulate;
  // conv2d_{fprop,wgrad}_bnin_<tile>_<dtype>: the x operand is the batch norm (+ ReLU) of
  // the x given, applied as each tile is loaded: relu?((x - in_mean[c]) * (in_gamma[c] *
  // in_invstd[c]) + in_beta[c]), rounded to the element type, as bn_apply_<T> computes it;
  // padding and out-of-bounds positions stay zero. dgrad with bn_grad: the batch norm whose
  // backward sums the epilogue takes (below). Null otherwise.
  const float* in_mean;    // [C] save_mean of the batch norm
  const float* in_invstd;  // [C] save_invstd
  const float* in_gamma;   // [C]
  const float* in_beta;    // [C]
  int32_t in_relu;         // apply a ReLU after the batch norm
  // dgrad with bn_grad = 1: the epilogue also takes the two sums of the backward of the
  // batch norm whose output's gradient it stores (see conv.cu, "BN backward sums"): that
  // BN's input is bn_x ([N,H,W,C], the dx shape), its parameters and saved statistics are
  // in_mean, in_invstd, in_gamma, in_beta, and with in_relu the gradient goes through the
  // BN's own ReLU, its output recomputed from bn_x. Per channel c and row tile b, the pair
  // (sum g, sum g * (x - mean)) goes to bn_part[c * tiles + b] (tiles: the row tiles of all
  // phases), or with one tile to bn_mean[c] and bn_m2[c]; bn_backward_finalize_f32 merges them.
  int32_t bn_grad;
  // dgrad with accumulate = 1: when set, the sum is then masked by the ReLU whose output
  // this is (acc_mask[i] > 0 ? sum : 0; [N,H,W,C], the x shape): the gradient of a block's
  // input is that of the previous block's final ReLU too. Null otherwise.
  const void* acc_mask;
  const void* bn_x;  // dgrad with bn_grad: [N,H,W,C] input of the batch norm, else null
  // dgrad with bn_grad: a second batch norm whose output has the same gradient (a
  // downsample block's shortcut BN shares the block output's gradient with bn3), without a
  // ReLU: its input bn2_x ([N,H,W,C]) and saved mean bn2_mean; its pairs (sum g, sum g *
  // (x2 - mean2)) go to bn2_part, or with one tile to bn2_sum and bn2_sumx. Null otherwise.
  const void* bn2_x;
  const float* bn2_mean;
  void* bn2_part;
  float* bn2_sum;
  float* bn2_sumx;
  // dgrad with accumulate = 1, instead of acc_mask: that ReLU's decisions as bits, bit i % 8
  // of byte i / 8 set iff its output at flat index i is > 0 (bn_apply writes them beside a
  // block's output, relu_bits). Null otherwise.
  const uint8_t* acc_mask_bits;
} PkConvParams;

// transpose_<dtype>: dst[b][j][i] = src[b][i][j] for batch matrices of rows x cols.
typedef struct {
  const void* src;
  void* dst;
  int32_t batch;
  int32_t rows;
  int32_t cols;
  int32_t pad0;
} PkTransposeParams;

// transpose_pad_f32_<dtype>: dst[b][j][i] = i < rows ? (dtype)src[b][i][j] : 0 for i < ld
// (ld <= PK_PAD_MAX), for batch f32 matrices of rows x cols: NCHW -> NHWC with the channels
// padded (or cut) to ld.
#define PK_PAD_MAX 16
typedef struct {
  const float* src;
  void* dst;
  int32_t batch;
  int32_t rows;
  int32_t cols;
  int32_t ld;
} PkTransposePadParams;

// ---------------------------------------------------------------- layers
// The non-convolution layers of a training step (bn.cu, elementwise.cu, pool.cu, fc.cu,
// loss.cu, sgd.cu). Activations are NHWC; per-channel ops see them as [m, c], c fastest.
// Wrappers: src/ops/layers/; CPU oracles and fast paths: src/cpu/layers/.

// bn.cu. The per-channel kernels run on a grid (ceil(c / vec / blockDim.x), chunks) of
// blocks (blockDim.x channel vectors, blockDim.y rows); chunk b covers the rows
// [b * rows_per_chunk, min(m, (b + 1) * rows_per_chunk)). Per-chunk partial statistics
// live in `out` (its bytes, as [c][chunks] float2) when chunks > 1, else in mean/invstd
// (forward) or dgamma/dbeta (backward); `out` is overwritten afterwards.
typedef struct {
  const void* x;         // [m, c] input of the forward
  const void* dy;        // backward: [m, c] gradient of the output
  const void* relu_out;  // backward: [m, c] forward output after a fused ReLU, or null
  void* out;             // y (forward) or dx (backward)
  const float* gamma;    // [c]
  const float* beta;     // [c]
  float* mean;           // [c] save_mean (train, backward) or running_mean (eval)
  float* invstd;         // [c] save_invstd (train, backward) or running_var (eval)
  float* running_mean;   // [c] train
  float* running_var;    // [c] train
  float* dgamma;         // [c] backward
  float* dbeta;          // [c] backward
  int64_t m;             // rows
  int64_t rows_per_chunk;
  int32_t c;             // channels
  int32_t vec;           // elements per vector: 1, or 16 / sizeof(T) when c % that == 0
  int32_t chunks;        // gridDim.y of the per-channel kernels
  int32_t relu;          // forward: apply a ReLU
  float momentum;
  float eps;
  int32_t eval;          // forward apply: normalize with running_mean/running_var
  int32_t pad0;
  const void* residual;  // forward apply: [m, c] added after the normalization, before the
                         // ReLU (a bottleneck's last BN + residual add + ReLU), or null
  void* grad_out;        // backward reduce: [m, c] g (dy through the ReLU mask) written, or null
  // backward _maxpool variants: the BN's output went through the 3x3 stride 2 max pool
  // (pool.cu) of the [m / (pool_h * pool_w), pool_h, pool_w, c] input, dy is the pool
  // output's gradient ([n, oh, ow, c]), and pool_taps the pool's argmax taps (same shape)
  const uint8_t* pool_taps;
  int32_t pool_h;
  int32_t pool_w;
  // A second batch norm over [m, c] beside the first (a downsample block's shortcut BN
  // beside bn3): bn_apply_bnres normalizes `residual` with it (no ReLU, rounded to T)
  // before adding; the _pair backward variants take its input x2 and write its dx2 (and,
  // in the reduction, its partial sums in dx2's bytes) from the same dy.
  const void* x2;
  void* out2;
  const float* gamma2;
  const float* beta2;
  float* mean2;
  float* invstd2;
  float* dgamma2;
  float* dbeta2;
  // apply with a ReLU: the ReLU's decisions as bits, bit i % 8 of byte i / 8 set iff the
  // stored output at flat index i is > 0, for a dgrad that accumulates through this ReLU
  // (acc_mask_bits); 4 * ceil(m * c / 32) bytes, zeroed beforehand unless vec == 8 (a
  // narrower vector ORs its bits into 32-bit words); null otherwise.
  uint8_t* relu_bits;
} PkBnParams;

// elementwise.cu: out[i] = f(a[i], b[i]) for i < n, `vec` elements per vector access
// (1, or the width of 16 bytes of the widest type).
typedef struct {
  const void* a;
  const void* b;
  void* out;
  int64_t n;
  int32_t vec;
  int32_t pad0;
} PkElementwiseParams;

// pool.cu: max pool 3x3 stride 2 padding 1 on [n, h, w, c] -> [n, oh, ow, c], and global
// average pool on [n, h * w, c] -> [n, c] (f32).
typedef struct {
  const void* x;   // forward input (max pool: also read by the backward from x)
  const void* dy;  // backward: gradient of the output
  void* out;       // y or dx
  uint8_t* arg;    // max pool: [n, oh, ow, c] argmax taps (dh * 3 + dw of the window), written by
                   // the forward when not null, read by maxpool_backward_arg
  // maxpool_forward_bn: the batch norm (+ ReLU) applied to x as it is loaded ([c] each)
  const float* mean;
  const float* invstd;
  const float* gamma;
  const float* beta;
  int32_t n;
  int32_t h;
  int32_t w;
  int32_t c;
  int32_t oh;
  int32_t ow;
  int32_t vec;   // elements per vector: 1, or 16 / sizeof(T) when c % that == 0
  int32_t relu;  // maxpool_forward_bn: the BN's ReLU
} PkPoolParams;

// fc.cu: C[i, j] = sum_k A(i, k) * B(k, j) (+ bias[j]), A(i, k) = a[i * a_si + k * a_sk],
// B(k, j) = b[k * b_sk + j * b_sj], C row-major [m, n]. fc_bias_grad_f32: c[j] = sum_i
// a[i * n + j] over i < m.
typedef struct {
  const float* a;
  const float* b;
  const float* bias;  // [n] or null
  float* c;
  int64_t a_si;
  int64_t a_sk;
  int64_t b_sk;
  int64_t b_sj;
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t pad0;
} PkFcParams;
#define PK_FC_TILE 64
#define PK_FC_TILE_K 16
#define PK_FC_THREADS 256

// loss.cu: softmax cross-entropy of [n, classes] logits, one block.
typedef struct {
  const float* logits;
  const int32_t* targets;  // [n]
  float* loss;             // [1]: mean over the rows
  float* dlogits;          // [n, classes]
  int32_t n;
  int32_t classes;
  float smoothing;         // label smoothing in [0, 1): target (1 - s) one-hot + s / classes
  int32_t pad0;
} PkLossParams;

// sgd.cu: PyTorch's SGD (dampening 0, no Nesterov) on n parameters.
typedef struct {
  float* param;
  const float* grad;
  float* buf;  // momentum buffer
  int64_t n;
  float lr;
  float momentum;
  float weight_decay;
  int32_t first;  // first step: buf = d
  float grad_scale;  // the gradient is multiplied by this first (1: unscaled)
  int32_t pad0;
} PkSgdParams;

// sgd.cu, the multi-tensor step: one tensor of the table, its chunks of `chunk`
// parameters numbered from chunk0 (counted over the whole table).
typedef struct {
  float* param;
  const float* grad;
  float* buf;
  void* low;  // the updated parameters in the kernel's low type, or null
  int64_t n;
  int64_t chunk0;
} PkSgdSeg;

typedef struct {
  const PkSgdSeg* segs;
  int32_t nseg;
  int32_t nchunks;  // over every tensor
  float lr;
  float momentum;
  float weight_decay;
  int32_t first;
  float grad_scale;
  int32_t chunk;  // parameters per chunk, a multiple of 4
} PkSgdMultiParams;
