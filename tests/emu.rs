//! The emulation's own tests: kernels of kernels/selftest.cu give the oracle's answer
//! in every fiber order, and the emulation catches what compute-sanitizer would: a
//! missing barrier (a different answer under another order), out-of-bounds writes,
//! divergent barriers, and reads of uninitialised memory (poison).
//!
//! The `cuda_*` tests run the same checks of the primitives on a real GPU.

mod common;

use half::{bf16, f16};
use prunekit::gpu::{Gpu, GpuBuf, Kernel, LaunchConfig, Schedule};
use prunekit::ops::params::SelftestParams;

fn k(name: &'static str) -> Kernel {
    Kernel::new("selftest", name)
}

fn params<A: prunekit::gpu::Elem, B: prunekit::gpu::Elem, C: prunekit::gpu::Elem>(
    a: &GpuBuf<A>,
    b: &GpuBuf<B>,
    c: &GpuBuf<C>,
    m: i32,
    n: i32,
    kk: i32,
    mode: i32,
) -> SelftestParams {
    SelftestParams { a: a.ptr(), b: b.ptr(), c: c.ptr(), m, n, k: kk, mode }
}

fn schedules() -> Vec<Gpu> {
    vec![Gpu::emu_with(Schedule::Forward), Gpu::emu_with(Schedule::Reverse), Gpu::emu_with(Schedule::Shuffle(7))]
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    common::Rng::new(seed).vec(n)
}

fn gemm_oracle(a: &[f32], b: &[f32], m: usize, n: usize, kk: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..kk {
                acc += a[i * kk + p] as f64 * b[p * n + j] as f64;
            }
            c[i * n + j] = acc as f32;
        }
    }
    c
}

/// The largest absolute difference; a NaN (poison read somewhere) counts as infinite.
fn max_err(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| if (a - b).is_nan() { f32::INFINITY } else { (a - b).abs() }).fold(0.0, f32::max)
}

fn run_gemm(gpu: &Gpu, m: usize, n: usize, kk: usize, mode: i32) -> (Vec<f32>, Vec<f32>) {
    let a = rand_vec(m * kk, 1);
    let b = rand_vec(kk * n, 2);
    let (da, db, dc) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap(), gpu.zeros::<f32>(m * n).unwrap());
    let cfg = LaunchConfig {
        grid: (n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1),
        block: (16, 16, 1),
        shared_mem_bytes: 0,
    };
    let p = params(&da, &db, &dc, m as i32, n as i32, kk as i32, mode);
    unsafe { gpu.launch(k("selftest_gemm_f32"), cfg, &p).unwrap() };
    (gpu.download(&dc).unwrap(), gemm_oracle(&a, &b, m, n, kk))
}

fn check_tiled_gemm(gpu: &Gpu) {
    for &(m, n, kk) in &[(37, 29, 45), (1, 1, 1), (16, 16, 16), (50, 3, 70)] {
        let (got, want) = run_gemm(gpu, m, n, kk, 0);
        assert!(max_err(&got, &want) < 1e-4, "{} {m}x{n}x{kk}: error {}", gpu.name(), max_err(&got, &want));
    }
}

#[test]
fn tiled_gemm_matches_oracle_in_every_order() {
    for gpu in schedules() {
        check_tiled_gemm(&gpu);
    }
}

#[test]
#[cfg_attr(
    pk_emu_sanitize = "thread",
    ignore = "races on purpose: ThreadSanitizer reports it (tests/emu_sanitize.rs, tsan_reports_a_missing_barrier)"
)]
fn missing_barrier_changes_the_answer_under_reverse_order() {
    let (got, want) = run_gemm(&Gpu::emu_with(Schedule::Reverse), 37, 29, 45, 1);
    assert!(max_err(&got, &want) > 1e-2, "the race went unnoticed");
    // The correct kernel under the same order is fine (checked above); so is the racy one
    // under no order in particular: the shuffled order catches it too.
    let (got, want) = run_gemm(&Gpu::emu_with(Schedule::Shuffle(3)), 37, 29, 45, 1);
    assert!(max_err(&got, &want) > 1e-2, "the race went unnoticed under a shuffled order");
}

