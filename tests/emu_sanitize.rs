//! The emulation under real sanitizers. Built with `PK_EMU_SANITIZE=address`, the
//! emulation reports reads and writes on either side of a device buffer (its 4 KiB red
//! zones and the slack after its end) and use after free, through AddressSanitizer;
//! with `PK_EMU_SANITIZE=thread`, data races between the CUDA threads of one launch,
//! through ThreadSanitizer. Each bad kernel runs in a child process (this test binary
//! run again, told which case by `PK_EMU_SANITIZE_CHILD`), since the sanitizer ends the
//! process; the test checks the child failed with the sanitizer's report and the
//! kernel's name. Under the other builds these tests are ignored with the reason.
//!
//! Two fixes hold in every build: static `__shared__` memory starts poisoned, and
//! `__syncwarp()` without a mask compiles and means all lanes.

use prunekit::gpu::{Gpu, GpuBuf, Kernel, LaunchConfig, Schedule};
use prunekit::ops::params::SelftestParams;

const CHILD: &str = "PK_EMU_SANITIZE_CHILD";

fn k(name: &'static str) -> Kernel {
    Kernel::new("selftest", name)
}

fn params(a: u64, c: u64, m: i32, mode: i32) -> SelftestParams {
    SelftestParams { a, b: a, c, m, n: 0, k: 0, mode }
}

fn gpu() -> Gpu {
    Gpu::emu_with(Schedule::Forward)
}

fn floats(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 + 1.0).collect()
}

/// Runs the bad kernel `case` in a child process; returns the child's stderr after
/// checking that it failed, that it did not get past the launch, and that its stderr
/// holds `report` and the kernel's name in the runtime's context line.
fn child_reports(test: &str, case: &str, kernel: &str, report: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1", "--include-ignored"])
        .env(CHILD, case)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{case}: the child succeeded:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("child survived"), "{case}: the launch returned:\n{stdout}\n{stderr}");
    assert!(stderr.contains(report), "{case}: no {report:?} in the child's stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("prunekit emu: in kernel {kernel}, block (")),
        "{case}: the report does not name the kernel {kernel}:\n{stderr}"
    );
    stderr
}

/// A sanitizer test run (with --include-ignored) in a build without its sanitizer fails
/// with the reason, instead of passing vacuously.
fn needs(built: bool, why: &str) {
    assert!(built, "{why}");
}

/// In the child: runs `f` (which launches a bad kernel) and says so if it survives.
fn in_child(case: &str, f: impl FnOnce()) -> bool {
    if std::env::var(CHILD).as_deref() != Ok(case) {
        return false;
    }
    f();
    println!("child survived");
    true
}

// ---------------------------------------------------------------- every build

#[test]
fn static_shared_memory_starts_poisoned() {
    let gpu = gpu();
    let a = gpu.upload(&floats(256)).unwrap();
    let c = gpu.zeros::<f32>(3 * 256).unwrap();
    for _ in 0..2 {
        // Read before any write: the poison, in every block, also after a block that wrote it.
        let p = params(a.ptr(), c.ptr(), 256, 0);
        unsafe { gpu.launch(k("selftest_static_smem_f32"), LaunchConfig::linear(3, 256), &p).unwrap() };
        let got = gpu.download(&c).unwrap();
        assert!(
            got.iter().all(|x| x.to_bits() == 0xFFFF_FFFF),
            "static shared memory is not poisoned: {:?}",
            &got[..4]
        );
        let p = params(a.ptr(), c.ptr(), 256, 1);
        unsafe { gpu.launch(k("selftest_static_smem_f32"), LaunchConfig::linear(3, 256), &p).unwrap() };
        assert_eq!(gpu.download(&c).unwrap(), floats(256).repeat(3));
    }
}

#[test]
fn syncwarp_without_a_mask_means_all_lanes() {
    for gpu in [gpu(), Gpu::emu_with(Schedule::Reverse), Gpu::emu_with(Schedule::Shuffle(5))] {
        let a = gpu.upload(&floats(256)).unwrap();
        let c = gpu.zeros::<f32>(2 * 256).unwrap();
        let p = params(a.ptr(), c.ptr(), 256, 0);
        unsafe { gpu.launch(k("selftest_syncwarp_f32"), LaunchConfig::linear(2, 256), &p).unwrap() };
        let want: Vec<f32> = (0..512).map(|t| ((t % 256) ^ 1) as f32 + 1.0).collect();
        assert_eq!(gpu.download(&c).unwrap(), want, "{}", gpu.name());
    }
}

