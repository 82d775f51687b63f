//! `--plot FILE.svg`: measured and FLOP-ideal speedup (log axis) against sparsity, one
//! pair of lines per mode, drawn with plotters (SVG backend).

use super::step::BenchRow;
use crate::plot::{tick_label, LogAxis, LABEL_FONT_PX};
use crate::{invalid, Result};
use plotters::prelude::*;
use std::path::Path;

/// Checks, before a run, that `path` names an SVG file in a folder that can be written.
pub fn check_path(path: &Path) -> Result<()> {
    crate::limits::check_svg_path(path)
}

/// Draws the plot of a bench's rows to an SVG file.
pub fn plot(rows: &[BenchRow], path: &Path, title: &str) -> Result<()> {
    check_path(path)?;
    let err = |e: &dyn std::fmt::Display| invalid!("drawing {}: {e}", path.display());
    let dense = rows.iter().find(|r| r.mode == "dense");
    let modes: Vec<&str> = {
        let mut m: Vec<&str> = rows.iter().map(|r| r.mode.as_str()).filter(|m| *m != "dense").collect();
        m.dedup();
        m
    };
    let speedups: Vec<f64> = rows.iter().flat_map(|r| [r.speedup, r.ideal_speedup]).chain([1.0]).collect();
    let xmax = rows.iter().map(|r| r.sparsity).fold(0.5f64, f64::max) + 0.05;
    let (height, margin, x_labels) = (560u32, 12u32, 40u32);
    // The plotting area's height: the figure less the caption (about 30 px), margins and x labels.
    let axis_px = (height - 2 * margin - x_labels - 30) as f64;
    let yaxis = LogAxis::new(&speedups, axis_px, LABEL_FONT_PX as f64, 1.15);
    let root = SVGBackend::new(path, (800, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(margin)
        .x_label_area_size(x_labels)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax, yaxis.coord())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("sparsity")
        .y_desc("speedup over dense (training step, log)")
        .label_style(("sans-serif", LABEL_FONT_PX))
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN];
    for (i, m) in modes.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mut pts: Vec<&BenchRow> = dense.into_iter().chain(rows.iter().filter(|r| r.mode == *m)).collect();
        pts.sort_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
        let measured: Vec<(f64, f64)> = pts.iter().map(|r| (r.sparsity, r.speedup)).collect();
        let ideal: Vec<(f64, f64)> = pts.iter().map(|r| (r.sparsity, r.ideal_speedup)).collect();
        chart
            .draw_series(LineSeries::new(measured.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{m}: measured"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(measured.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
        chart
            .draw_series(DashedLineSeries::new(ideal, 6, 4, color.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label(format!("{m}: FLOP-ideal"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