fn run_warp_race(gpu: &Gpu, mode: i32) -> (Vec<f32>, Vec<f32>) {
    let a = rand_vec(64, 21);
    let (da, dc) = (gpu.upload(&a).unwrap(), gpu.zeros::<f32>(64).unwrap());
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (64, 1, 1), shared_mem_bytes: 256 };
    let p = params(&da, &da, &dc, 64, 0, 0, mode);
    unsafe { gpu.launch(k("selftest_warp_race_f32"), cfg, &p).unwrap() };
    let want = (0..64).map(|t| a[(t + 32) % 64]).collect();
    (gpu.download(&dc).unwrap(), want)
}

#[test]
fn warp_collectives_do_not_hide_a_missing_block_barrier() {
    for gpu in schedules() {
        let (got, want) = run_warp_race(&gpu, 0);
        assert_eq!(got, want, "{}", gpu.name());
        if cfg!(pk_emu_sanitize = "thread") {
            continue; // mode 1 races on purpose, and ThreadSanitizer would end the process
        }
        let (got, _) = run_warp_race(&gpu, 1);
        assert!(got.iter().any(|x| x.is_nan()), "{}: the race went unnoticed", gpu.name());
    }
}

fn check_reductions(gpu: &Gpu) {
    let n = 10_007;
    let a = rand_vec(n, 5);
    let want: f64 = a.iter().map(|&x| x as f64).sum();
    for mode in [0, 1] {
        let da = gpu.upload(&a).unwrap();
        let dc = gpu.zeros::<f32>(1).unwrap();
        let p = params(&da, &da, &dc, n as i32, 0, 0, mode);
        unsafe { gpu.launch(k("selftest_reduce_f32"), LaunchConfig::linear(7, 256), &p).unwrap() };
        let got = gpu.download(&dc).unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-2, "{} mode {mode}: {got} vs {want}", gpu.name());
    }
}

#[test]
fn warp_and_block_reductions_match_oracle() {
    for gpu in schedules() {
        check_reductions(&gpu);
    }
}

fn check_ballot_and_int_atomics(gpu: &Gpu) {
    let n = 1000usize;
    let a: Vec<i32> = (0..n as i32).map(|i| (i * 7919) % 1009).collect();
    let da = gpu.upload(&a).unwrap();
    let dc = gpu.upload(&[0i32, i32::MIN]).unwrap();
    let p = params(&da, &da, &dc, n as i32, 0, 0, 0);
    unsafe { gpu.launch(k("selftest_ballot_i32"), LaunchConfig::linear(8, 128), &p).unwrap() };
    let got = gpu.download(&dc).unwrap();
    assert_eq!(got[0], a.iter().filter(|&&v| v & 1 == 1).count() as i32);
    assert_eq!(got[1], *a.iter().max().unwrap());
}

#[test]
fn ballot_and_integer_atomics() {
    for gpu in schedules() {
        check_ballot_and_int_atomics(&gpu);
    }
}

fn check_shuffles(gpu: &Gpu) {
    let a: Vec<i32> = (0..32).map(|i| i * 10 + 1).collect();
    let da = gpu.upload(&a).unwrap();
    let dc = gpu.zeros::<i32>(128).unwrap();
    let p = params(&da, &da, &dc, 32, 0, 0, 0);
    unsafe { gpu.launch(k("selftest_shfl_i32"), LaunchConfig::linear(1, 32), &p).unwrap() };
    let got = gpu.download(&dc).unwrap();
    for l in 0..32usize {
        let xor = l ^ 9;
        let want = [
            a[(l + 3) % 32],
            if l + 5 < 32 { a[l + 5] } else { a[l] },
            if l >= 7 { a[l - 7] } else { a[l] },
            if xor >= (l & !15) + 16 { a[l] } else { a[xor] },
        ];
        assert_eq!(&got[4 * l..4 * l + 4], &want, "lane {l}");
    }
}

