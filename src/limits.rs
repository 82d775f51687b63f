//! Limits checked before a command starts its work, shared by `bench`, `train` and
//! `eval`: whether a training workspace fits in the device's memory (estimated from the
//! architecture, before anything big is allocated), and whether an output file can be
//! written where it is asked for (before a long run, not after it).

use crate::device::Device;
use crate::model::{Arch, PrecisionKind};
use crate::ops::layers::maxpool_out;
use crate::{ensure, invalid, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The memory a model and its training workspace take, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryNeed {
    /// Activations, saved statistics, gradients of activations and scratch buffers of one
    /// [`Workspace`](crate::model::Workspace).
    pub workspace: f64,
    /// Parameters, their gradients and momenta (and the bf16 copies of conv weights).
    pub model: f64,
}

impl MemoryNeed {
    /// Both together.
    pub fn total(&self) -> f64 {
        self.workspace + self.model
    }
}

fn conv_out(h: usize, k: usize, stride: usize, pad: usize) -> usize {
    (h + 2 * pad).saturating_sub(k) / stride + 1
}

/// The memory that [`Model::workspace`](crate::model::Model::workspace) for batches of `n`
/// images of `h` x `w` and the model itself take, computed (in floating point, so that
/// absurd sizes cannot overflow) from the buffers the workspace plans.
pub fn training_memory(arch: &Arch, precision: PrecisionKind, n: usize, h: usize, w: usize) -> MemoryNeed {
    let e = match precision {
        PrecisionKind::F32 => 4.0,
        PrecisionKind::Bf16 => 2.0,
    };
    let nf = n as f64;
    let mut bytes = 0.0f64;
    // Input: NCHW and NHWC f32, and the low-precision copy (on a kernel device a bf16
    // model holds no NHWC f32 copy and its low copy has 8 channels: 9.3 bytes per value,
    // under this estimate's 10).
    let img = nf * 3.0 * (h * w) as f64;
    bytes += 2.0 * 4.0 * img + if e < 4.0 { e * img } else { 0.0 };
    let (h1, w1) = (conv_out(h, 7, 2, 3), conv_out(w, 7, 2, 3));
    let (hp, wp) = (maxpool_out(h1), maxpool_out(w1));
    let l_stem = nf * (h1 * w1 * arch.stem) as f64;
    let l_pool = nf * (hp * wp * arch.stem) as f64;
    bytes += e * (2.0 * l_stem + l_pool);
    // Scratch buffers by length (the workspace keeps, per length, the most any step uses
    // at once); lengths as integers of elements per image, to group equal ones.
    let mut needs: BTreeMap<usize, usize> = BTreeMap::new();
    let mut need = |counts: &[(usize, usize)]| {
        let mut here: BTreeMap<usize, usize> = BTreeMap::new();
        for &(len, k) in counts {
            *here.entry(len).or_default() += k;
        }
        for (len, k) in here {
            let v = needs.entry(len).or_default();
            *v = (*v).max(k);
        }
    };
    let (mut hh, mut ww) = (hp, wp);
    let mut last = hp * wp * arch.stem;
    let mut saved = arch.stem;
    for b in &arch.blocks {
        let (ho, wo) = (conv_out(hh, 3, b.stride, 1), conv_out(ww, 3, b.stride, 1));
        let (l_in, l1, l2, l_out) = (hh * ww * b.cin, hh * ww * b.w1, ho * wo * b.w2, ho * wo * b.cout);
        need(&[(l_out, 2)]);
        need(&[(l_out, 2), (l_in, 2), (l1, 2), (l2, 2)]);
        let per_image = 2 * l1 + 2 * l2 + 2 * l_out + if b.downsample { l_out } else { 0 };
        bytes += e * nf * per_image as f64;
        saved += b.w1 + b.w2 + b.cout + if b.downsample { b.cout } else { 0 };
        last = l_out;
        (hh, ww) = (ho, wo);
    }
    need(&[(h1 * w1 * arch.stem, 2), (hp * wp * arch.stem, 1)]);
    need(&[(last, 1)]);
    bytes += e * nf * needs.iter().map(|(&len, &k)| (len * k) as f64).sum::<f64>();
    // Saved batch statistics (mean and 1/std per channel), features, logits, targets.
    bytes += 4.0 * 2.0 * 2.0 * saved as f64;
    bytes += 4.0 * nf * (2.0 * arch.fc_in() as f64 + 2.0 * arch.classes as f64 + 1.0);
    let params = arch.params() as f64;
    let conv_params: f64 = arch.convs(h, w).iter().map(|c| (c.cin * c.cout * c.kernel * c.kernel) as f64).sum();
    let stats: f64 = 2.0 * (arch.stem + saved) as f64; // BN running statistics (about)
    let model = 4.0 * (3.0 * params + stats) + if e < 4.0 { e * conv_params } else { 0.0 };
    MemoryNeed { workspace: bytes, model }
}

/// Memory the device can still give, in bytes, and what that memory is ("free GPU
/// memory", "available host memory"); `None` when it cannot be found out.
pub fn available_memory(dev: &Device) -> Option<(f64, &'static str)> {
    match dev.gpu().map(|g| g.memory()) {
        Some(Ok(Some((free, _)))) => Some((free as f64, "free GPU memory")),
        Some(Err(_)) => None,
        _ => host_available().map(|b| (b, "available host memory")),
    }
}

/// MemAvailable of /proc/meminfo, capped by the cgroup's memory.max where one is set.
fn host_available() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut avail = kb * 1024.0;
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<f64>().ok());
    if let (Some(max), Some(cur)) = (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        avail = avail.min((max - cur).max(0.0));
    }
    Some(avail)
}

