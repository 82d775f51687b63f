//! Axes for the SVG plots that prunekit draws (`bench --plot`, `transfer --plot`): where a
//! logarithmic axis puts its ticks, and how every tick is labelled.
//!
//! A log axis is laid out as a plotting library's log locator does:
//! - labelled (major) ticks only at 1-2-5 multiples of powers of ten, or only at powers of
//!   ten (every `k`-th one on very wide ranges) when the 1-2-5 labels would not fit the
//!   axis' width;
//! - unlabelled light (minor) lines at the other integer multiples of the powers of ten, and
//!   none where they would be denser than a few pixels apart;
//! - the range padded around the data and, where it holds fewer than two labelled ticks,
//!   widened out to the nearest ones, so a single value (one budget, or runs that all took
//!   the same time) still gets a readable axis.
//!
//! Labels are printed as the shortest decimal that reads back as the tick's value rounded to
//! 12 significant digits: `100`, `0.3`, `2.5`, never `100.0` or `0.30000000000000004`.

use plotters::coord::combinators::{BindKeyPoints, IntoLogRange, LogCoord, WithKeyPoints};
use std::ops::Range;

/// Font size of tick labels, in pixels (every plot sets its mesh's label style to it).
pub const LABEL_FONT_PX: u32 = 12;

/// Width of a digit in the labels' font, as a fraction of the font size (sans-serif digits
/// are about 0.55 em; this errs on the wide side).
pub const DIGIT_EM: f64 = 0.6;

/// Light lines closer than this many pixels are left out.
const MIN_LIGHT_GAP_PX: f64 = 4.0;

/// Space kept between two labels, in pixels.
const LABEL_GAP_PX: f64 = 6.0;

/// A logarithmic axis: its range, its labelled ticks and its light lines.
#[derive(Clone, Debug, PartialEq)]
pub struct LogAxis {
    /// The drawn range (positive, `start < end`).
    pub range: Range<f64>,
    /// Labelled ticks, ascending, inside the range.
    pub major: Vec<f64>,
    /// Light lines, ascending, inside the range, none at a major tick.
    pub minor: Vec<f64>,
}

/// The label of a tick value: the shortest decimal for `v` rounded to 12 significant
/// digits, without a trailing `.0` (`1000`, `0.3`, `-2.5`, `0`).
pub fn tick_label(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let rounded: f64 = format!("{v:.11e}").parse().unwrap_or(v);
    let s = format!("{rounded}");
    // `{}` of an f64 prints no exponent and no trailing `.0` for whole numbers in Rust, but
    // keep the rule explicit.
    match s.strip_suffix(".0") {
        Some(t) => t.to_string(),
        None => s,
    }
}

/// The width in pixels of `label` in a font of `font_px`.
pub fn label_width(label: &str, font_px: f64) -> f64 {
    label.chars().count() as f64 * font_px * DIGIT_EM
}

/// `mantissa * 10^exp`, computed so that negative powers are a division (0.3 is 3 / 10,
/// the nearest double to 0.3, not 3 * 0.1).
fn scaled(mantissa: u32, exp: i32) -> f64 {
    if exp >= 0 {
        mantissa as f64 * 10f64.powi(exp)
    } else {
        mantissa as f64 / 10f64.powi(-exp)
    }
}

/// Every `mantissa * 10^e` for the given mantissas that lies in [lo, hi] (with a relative
/// slack of 1e-9 at both ends), ascending.
fn multiples(lo: f64, hi: f64, mantissas: &[u32], every_decade: i32) -> Vec<f64> {
    let (e0, e1) = (lo.log10().floor() as i32 - 1, hi.log10().ceil() as i32 + 1);
    let mut out = Vec::new();
    for e in e0..=e1 {
        if every_decade > 1 && e.rem_euclid(every_decade) != 0 {
            continue;
        }
        for &m in mantissas {
            let v = scaled(m, e);
            if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                out.push(v);
            }
        }
    }
    out
}

/// The largest 1-2-5 value at most `v`, and the smallest at least `v`.
fn nice_below_above(v: f64) -> (f64, f64) {
    let e = v.log10().floor() as i32;
    let cands: Vec<f64> = (e - 1..=e + 1).flat_map(|e| [1, 2, 5].map(|m| scaled(m, e))).collect();
    let below = cands.iter().copied().filter(|&c| c <= v * (1.0 + 1e-12)).fold(f64::MIN, f64::max);
    let above = cands.iter().copied().filter(|&c| c >= v * (1.0 - 1e-12)).fold(f64::MAX, f64::min);
    (below, above)
}

/// Whether labels at `ticks` fit an axis of `pixels` over `range` without overlapping.
fn labels_fit(ticks: &[f64], range: &Range<f64>, pixels: f64, font_px: f64) -> bool {
    let (l0, l1) = (range.start.log10(), range.end.log10());
    let px = |v: f64| (v.log10() - l0) / (l1 - l0) * pixels;
    ticks.windows(2).all(|w| {
        let half = (label_width(&tick_label(w[0]), font_px) + label_width(&tick_label(w[1]), font_px)) / 2.0;
        px(w[1]) - px(w[0]) >= half + LABEL_GAP_PX
    })
}

