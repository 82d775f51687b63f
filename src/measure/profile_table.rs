//! The per-op profile table of `prunekit bench --profile`: for every op family, one line
//! per model (dense first), so that a family's time, FLOPs and bytes sit next to the
//! dense model's, with the ratios to the dense model that show where the removed FLOPs
//! did not come back as time.

use super::step::BenchRow;
use crate::ops::profile::{Family, Profile};

/// A row's name in the profile table: `dense`, or the mode and the sparsity (`filters 0.5`).
pub fn label(row: &BenchRow) -> String {
    if row.mode == "dense" {
        "dense".to_string()
    } else {
        format!("{} {}", row.mode, row.sparsity)
    }
}

/// The profile table of the bench rows that carry a profile (see [`table`]).
pub fn bench_table(rows: &[BenchRow]) -> String {
    let named: Vec<(String, &Profile)> = rows.iter().filter_map(|r| Some((label(r), r.profile.as_ref()?))).collect();
    table(&named)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".to_string()
    }
}

/// What a line of the table measures: time, FLOPs and bytes moved.
#[derive(Clone, Copy)]
struct Amount {
    ms: f64,
    flops: u64,
    bytes: u64,
}

/// One line of the table; `dense` is the same line of the first profile.
fn line(family: &str, model: &str, calls: Option<usize>, share: f64, a: Amount, dense: Option<Amount>) -> String {
    let Amount { ms, flops, bytes } = a;
    let per_s = |x: u64| if ms > 0.0 { x as f64 / (ms * 1e6) } else { 0.0 };
    let (t, f, b) = match dense {
        Some(d) => (ratio(ms, d.ms), ratio(flops as f64, d.flops as f64), ratio(bytes as f64, d.bytes as f64)),
        None => ("-".into(), "-".into(), "-".into()),
    };
    format!(
        "{:<12} {:<14} {:>6} {:>10.2} {:>7.1} {:>9.3} {:>9.1} {:>9.2} {:>8.2} {:>7} {:>7} {:>7}\n",
        family,
        model,
        calls.map_or_else(|| "".to_string(), |c| c.to_string()),
        ms,
        share * 100.0,
        flops as f64 / 1e9,
        bytes as f64 / 1e6,
        per_s(flops),
        per_s(bytes),
        t,
        f,
        b
    )
}

/// The profiles of several models as one table: for each op family (in
/// [`Family::ALL`]'s order), a line per model with its calls, time (ms), share of the
/// step (%), GFLOP, MB moved, achieved GFLOP/s and GB/s, and its time, FLOPs and bytes
/// relative to the first model's line of the same family (`t/dense`, `F/dense`,
/// `B/dense`; the first model is the dense one). Then per model the time between the ops
/// (`other`) and the whole step (`step`: every op's FLOPs and bytes, the step's time).
/// A family in which a pruned model's `t/dense` stays well above its `F/dense` is where
/// the removed FLOPs did not come back.
pub fn table(profiles: &[(String, &Profile)]) -> String {
    let mut s = format!(
        "{:<12} {:<14} {:>6} {:>10} {:>7} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7}\n",
        "family",
        "model",
        "calls",
        "time ms",
        "share %",
        "GFLOP",
        "MB",
        "GFLOP/s",
        "GB/s",
        "t/dense",
        "F/dense",
        "B/dense"
    );
    let Some((_, first)) = profiles.first() else { return s };
    for family in Family::ALL {
        if profiles.iter().all(|(_, p)| p.family(family).is_none()) {
            continue;
        }
        let dense = first.family(family).map(|f| Amount { ms: f.ms, flops: f.flops, bytes: f.bytes });
        for (name, p) in profiles {
            match p.family(family) {
                Some(f) => {
                    let a = Amount { ms: f.ms, flops: f.flops, bytes: f.bytes };
                    s += &line(family.name(), name, Some(f.calls), f.share, a, dense)
                }
                None => s += &line(family.name(), name, Some(0), 0.0, Amount { ms: 0.0, flops: 0, bytes: 0 }, dense),
            }
        }
    }
    let share = |p: &Profile, ms: f64| if p.step_ms > 0.0 { ms / p.step_ms } else { 0.0 };
    for (name, p) in profiles {
        let dense = Some(Amount { ms: first.other_ms, flops: 0, bytes: 0 });
        let a = Amount { ms: p.other_ms, flops: 0, bytes: 0 };
        s += &line("other", name, None, share(p, p.other_ms), a, dense);
    }
    for (name, p) in profiles {
        let dense = Some(Amount { ms: first.step_ms, flops: first.flops, bytes: first.bytes });
        let a = Amount { ms: p.step_ms, flops: p.flops, bytes: p.bytes };
        s += &line("step", name, Some(p.calls.len()), share(p, p.step_ms), a, dense);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::profile::{Call, Cost};

    #[test]
    fn table_lines_up_models_per_family() {
        let call = |family, flops, ms| Call { family, cost: Cost { flops, bytes: 1_000_000 }, ms };
        let dense = Profile::from_calls(
            "cpu",
            10.0,
            vec![call(Family::ConvFprop, 8_000_000_000, 8.0), call(Family::Sgd, 0, 1.0)],
        );
        let pruned = Profile::from_calls(
            "cpu",
            6.0,
            vec![call(Family::ConvFprop, 2_000_000_000, 4.0), call(Family::Sgd, 0, 0.5)],
        );
        let t = table(&[("dense".into(), &dense), ("filters 0.5".into(), &pruned)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("family") && lines[0].contains("t/dense"), "{t}");
        assert!(lines[1].starts_with("conv_fprop   dense"), "{t}");
        assert!(lines[2].starts_with("conv_fprop   filters 0.5"), "{t}");
        // 4 ms of 8: t/dense 0.50 against F/dense 0.25.
        assert!(lines[2].contains("0.50") && lines[2].contains("0.25"), "{}", lines[2]);
        assert!(lines[3].starts_with("sgd") && lines[4].starts_with("sgd"), "{t}");
        assert!(lines[5].starts_with("other") && lines[7].starts_with("step"), "{t}");
        assert!(lines[8].contains("100.0") && lines[8].contains("0.60"), "{}", lines[8]);
        assert_eq!(lines.len(), 9);
    }
}
