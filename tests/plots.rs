//! The SVG plots (`transfer --plot`, `bench --plot`) read as a person reads them: for
//! several data ranges, no two tick labels on an axis overlap (their extents from the SVG's
//! text positions, anchors and font sizes), no label ends in `.0` or carries float noise,
//! and a single value still gets an axis with labelled ticks.

use common::report::{ladder, lawful_report, report};
use prunekit::transfer::Law;
use std::collections::BTreeMap;

mod common;

/// A text element of an SVG: position, anchor, font size and content.
#[derive(Debug, Clone)]
struct Text {
    x: f64,
    y: f64,
    anchor: String,
    font: f64,
    body: String,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let i = tag.find(&key)? + key.len();
    Some(tag[i..].split('"').next()?.to_string())
}

fn texts(svg: &str) -> Vec<Text> {
    let mut out = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find("<text") {
        rest = &rest[i..];
        let close = rest.find('>').unwrap();
        let tag = &rest[..close];
        let end = rest.find("</text>").unwrap();
        let body = rest[close + 1..end].trim().to_string();
        out.push(Text {
            x: attr(tag, "x").unwrap().parse().unwrap(),
            y: attr(tag, "y").unwrap().parse().unwrap(),
            anchor: attr(tag, "text-anchor").unwrap_or_else(|| "start".into()),
            font: attr(tag, "font-size").unwrap().parse().unwrap(),
            body,
        });
        rest = &rest[end..];
    }
    out
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.parse::<f64>().is_ok()
}

/// Horizontal extent of a label (digits about 0.6 em wide, the widest sans-serif digits).
fn x_extent(t: &Text) -> (f64, f64) {
    let w = t.body.chars().count() as f64 * t.font * 0.6;
    match t.anchor.as_str() {
        "middle" => (t.x - w / 2.0, t.x + w / 2.0),
        "end" => (t.x - w, t.x),
        _ => (t.x, t.x + w),
    }
}

/// The numeric tick labels of an SVG grouped into axes: x axes are labels on one line
/// (same y, centred) of one panel (panels side by side, split at `panel_width`), y axes
/// labels in one column (same x, right-aligned).
fn axes(svg: &str, panel_width: f64) -> (Vec<Vec<Text>>, Vec<Vec<Text>>) {
    let nums: Vec<Text> = texts(svg).into_iter().filter(|t| is_number(&t.body)).collect();
    let mut xs: BTreeMap<(i64, i64), Vec<Text>> = BTreeMap::new();
    let mut ys: BTreeMap<i64, Vec<Text>> = BTreeMap::new();
    for t in nums {
        if t.anchor == "middle" {
            xs.entry((t.y.round() as i64, (t.x / panel_width).floor() as i64)).or_default().push(t);
        } else {
            ys.entry(t.x.round() as i64).or_default().push(t);
        }
    }
    (xs.into_values().collect(), ys.into_values().collect())
}

fn check_axes(svg: &str, what: &str, panel_width: f64, x_axes: usize) {
    let (xs, ys) = axes(svg, panel_width);
    assert_eq!(xs.len(), x_axes, "{what}: x axes with labels");
    for axis in &xs {
        let mut labels = axis.clone();
        labels.sort_by(|a, b| a.x.total_cmp(&b.x));
        assert!(labels.len() >= 2, "{what}: an x axis with fewer than two labels: {labels:?}");
        for w in labels.windows(2) {
            let (a, b) = (x_extent(&w[0]), x_extent(&w[1]));
            assert!(a.1 <= b.0, "{what}: x labels {:?} and {:?} overlap ({a:?}, {b:?})", w[0].body, w[1].body);
        }
    }
    for axis in &ys {
        let mut labels = axis.clone();
        labels.sort_by(|a, b| a.y.total_cmp(&b.y));
        for w in labels.windows(2) {
            assert!(
                w[1].y - w[0].y >= w[0].font.max(w[1].font),
                "{what}: y labels {:?} and {:?} overlap",
                w[0].body,
                w[1].body
            );
        }
    }
    for t in xs.iter().chain(&ys).flatten() {
        assert!(!t.body.ends_with(".0"), "{what}: label {:?} ends in .0", t.body);
        assert!(t.body.len() <= 8, "{what}: label {:?} is float noise", t.body);
    }
}

