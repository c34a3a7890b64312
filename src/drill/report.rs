//! A drill's report folder: `summary.md` (verdicts with their figures), `series.csv` (the raw
//! time series), `chart.svg` (latency, responses by kind, queue depth and database connections
//! over time, with the fault's start and end marked).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::series::Point;
use super::{DrillError, Mark, Promise};

pub fn write(
    dir: &Path,
    title: &str,
    command: &str,
    promises: &[Promise],
    points: &[Point],
    marks: &[Mark],
) -> Result<(), DrillError> {
    std::fs::create_dir_all(dir)?;
    let mut md = String::new();
    let held = promises.iter().all(|p| p.held);
    let _ = writeln!(md, "# Drill: {title}\n");
    let _ = writeln!(md, "Command: `{command}`  ");
    let _ = writeln!(md, "Verdict: **{}**\n", if held { "every promise held" } else { "a promise failed" });
    let _ = writeln!(md, "| promise | held | figures |\n|---|---|---|");
    for p in promises {
        let _ = writeln!(md, "| {} | {} | {} |", p.name, if p.held { "yes" } else { "**no**" }, p.figures);
    }
    let _ = writeln!(md, "\nTimeline:\n");
    for m in marks {
        let _ = writeln!(md, "- {:.1} s: {}", m.at.as_secs_f64(), m.label);
    }
    let _ = writeln!(
        md,
        "\n![chart](chart.svg)\n\nRaw series: `series.csv` (one row per {} ms).",
        super::series::BUCKET.as_millis()
    );
    std::fs::write(dir.join("summary.md"), md)?;

    let mut csv =
        String::from("t_s,p50_ms,p99_ms,ok_per_s,429_per_s,503_per_s,other_per_s,queue_depth,db_connections_seen_by_postgresql,db_pool_in_use_by_engine,storm_answered_per_s\n");
    for p in points {
        let _ = writeln!(
            csv,
            "{:.1},{:.2},{:.2},{:.1},{:.1},{:.1},{:.1},{},{},{},{:.0}",
            p.at,
            p.p50_ms,
            p.p99_ms,
            p.ok_per_s,
            p.limited_per_s,
            p.unavailable_per_s,
            p.other_per_s,
            p.queue_depth,
            p.server_connections.map(|n| n.to_string()).unwrap_or_default(),
            p.pool_in_use,
            p.storm_per_s
        );
    }
    std::fs::write(dir.join("series.csv"), csv)?;
    chart(&dir.join("chart.svg"), title, points, marks).map_err(|e| DrillError::Report(e.to_string()))
}

fn chart(path: &Path, title: &str, points: &[Point], marks: &[Mark]) -> Result<(), Box<dyn std::error::Error>> {
    let stormy = points.iter().any(|p| p.storm_per_s > 0.0);
    let root = SVGBackend::new(path, (1100, if stormy { 1240 } else { 960 })).into_drawing_area();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(40);
    header.titled(title, ("sans-serif", 22))?;
    let panels = body.split_evenly((if stormy { 4 } else { 3 }, 1));
    let t_max = points.last().map(|p| p.at).unwrap_or(1.0).max(1.0);
    let max = |f: &dyn Fn(&Point) -> f64| points.iter().map(f).fold(1.0_f64, f64::max) * 1.1;

    type Line<'a> = (&'a str, RGBColor, Box<dyn Fn(&Point) -> f64 + 'a>);
    let mut panel_specs: Vec<(&str, Vec<Line>)> = vec![
        (
            "latency of successful requests (ms)",
            vec![("p50", BLUE, Box::new(|p: &Point| p.p50_ms)), ("p99", RED, Box::new(|p: &Point| p.p99_ms))],
        ),
        (
            "responses per second by kind",
            vec![
                ("2xx", RGBColor(0, 150, 0), Box::new(|p: &Point| p.ok_per_s)),
                ("429", RGBColor(230, 140, 0), Box::new(|p: &Point| p.limited_per_s)),
                ("503", RED, Box::new(|p: &Point| p.unavailable_per_s)),
                ("other (409, errors)", RGBColor(120, 120, 120), Box::new(|p: &Point| p.other_per_s)),
            ],
        ),
        (
            "queue depth (all CAs) and database connections in use",
            vec![
                ("queue depth", RGBColor(120, 0, 160), Box::new(|p: &Point| p.queue_depth as f64)),
                (
                    "db connections (PostgreSQL's count)",
                    RGBColor(0, 120, 160),
                    Box::new(|p: &Point| p.server_connections.unwrap_or(0) as f64),
                ),
                (
                    "pool connections in use (engine's count)",
                    RGBColor(0, 180, 200),
                    Box::new(|p: &Point| p.pool_in_use as f64),
                ),
            ],
        ),
    ];
    if stormy {
        panel_specs.push((
            "retry storm from another process: requests answered per second",
            vec![("storm answers", RGBColor(200, 0, 120), Box::new(|p: &Point| p.storm_per_s))],
        ));
    }
    for (panel, (caption, lines)) in panels.iter().zip(panel_specs) {
        let y_max = lines.iter().map(|(_, _, f)| max(f.as_ref())).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("seconds").light_line_style(WHITE.mix(0.0)).draw()?;
        for (i, mark) in marks.iter().enumerate() {
            let t = mark.at.as_secs_f64();
            chart.draw_series(std::iter::once(PathElement::new(vec![(t, 0.0), (t, y_max)], BLACK.mix(0.5))))?;
            // Staggered, so the labels of marks close together stay readable.
            let y = y_max * (0.97 - 0.09 * (i % 4) as f64);
            chart.draw_series(std::iter::once(Text::new(format!(" {}", mark.label), (t, y), ("sans-serif", 11))))?;
        }
        for (label, color, f) in lines {
            chart
                .draw_series(LineSeries::new(points.iter().map(|p| (p.at, f(p))), color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
