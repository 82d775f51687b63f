//! Running the prunekit binary from tests, and tiny data sets for it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The prunekit binary: `PRUNEKIT_BIN` where the tests run outside the source tree.
pub fn bin() -> PathBuf {
    std::env::var_os("PRUNEKIT_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_prunekit")), PathBuf::from)
}

pub fn prunekit(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

pub fn ok(o: &Output) -> String {
    let (out, err) = text(o);
    assert!(o.status.success(), "exit {:?}\n{out}\n{err}", o.status.code());
    out
}

pub fn fails(o: &Output, needle: &str) -> String {
    let (out, err) = text(o);
    assert!(!o.status.success(), "accepted:\n{out}\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}\n{out}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    err
}

/// An IDX pair of `n` 16x16 images: class i % 4 has gray level 25, 90, 155 or 220, plus
/// seeded noise of +-20. Returns the `idx:IMAGES,LABELS` spec.
pub fn tiny_idx(dir: &Path, n: usize) -> String {
    let (h, w) = (16u32, 16u32);
    let mut images = vec![0, 0, 8, 3];
    for d in [n as u32, h, w] {
        images.extend(d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    let mut s = 0x1234_5678u64;
    for i in 0..n {
        let c = i % 4;
        labels.push(c as u8);
        for _ in 0..h * w {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = ((s >> 33) % 41) as i32 - 20;
            images.push((25 + 65 * c as i32 + noise).clamp(0, 255) as u8);
        }
    }
    let (ip, lp) = (dir.join("images.idx"), dir.join("labels.idx"));
    std::fs::write(&ip, images).unwrap();
    std::fs::write(&lp, labels).unwrap();
    format!("idx:{},{}", ip.display(), lp.display())
}
