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
    /// One conv weight (KRSC) of a filter-norm launch.
    NormSegment = "PkNormSegment" { weights: u64, k: i32, filter_len: i32, out_offset: i32, pad0: i32 }
);
params!(
    FilterNormsParams = "PkFilterNormsParams" {
        segments: u64, scores: u64, num_segments: i32, total_filters: i32, norm: i32, pad0: i32,
    }
);
params!(
    GroupSumsParams = "PkGroupSumsParams" {
        scores: u64, dst_offset: u64, width: u64, member_start: u64, member_offset: u64,
        num_groups: i32, max_width: i32,
    }
);
params!(
    /// One selection of a top-k launch.
    TopkSegment = "PkTopkSegment" { offset: i32, width: i32, n: i32, keep_offset: i32 }
);
params!(TopkParams = "PkTopkParams" { scores: u64, segments: u64, keep: u64, num_segments: i32, pad0: i32 });
params!(
    /// One gather of a compaction launch.
    GatherJob = "PkGatherJob" {
        src: u64, dst: u64, rows: u64, mids: u64, cols: u64, n_rows: i32, n_mid: i32, n_cols: i32,
        src_mid: i32, src_cols: i32, pad0: i32,
    }
);
params!(GatherParams = "PkGatherParams" { jobs: u64, num_jobs: i32, pad0: i32 });
params!(
    SelftestParams = "PkSelftestParams" { a: u64, b: u64, c: u64, m: i32, n: i32, k: i32, mode: i32 }
);

// ---------------------------------------------------------------- conv.cu
params!(
    /// Division by a runtime constant as a multiply and a shift (`PkFastDiv`): for
    /// `0 <= n < 2^31`, `n / d == umulhi(n, mul) >> shr` (`mul == 0` means `d == 1`).
    FastDiv = "PkFastDiv" { d: i32, mul: u32, shr: u32, pad0: i32 }
);
params!(
    /// One implicit-GEMM convolution pass (`conv2d_<pass>_<tile>_<dtype>`).
    ConvParams = "PkConvParams" {
        a: u64, b: u64, out: u64,
        n: i32, h: i32, w: i32, c: i32, k: i32, r: i32, s: i32, stride: i32, pad: i32, p: i32, q: i32,
        gemm_m: i32, gemm_n: i32, gemm_k: i32, k_tiles_per_split: i32, pad0: i32,
        div_c: FastDiv, div_k: FastDiv, div_s: FastDiv, div_q: FastDiv, div_pq: FastDiv, div_w: FastDiv,
        div_hw: FastDiv,
    }
);
params!(
    /// A batched transpose (`transpose_<dtype>`): the layout conversions.
    TransposeParams = "PkTransposeParams" { src: u64, dst: u64, batch: i32, rows: i32, cols: i32, pad0: i32 }
);

/// Width limit of one top-k selection (PK_TOPK_MAX_WIDTH in params.h).
pub const TOPK_MAX_WIDTH: usize = 4096;
/// Threads of a top-k block (PK_TOPK_THREADS).
pub const TOPK_THREADS: u32 = 1024;

// ---------------------------------------------------------------- layers
params!(
    /// Batch norm launches (kernels/bn.cu); fields as `PkBnParams` in kernels/params.h.
    BnParams = "PkBnParams" {
        x: u64, dy: u64, relu_out: u64, out: u64, gamma: u64, beta: u64, mean: u64, invstd: u64,
        running_mean: u64, running_var: u64, dgamma: u64, dbeta: u64, m: i64, rows_per_chunk: i64,
        c: i32, vec: i32, chunks: i32, relu: i32, momentum: f32, eps: f32, eval: i32, pad0: i32,
    }
);
params!(
    /// Elementwise launches (kernels/elementwise.cu); fields as `PkElementwiseParams`.
    ElementwiseParams = "PkElementwiseParams" { a: u64, b: u64, out: u64, n: i64, vec: i32, pad0: i32 }
);
params!(
    /// Pooling launches (kernels/pool.cu); fields as `PkPoolParams`.
    PoolParams = "PkPoolParams" {
        x: u64, dy: u64, out: u64, n: i32, h: i32, w: i32, c: i32, oh: i32, ow: i32, vec: i32, pad0: i32,
    }
);
params!(
    /// Fully connected launches (kernels/fc.cu); fields as `PkFcParams`.
    FcParams = "PkFcParams" {
        a: u64, b: u64, bias: u64, c: u64, a_si: i64, a_sk: i64, b_sk: i64, b_sj: i64, m: i32, n: i32, k: i32,
        pad0: i32,
    }
);
params!(
    /// The softmax cross-entropy launch (kernels/loss.cu); fields as `PkLossParams`.
    LossParams = "PkLossParams" { logits: u64, targets: u64, loss: u64, dlogits: u64, n: i32, classes: i32 }
);
params!(
    /// The SGD launch (kernels/sgd.cu); fields as `PkSgdParams`.
    SgdParams = "PkSgdParams" {
        param: u64, grad: u64, buf: u64, n: i64, lr: f32, momentum: f32, weight_decay: f32, first: i32,
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
        // layers
        check::<BnParams>(BnParams::FIELDS);
        check::<ElementwiseParams>(ElementwiseParams::FIELDS);
        check::<PoolParams>(PoolParams::FIELDS);
        check::<FcParams>(FcParams::FIELDS);
        check::<LossParams>(LossParams::FIELDS);
        check::<SgdParams>(SgdParams::FIELDS);
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
            // layers
            BnParams::C_NAME,
            ElementwiseParams::C_NAME,
            PoolParams::C_NAME,
            FcParams::C_NAME,
            LossParams::C_NAME,
            SgdParams::C_NAME,
        ];
        for name in c_layout().keys() {
            assert!(mirrored.contains(&name.as_str()), "{name} has no Rust mirror in the layout test");
        }
    }
}
