//! Sparsity as an exact decimal, so that kept widths are what exact arithmetic gives:
//! s = 0.7 of C = 10 keeps 3, though (1 - 0.7) * 10 is 3.0000000000000004 in f64.

use crate::{ensure, invalid, Result};
use std::fmt;
use std::str::FromStr;

/// At most this many decimal places.
const MAX_DECIMALS: u32 = 18;

/// A sparsity s in [0, 1), held exactly as num / 10^decimals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sparsity {
    num: u64,
    decimals: u32,
}

impl Sparsity {
    /// Sparsity 0: nothing is removed.
    pub const ZERO: Sparsity = Sparsity { num: 0, decimals: 0 };

    /// The exact decimal that `s` prints as (its shortest round-trip form), e.g. 0.7.
    /// Values with more than 18 decimal places (s < 1e-17 or so) are rounded up to 18,
    /// which changes no kept width below 10^17 channels.
    pub fn from_f64(s: f64) -> Result<Sparsity> {
        ensure!(s.is_finite() && (0.0..1.0).contains(&s), "sparsity must be in [0, 1), got {s}");
        let text = format!("{s}");
        match text.parse::<Sparsity>() {
            Ok(sp) => Ok(sp),
            Err(_) => {
                // More than 18 decimals: the value is tiny; round it up.
                let scale = 10f64.powi(MAX_DECIMALS as i32);
                Ok(Sparsity { num: (s * scale).ceil().max(1.0) as u64, decimals: MAX_DECIMALS })
            }
        }
    }

    /// The nearest f64 (for display and arithmetic that need not be exact).
    pub fn as_f64(self) -> f64 {
        self.num as f64 / 10f64.powi(self.decimals as i32)
    }

    /// n = ceil((1 - s) * c), exactly.
    pub fn kept(self, c: usize) -> usize {
        let den = 10u128.pow(self.decimals);
        let a = den - self.num as u128;
        ((a * c as u128).div_ceil(den)) as usize
    }
}

impl FromStr for Sparsity {
    type Err = crate::Error;
    /// A plain decimal in [0, 1): `0`, `0.5`, `.25`, `0.700`.
    fn from_str(s: &str) -> Result<Sparsity> {
        let bad = || invalid!("sparsity {s:?} is not a decimal number in [0, 1) such as 0.5");
        let t = s.trim();
        let (int, frac) = match t.split_once('.') {
            Some((i, f)) => (i, f),
            None => (t, ""),
        };
        if (int.is_empty() && frac.is_empty())
            || !int.chars().all(|c| c.is_ascii_digit())
            || !frac.chars().all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        if int.chars().any(|c| c != '0') {
            return Err(invalid!("sparsity must be below 1, got {s}"));
        }
        let frac = frac.trim_end_matches('0');
        ensure!(frac.len() as u32 <= MAX_DECIMALS, "sparsity {s:?} has more than {MAX_DECIMALS} decimal places");
        let num = if frac.is_empty() { 0 } else { frac.parse::<u64>().map_err(|_| bad())? };
        Ok(Sparsity { num, decimals: frac.len() as u32 })
    }
}

impl fmt::Display for Sparsity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.num == 0 {
            return write!(f, "0");
        }
        write!(f, "0.{:0width$}", self.num, width = self.decimals as usize)
    }
}

/// The width a pruned layer of `c` channels keeps: ceil((1 - s) * c) rounded up to a
/// multiple of `round_to`, never above `c`.
pub fn kept_width(c: usize, sparsity: Sparsity, round_to: usize) -> Result<usize> {
    ensure!(round_to > 0, "round_to must be at least 1");
    let n = sparsity.kept(c);
    Ok(n.div_ceil(round_to).saturating_mul(round_to).min(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_kept_widths() {
        let s = |x: &str| x.parse::<Sparsity>().unwrap();
        assert_eq!(kept_width(10, s("0.7"), 1).unwrap(), 3);
        assert_eq!(kept_width(10, Sparsity::from_f64(0.7).unwrap(), 1).unwrap(), 3);
        assert_eq!(kept_width(64, s("0.5"), 8).unwrap(), 32);
        assert_eq!(kept_width(64, s("0.75"), 8).unwrap(), 16);
        assert_eq!(kept_width(60, s("0.5"), 8).unwrap(), 32);
        assert_eq!(kept_width(7, s("0.5"), 8).unwrap(), 7, "never above c");
        assert_eq!(kept_width(13, s("0.3"), 1).unwrap(), 10); // 9.1 -> 10
        assert_eq!(kept_width(5, s("0.999"), 1).unwrap(), 1);
        assert_eq!(kept_width(64, s("0"), 8).unwrap(), 64);
        assert_eq!(kept_width(100, s("0.25"), 1).unwrap(), 75);
        assert!(kept_width(8, s("0.5"), 0).is_err());
        assert_eq!(Sparsity::from_f64(0.1 + 0.2).unwrap().to_string(), "0.30000000000000004");
        assert_eq!(kept_width(10, Sparsity::from_f64(1e-30).unwrap(), 1).unwrap(), 10);
    }

    #[test]
    fn parsing() {
        for ok in ["0", "0.5", ".25", "0.700", "00.1"] {
            assert!(ok.parse::<Sparsity>().is_ok(), "{ok}");
        }
        assert_eq!("0.700".parse::<Sparsity>().unwrap().to_string(), "0.7");
        for bad in ["", ".", "1", "1.0", "-0.1", "abc", "nan", "0.5x", "1e-3", "0.1234567890123456789"] {
            assert!(bad.parse::<Sparsity>().is_err(), "{bad}");
        }
        assert!(Sparsity::from_f64(1.0).is_err());
        assert!(Sparsity::from_f64(-0.1).is_err());
        assert!(Sparsity::from_f64(f64::NAN).is_err());
    }
}