/// The correct versions of the racy kernels below: nothing to report, and the right answer.
#[test]
fn atomic_counter_and_own_block_reads_are_clean() {
    let gpu = gpu();
    let c = gpu.zeros::<i32>(1).unwrap();
    let p = params(c.ptr(), c.ptr(), 0, 1);
    unsafe { gpu.launch(k("selftest_counter_i32"), LaunchConfig::linear(4, 1024), &p).unwrap() };
    assert_eq!(gpu.download(&c).unwrap(), vec![4096]);
    let a = gpu.upload(&floats(64)).unwrap();
    let c = gpu.zeros::<f32>(128).unwrap();
    let p = params(a.ptr(), c.ptr(), 64, 1);
    unsafe { gpu.launch(k("selftest_cross_block_f32"), LaunchConfig::linear(64, 32), &p).unwrap() };
    let got = gpu.download(&c).unwrap();
    assert_eq!(&got[..64], &floats(64)[..]);
    assert_eq!(&got[64..], &floats(64)[..]);
}

// ---------------------------------------------------------------- AddressSanitizer

fn launch_read_before() {
    let gpu = gpu();
    let a = gpu.upload(&floats(64)).unwrap();
    let c = gpu.zeros::<f32>(64).unwrap();
    let p = params(a.ptr(), c.ptr(), 64, 0);
    let _ = unsafe { gpu.launch(k("selftest_read_before_f32"), LaunchConfig::linear(1, 64), &p) };
}

fn launch_write_before() {
    let gpu = gpu();
    let c = gpu.zeros::<f32>(64).unwrap();
    let p = params(c.ptr(), c.ptr(), 64, 0);
    let _ = unsafe { gpu.launch(k("selftest_write_before_f32"), LaunchConfig::linear(1, 32), &p) };
}

fn launch_read_in_slack() {
    // 13 floats: element 13 lies in the 12 bytes of slack up to the next 16 bytes.
    let gpu = gpu();
    let a = gpu.upload(&floats(13)).unwrap();
    let c = gpu.zeros::<f32>(14).unwrap();
    let p = params(a.ptr(), c.ptr(), 13, 0);
    let _ = unsafe { gpu.launch(k("selftest_read_past_end_f32"), LaunchConfig::linear(1, 32), &p) };
}

fn launch_use_after_free() {
    let gpu = gpu();
    let a: GpuBuf<f32> = gpu.upload(&floats(64)).unwrap();
    let freed = a.ptr();
    drop(a);
    let c = gpu.zeros::<f32>(64).unwrap();
    let p = params(freed, c.ptr(), 64, 0);
    let _ = unsafe { gpu.launch(k("selftest_copy_f32"), LaunchConfig::linear(1, 64), &p) };
}

const ASAN: &str = "needs a build with PK_EMU_SANITIZE=address";

#[test]
#[cfg_attr(not(pk_emu_sanitize = "address"), ignore = "needs a build with PK_EMU_SANITIZE=address")]
fn asan_reports_a_read_one_element_before_a_buffer() {
    needs(cfg!(pk_emu_sanitize = "address"), ASAN);
    let name = "asan_reports_a_read_one_element_before_a_buffer";
    if in_child("read_before", launch_read_before) {
        return;
    }
    let err = child_reports(name, "read_before", "selftest_read_before_f32", "ERROR: AddressSanitizer");
    assert!(err.contains("READ of size 4"), "{err}");
    assert!(err.contains("4 bytes before a device buffer of 256 bytes"), "{err}");
    assert!(err.contains("thread (0,0,0)"), "{err}");
}

#[test]
#[cfg_attr(not(pk_emu_sanitize = "address"), ignore = "needs a build with PK_EMU_SANITIZE=address")]
fn asan_reports_a_write_300_floats_before_a_buffer() {
    needs(cfg!(pk_emu_sanitize = "address"), ASAN);
    let name = "asan_reports_a_write_300_floats_before_a_buffer";
    if in_child("write_before", launch_write_before) {
        return;
    }
    let err = child_reports(name, "write_before", "selftest_write_before_f32", "ERROR: AddressSanitizer");
    assert!(err.contains("WRITE of size 4"), "{err}");
    assert!(err.contains("1200 bytes before a device buffer of 256 bytes"), "{err}");
}