#[test]
fn warp_shuffles_follow_cuda_semantics() {
    for gpu in schedules() {
        check_shuffles(&gpu);
    }
}

#[test]
fn fresh_buffers_hold_poison() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let n = 100;
    let fresh = gpu.alloc::<f32>(n).unwrap();
    let out = gpu.zeros::<f32>(n).unwrap();
    let p = params(&fresh, &fresh, &out, n as i32, 0, 0, 0);
    unsafe { gpu.launch(k("selftest_copy_f32"), LaunchConfig::linear(1, 128), &p).unwrap() };
    let got = gpu.download(&out).unwrap();
    assert!(got.iter().all(|x| x.to_bits() == 0xFFFF_FFFF), "uninitialised memory is not poisoned");
    // zeros() is zero.
    assert!(gpu.download(&gpu.zeros::<f32>(n).unwrap()).unwrap().iter().all(|&x| x == 0.0));
}

#[test]
#[cfg_attr(
    pk_emu_sanitize = "address",
    ignore = "the address build has no canaries: AddressSanitizer reports this (tests/emu_sanitize.rs)"
)]
fn write_into_slack_past_the_end_is_an_error() {
    // 13 floats: the write to element 13 lands in the 12 bytes of slack before the
    // guard page; the canary check after the launch reports it.
    let gpu = Gpu::emu_with(Schedule::Forward);
    let c = gpu.zeros::<f32>(13).unwrap();
    let p = params(&c, &c, &c, 13, 0, 0, 0);
    let err = unsafe { gpu.launch(k("selftest_oob_write_f32"), LaunchConfig::linear(1, 32), &p) }.unwrap_err();
    assert!(err.to_string().contains("out-of-bounds write"), "{err}");
}

/// Writes one element past the end of a buffer whose end is a guard page. The test
/// runs itself again as a child process (marked by PK_EMU_OOB_CHILD) to do this, since
/// the emulation ends the process on the fault, as a GPU would end the context. In the
/// address build the write lands in the buffer's red zone and AddressSanitizer reports it.
#[test]
fn write_past_the_end_faults_on_the_guard_page() {
    if std::env::var_os("PK_EMU_OOB_CHILD").is_some() {
        let gpu = Gpu::emu_with(Schedule::Forward);
        let c = gpu.zeros::<f32>(64).unwrap();
        let p = params(&c, &c, &c, 64, 0, 0, 0);
        let _ = unsafe { gpu.launch(k("selftest_oob_write_f32"), LaunchConfig::linear(1, 96), &p) };
        println!("child survived");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "write_past_the_end_faults_on_the_guard_page", "--nocapture", "--test-threads=1"])
        .env("PK_EMU_OOB_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child survived an out-of-bounds write:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("child survived"));
    let what = if cfg!(pk_emu_sanitize = "address") { "ERROR: AddressSanitizer" } else { "out-of-bounds access" };
    assert!(
        stderr.contains(what) && stderr.contains("0 bytes past the end of a device buffer of 256 bytes"),
        "unexpected report:\n{stderr}"
    );
    assert!(stderr.contains("selftest_oob_write_f32") && stderr.contains("thread (64,0,0)"), "{stderr}");
}

/// A float4 load from an address that is not a multiple of 16 faults on a GPU; the
/// emulation traps on it too (in a child process, as the out-of-bounds test).
#[test]
fn misaligned_vector_loads_trap() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let a = gpu.upload(&(0..8).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let c = gpu.zeros::<f32>(4).unwrap();
    if std::env::var_os("PK_EMU_MISALIGNED_CHILD").is_some() {
        let p = params(&a, &a, &c, 1, 0, 0, 0);
        let _ = unsafe { gpu.launch(k("selftest_vector_load_f32"), LaunchConfig::linear(1, 1), &p) };
        println!("child survived");
        return;
    }
    // Aligned: fine.
    let p = params(&a, &a, &c, 4, 0, 0, 0);
    unsafe { gpu.launch(k("selftest_vector_load_f32"), LaunchConfig::linear(1, 1), &p).unwrap() };
    assert_eq!(gpu.download(&c).unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "misaligned_vector_loads_trap", "--nocapture", "--test-threads=1"])
        .env("PK_EMU_MISALIGNED_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child survived a misaligned float4 load");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("child survived"));
    assert!(
        stderr.contains("misaligned memory access") && stderr.contains("selftest_vector_load_f32"),
        "unexpected report:\n{stderr}"
    );
}

