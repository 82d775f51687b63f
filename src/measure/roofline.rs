//! The roofline of a training step: the least time each op could take on a GPU, given
//! its FLOPs and bytes (counted from its shapes by the ops layer, [`Cost`]) and the GPU's
//! peak arithmetic rate and memory bandwidth. An op's limit is `max(FLOPs / peak,
//! bytes / bandwidth)`; a family's and a step's limits are the sums over their ops. The
//! table set beside a profile says how far each family is from its limit, and what
//! speedup pruning could buy at the limits (the *roofline-ideal* speedup: the dense
//! step's limit over the pruned step's), which is lower than the FLOP-ideal one where
//! pruning removes FLOPs but not bytes.
//!
//! The peaks are the datasheets' (dense tensor-core rate for bf16, whose convolutions run
//! on `mma`; the CUDA-core FMA rate for f32, whose convolutions are SIMT kernels).

use super::step::BenchRow;
use crate::model::PrecisionKind;
use crate::ops::profile::{Cost, Family, Profile};
use crate::{invalid, Result};

/// A GPU's peak rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Roofline {
    /// The short name (`h200`), also matched in a device's name (`NVIDIA H200`).
    pub name: &'static str,
    /// Dense bf16 tensor-core FLOP/s.
    pub bf16_flops: f64,
    /// f32 FMA FLOP/s on the CUDA cores.
    pub f32_flops: f64,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
}

/// The GPUs whose peaks are known (SXM parts; datasheet figures).
pub const KNOWN: [Roofline; 3] = [
    Roofline { name: "h200", bf16_flops: 989.4e12, f32_flops: 66.9e12, bandwidth: 4.8e12 },
    Roofline { name: "h100", bf16_flops: 989.4e12, f32_flops: 66.9e12, bandwidth: 3.35e12 },
    Roofline { name: "a100", bf16_flops: 312e12, f32_flops: 19.5e12, bandwidth: 2.039e12 },
];