#[test]
#[cfg_attr(not(pk_emu_sanitize = "address"), ignore = "needs a build with PK_EMU_SANITIZE=address")]
fn asan_reports_a_read_in_the_slack_after_the_end() {
    needs(cfg!(pk_emu_sanitize = "address"), ASAN);
    let name = "asan_reports_a_read_in_the_slack_after_the_end";
    if in_child("slack", launch_read_in_slack) {
        return;
    }
    let err = child_reports(name, "slack", "selftest_read_past_end_f32", "ERROR: AddressSanitizer");
    assert!(err.contains("READ of size 4"), "{err}");
    assert!(err.contains("0 bytes past the end of a device buffer of 52 bytes"), "{err}");
    assert!(err.contains("thread (13,0,0)"), "{err}");
}

#[test]
#[cfg_attr(not(pk_emu_sanitize = "address"), ignore = "needs a build with PK_EMU_SANITIZE=address")]
fn asan_reports_a_launch_on_a_freed_buffer() {
    needs(cfg!(pk_emu_sanitize = "address"), ASAN);
    let name = "asan_reports_a_launch_on_a_freed_buffer";
    if in_child("use_after_free", launch_use_after_free) {
        return;
    }
    child_reports(name, "use_after_free", "selftest_copy_f32", "ERROR: AddressSanitizer: heap-use-after-free");
}

// ---------------------------------------------------------------- ThreadSanitizer

fn launch_racy_counter() {
    let gpu = gpu();
    let c = gpu.zeros::<i32>(1).unwrap();
    let p = params(c.ptr(), c.ptr(), 0, 0);
    let _ = unsafe { gpu.launch(k("selftest_counter_i32"), LaunchConfig::linear(1, 1024), &p) };
}

fn launch_cross_block() {
    let gpu = gpu();
    let a = gpu.upload(&floats(64)).unwrap();
    let c = gpu.zeros::<f32>(128).unwrap();
    let p = params(a.ptr(), c.ptr(), 64, 0);
    let _ = unsafe { gpu.launch(k("selftest_cross_block_f32"), LaunchConfig::linear(64, 32), &p) };
}

fn launch_missing_barrier() {
    // selftest_gemm_f32 without its barrier between loading a tile and using it.
    let gpu = gpu();
    let a = gpu.upload(&floats(32 * 32)).unwrap();
    let c = gpu.zeros::<f32>(32 * 32).unwrap();
    let p = SelftestParams { a: a.ptr(), b: a.ptr(), c: c.ptr(), m: 32, n: 32, k: 32, mode: 1 };
    let cfg = LaunchConfig { grid: (2, 2, 1), block: (16, 16, 1), shared_mem_bytes: 0 };
    let _ = unsafe { gpu.launch(k("selftest_gemm_f32"), cfg, &p) };
}

const TSAN: &str = "needs a build with PK_EMU_SANITIZE=thread";

#[test]
#[cfg_attr(not(pk_emu_sanitize = "thread"), ignore = "needs a build with PK_EMU_SANITIZE=thread")]
fn tsan_reports_a_non_atomic_counter() {
    needs(cfg!(pk_emu_sanitize = "thread"), TSAN);
    let name = "tsan_reports_a_non_atomic_counter";
    if in_child("counter", launch_racy_counter) {
        return;
    }
    child_reports(name, "counter", "selftest_counter_i32", "WARNING: ThreadSanitizer: data race");
}

#[test]
#[cfg_attr(not(pk_emu_sanitize = "thread"), ignore = "needs a build with PK_EMU_SANITIZE=thread")]
fn tsan_reports_a_block_reading_another_blocks_write() {
    needs(cfg!(pk_emu_sanitize = "thread"), TSAN);
    let name = "tsan_reports_a_block_reading_another_blocks_write";
    if in_child("cross_block", launch_cross_block) {
        return;
    }
    child_reports(name, "cross_block", "selftest_cross_block_f32", "WARNING: ThreadSanitizer: data race");
}

#[test]
#[cfg_attr(not(pk_emu_sanitize = "thread"), ignore = "needs a build with PK_EMU_SANITIZE=thread")]
fn tsan_reports_a_missing_barrier() {
    needs(cfg!(pk_emu_sanitize = "thread"), TSAN);
    let name = "tsan_reports_a_missing_barrier";
    if in_child("missing_barrier", launch_missing_barrier) {
        return;
    }
    child_reports(name, "missing_barrier", "selftest_gemm_f32", "WARNING: ThreadSanitizer: data race");
}
