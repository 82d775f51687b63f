//! A profile's aggregation: the recorded ops ([`Call`]) summed per family
//! ([`FamilyProfile`]) and over the scope ([`Profile`]).

use super::{Cost, Family};

/// One recorded op of a profile (in JSON: family, flops, bytes, ms).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Call {
    /// Its family.
    pub family: Family,
    /// Its counted cost.
    #[serde(flatten)]
    pub cost: Cost,
    /// Its time in milliseconds (events on a GPU, the wall clock elsewhere).
    pub ms: f64,
}

/// One family's line of a [`Profile`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FamilyProfile {
    /// The family (in JSON its [`Family::name`]).
    pub family: Family,
    /// Ops of this family that ran.
    pub calls: usize,
    /// Their time in milliseconds.
    pub ms: f64,
    /// `ms` over the profile's `step_ms` (a fraction, not a percentage).
    pub share: f64,
    /// Counted FLOPs.
    pub flops: u64,
    /// Counted bytes read and written.
    pub bytes: u64,
    /// Achieved GFLOP/s: `flops / ms`.
    pub gflop_per_s: f64,
    /// Achieved GB/s (10^9 bytes): `bytes / ms`.
    pub gb_per_s: f64,
}

/// The profile of one scope (one training step, say), from [`profile`](super::profile()).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Profile {
    /// The device kind: cpu, emu or cuda.
    pub device: String,
    /// Milliseconds of the whole scope (device marks around it).
    pub step_ms: f64,
    /// The sum of the ops' times.
    pub ops_ms: f64,
    /// `step_ms - ops_ms`: time between the ops (host work, launch gaps).
    pub other_ms: f64,
    /// Counted FLOPs of every op.
    pub flops: u64,
    /// Counted bytes read and written by every op.
    pub bytes: u64,
    /// One line per family that ran, in [`Family::ALL`]'s order.
    pub families: Vec<FamilyProfile>,
    /// Every op in the order it ran: the convolutions of a step are told apart by their
    /// FLOPs and bytes.
    pub calls: Vec<Call>,
}

impl Profile {
    /// A profile of `calls` in a scope of `step_ms` on a `device` kind.
    pub fn from_calls(device: &str, step_ms: f64, calls: Vec<Call>) -> Profile {
        let families = Family::ALL
            .iter()
            .filter_map(|&family| {
                let of: Vec<&Call> = calls.iter().filter(|c| c.family == family).collect();
                if of.is_empty() {
                    return None;
                }
                let ms: f64 = of.iter().map(|c| c.ms).sum();
                let flops: u64 = of.iter().map(|c| c.cost.flops).sum();
                let bytes: u64 = of.iter().map(|c| c.cost.bytes).sum();
                let per_s = |x: u64| if ms > 0.0 { x as f64 / (ms * 1e6) } else { 0.0 };
                Some(FamilyProfile {
                    family,
                    calls: of.len(),
                    ms,
                    share: if step_ms > 0.0 { ms / step_ms } else { 0.0 },
                    flops,
                    bytes,
                    gflop_per_s: per_s(flops),
                    gb_per_s: per_s(bytes),
                })
            })
            .collect::<Vec<_>>();
        let ops_ms: f64 = calls.iter().map(|c| c.ms).sum();
        Profile {
            device: device.to_string(),
            step_ms,
            ops_ms,
            other_ms: step_ms - ops_ms,
            flops: calls.iter().map(|c| c.cost.flops).sum(),
            bytes: calls.iter().map(|c| c.cost.bytes).sum(),
            families,
            calls,
        }
    }

    /// The line of `family`, if any op of it ran.
    pub fn family(&self, family: Family) -> Option<&FamilyProfile> {
        self.families.iter().find(|f| f.family == family)
    }
}
