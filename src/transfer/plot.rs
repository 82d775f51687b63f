//! `--plot FILE.svg`: validation error against training compute (log x), one line per
//! model with its seeds' spread as error bars and the compute-optimal frontier marked; a
//! second panel against the measured training time. Drawn with plotters (SVG backend).

use super::advise::Advice;
use super::report::{Report, Row};
use crate::plot::{tick_label, LogAxis, LABEL_FONT_PX};
use crate::{ensure, invalid, Result};
use plotters::coord::combinators::{LogCoord, WithKeyPoints};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

/// A panel: where it is drawn, the x axis' description, and the x value of a row.
type Panel<'a, 'b> = (&'b DrawingArea<SVGBackend<'a>, plotters::coord::Shift>, &'static str, fn(&Row) -> f64);

/// Space around each panel, and the width of its y labels' area, in pixels.
const MARGIN: u32 = 12;
/// One color per model, in the report's order.
const COLORS: [RGBColor; 8] = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN, RGBColor(230, 140, 0), RGBColor(120, 60, 180)];
const Y_LABELS: u32 = 55;

/// A chart of validation error against a budget on a log axis.
type ErrorChart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>;

/// The mesh of an error chart: the log x axis' ticks, both axes' labels and descriptions.
fn draw_axes(chart: &mut ErrorChart<'_, '_>, xdesc: &str) -> std::result::Result<(), String> {
    chart
        .configure_mesh()
        .x_desc(xdesc)
        .y_desc("validation error (mean over seeds)")
        .label_style(("sans-serif", LABEL_FONT_PX))
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .draw()
        .map_err(|e| e.to_string())
}

/// The legend of an error chart, upper right.
fn draw_legend<'a, 'b: 'a>(chart: &mut ErrorChart<'a, 'b>) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Checks, before a run, that `path` names an SVG file in a folder that can be written.
pub fn check_plot_path(path: &Path) -> Result<()> {
    crate::limits::check_svg_path(path)
}