#[test]
fn divergent_barriers_are_reported() {
    for gpu in schedules() {
        for (mode, what) in [(0, "exited"), (1, "exited"), (2, "waits at")] {
            let c = gpu.zeros::<f32>(128).unwrap();
            let p = params(&c, &c, &c, 0, 0, 0, mode);
            let err =
                unsafe { gpu.launch(k("selftest_divergent_barrier"), LaunchConfig::linear(2, 64), &p) }.unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("divergent barrier") && msg.contains(what), "mode {mode}: {msg}");
        }
    }
}

fn bf16_bits(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn mma_oracle(a: &[f32], b_kn: impl Fn(usize, usize) -> f32, c0: f32) -> Vec<f32> {
    let mut d = vec![0.0; 128];
    for i in 0..16 {
        for j in 0..8 {
            let mut acc = 0.0f64;
            for p in 0..16 {
                acc += a[i * 16 + p] as f64 * b_kn(p, j) as f64;
            }
            d[i * 8 + j] = acc as f32 + c0;
        }
    }
    d
}

fn check_mma_bf16(gpu: &Gpu) {
    let a: Vec<f32> = bf16_bits(&rand_vec(256, 11)).iter().map(|x| x.to_f32()).collect();
    let bt: Vec<f32> = bf16_bits(&rand_vec(128, 12)).iter().map(|x| x.to_f32()).collect(); // [n][k]
    let (da, db) = (gpu.upload(&bf16_bits(&a)).unwrap(), gpu.upload(&bf16_bits(&bt)).unwrap());
    let dd = gpu.zeros::<f32>(128).unwrap();
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), shared_mem_bytes: 768 };
    let p = params(&da, &db, &dd, 0, 0, 0, 0);
    unsafe { gpu.launch(k("selftest_mma_bf16"), cfg, &p).unwrap() };
    let want = mma_oracle(&a, |kk, n| bt[n * 16 + kk], 0.0);
    let got = gpu.download(&dd).unwrap();
    assert!(max_err(&got, &want) < 1e-4, "{}: {}", gpu.name(), max_err(&got, &want));
}

fn check_mma_trans_f16(gpu: &Gpu) {
    let to16 = |v: Vec<f32>| -> Vec<f16> { v.iter().map(|&x| f16::from_f32(x)).collect() };
    let a16 = to16(rand_vec(256, 13));
    let b16 = to16(rand_vec(128, 14)); // [k][n]
    let a: Vec<f32> = a16.iter().map(|x| x.to_f32()).collect();
    let b: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
    let (da, db) = (gpu.upload(&a16).unwrap(), gpu.upload(&b16).unwrap());
    let dd = gpu.zeros::<f32>(128).unwrap();
    let p = params(&da, &db, &dd, 0, 0, 0, 0);
    unsafe { gpu.launch(k("selftest_mma_trans_f16"), LaunchConfig::linear(1, 32), &p).unwrap() };
    let want = mma_oracle(&a, |kk, n| b[kk * 8 + n], 1.0);
    let got = gpu.download(&dd).unwrap();
    assert!(max_err(&got, &want) < 1e-3, "{}: {}", gpu.name(), max_err(&got, &want));
}

#[test]
fn tensor_core_fragments_follow_the_ptx_layouts() {
    for gpu in schedules() {
        check_mma_bf16(&gpu);
        check_mma_trans_f16(&gpu);
    }
}

