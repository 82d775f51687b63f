//! The `#[repr(C)]` mirrors of `kernels/params.h`. Device pointers are `u64` addresses
//! (`GpuBuf::ptr`). `bytemuck::Pod` proves there is no hidden padding, and the test
//! below compares every size and offset with what the C++ compiler laid out.

use crate::gpu::KernelParams;

macro_rules! params {
    ($(#[$m:meta])* $name:ident = $cname:literal { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        // SAFETY: the layout test checks this struct against the C struct of that name.
        unsafe impl KernelParams for $name { const C_NAME: &'static str = $cname; }
        impl $name {
            /// (field, offset, size), for the layout test.
            pub const FIELDS: &'static [(&'static str, usize, usize)] = &[
                $((stringify!($f), std::mem::offset_of!($name, $f), std::mem::size_of::<$t>())),*
            ];
        }
    };
}

params!(
    /// One conv weight (KRSC) of a filter-norm launch, whose filter norms go to
    /// `scores[out_offset .. out_offset + k]` (`PkNormSegment`).
    NormSegment = "PkNormSegment" {
        /// Device address of `k * filter_len` elements of the entry point's dtype.
        weights: u64,
        /// Filters (rows).
        k: i32,
        /// Elements per filter: R*S*C.
        filter_len: i32,
        /// Index of the segment's first score.
        out_offset: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// `filter_norms_<dtype>`: the L1 or L2 norm of every filter of every segment
    /// (`PkFilterNormsParams`).
    FilterNormsParams = "PkFilterNormsParams" {
        /// Device address of `num_segments` [`NormSegment`]s.
        segments: u64,
        /// Device address of the f64 scores.
        scores: u64,
        /// Segments in the table.
        num_segments: i32,
        /// The sum of `k` over the segments.
        total_filters: i32,
        /// 1 (L1) or 2 (L2).
        norm: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// `group_sums_f64`: `scores[dst_offset[g] + c]` becomes the sum over the members `m`
    /// of group `g` of `scores[member_offset[m] + c]`, for `c < width[g]`
    /// (`PkGroupSumsParams`).
    GroupSumsParams = "PkGroupSumsParams" {
        /// Device address of the f64 scores, read and written.
        scores: u64,
        /// Device address of `[num_groups]` i32: each group's first destination score.
        dst_offset: u64,
        /// Device address of `[num_groups]` i32: each group's width.
        width: u64,
        /// Device address of `[num_groups + 1]` i32: group `g`'s members are
        /// `member_offset[member_start[g] .. member_start[g + 1]]`.
        member_start: u64,
        /// Device address of `[member_start[num_groups]]` i32: each member's first score.
        member_offset: u64,
        /// Groups (`gridDim.y`).
        num_groups: i32,
        /// The largest group width.
        max_width: i32,
    }
);
params!(
    /// One selection of a top-k launch: keep the `n` largest of
    /// `scores[offset .. offset + width]`, ties to the lower index, kept indices (relative
    /// to `offset`) ascending in `keep[keep_offset .. keep_offset + n]` (`PkTopkSegment`).
    TopkSegment = "PkTopkSegment" {
        /// Index of the first candidate score.
        offset: i32,
        /// Candidates (at most [`TOPK_MAX_WIDTH`]).
        width: i32,
        /// How many to keep.
        n: i32,
        /// Index of the first kept index in the output.
        keep_offset: i32,
    }
);
params!(
    /// `topk_f64`: one block per [`TopkSegment`] (`PkTopkParams`).
    TopkParams = "PkTopkParams" {
        /// Device address of the f64 scores.
        scores: u64,
        /// Device address of `num_segments` [`TopkSegment`]s.
        segments: u64,
        /// Device address of the i32 kept indices, written.
        keep: u64,
        /// Segments in the table.
        num_segments: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// One gather of a compaction launch: `dst[i, j, l] = src[rows[i], mids[j], cols[l]]`
    /// with `src` of shape `[*, src_mid, src_cols]` and `dst` of shape
    /// `[n_rows, n_mid, n_cols]` (`PkGatherJob`).
    GatherJob = "PkGatherJob" {
        /// Device address of the source tensor.
        src: u64,
        /// Device address of the destination tensor, written.
        dst: u64,
        /// Device address of `[n_rows]` i32 kept indices of dimension 0; 0 (null) for the identity.
        rows: u64,
        /// Device address of `[n_mid]` i32 kept indices of dimension 1; 0 (null) for the identity.
        mids: u64,
        /// Device address of `[n_cols]` i32 kept indices of dimension 2; 0 (null) for the identity.
        cols: u64,
        /// Size of the destination's dimension 0.
        n_rows: i32,
        /// Size of the destination's dimension 1.
        n_mid: i32,
        /// Size of the destination's dimension 2.
        n_cols: i32,
        /// Size of the source's dimension 1.
        src_mid: i32,
        /// Size of the source's dimension 2.
        src_cols: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// `gather_<dtype>`: every job of the table in one launch; `blockIdx.y` is the job
    /// (`PkGatherParams`).
    GatherParams = "PkGatherParams" {
        /// Device address of `num_jobs` [`GatherJob`]s.
        jobs: u64,
        /// Jobs in the table.
        num_jobs: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// The kernels of `kernels/selftest.cu`, which test the execution model (the
    /// emulation, and on a GPU the primitives) rather than compute anything for prunekit
    /// (`PkSelftestParams`).
    SelftestParams = "PkSelftestParams" {
        /// Device address of the first input.
        a: u64,
        /// Device address of the second input.
        b: u64,
        /// Device address of the output.
        c: u64,
        /// Rows of the tiled matmul (`[m, k] x [k, n]`); the element count of the others.
        m: i32,
        /// Columns of the tiled matmul.
        n: i32,
        /// Inner dimension of the tiled matmul.
        k: i32,
        /// Selects a variant of the kernel (e.g. 1 leaves out a barrier); each kernel's
        /// comment in `kernels/selftest.cu` says what each value does.
        mode: i32,
    }
);

// ---------------------------------------------------------------- conv.cu
params!(
    /// Division by a runtime constant as a multiply and a shift (`PkFastDiv`): for
    /// `0 <= n < 2^31`, `n / d == umulhi(n, mul) >> shr` (`mul == 0` means `d == 1`).
    FastDiv = "PkFastDiv" {
        /// The divisor (at least 1).
        d: i32,
        /// The multiplier (0 when `d == 1`).
        mul: u32,
        /// The shift applied after the high half of the product.
        shr: u32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// One implicit-GEMM convolution pass (`conv2d_<pass>_<tile>_<dtype>`,
    /// `PkConvParams`). Operands by pass: fprop `a` = x (NHWC), `b` = w (KRSC),
    /// `out` = y (NPQK); dgrad `a` = dy (NPQK), `b` = w (KRSC), `out` = dx (NHWC); wgrad
    /// `a` = dy (NPQK), `b` = x (NHWC), `out` = dw (KRSC, f32; zeroed first when split).
    ConvParams = "PkConvParams" {
        /// Device address of the GEMM's A operand (see the pass table above).
        a: u64,
        /// Device address of the GEMM's B operand.
        b: u64,
        /// Device address of the output.
        out: u64,
        /// Images in the batch (N).
        n: i32,
        /// Input height (H).
        h: i32,
        /// Input width (W).
        w: i32,
        /// Input channels (C).
        c: i32,
        /// Output channels, the filters (K).
        k: i32,
        /// Filter height (R).
        r: i32,
        /// Filter width (S).
        s: i32,
        /// Stride along height and width.
        stride: i32,
        /// Zero padding on each side, along height and width.
        pad: i32,
        /// Output height (P).
        p: i32,
        /// Output width (Q).
        q: i32,
        /// The pass's GEMM M: N*P*Q (fprop), N*H*W (dgrad) or K (wgrad).
        gemm_m: i32,
        /// The pass's GEMM N: K (fprop), C (dgrad) or R*S*C (wgrad).
        gemm_n: i32,
        /// The pass's GEMM K: R*S*C (fprop), R*S*K (dgrad) or N*P*Q (wgrad).
        gemm_k: i32,
        /// K-tiles per `blockIdx.z` (all of them when not split).
        k_tiles_per_split: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
        /// Division by C.
        div_c: FastDiv,
        /// Division by K.
        div_k: FastDiv,
        /// Division by S.
        div_s: FastDiv,
        /// Division by Q.
        div_q: FastDiv,
        /// Division by P*Q.
        div_pq: FastDiv,
        /// Division by W.
        div_w: FastDiv,
        /// Division by H*W.
        div_hw: FastDiv,
        /// fprop with `bn_stats`: device address of the `[K][gridDim.x]` float2 (mean, M2)
        /// per row tile, used when there is more than one row tile (else 0).
        bn_part: u64,
        /// fprop with `bn_stats` and one row tile: device address of the `[K]` f32 tile means.
        bn_mean: u64,
        /// fprop with `bn_stats` and one row tile: device address of the `[K]` f32 tile M2.
        bn_m2: u64,
        /// 1: the fprop epilogue writes per-channel BN statistics of its output.
        bn_stats: i32,
        /// 1: dgrad adds its result to the output's values (`dx += ...`) instead of
        /// overwriting them.
        accumulate: i32,
        /// `bnin` entry points: device address of the `[C]` f32 mean of the batch norm
        /// applied to x as it is loaded (0 otherwise).
        in_mean: u64,
        /// `bnin`: device address of the `[C]` f32 inverse standard deviation.
        in_invstd: u64,
        /// `bnin`: device address of the `[C]` f32 gamma.
        in_gamma: u64,
        /// `bnin`: device address of the `[C]` f32 beta.
        in_beta: u64,
        /// `bnin`: 1 applies a ReLU after the batch norm.
        in_relu: i32,
        /// dgrad: 1 takes the batch norm backward's sums of the stored gradient in the
        /// epilogue (`bn_x`, the `in_*` parameters, out to `bn_part` or `bn_mean`/`bn_m2`).
        bn_grad: i32,
        /// dgrad with `accumulate`: device address of the `[N, H, W, C]` output of a ReLU
        /// that masks the sum (`mask > 0 ? sum : 0`), or 0.
        acc_mask: u64,
        /// dgrad with `bn_grad`: device address of the `[N, H, W, C]` input of the batch
        /// norm, or 0.
        bn_x: u64,
        /// dgrad with `bn_grad`: the input of a second batch norm (no ReLU) whose output has
        /// the same gradient, or 0.
        bn2_x: u64,
        /// The second batch norm's `[C]` saved mean.
        bn2_mean: u64,
        /// The second batch norm's per-tile pairs (`[C][tiles]` float2).
        bn2_part: u64,
        /// The second batch norm's sum of g (one tile).
        bn2_sum: u64,
        /// The second batch norm's sum of g (x - mean) (one tile).
        bn2_sumx: u64,
        /// dgrad with `accumulate`, instead of `acc_mask`: device address of that ReLU's
        /// decisions as bits (bit `i % 8` of byte `i / 8`: its output at flat index `i` is
        /// > 0), or 0 (null).
        acc_mask_bits: u64,
    }
);
params!(
    /// A batched transpose (`transpose_<dtype>`): the layout conversions;
    /// `dst[b][j][i] = src[b][i][j]` for `batch` matrices of `rows` x `cols`
    /// (`PkTransposeParams`).
    TransposeParams = "PkTransposeParams" {
        /// Device address of the source matrices.
        src: u64,
        /// Device address of the transposed matrices, written.
        dst: u64,
        /// Matrices.
        batch: i32,
        /// Rows of each source matrix.
        rows: i32,
        /// Columns of each source matrix.
        cols: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// A batched transpose from f32 with the rows padded or cut (`transpose_pad_f32_<dtype>`):
    /// `dst[b][j][i] = i < rows ? src[b][i][j] : 0` for `i < ld`, `batch` matrices of
    /// `rows` x `cols` (`PkTransposePadParams`).
    TransposePadParams = "PkTransposePadParams" {
        /// Device address of the f32 source matrices.
        src: u64,
        /// Device address of the transposed, padded matrices, written.
        dst: u64,
        /// Matrices.
        batch: i32,
        /// Rows of each source matrix.
        rows: i32,
        /// Columns of each source matrix.
        cols: i32,
        /// Elements of each row of the destination (`<= PK_PAD_MAX`).
        ld: i32,
    }
);

/// Most elements of a padded row (PK_PAD_MAX in params.h).
pub const PAD_MAX: usize = 16;

/// Width limit of one top-k selection (PK_TOPK_MAX_WIDTH in params.h).
pub const TOPK_MAX_WIDTH: usize = 4096;
/// Threads of a top-k block (PK_TOPK_THREADS).
pub const TOPK_THREADS: u32 = 1024;

// ---------------------------------------------------------------- layers
params!(
    /// Batch norm launches (kernels/bn.cu; `PkBnParams`). Activations are seen as `[m, c]`,
    /// c fastest. The per-channel kernels run on a grid of `(ceil(c / vec / blockDim.x),
    /// chunks)` blocks; with `chunks > 1` the per-chunk partial statistics live in the
    /// bytes of `out` (as `[c][chunks]` float2), which is overwritten afterwards.
    BnParams = "PkBnParams" {
        /// Device address of the `[m, c]` input of the forward.
        x: u64,
        /// Backward: device address of the `[m, c]` gradient of the output.
        dy: u64,
        /// Backward: device address of the `[m, c]` forward output after a fused ReLU, or 0 (null).
        relu_out: u64,
        /// Device address of y (forward) or dx (backward), `[m, c]`.
        out: u64,
        /// Device address of the `[c]` f32 scale.
        gamma: u64,
        /// Device address of the `[c]` f32 shift.
        beta: u64,
        /// Device address of `[c]` f32: the saved batch mean (train, backward) or the running
        /// mean (eval).
        mean: u64,
        /// Device address of `[c]` f32: the saved `1 / sqrt(var + eps)` (train, backward) or
        /// the running variance (eval).
        invstd: u64,
        /// Train: device address of the `[c]` f32 running mean, updated.
        running_mean: u64,
        /// Train: device address of the `[c]` f32 running variance, updated.
        running_var: u64,
        /// Backward: device address of the `[c]` f32 gradient of gamma.
        dgamma: u64,
        /// Backward: device address of the `[c]` f32 gradient of beta.
        dbeta: u64,
        /// Rows: N*H*W.
        m: i64,
        /// Rows per chunk: chunk `b` covers `[b * rows_per_chunk, min(m, (b + 1) * rows_per_chunk))`.
        rows_per_chunk: i64,
        /// Channels.
        c: i32,
        /// Elements per vector: 1, or `16 / size_of::<T>()` when `c` is a multiple of that
        /// and the buffers are 16-byte aligned.
        vec: i32,
        /// Row chunks: `gridDim.y` of the per-channel kernels.
        chunks: i32,
        /// Forward: 1 to apply a ReLU after the normalisation.
        relu: i32,
        /// Weight of the batch statistic in the running-statistics update.
        momentum: f32,
        /// Added to the variance before the square root.
        eps: f32,
        /// Forward apply: 1 to normalise with the running statistics (eval mode).
        eval: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
        /// Forward apply: device address of an `[m, c]` tensor added after the
        /// normalisation and before the ReLU (the residual of a bottleneck), or 0 (null).
        residual: u64,
        /// Backward reduce: device address of an `[m, c]` tensor that receives g, the output
        /// gradient through the fused ReLU's mask (for the other consumers of a bottleneck's
        /// sum), or 0 (null).
        grad_out: u64,
        /// Backward `_maxpool` variants: device address of the `[n, oh, ow, c]` u8 argmax
        /// taps of the 3x3 stride 2 max pool that took the BN's output (`dy` is then that
        /// pool output's gradient, `[n, oh, ow, c]`); 0 otherwise.
        pool_taps: u64,
        /// Backward `_maxpool` variants: the pool input's height (`m = n * pool_h * pool_w`).
        pool_h: i32,
        /// Backward `_maxpool` variants: the pool input's width.
        pool_w: i32,
        /// A second batch norm's input `[m, c]` (device address): the `_pair` backward
        /// variants' second x (same dy); 0 otherwise. (`bn_apply_bnres` normalizes
        /// `residual` with the second BN's parameters instead.)
        x2: u64,
        /// The `_pair` backward variants: device address of the second input gradient dx2.
        out2: u64,
        /// The second batch norm's `[c]` gamma (device address; `_bnres` and `_pair`).
        gamma2: u64,
        /// The second batch norm's `[c]` beta (`_bnres`).
        beta2: u64,
        /// The second batch norm's `[c]` saved mean.
        mean2: u64,
        /// The second batch norm's `[c]` saved inverse deviation.
        invstd2: u64,
        /// The `_pair` backward variants: the second batch norm's `[c]` dgamma.
        dgamma2: u64,
        /// The `_pair` backward variants: the second batch norm's `[c]` dbeta.
        dbeta2: u64,
        /// Apply with a ReLU: device address of the ReLU's decisions as bits (bit `i % 8`
        /// of byte `i / 8`: the stored output at flat index `i` is > 0), written
        /// (`4 * ceil(m * c / 32)` bytes, zeroed first unless `vec` is 8); or 0 (null).
        relu_bits: u64,
    }
);
params!(
    /// Elementwise launches (kernels/elementwise.cu; `PkElementwiseParams`):
    /// `out[i] = f(a[i], b[i])` for `i < n`.
    ElementwiseParams = "PkElementwiseParams" {
        /// Device address of the first input (the forward output for the ReLU backward).
        a: u64,
        /// Device address of the second input (dy for the ReLU backward); 0 (null) for casts.
        b: u64,
        /// Device address of the output.
        out: u64,
        /// Elements.
        n: i64,
        /// Elements per vector access: 1, or 8 when every buffer is 16-byte aligned.
        vec: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// Pooling launches (kernels/pool.cu; `PkPoolParams`): max pool 3x3 stride 2 padding 1
    /// on `[n, h, w, c]` -> `[n, oh, ow, c]`, and global average pool on `[n, h * w, c]` ->
    /// `[n, c]` (f32).
    PoolParams = "PkPoolParams" {
        /// Device address of the forward input (max pool: also read by the backward from x).
        x: u64,
        /// Backward: device address of the gradient of the output.
        dy: u64,
        /// Device address of y (forward) or dx (backward).
        out: u64,
        /// Max pool: device address of the `[n, oh, ow, c]` u8 argmax taps (`dh * 3 + dw` of
        /// the window), written by the forward when not 0 (null), read by
        /// `maxpool_backward_arg`.
        arg: u64,
        /// `maxpool_forward_bn`: device addresses of the `[c]` f32 saved mean, saved inverse
        /// standard deviation, gamma and beta of the batch norm applied to x as it is loaded.
        mean: u64,
        /// See `mean`.
        invstd: u64,
        /// See `mean`.
        gamma: u64,
        /// See `mean`.
        beta: u64,
        /// Images.
        n: i32,
        /// Input height.
        h: i32,
        /// Input width.
        w: i32,
        /// Channels.
        c: i32,
        /// Output height (max pool).
        oh: i32,
        /// Output width (max pool).
        ow: i32,
        /// Elements per vector: 1, or `16 / size_of::<T>()` when `c` is a multiple of that
        /// and the buffers are 16-byte aligned.
        vec: i32,
        /// `maxpool_forward_bn`: 1 if the batch norm is followed by a ReLU.
        relu: i32,
    }
);
params!(
    /// Fully connected launches (kernels/fc.cu; `PkFcParams`). `fc_gemm_f32`:
    /// `C[i, j] = sum_k A(i, k) * B(k, j) (+ bias[j])` with `A(i, k) = a[i * a_si + k * a_sk]`,
    /// `B(k, j) = b[k * b_sk + j * b_sj]`, C row-major `[m, n]`. `fc_bias_grad_f32`:
    /// `c[j] = sum_i a[i * n + j]` over `i < m`.
    FcParams = "PkFcParams" {
        /// Device address of the f32 A operand.
        a: u64,
        /// Device address of the f32 B operand.
        b: u64,
        /// Device address of the `[n]` f32 bias, or 0 (null) for none.
        bias: u64,
        /// Device address of the f32 output, written.
        c: u64,
        /// Stride of A along i, in elements.
        a_si: i64,
        /// Stride of A along k, in elements.
        a_sk: i64,
        /// Stride of B along k, in elements.
        b_sk: i64,
        /// Stride of B along j, in elements.
        b_sj: i64,
        /// Rows of C.
        m: i32,
        /// Columns of C.
        n: i32,
        /// The reduction length.
        k: i32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// The softmax cross-entropy launch (kernels/loss.cu; `PkLossParams`), one block.
    LossParams = "PkLossParams" {
        /// Device address of the `[n, classes]` f32 logits.
        logits: u64,
        /// Device address of the `[n]` i32 target classes.
        targets: u64,
        /// Device address of one f32: the mean loss over the rows.
        loss: u64,
        /// Device address of the `[n, classes]` f32 gradient of the mean loss.
        dlogits: u64,
        /// Rows (images).
        n: i32,
        /// Classes.
        classes: i32,
        /// Label smoothing in [0, 1): the target distribution is `(1 - smoothing)` on the
        /// class plus `smoothing / classes` on every class.
        smoothing: f32,
        /// Padding to a multiple of 8 bytes.
        pad0: i32,
    }
);
params!(
    /// The SGD launch (kernels/sgd.cu; `PkSgdParams`): PyTorch's SGD (dampening 0, no
    /// Nesterov) on `n` parameters.
    SgdParams = "PkSgdParams" {
        /// Device address of the f32 parameters, updated.
        param: u64,
        /// Device address of the f32 gradients.
        grad: u64,
        /// Device address of the f32 momentum buffer, updated.
        buf: u64,
        /// Parameters.
        n: i64,
        /// Learning rate.
        lr: f32,
        /// Momentum factor.
        momentum: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
        /// 1 on the first step: `buf = d` (the old buffer is not read).
        first: i32,
        /// The gradient is multiplied by this before anything else (gradient clipping);
        /// 1 leaves it as it is.
        grad_scale: f32,
        /// Padding.
        pad0: i32,
    }
);
params!(
    /// One tensor of a multi-tensor SGD launch (`PkSgdSeg`): its chunks of
    /// [`SgdMultiParams::chunk`] parameters are numbered from `chunk0` over the whole table.
    SgdSeg = "PkSgdSeg" {
        /// Device address of the f32 parameters, updated.
        param: u64,
        /// Device address of the f32 gradients.
        grad: u64,
        /// Device address of the f32 momentum buffer, updated.
        buf: u64,
        /// Device address of the updated parameters' copy in the kernel's low type, or 0.
        low: u64,
        /// Parameters.
        n: i64,
        /// The tensor's first chunk.
        chunk0: i64,
    }
);
params!(
    /// `sgd_multi_<low>` (kernels/sgd.cu; `PkSgdMultiParams`): [`SgdParams`]'s step on
    /// every tensor of a table of [`SgdSeg`]s.
    SgdMultiParams = "PkSgdMultiParams" {
        /// Device address of `nseg` [`SgdSeg`]s, in order of `chunk0`.
        segs: u64,
        /// Tensors in the table.
        nseg: i32,
        /// Chunks over every tensor.
        nchunks: i32,
        /// Learning rate.
        lr: f32,
        /// Momentum factor.
        momentum: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
        /// 1 on the first step: `buf = d` (the old buffer is not read).
        first: i32,
        /// The gradient is multiplied by this before anything else; 1 leaves it as it is.
        grad_scale: f32,
        /// Parameters per chunk, a multiple of 4.
        chunk: i32,
    }
);
/// Output tile of the FC GEMM (PK_FC_TILE).
pub const FC_TILE: usize = 64;
/// Threads of an FC GEMM block (PK_FC_THREADS).
pub const FC_THREADS: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::{c_char, CStr};

    #[repr(C)]
    struct FieldLayout {
        strct: *const c_char,
        field: *const c_char,
        offset: usize,
        size: usize,
        struct_size: usize,
    }
    extern "C" {
        fn pk_emu_param_layout(n: *mut usize) -> *const FieldLayout;
    }

    /// struct -> (size, field -> (offset, size)).
    type CLayout = BTreeMap<String, (usize, BTreeMap<String, (usize, usize)>)>;

    /// The layouts as the C++ compiler sees params.h.
    fn c_layout() -> CLayout {
        let mut n = 0;
        // SAFETY: a static table of n entries with string literals.
        let table = unsafe { std::slice::from_raw_parts(pk_emu_param_layout(&mut n), n) };
        let mut out = CLayout::new();
        for f in table {
            let s = unsafe { CStr::from_ptr(f.strct) }.to_string_lossy().into_owned();
            let name = unsafe { CStr::from_ptr(f.field) }.to_string_lossy().into_owned();
            let e = out.entry(s).or_insert((f.struct_size, BTreeMap::new()));
            e.1.insert(name, (f.offset, f.size));
        }
        out
    }

    fn check<P: KernelParams>(fields: &[(&str, usize, usize)]) {
        let c = c_layout();
        let (size, cf) = c.get(P::C_NAME).unwrap_or_else(|| panic!("{} missing from layout.cpp", P::C_NAME));
        assert_eq!(*size, std::mem::size_of::<P>(), "size of {}", P::C_NAME);
        assert_eq!(cf.len(), fields.len(), "field count of {}", P::C_NAME);
        for (name, off, sz) in fields {
            assert_eq!(cf.get(*name), Some(&(*off, *sz)), "{}.{name}", P::C_NAME);
        }
    }

    #[test]
    fn layouts_match_params_h() {
        check::<NormSegment>(NormSegment::FIELDS);
        check::<FilterNormsParams>(FilterNormsParams::FIELDS);
        check::<GroupSumsParams>(GroupSumsParams::FIELDS);
        check::<TopkSegment>(TopkSegment::FIELDS);
        check::<TopkParams>(TopkParams::FIELDS);
        check::<GatherJob>(GatherJob::FIELDS);
        check::<GatherParams>(GatherParams::FIELDS);
        check::<SelftestParams>(SelftestParams::FIELDS);
        // conv.cu
        check::<FastDiv>(FastDiv::FIELDS);
        check::<ConvParams>(ConvParams::FIELDS);
        check::<TransposeParams>(TransposeParams::FIELDS);
        check::<TransposePadParams>(TransposePadParams::FIELDS);
        // layers
        check::<BnParams>(BnParams::FIELDS);
        check::<ElementwiseParams>(ElementwiseParams::FIELDS);
        check::<PoolParams>(PoolParams::FIELDS);
        check::<FcParams>(FcParams::FIELDS);
        check::<LossParams>(LossParams::FIELDS);
        check::<SgdParams>(SgdParams::FIELDS);
        check::<SgdSeg>(SgdSeg::FIELDS);
        check::<SgdMultiParams>(SgdMultiParams::FIELDS);
    }

    #[test]
    fn every_c_struct_has_a_mirror() {
        let mirrored = [
            NormSegment::C_NAME,
            FilterNormsParams::C_NAME,
            GroupSumsParams::C_NAME,
            TopkSegment::C_NAME,
            TopkParams::C_NAME,
            GatherJob::C_NAME,
            GatherParams::C_NAME,
            SelftestParams::C_NAME,
            // conv.cu
            FastDiv::C_NAME,
            ConvParams::C_NAME,
            TransposeParams::C_NAME,
            TransposePadParams::C_NAME,
            // layers
            BnParams::C_NAME,
            ElementwiseParams::C_NAME,
            PoolParams::C_NAME,
            FcParams::C_NAME,
            LossParams::C_NAME,
            SgdParams::C_NAME,
            SgdSeg::C_NAME,
            SgdMultiParams::C_NAME,
        ];
        for name in c_layout().keys() {
            assert!(mirrored.contains(&name.as_str()), "{name} has no Rust mirror in the layout test");
        }
    }
}
