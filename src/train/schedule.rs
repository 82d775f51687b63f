//! The learning rate of each step: an optional linear warm-up to the base rate, then
//! constant or a cosine decay fitted to the run's steps.

use crate::{ensure, invalid, Result};

/// The shape of the learning rate after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Half a cosine from the base rate down towards 0 at the last step.
    Cosine,
    /// The base rate throughout.
    Constant,
}

impl std::str::FromStr for ScheduleKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(ScheduleKind::Cosine),
            "constant" => Ok(ScheduleKind::Constant),
            _ => Err(invalid!("unknown schedule {s:?}: expected cosine or constant")),
        }
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
        })
    }
}

/// A learning-rate schedule over `total` steps (numbered from 0).
///
/// - Warm-up, steps `s < warmup`: `base * (s + 1) / warmup` (the last warm-up step is at
///   the base rate).
/// - Then `Constant`: `base`; `Cosine`: `base * (1 + cos(pi * (s - warmup) / (total -
///   warmup))) / 2`, so the first step after the warm-up is at the base rate and the decay
///   would reach 0 one step after the last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// The peak learning rate.
    pub base: f64,
    /// What follows the warm-up.
    pub kind: ScheduleKind,
    /// Steps of linear warm-up (0: none).
    pub warmup: u64,
    /// Steps of the whole run.
    pub total: u64,
}

impl Schedule {
    /// A schedule; the base rate must be finite and positive and the warm-up shorter than
    /// the run.
    pub fn new(base: f64, kind: ScheduleKind, warmup: u64, total: u64) -> Result<Schedule> {
        ensure!(base.is_finite() && base > 0.0, "the learning rate must be finite and positive, not {base}");
        ensure!(total >= 1, "a run needs at least one step");
        ensure!(warmup < total, "the warm-up ({warmup} steps) must be shorter than the run ({total} steps)");
        Ok(Schedule { base, kind, warmup, total })
    }

    /// The learning rate of step `s` (from 0).
    pub fn lr(&self, s: u64) -> f64 {
        if s < self.warmup {
            return self.base * (s + 1) as f64 / self.warmup as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.base,
            ScheduleKind::Cosine => {
                let t = (s - self.warmup) as f64 / (self.total - self.warmup) as f64;
                self.base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}