/// With PK_PLOT_DIR set, the plots are kept there to be looked at.
fn keep(svg: &str, plot: &str, case: &str) {
    if let Ok(dir) = std::env::var("PK_PLOT_DIR") {
        let name: String = case.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        std::fs::write(std::path::Path::new(&dir).join(format!("{plot}-{name}.svg")), svg).unwrap();
    }
}

#[test]
fn transfer_plot_axes_are_readable_for_every_range() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<f64>, bool)> = vec![
        ("3..768", ladder(3.0, 768.0), false),
        ("50..1600", ladder(50.0, 1600.0), false),
        ("0.5..16", ladder(0.5, 16.0), false),
        ("0.5..20", vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0], false),
        ("one budget", vec![100.0], false),
        ("same time", ladder(3.0, 96.0), true),
        ("one budget, same time", vec![7.0], true),
        ("wide", vec![0.01, 1.0, 100.0, 1e4, 1e6], false),
    ];
    for (what, budgets, same_time) in cases {
        let path = dir.path().join("t.svg");
        prunekit::transfer::plot(&report(&budgets, same_time), &path, what).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        keep(&svg, "transfer", what);
        check_axes(&svg, what, 600.0, 2);
    }
}

#[test]
fn advice_plot_axes_are_readable_for_every_range() {
    let dir = tempfile::tempdir().unwrap();
    let laws = [
        ("dense", Law { e_inf: 0.05, a: 1.0, b: 0.5, rmse: 0.0 }),
        ("filters:0.5", Law { e_inf: 0.15, a: 0.5, b: 0.8, rmse: 0.0 }),
    ];
    for (what, budgets, at) in [
        ("3..768 at 3072", ladder(3.0, 768.0), 3072.0),
        ("50..1600 at 1600", ladder(50.0, 1600.0), 1600.0),
        ("0.5..4 at 20", ladder(0.5, 4.0), 20.0),
    ] {
        let report = lawful_report(&laws, &budgets, 0.01);
        let advice = prunekit::transfer::advise(&report, at, None).unwrap();
        let path = dir.path().join("a.svg");
        prunekit::transfer::plot_advice(&report, &advice, &path, what).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        keep(&svg, "advice", what);
        assert!(svg.contains("asked budget"), "{what}");
        check_axes(&svg, what, 800.0, 1);
    }
}

fn bench_row(mode: &str, sparsity: f64, speedup: f64, ideal: f64) -> prunekit::measure::step::BenchRow {
    prunekit::measure::step::BenchRow {
        mode: mode.into(),
        sparsity,
        params: 1000,
        gflops_forward_per_image: 1.0 / ideal,
        gflops_train_per_image: 3.0 / ideal,
        step_ms: 100.0 / speedup,
        images_per_s: 10.0 * speedup,
        speedup,
        ideal_speedup: ideal,
        efficiency: speedup / ideal,
        loss: 2.3,
        profile: None,
    }
}

/// A mode's row: mode, sparsity, measured and FLOP-ideal speedup.
type ModeRow = (&'static str, f64, f64, f64);

#[test]
fn bench_plot_axes_are_readable_for_every_range() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<ModeRow>)> = vec![
        ("dense only", vec![]),
        (
            "cpu-like",
            vec![
                ("filters", 0.25, 1.29, 1.45),
                ("filters", 0.5, 2.21, 2.27),
                ("filters", 0.75, 3.11, 4.07),
                ("channels", 0.25, 1.41, 1.77),
                ("channels", 0.5, 2.79, 3.92),
                ("channels", 0.75, 7.84, 15.1),
                ("masked", 0.25, 0.81, 1.0),
                ("masked", 0.5, 0.94, 1.0),
            ],
        ),
        ("slowdown", vec![("filters", 0.5, 0.6, 1.1), ("filters", 0.9, 0.9, 1.2)]),
        ("wide", vec![("channels", 0.5, 3.0, 4.0), ("channels", 0.95, 150.0, 400.0)]),
    ];
    for (what, rest) in cases {
        let mut rows = vec![bench_row("dense", 0.0, 1.0, 1.0)];
        rows.extend(rest.into_iter().map(|(m, s, a, i)| bench_row(m, s, a, i)));
        let path = dir.path().join("b.svg");
        prunekit::measure::plot::plot(&rows, &path, what).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        keep(&svg, "bench", what);
        check_axes(&svg, what, 800.0, 1);
        let (_, ys) = axes(&svg, 800.0);
        assert!(ys.iter().any(|a| a.len() >= 2), "{what}: the speedup axis has fewer than two labels");
    }
}
