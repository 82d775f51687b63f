// Sizes and offsets of the kernel parameter structs as the C++ compiler lays them out
// (nvcc lays out device structs exactly as the host compiler does). A test in
// src/ops/params.rs compares them with the #[repr(C)] mirrors.
#include <cstddef>

#include "emu.h"
#include "../params.h"

struct PkFieldLayout {
  const char* strct;
  const char* field;
  size_t offset;
  size_t size;
  size_t struct_size;
};

#define PK_F(S, f) {#S, #f, offsetof(S, f), sizeof(((S*)nullptr)->f), sizeof(S)},

static const PkFieldLayout kLayout[] = {
    PK_F(PkNormSegment, weights) PK_F(PkNormSegment, k) PK_F(PkNormSegment, filter_len)
    PK_F(PkNormSegment, out_offset) PK_F(PkNormSegment, pad0)

    PK_F(PkFilterNormsParams, segments) PK_F(PkFilterNormsParams, scores) PK_F(PkFilterNormsParams, num_segments)
    PK_F(PkFilterNormsParams, total_filters) PK_F(PkFilterNormsParams, norm) PK_F(PkFilterNormsParams, pad0)

    PK_F(PkGroupSumsParams, scores) PK_F(PkGroupSumsParams, dst_offset) PK_F(PkGroupSumsParams, width)
    PK_F(PkGroupSumsParams, member_start) PK_F(PkGroupSumsParams, member_offset)
    PK_F(PkGroupSumsParams, num_groups) PK_F(PkGroupSumsParams, max_width)

    PK_F(PkTopkSegment, offset) PK_F(PkTopkSegment, width) PK_F(PkTopkSegment, n) PK_F(PkTopkSegment, keep_offset)

    PK_F(PkTopkParams, scores) PK_F(PkTopkParams, segments) PK_F(PkTopkParams, keep)
    PK_F(PkTopkParams, num_segments) PK_F(PkTopkParams, pad0)

    PK_F(PkGatherJob, src) PK_F(PkGatherJob, dst) PK_F(PkGatherJob, rows) PK_F(PkGatherJob, mids)
    PK_F(PkGatherJob, cols) PK_F(PkGatherJob, n_rows) PK_F(PkGatherJob, n_mid) PK_F(PkGatherJob, n_cols)
    PK_F(PkGatherJob, src_mid) PK_F(PkGatherJob, src_cols) PK_F(PkGatherJob, pad0)

    PK_F(PkGatherParams, jobs) PK_F(PkGatherParams, num_jobs) PK_F(PkGatherParams, pad0)

    PK_F(PkSelftestParams, a) PK_F(PkSelftestParams, b) PK_F(PkSelftestParams, c) PK_F(PkSelftestParams, m)
    PK_F(PkSelftestParams, n) PK_F(PkSelftestParams, k) PK_F(PkSelftestParams, mode)

    // ------------------------------------------------------------ conv.cu
    PK_F(PkFastDiv, d) PK_F(PkFastDiv, mul) PK_F(PkFastDiv, shr) PK_F(PkFastDiv, pad0)

    PK_F(PkConvParams, a) PK_F(PkConvParams, b) PK_F(PkConvParams, out) PK_F(PkConvParams, n)
    PK_F(PkConvParams, h) PK_F(PkConvParams, w) PK_F(PkConvParams, c) PK_F(PkConvParams, k)
    PK_F(PkConvParams, r) PK_F(PkConvParams, s) PK_F(PkConvParams, stride) PK_F(PkConvParams, pad)
    PK_F(PkConvParams, p) PK_F(PkConvParams, q) PK_F(PkConvParams, gemm_m) PK_F(PkConvParams, gemm_n)
    PK_F(PkConvParams, gemm_k) PK_F(PkConvParams, k_tiles_per_split) PK_F(PkConvParams, pad0)
    PK_F(PkConvParams, div_c) PK_F(PkConvParams, div_k) PK_F(PkConvParams, div_s) PK_F(PkConvParams, div_q)
    PK_F(PkConvParams, div_pq) PK_F(PkConvParams, div_w) PK_F(PkConvParams, div_hw)
    PK_F(PkConvParams, bn_part) PK_F(PkConvParams, bn_mean) PK_F(PkConvParams, bn_m2)
    PK_F(PkConvParams, bn_stats) PK_F(PkConvParams, accumulate)
    PK_F(PkConvParams, in_mean) PK_F(PkConvParams, in_invstd) PK_F(PkConvParams, in_gamma)
    PK_F(PkConvParams, in_beta) PK_F(PkConvParams, in_relu) PK_F(PkConvParams, bn_grad) PK_F(PkConvParams, acc_mask)
    PK_F(PkConvParams, bn_x) PK_F(PkConvParams, bn2_x) PK_F(PkConvParams, bn2_mean) PK_F(PkConvParams, bn2_part)
    PK_F(PkConvParams, bn2_sum) PK_F(PkConvParams, bn2_sumx) PK_F(PkConvParams, acc_mask_bits)

    PK_F(PkTransposeParams, src) PK_F(PkTransposeParams, dst) PK_F(PkTransposeParams, batch)
    PK_F(PkTransposeParams, rows) PK_F(PkTransposeParams, cols) PK_F(PkTransposeParams, pad0)
    PK_F(PkTransposePadParams, src) PK_F(PkTransposePadParams, dst) PK_F(PkTransposePadParams, batch)
    PK_F(PkTransposePadParams, rows) PK_F(PkTransposePadParams, cols) PK_F(PkTransposePadParams, ld)

    // ------------------------------------------------------------ layers
    PK_F(PkBnParams, x) PK_F(PkBnParams, dy) PK_F(PkBnParams, relu_out) PK_F(PkBnParams, out)
    PK_F(PkBnParams, gamma) PK_F(PkBnParams, beta) PK_F(PkBnParams, mean) PK_F(PkBnParams, invstd)
    PK_F(PkBnParams, running_mean) PK_F(PkBnParams, running_var) PK_F(PkBnParams, dgamma)
    PK_F(PkBnParams, dbeta) PK_F(PkBnParams, m) PK_F(PkBnParams, rows_per_chunk) PK_F(PkBnParams, c)
    PK_F(PkBnParams, vec) PK_F(PkBnParams, chunks) PK_F(PkBnParams, relu) PK_F(PkBnParams, momentum)
    PK_F(PkBnParams, eps) PK_F(PkBnParams, eval) PK_F(PkBnParams, pad0) PK_F(PkBnParams, residual) PK_F(PkBnParams, grad_out)
    PK_F(PkBnParams, pool_taps) PK_F(PkBnParams, pool_h) PK_F(PkBnParams, pool_w)
    PK_F(PkBnParams, x2) PK_F(PkBnParams, out2) PK_F(PkBnParams, gamma2) PK_F(PkBnParams, beta2)
    PK_F(PkBnParams, mean2) PK_F(PkBnParams, invstd2) PK_F(PkBnParams, dgamma2) PK_F(PkBnParams, dbeta2) PK_F(PkBnParams, relu_bits)

    PK_F(PkElementwiseParams, a) PK_F(PkElementwiseParams, b) PK_F(PkElementwiseParams, out)
    PK_F(PkElementwiseParams, n) PK_F(PkElementwiseParams, vec) PK_F(PkElementwiseParams, pad0)

    PK_F(PkPoolParams, x) PK_F(PkPoolParams, dy) PK_F(PkPoolParams, out) PK_F(PkPoolParams, arg)
    PK_F(PkPoolParams, mean) PK_F(PkPoolParams, invstd) PK_F(PkPoolParams, gamma) PK_F(PkPoolParams, beta)
    PK_F(PkPoolParams, n) PK_F(PkPoolParams, h) PK_F(PkPoolParams, w) PK_F(PkPoolParams, c)
    PK_F(PkPoolParams, oh) PK_F(PkPoolParams, ow) PK_F(PkPoolParams, vec) PK_F(PkPoolParams, relu)

    PK_F(PkFcParams, a) PK_F(PkFcParams, b) PK_F(PkFcParams, bias) PK_F(PkFcParams, c) PK_F(PkFcParams, a_si)
    PK_F(PkFcParams, a_sk) PK_F(PkFcParams, b_sk) PK_F(PkFcParams, b_sj) PK_F(PkFcParams, m)
    PK_F(PkFcParams, n) PK_F(PkFcParams, k) PK_F(PkFcParams, pad0)

    PK_F(PkLossParams, logits) PK_F(PkLossParams, targets) PK_F(PkLossParams, loss)
    PK_F(PkLossParams, dlogits) PK_F(PkLossParams, n) PK_F(PkLossParams, classes)
    PK_F(PkLossParams, smoothing) PK_F(PkLossParams, pad0)

    PK_F(PkSgdParams, param) PK_F(PkSgdParams, grad) PK_F(PkSgdParams, buf) PK_F(PkSgdParams, n)
    PK_F(PkSgdParams, lr) PK_F(PkSgdParams, momentum) PK_F(PkSgdParams, weight_decay) PK_F(PkSgdParams, first)
    PK_F(PkSgdParams, grad_scale) PK_F(PkSgdParams, pad0)
    PK_F(PkSgdSeg, param) PK_F(PkSgdSeg, grad) PK_F(PkSgdSeg, buf) PK_F(PkSgdSeg, low) PK_F(PkSgdSeg, n)
    PK_F(PkSgdSeg, chunk0)
    PK_F(PkSgdMultiParams, segs) PK_F(PkSgdMultiParams, nseg) PK_F(PkSgdMultiParams, nchunks)
    PK_F(PkSgdMultiParams, lr) PK_F(PkSgdMultiParams, momentum) PK_F(PkSgdMultiParams, weight_decay)
    PK_F(PkSgdMultiParams, first) PK_F(PkSgdMultiParams, grad_scale) PK_F(PkSgdMultiParams, chunk)
};


extern "C" const PkFieldLayout* pk_emu_param_layout(size_t* n) {
  *n = sizeof(kLayout) / sizeof(kLayout[0]);
  return kLayout;
}