/// selftest_wgmma_bf16 with `n` columns and `mode`: A [64][64] and B [n][64] (bf16,
/// K-major), the result [64][n], and the oracle A * B^T.
fn run_wgmma(gpu: &Gpu, n: usize, mode: i32) -> Result<(Vec<f32>, Vec<f32>), prunekit::gpu::GpuError> {
    let (a, b) = (bf16_bits(&rand_vec(64 * 64, 21)), bf16_bits(&rand_vec(n * 64, 22)));
    let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    let dd = gpu.zeros::<f32>(64 * n).unwrap();
    let cfg =
        LaunchConfig { grid: (1, 1, 1), block: (128, 1, 1), shared_mem_bytes: (1024 + 128 + (64 + n) * 128) as u32 };
    let p = params(&da, &db, &dd, 64, n as i32, 64, mode);
    unsafe { gpu.launch(k("selftest_wgmma_bf16"), cfg, &p)? };
    let mut want = vec![0.0f32; 64 * n];
    for i in 0..64 {
        for j in 0..n {
            let acc: f64 = (0..64).map(|p| a[i * 64 + p].to_f64() * b[j * 64 + p].to_f64()).sum();
            want[i * n + j] = acc as f32;
        }
    }
    Ok((gpu.download(&dd)?, want))
}

/// wgmma through 128-byte-swizzled descriptors, m64n64 and m64n128, operands K-major and
/// MN-major: the D fragment and the operands' layouts as the PTX ISA documents them; tiles
/// off the swizzle's 1024-byte alignment give another product.
fn check_wgmma(gpu: &Gpu) {
    for n in [64, 128] {
        let (got, want) = run_wgmma(gpu, n, 0).unwrap();
        assert!(max_err(&got, &want) < 1e-3, "{} n = {n}: {}", gpu.name(), max_err(&got, &want));
        let (got, _) = run_wgmma(gpu, n, 5).unwrap();
        assert!(max_err(&got, &want) < 1e-3, "{} n = {n}, MN-major: {}", gpu.name(), max_err(&got, &want));
        let (off, _) = run_wgmma(gpu, n, 2).unwrap();
        assert!(max_err(&off, &want) > 0.1, "{} n = {n}: tiles off the 1024-byte boundary read the same", gpu.name());
    }
}

#[test]
fn warpgroup_mma_follows_the_ptx_layouts() {
    for gpu in schedules() {
        check_wgmma(&gpu);
    }
}

#[test]
fn wgmma_reads_shared_memory_and_writes_accumulators_at_the_wait() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    // Shared memory overwritten between the MMAs' issue and their wait: what they read.
    let (got, _) = run_wgmma(&gpu, 64, 1).unwrap();
    assert!(got.iter().all(|&x| x == 0.0), "the MMAs read shared memory before their wait");
    // Never waited for: an error, not a silent result.
    let err = run_wgmma(&gpu, 64, 3).unwrap_err().to_string();
    assert!(err.contains("never waited"), "{err}");
    // A cp.async into a tile that MMAs in flight read: an error.
    let err = run_wgmma(&gpu, 128, 4).unwrap_err().to_string();
    assert!(err.contains("in flight"), "{err}");
}

#[test]
fn reading_before_cp_async_wait_sees_poison() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let a = gpu.upload(&bf16_bits(&rand_vec(256, 1))).unwrap();
    let b = gpu.upload(&bf16_bits(&rand_vec(128, 2))).unwrap();
    let d = gpu.zeros::<f32>(128).unwrap();
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), shared_mem_bytes: 768 };
    let p = params(&a, &b, &d, 0, 0, 0, 1);
    unsafe { gpu.launch(k("selftest_mma_bf16"), cfg, &p).unwrap() };
    assert!(gpu.download(&d).unwrap().iter().all(|x| x.is_nan()), "the copies were visible before the wait");
}