/// Gigabytes, for messages.
pub fn gb(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else {
        format!("{:.0} MB", (bytes / 1e6).max(1.0))
    }
}

/// Refuses, with what it needs and what there is, a batch and image size whose model and
/// workspace (plus `host_extra` bytes of input batches in host memory, counted on a host
/// device) do not fit in the device's memory. Call it before building the
/// workspace: nothing big is allocated yet.
pub fn check_training_memory(
    dev: &Device,
    arch: &Arch,
    precision: PrecisionKind,
    batch: usize,
    size: usize,
    host_extra: f64,
) -> Result<MemoryNeed> {
    check_run_memory(dev, arch, precision, batch, size, None, host_extra)
}

/// [`check_training_memory`] for a run that also evaluates with a batch of `eval_batch`
/// images in a second workspace (when `Some` and not the training batch).
pub fn check_run_memory(
    dev: &Device,
    arch: &Arch,
    precision: PrecisionKind,
    batch: usize,
    size: usize,
    eval_batch: Option<usize>,
    host_extra: f64,
) -> Result<MemoryNeed> {
    let need = training_memory(arch, precision, batch, size, size);
    let eval_ws = match eval_batch {
        Some(e) if e != batch => training_memory(arch, precision, e, size, size).workspace,
        _ => 0.0,
    };
    let on_host = !matches!(dev.gpu().map(|g| g.kind()), Some(crate::gpu::BackendKind::Cuda));
    let total = need.total() + eval_ws + if on_host { host_extra } else { 0.0 };
    // The counting mode maps its buffers but never fills them: no memory to check.
    if let Some((avail, what)) = available_memory(dev).filter(|_| !dev.counts_only()) {
        crate::ensure!(
            matches!(total.partial_cmp(&avail), Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)),
            "batch {batch} of {size}x{size} images needs about {} ({} for the workspace, {} for the model{}{}), \
             more than the {} of {what} on {}; use a smaller --batch{} or --size",
            gb(total),
            gb(need.workspace),
            gb(need.model),
            if eval_ws > 0.0 { format!(", {} for the evaluation workspace", gb(eval_ws)) } else { String::new() },
            if on_host && host_extra > 0.0 { format!(", {} for input batches", gb(host_extra)) } else { String::new() },
            gb(avail),
            dev.name(),
            if eval_ws > 0.0 { ", --eval-batch" } else { "" }
        );
    }
    Ok(need)
}

/// Refuses an output path that cannot be written: a folder, a file in a missing folder,
/// or in a folder where no file can be created (tried with a probe file that is removed
/// again). `flag` names the option in the message, e.g. `--out`.
pub fn check_output_path(flag: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    ensure!(!path.as_os_str().is_empty(), "{flag}: the path is empty");
    ensure!(!path.is_dir(), "{flag} {shown}: is a folder, not a file");
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    ensure!(parent.is_dir(), "{flag} {shown}: the folder {} does not exist", parent.display());
    let probe = parent.join(format!(".prunekit-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(invalid!("{flag} {shown}: cannot write in the folder {}: {e}", parent.display())),
    }
}

/// [`check_output_path`] for `--plot`, which also wants a file name ending in `.svg`.
pub fn check_svg_path(path: &Path) -> Result<()> {
    ensure!(
        path.extension().and_then(|e| e.to_str()) == Some("svg"),
        "--plot writes SVG: give a file name ending in .svg (got {})",
        path.display()
    );
    check_output_path("--plot", path)
}

/// Writes `text` to `path` atomically: a temporary file in the same folder, then a rename
/// (a failure leaves no partial file).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let shown = path.display().to_string();
    let name = path.file_name().ok_or_else(|| crate::invalid!("{shown}: not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let done = std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| crate::Error::Io { path: shown, source });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_training_memory_is_plausible() {
        let a = Arch::resnet50(1000);
        let m = training_memory(&a, PrecisionKind::F32, 100_000, 224, 224);
        assert!(m.workspace > 5e12 && m.workspace < 1e14, "{}", m.workspace);
        assert!((m.model / 1e6 - 25.56 * 12.0).abs() < 5.0, "{}", m.model);
        let small = training_memory(&a, PrecisionKind::F32, 8, 224, 224);
        assert!(small.workspace > 0.5e9 && small.workspace < 4e9, "{}", small.workspace);
    }
}