impl LogAxis {
    /// The axis for data `values` (the finite positive ones count; none: the range 1..10),
    /// drawn over `pixels` with labels in a font of `font_px`. The range is the data's,
    /// widened by `pad` (a factor, e.g. 1.3) on both sides, then out to the nearest 1-2-5
    /// values where it holds fewer than two of them.
    pub fn new(values: &[f64], pixels: f64, font_px: f64, pad: f64) -> LogAxis {
        let pos: Vec<f64> = values.iter().copied().filter(|v| v.is_finite() && *v > 0.0).collect();
        let (mut lo, mut hi) = if pos.is_empty() {
            (1.0, 10.0)
        } else {
            (pos.iter().copied().fold(f64::INFINITY, f64::min), pos.iter().copied().fold(0.0, f64::max))
        };
        let pad = if pad.is_finite() && pad >= 1.0 { pad } else { 1.0 };
        lo /= pad;
        hi *= pad;
        if hi / lo < 2.0 {
            // One value, or values close together: at least a factor of 4 around them.
            let mid = (lo * hi).sqrt();
            (lo, hi) = (mid / 2.0, mid * 2.0);
        }
        if multiples(lo, hi, &[1, 2, 5], 1).len() < 2 {
            (lo, hi) = (nice_below_above(lo).0, nice_below_above(hi).1);
        }
        let range = lo..hi;
        let pixels = pixels.max(1.0);
        // The densest labelling that fits: 1-2-5, then powers of ten, then every k-th power.
        let mut major = multiples(lo, hi, &[1, 2, 5], 1);
        let mut step = 0;
        if !labels_fit(&major, &range, pixels, font_px) {
            step = 1;
            loop {
                major = multiples(lo, hi, &[1], step);
                if major.len() <= 2 || labels_fit(&major, &range, pixels, font_px) {
                    break;
                }
                step += 1;
            }
        }
        // Light lines: every integer multiple when the labels are 1-2-5 or single decades,
        // the skipped powers of ten when labels skip decades; none where they would crowd.
        let decade_px = pixels / (hi / lo).log10();
        let mut minor =
            if step <= 1 { multiples(lo, hi, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 1) } else { multiples(lo, hi, &[1], 1) };
        // The narrowest gap of the 1..9 set is between 9 and 10: log10(10/9) of a decade.
        let narrowest = if step <= 1 { decade_px * (10f64 / 9.0).log10() } else { decade_px };
        if narrowest < MIN_LIGHT_GAP_PX {
            minor = if step <= 1 && decade_px >= MIN_LIGHT_GAP_PX { multiples(lo, hi, &[1], 1) } else { Vec::new() };
        }
        minor.retain(|m| !major.iter().any(|x| (x / m - 1.0).abs() < 1e-9));
        LogAxis { range, major, minor }
    }
}

impl LogAxis {
    /// The plotters coordinate of the axis: a log scale whose bold mesh lines (labelled)
    /// are the major ticks and whose light lines are the minor ones.
    pub fn coord(&self) -> WithKeyPoints<LogCoord<f64>> {
        self.range.clone().log_scale().with_key_points(self.major.clone()).with_light_points(self.minor.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(a: &LogAxis) -> Vec<String> {
        a.major.iter().map(|&v| tick_label(v)).collect()
    }

    #[test]
    fn labels_have_no_trailing_zero_or_float_noise() {
        assert_eq!(tick_label(100.0), "100");
        assert_eq!(tick_label(2000.0), "2000");
        assert_eq!(tick_label(0.1 * 3.0), "0.3");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(-1.0), "-1");
        assert_eq!(tick_label(scaled(5, -3)), "0.005");
    }

    #[test]
    fn narrow_ranges_label_1_2_5_and_draw_light_lines() {
        let a = LogAxis::new(&[50.0, 1600.0], 500.0, 12.0, 1.3);
        assert_eq!(labels(&a), ["50", "100", "200", "500", "1000", "2000"]);
        assert!(a.minor.contains(&300.0) && a.minor.contains(&40.0) && !a.minor.contains(&500.0));
        let b = LogAxis::new(&[0.5, 20.0], 500.0, 12.0, 1.3);
        assert_eq!(labels(&b), ["0.5", "1", "2", "5", "10", "20"]);
    }

    #[test]
    fn wide_ranges_label_powers_of_ten() {
        let a = LogAxis::new(&[1e-2, 1e6], 400.0, 12.0, 1.3);
        assert!(labels(&a).iter().all(|l| l.trim_start_matches("0.").trim_start_matches('0').starts_with('1')));
        assert!(a.major.len() >= 2);
        assert!(labels_fit(&a.major, &a.range, 400.0, 12.0));
    }

    #[test]
    fn a_single_value_gets_two_labelled_ticks_around_it() {
        for v in [3.0, 7.3, 100.0, 0.042, 1234.5] {
            let a = LogAxis::new(&[v], 500.0, 12.0, 1.3);
            assert!(a.major.len() >= 2, "{v}: {:?}", a);
            assert!(a.range.start < v && v < a.range.end, "{v}: {:?}", a.range);
        }
        let none = LogAxis::new(&[], 500.0, 12.0, 1.3);
        assert_eq!(labels(&none), ["1", "2", "5", "10"]);
    }

    #[test]
    fn ticks_stay_inside_the_range_and_never_repeat() {
        for (lo, hi) in [(3.0, 768.0), (50.0, 1600.0), (0.5, 20.0), (0.9, 1.1), (1.0, 1e9), (2.1, 3.5)] {
            for px in [120.0, 500.0, 2000.0] {
                let a = LogAxis::new(&[lo, hi], px, 12.0, 1.3);
                for t in a.major.iter().chain(&a.minor) {
                    assert!(*t >= a.range.start * (1.0 - 1e-9) && *t <= a.range.end * (1.0 + 1e-9));
                }
                let l = labels(&a);
                assert!(l.windows(2).all(|w| w[0] != w[1]), "{l:?}");
                assert!(a.major.len() >= 2 || px < 200.0, "{lo}..{hi} on {px}: {l:?}");
                assert!(labels_fit(&a.major, &a.range, px, 12.0) || a.major.len() <= 2, "{lo}..{hi} on {px}: {l:?}");
            }
        }
    }
}