/// selftest_mbarrier_f32 on `m` inputs in `mode`: the output (c = 2a + 1 where the
/// pipeline wrote it, zero elsewhere) and the oracle.
fn run_mbarrier(gpu: &Gpu, m: usize, mode: i32) -> Result<(Vec<f32>, Vec<f32>), prunekit::gpu::GpuError> {
    let a = rand_vec(m, 31);
    let (da, dc) = (gpu.upload(&a).unwrap(), gpu.zeros::<f32>(m).unwrap());
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (96, 1, 1), shared_mem_bytes: 64 + 3 * 512 };
    let p = params(&da, &da, &dc, m as i32, 0, 0, mode);
    unsafe { gpu.launch(k("selftest_mbarrier_f32"), cfg, &p)? };
    Ok((gpu.download(&dc)?, a.iter().map(|x| 2.0 * x + 1.0).collect()))
}

/// A ring of three stages on mbarriers, filled by cp.async (a partial last chunk
/// zero-filled) or by bulk copies: every chunk passes, in every round of the ring.
fn check_mbarrier_pipeline(gpu: &Gpu) {
    for m in [1, 128, 129, 3 * 128, 1000, 13 * 128 + 37] {
        let (got, want) = run_mbarrier(gpu, m, 0).unwrap();
        assert_eq!(got, want, "{} cp.async, m = {m}", gpu.name());
    }
    for m in [4, 128, 132, 1000, 13 * 128 + 36] {
        let (got, want) = run_mbarrier(gpu, m, 1).unwrap();
        assert_eq!(got, want, "{} bulk copy, m = {m}", gpu.name());
    }
}

#[test]
fn mbarrier_pipelines_pass_every_chunk_in_every_order() {
    for gpu in schedules() {
        check_mbarrier_pipeline(&gpu);
    }
}

#[test]
fn mbarrier_misuse_is_caught() {
    // Consumers that do not wait read the stage before it is filled when they run first.
    let (got, want) = run_mbarrier(&Gpu::emu_with(Schedule::Reverse), 300, 2).unwrap();
    assert!(max_err(&got, &want) > 1.0, "reading without the wait saw the data");
    let gpu = Gpu::emu_with(Schedule::Forward);
    // A phase that never completes: a deadlock, reported (a GPU would hang).
    let err = run_mbarrier(&gpu, 1000, 3).unwrap_err().to_string();
    assert!(err.contains("deadlock") && err.contains("mbarrier") && err.contains("32 of 32 arrivals"), "{err}");
    let err = run_mbarrier(&gpu, 1000, 4).unwrap_err().to_string();
    assert!(err.contains("never initialized"), "{err}");
}

/// selftest_named_barrier_f32 with `rounds` rounds for group 0 in `mode`: the output and
/// the oracle (each round, thread i of a group takes its mirror's value plus the round).
fn run_named_barrier(gpu: &Gpu, rounds: usize, mode: i32) -> Result<(Vec<f32>, Vec<f32>), prunekit::gpu::GpuError> {
    let a = rand_vec(128, 41);
    let (da, dc) = (gpu.upload(&a).unwrap(), gpu.zeros::<f32>(128).unwrap());
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (128, 1, 1), shared_mem_bytes: 512 };
    let p = params(&da, &da, &dc, 0, rounds as i32, 0, mode);
    unsafe { gpu.launch(k("selftest_named_barrier_f32"), cfg, &p)? };
    let mut want = a;
    for g in 0..2 {
        let v = &mut want[g * 64..(g + 1) * 64];
        for r in 0..rounds + 2 * g {
            let stored: Vec<f32> = v.iter().map(|x| x + r as f32).collect();
            for (i, x) in v.iter_mut().enumerate() {
                *x = stored[63 - i];
            }
        }
    }
    Ok((gpu.download(&dc)?, want))
}

#[test]
fn named_barriers_synchronize_a_part_of_the_block() {
    for gpu in schedules() {
        for rounds in [1, 2, 5] {
            let (got, want) = run_named_barrier(&gpu, rounds, 0).unwrap();
            assert_eq!(got, want, "{} rounds = {rounds}", gpu.name());
        }
    }
}