impl Roofline {
    /// The known GPU named `name` (`h200`, `H100`, ...), or an error listing them.
    pub fn named(name: &str) -> Result<Roofline> {
        let n = name.to_ascii_lowercase();
        KNOWN.iter().copied().find(|r| r.name == n).ok_or_else(|| {
            invalid!(
                "no roofline for GPU {name:?}: known are {}",
                KNOWN.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The known GPU a device's name mentions (`NVIDIA H200` is the h200), if any.
    pub fn of_device(device_name: &str) -> Option<Roofline> {
        let n = device_name.to_ascii_lowercase();
        KNOWN.iter().copied().find(|r| n.contains(r.name))
    }

    /// Peak FLOP/s in `precision`.
    pub fn peak(&self, precision: PrecisionKind) -> f64 {
        match precision {
            PrecisionKind::Bf16 => self.bf16_flops,
            PrecisionKind::F32 => self.f32_flops,
        }
    }

    /// The least time of one op, in ms, and whether bytes (not FLOPs) set it.
    pub fn limit_ms(&self, c: Cost, precision: PrecisionKind) -> (f64, bool) {
        let (f, b) = (c.flops as f64 / self.peak(precision), c.bytes as f64 / self.bandwidth);
        (f.max(b) * 1e3, b >= f)
    }
}

/// A family's limit: the sum of its ops' limits (ms), and the share of that sum set by
/// bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limit {
    /// The least time, ms.
    pub ms: f64,
    /// The part of `ms` from ops that bytes bound.
    pub byte_bound_ms: f64,
}

/// The limits of each family of a profile, and of the whole step (the last entry, `None`).
pub fn limits(p: &Profile, r: &Roofline, precision: PrecisionKind) -> Vec<(Option<Family>, Limit)> {
    let mut out: Vec<(Option<Family>, Limit)> = Vec::new();
    let mut step = Limit::default();
    for family in Family::ALL {
        let mut l = Limit::default();
        let mut any = false;
        for c in p.calls.iter().filter(|c| c.family == family) {
            let (ms, bytes) = r.limit_ms(c.cost, precision);
            l.ms += ms;
            if bytes {
                l.byte_bound_ms += ms;
            }
            any = true;
        }
        if any {
            step.ms += l.ms;
            step.byte_bound_ms += l.byte_bound_ms;
            out.push((Some(family), l));
        }
    }
    out.push((None, step));
    out
}

/// The roofline table of the bench rows that carry a profile: per family and row, GFLOP,
/// GB, the limit (ms, and `B` where bytes set most of it, `F` where FLOPs do), and, when
/// the rows were timed (`timed`), the measured time and the fraction of the limit it
/// reached; then per row the step's limit, the roofline-ideal speedup (the first row's
/// step limit over this row's) beside the FLOP-ideal one, and, when timed, the measured
/// speedup's efficiency against each.
pub fn table(rows: &[BenchRow], r: &Roofline, precision: PrecisionKind, timed: bool) -> String {
    let peak = r.peak(precision);
    let mut s = format!(
        "roofline of {} ({:.0} TFLOP/s {precision}, {:.2} TB/s):\n{:<12} {:<14} {:>9} {:>8} {:>9} {:>5} {:>9} {:>8}\n",
        r.name,
        peak / 1e12,
        r.bandwidth / 1e12,
        "family",
        "model",
        "GFLOP",
        "GB",
        "limit ms",
        "bound",
        "ms",
        "% limit"
    );
    let named: Vec<(String, &BenchRow, &Profile)> =
        rows.iter().filter_map(|row| Some((super::profile_table::label(row), row, row.profile.as_ref()?))).collect();
    let per_row: Vec<Vec<(Option<Family>, Limit)>> = named.iter().map(|(_, _, p)| limits(p, r, precision)).collect();
    let fmt_measured = |ms: f64, limit: f64| {
        if timed && ms > 0.0 {
            (format!("{ms:.2}"), format!("{:.0}", 100.0 * limit / ms))
        } else {
            ("-".to_string(), "-".to_string())
        }
    };
    for family in Family::ALL {
        for ((name, _, p), lims) in named.iter().zip(&per_row) {
            let Some((_, l)) = lims.iter().find(|(f, _)| *f == Some(family)) else { continue };
            let f = p.family(family).expect("a family with a limit has calls");
            let (ms, pct) = fmt_measured(f.ms, l.ms);
            s += &format!(
                "{:<12} {:<14} {:>9.1} {:>8.2} {:>9.3} {:>5} {:>9} {:>8}\n",
                family.name(),
                name,
                f.flops as f64 / 1e9,
                f.bytes as f64 / 1e9,
                l.ms,
                if l.byte_bound_ms * 2.0 >= l.ms { "B" } else { "F" },
                ms,
                pct
            );
        }
    }
    let dense_limit = per_row.first().and_then(|l| l.last()).map(|(_, l)| l.ms);
    s += &format!(
        "{:<12} {:<14} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "step", "model", "GFLOP", "GB", "limit ms", "roofline", "FLOP", "eff roof", "eff FLOP"
    );
    for ((name, row, p), lims) in named.iter().zip(&per_row) {
        let l = lims.last().expect("the step's limit").1;
        let roof = dense_limit.map_or(f64::NAN, |d| d / l.ms);
        let (er, ef) = if timed {
            (format!("{:.2}", row.speedup / roof), format!("{:.2}", row.efficiency))
        } else {
            ("-".to_string(), "-".to_string())
        };
        s += &format!(
            "{:<12} {:<14} {:>9.1} {:>8.2} {:>9.3} {:>9.2} {:>9.2} {:>9} {:>9}\n",
            "step",
            name,
            p.flops as f64 / 1e9,
            p.bytes as f64 / 1e9,
            l.ms,
            roof,
            row.ideal_speedup,
            er,
            ef
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::profile::Call;

    #[test]
    fn an_op_is_limited_by_the_slower_of_its_flops_and_its_bytes() {
        let r = Roofline::named("H200").unwrap();
        // 989.4 GFLOP and 1 GB: FLOPs take 1 ms, bytes 0.208 ms.
        let (ms, bytes) = r.limit_ms(Cost { flops: 989_400_000_000, bytes: 1_000_000_000 }, PrecisionKind::Bf16);
        assert!((ms - 1.0).abs() < 1e-9 && !bytes, "{ms}");
        // The same op in f32 runs on the CUDA cores: 14.8 ms.
        let (ms, _) = r.limit_ms(Cost { flops: 989_400_000_000, bytes: 1_000_000_000 }, PrecisionKind::F32);
        assert!((ms - 989.4 / 66.9).abs() < 1e-9, "{ms}");
        // 4.8 GB and no FLOPs: 1 ms, bound by bytes.
        let (ms, bytes) = r.limit_ms(Cost { flops: 0, bytes: 4_800_000_000 }, PrecisionKind::Bf16);
        assert!((ms - 1.0).abs() < 1e-9 && bytes);
        assert!(Roofline::named("v100").unwrap_err().to_string().contains("h200, h100, a100"));
        assert_eq!(Roofline::of_device("NVIDIA H200").unwrap().name, "h200");
        assert!(Roofline::of_device("emu (host emulation of CUDA, forward fiber order)").is_none());
    }

    #[test]
    fn family_limits_sum_their_ops_and_the_step_sums_the_families() {
        let r = Roofline::named("h200").unwrap();
        let call = |family, flops, bytes| Call { family, cost: Cost { flops, bytes }, ms: 1.0 };
        let p = Profile::from_calls(
            "x",
            5.0,
            vec![
                call(Family::ConvFprop, 989_400_000_000, 0),   // 1 ms, FLOPs
                call(Family::ConvFprop, 0, 2 * 4_800_000_000), // 2 ms, bytes
                call(Family::Sgd, 0, 4_800_000_000),           // 1 ms, bytes
            ],
        );
        let l = limits(&p, &r, PrecisionKind::Bf16);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].0, Some(Family::ConvFprop));
        assert!((l[0].1.ms - 3.0).abs() < 1e-9 && (l[0].1.byte_bound_ms - 2.0).abs() < 1e-9);
        assert_eq!(l[1].0, Some(Family::Sgd));
        assert_eq!(l[2].0, None);
        assert!((l[2].1.ms - 4.0).abs() < 1e-9 && (l[2].1.byte_bound_ms - 3.0).abs() < 1e-9);
    }
}