/// Draws the report to an SVG file.
pub fn plot(report: &Report, path: &Path, title: &str) -> Result<()> {
    check_plot_path(path)?;
    ensure!(!report.rows.is_empty(), "nothing to plot: the report has no rows");
    let err = |e: &dyn std::fmt::Display| invalid!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);
    let mut models: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    let ymax = report.rows.iter().map(|r| r.val_error_max).fold(0.0f64, f64::max).min(1.0) * 1.08 + 0.01;
    let ymin = (report.rows.iter().map(|r| r.val_error_min).fold(1.0f64, f64::min) * 0.92 - 0.01).max(0.0);
    let colors = COLORS;
    let panels: [Panel; 2] = [
        (&left, "training compute (GFLOPs, log)", |r| r.train_gflops),
        (&right, "measured training time per run (s, log)", |r| r.wall_s.max(1e-3)),
    ];
    for (area, xdesc, x) in panels {
        let xs: Vec<f64> = report.rows.iter().map(x).collect();
        let axis_px = area.dim_in_pixel().0 as f64 - 2.0 * MARGIN as f64 - Y_LABELS as f64;
        let xaxis = LogAxis::new(&xs, axis_px, LABEL_FONT_PX as f64, 1.3);
        let mut chart = ChartBuilder::on(area)
            .margin(MARGIN)
            .x_label_area_size(40)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(xaxis.coord(), ymin..ymax)
            .map_err(|e| err(&e))?;
        draw_axes(&mut chart, xdesc).map_err(|e| err(&e))?;
        for (i, m) in models.iter().enumerate() {
            let color = colors[i % colors.len()];
            let mut rows: Vec<&Row> = report.rows.iter().filter(|r| r.model == *m).collect();
            rows.sort_by(|a, b| x(a).total_cmp(&x(b)));
            let pts: Vec<(f64, f64)> = rows.iter().map(|r| (x(r), r.val_error)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(m.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(rows.iter().map(|r| {
                    ErrorBar::new_vertical(
                        x(r),
                        r.val_error_min,
                        r.val_error,
                        r.val_error_max,
                        color.stroke_width(1),
                        6,
                    )
                }))
                .map_err(|e| err(&e))?;
        }
        // The frontier: at each budget, the optimum's point.
        let mut front: Vec<(f64, f64)> = report
            .optima
            .iter()
            .filter_map(|o| {
                report.rows.iter().find(|r| {
                    r.budget_gflops.to_bits() == o.budget_gflops.to_bits()
                        && r.budget_seconds == o.budget_seconds
                        && r.model == o.best_model
                })
            })
            .map(|r| (x(r), r.val_error))
            .collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(DashedLineSeries::new(front.clone(), 4, 4, BLACK.mix(0.6).stroke_width(1)))
            .map_err(|e| err(&e))?
            .label("compute-optimal (best per budget)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6).stroke_width(1)));
        chart.draw_series(front.iter().map(|&p| Circle::new(p, 6, BLACK.stroke_width(2)))).map_err(|e| err(&e))?;
        draw_legend(&mut chart).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Draws the advisor's fits: each model's measured mean errors (with the seeds' spread) and
/// its fitted law as a line, from the smallest budget run to past the asked budget, with
/// the asked budget marked and each prediction's interval as an error bar there.
pub fn plot_advice(report: &Report, advice: &Advice, path: &Path, title: &str) -> Result<()> {
    check_plot_path(path)?;
    ensure!(!advice.fits.is_empty(), "nothing to plot: the advice has no fits");
    let err = |e: &dyn std::fmt::Display| invalid!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let b = advice.budget;
    let mut xs: Vec<f64> = advice.fits.iter().flat_map(|f| f.budgets.iter().copied()).collect();
    xs.push(b);
    let (xlo, xhi) = (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(0.0f64, f64::max));
    let rows: Vec<&Row> = report.rows.iter().filter(|r| advice.fits.iter().any(|f| f.model == r.model)).collect();
    let ys: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.val_error_min, r.val_error_max])
        .chain(advice.fits.iter().flat_map(|f| [f.interval.0, f.interval.1, f.predicted]))
        .filter(|y| y.is_finite())
        .collect();
    let ymax = ys.iter().copied().fold(0.0f64, f64::max).min(1.0) * 1.08 + 0.01;
    let ymin = (ys.iter().copied().fold(1.0f64, f64::min) * 0.92 - 0.01).max(0.0);
    let axis_px = 800.0 - 2.0 * MARGIN as f64 - Y_LABELS as f64;
    let xaxis = LogAxis::new(&[xlo, xhi], axis_px, LABEL_FONT_PX as f64, 1.3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(MARGIN)
        .x_label_area_size(40)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(xaxis.coord(), ymin..ymax)
        .map_err(|e| err(&e))?;
    let xdesc = if advice.unit == "s" { "training time budget (s, log)" } else { "training compute (GFLOPs, log)" };
    draw_axes(&mut chart, xdesc).map_err(|e| err(&e))?;
    let (x0, x1) = (xaxis.range.start, xaxis.range.end);
    chart
        .draw_series(DashedLineSeries::new(vec![(b, ymin), (b, ymax)], 3, 3, BLACK.mix(0.5).stroke_width(1)))
        .map_err(|e| err(&e))?
        .label(format!("asked budget ({})", tick_label(b)))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5).stroke_width(1)));
    for (i, f) in advice.fits.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let curve: Vec<(f64, f64)> = (0..=200)
            .map(|k| x0 * (x1 / x0).powf(k as f64 / 200.0))
            .map(|c| (c, f.law.at(c).clamp(ymin, ymax)))
            .collect();
        chart
            .draw_series(LineSeries::new(curve, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{}: fit, {} at {}", f.model, tick_label((f.predicted * 1e4).round() / 1e4), tick_label(b)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        let measured = rows.iter().filter(|r| r.model == f.model);
        chart
            .draw_series(measured.map(|r| {
                ErrorBar::new_vertical(
                    r.budget(),
                    r.val_error_min,
                    r.val_error,
                    r.val_error_max,
                    color.stroke_width(1),
                    6,
                )
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(ErrorBar::new_vertical(
                b,
                f.interval.0.max(ymin),
                f.predicted,
                f.interval.1.min(ymax),
                color.stroke_width(2),
                10,
            )))
            .map_err(|e| err(&e))?;
    }
    draw_legend(&mut chart).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
