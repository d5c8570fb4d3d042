//! PNG line and bar charts: a run's `loss.png`, and the analyses' plots. Drawn with plotters' bitmap
//! backend into memory and encoded here, so the file is written atomically like every other;
//! the text is set in the bundled DejaVu Sans (`assets/fonts`, Bitstream Vera licence), so no
//! system font is needed.

use crate::error::{Error, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known to parse; a failure would leave plotters' default.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One line of a chart: its legend label and its points, in order of x.
pub struct Series<'a> {
    pub label: &'a str,
    pub points: &'a [(f64, f64)],
}

/// The size of the charts ferrotune writes, in pixels.
pub const CHART_SIZE: (u32, u32) = (900, 520);

/// What a chart shows.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Width and height in pixels.
    pub size: (u32, u32),
    /// x is a count (steps, layers): its ticks are written without decimals.
    pub integer_x: bool,
    /// y is a count: the axis starts at 0 and its ticks have no decimals.
    pub count_y: bool,
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Model(format!("drawing {}: {e}", path.display()))
}

/// The range that holds every value of `v`, padded by 5 % (a flat line gets ±1 % of itself).
fn padded(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.filter(|x| x.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.01 * lo.abs().max(1.0) };
    (lo - pad, hi + pad)
}

/// A tick value written with as many decimals as an axis spanning `span` needs (one more than
/// a tenth of the span shows), trailing zeros dropped: the ticks' binary fractions such as
/// 0.9999999999 come out as 1.
fn tick_label(v: f64, span: f64) -> String {
    let decimals = if span > 0.0 && span.is_finite() { ((-(span / 10.0).log10()).ceil().max(0.0) as usize + 1).min(12) } else { 3 };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if s == "-0" { "0".into() } else { s }
}

/// A chart's plotting area: f64 on both axes.
type Plot<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// What every chart shares: the bundled font, a white canvas of `chart.size` with the title, axes
/// over `x` × `y`, the legend (upper right) after `draw` has drawn the mesh and the series, and the
/// PNG written atomically.
fn render(path: &Path, chart: &Chart, x: std::ops::Range<f64>, y: std::ops::Range<f64>, draw: impl FnOnce(&mut Plot) -> Result<()>) -> Result<()> {
    register_font();
    let (w, h) = chart.size;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        let mut c = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)
            .map_err(|e| plot_error(path, e))?;
        draw(&mut c)?;
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_error(path, e))?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    write_png(path, w, h, &rgb)
}

/// Draws `series` as lines with a legend and writes the PNG (8-bit RGB) to `path` atomically.
pub fn line_chart(path: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    let (x0, x1) = padded(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (mut y0, mut y1) = padded(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    if chart.count_y {
        (y0, y1) = (0.0, y1.max(1.0));
    }
    render(path, chart, x0..x1, y0..y1, |c| {
        let x_ticks = |x: &f64| if chart.integer_x { format!("{x:.0}") } else { tick_label(*x, x1 - x0) };
        let y_ticks = |y: &f64| if chart.count_y { format!("{y:.0}") } else { tick_label(*y, y1 - y0) };
        c.configure_mesh()
            .x_label_formatter(&x_ticks)
            .y_label_formatter(&y_ticks)
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| plot_error(path, e))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite());
            c.draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| plot_error(path, e))?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
            // Sparse series (evaluations) get a mark at every point.
            if s.points.len() <= 60 {
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| plot_error(path, e))?;
            }
        }
        Ok(())
    })
}

/// Grouped bars: for each category (x), one bar per group, with a legend of the groups. For
/// values side by side, such as a loss before and after fine-tuning on several files.
pub fn bar_chart(path: &Path, chart: &Chart, categories: &[String], groups: &[(&str, Vec<f64>)]) -> Result<()> {
    let top = groups.iter().flat_map(|g| g.1.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let n = categories.len() as f64;
    render(path, chart, -0.5..n - 0.5, 0.0..(top * 1.1).max(1e-9), |c| {
        // Ticks at whole x values carry the category names; others stay blank.
        let name_at = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < categories.len() { categories[i as usize].clone() } else { String::new() }
        };
        c.configure_mesh()
            .x_labels(categories.len().max(1) * 2 + 1)
            .x_label_formatter(&name_at)
            .disable_x_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| plot_error(path, e))?;
        let width = 0.8 / groups.len().max(1) as f64;
        for (g, (label, values)) in groups.iter().enumerate() {
            let color = Palette99::pick(g).to_rgba();
            let bars = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| {
                let x0 = i as f64 - 0.4 + g as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
            });
            c.draw_series(bars)
                .map_err(|e| plot_error(path, e))?
                .label(*label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        }
        Ok(())
    })
}

/// Encodes 8-bit RGB pixels as a PNG and writes it to `path` atomically.
fn write_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<()> {
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| plot_error(path, e))?;
        writer.write_image_data(rgb).map_err(|e| plot_error(path, e))?;
    }
    crate::io_util::write_atomic(path, &png_bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tick_labels_have_the_decimals_the_axis_needs() {
        use super::tick_label;
        assert_eq!(tick_label(0.9999999999, 1.2), "1");
        assert_eq!(tick_label(0.30000000000000004, 1.2), "0.3");
        assert_eq!(tick_label(1.45, 0.3), "1.45");
        assert_eq!(tick_label(2.5e-5, 1e-4), "0.000025");
        assert_eq!(tick_label(-0.0000001, 2.0), "0");
        assert_eq!(tick_label(1500.0, 4000.0), "1500");
    }
}