#[test]
fn named_barrier_misuse_is_caught() {
    // Without the barrier between the stores and the loads, a warp that runs first reads
    // the other warp's slots before they are written (a race on purpose, which
    // ThreadSanitizer would report and end the process with).
    if !cfg!(pk_emu_sanitize = "thread") {
        let (got, want) = run_named_barrier(&Gpu::emu_with(Schedule::Reverse), 3, 1).unwrap();
        assert!(max_err(&got, &want) > 0.5, "reading without the barrier saw the data");
    }
    let gpu = Gpu::emu_with(Schedule::Forward);
    let err = run_named_barrier(&gpu, 3, 2).unwrap_err().to_string();
    assert!(err.contains("deadlock") && err.contains("bar.sync 2, 64") && err.contains("reached by 32"), "{err}");
    let err = run_named_barrier(&gpu, 3, 3).unwrap_err().to_string();
    assert!(err.contains("bar.sync 2 with the count"), "{err}");
    let err = run_named_barrier(&gpu, 3, 4).unwrap_err().to_string();
    assert!(err.contains("more than its count"), "{err}");
}

#[test]
fn bad_launches_are_errors() {
    let gpu = Gpu::emu_with(Schedule::Forward);
    let c = gpu.zeros::<f32>(4).unwrap();
    let p = params(&c, &c, &c, 0, 0, 0, 0);
    let too_big = LaunchConfig { grid: (1, 1, 1), block: (1025, 1, 1), shared_mem_bytes: 0 };
    assert!(unsafe { gpu.launch(k("selftest_copy_f32"), too_big, &p) }.is_err());
    assert!(unsafe { gpu.launch(k("no_such_kernel"), LaunchConfig::linear(1, 1), &p) }.is_err());
    assert!(unsafe { gpu.launch(Kernel::new("nope", "x"), LaunchConfig::linear(1, 1), &p) }.is_err());
    // Wrong parameter struct size.
    let err = unsafe {
        gpu.launch(k("selftest_copy_f32"), LaunchConfig::linear(1, 1), &prunekit::ops::params::TopkSegment::default())
    }
    .unwrap_err();
    assert!(err.to_string().contains("bytes of parameters"), "{err}");
}

mod cuda {
    use super::*;
    const WHY: &str = "needs a CUDA GPU: run with --include-ignored on a GPU machine";
    fn gpu() -> Gpu {
        Gpu::cuda(0).unwrap_or_else(|e| panic!("{WHY}: {e}"))
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_tiled_gemm() {
        check_tiled_gemm(&gpu());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_named_barriers() {
        let gpu = gpu();
        for rounds in [1, 2, 5] {
            let (got, want) = run_named_barrier(&gpu, rounds, 0).unwrap();
            assert_eq!(got, want, "rounds = {rounds}");
        }
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_reductions() {
        check_reductions(&gpu());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_ballot_and_atomics() {
        check_ballot_and_int_atomics(&gpu());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_shuffles() {
        check_shuffles(&gpu());
    }
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_tensor_core_fragments() {
        let g = gpu();
        check_mma_bf16(&g);
        check_mma_trans_f16(&g);
    }
    #[test]
    #[ignore = "needs a CUDA GPU of compute capability 9.0"]
    fn cuda_mbarrier_pipeline() {
        let g = gpu();
        assert!(g.has_wgmma(), "{} is not sm_90 (mbarrier transaction counts and bulk copies)", g.name());
        check_mbarrier_pipeline(&g);
    }
    /// On an sm_90 GPU: the hardware's wgmma gives the oracle's product, and the same
    /// product as the emulation for tiles off the swizzle's alignment (the swizzle is a
    /// function of the address on both).
    #[test]
    #[ignore = "needs a CUDA GPU of compute capability 9.0"]
    fn cuda_warpgroup_mma() {
        let g = gpu();
        assert!(g.has_wgmma(), "{} has no wgmma (needs sm_90)", g.name());
        check_wgmma(&g);
        let emu = Gpu::emu_with(Schedule::Forward);
        for n in [64, 128] {
            let (hw, _) = run_wgmma(&g, n, 2).unwrap();
            let (em, _) = run_wgmma(&emu, n, 2).unwrap();
            assert!(max_err(&hw, &em) < 1e-3, "n = {n}: the GPU and the emulation swizzle differently");
        }
    }
}
