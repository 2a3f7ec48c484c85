//! The experiment's figure, drawn in Rust with plotters: one panel per number of local
//! steps (mean held-out loss over the languages after each round, one line per arm) and one
//! panel of FedIT's aggregation error per round.
//!
//! Text is rendered with DejaVu Sans embedded in the binary (examples/assets, Bitstream Vera
//! licence), so the figure needs no system fonts and comes out the same on every machine.

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::{Arm, ExperimentError, ExperimentResults};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn ensure_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The font is a valid TrueType file (checked by the test that draws a figure).
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// A distinct colour per arm (Okabe–Ito, readable by colour-blind readers).
fn colour(arm: Arm) -> RGBColor {
    match arm {
        Arm::FfaLora => RGBColor(0, 114, 178),
        Arm::FedSvd => RGBColor(86, 180, 233),
        Arm::FedIt => RGBColor(213, 94, 0),
        Arm::FedSaLora => RGBColor(0, 158, 115),
        Arm::GroupB => RGBColor(204, 121, 167),
        Arm::LocalOnly => RGBColor(120, 120, 120),
        Arm::CentralisedLanguage => RGBColor(230, 159, 0),
        Arm::Centralised => RGBColor(0, 0, 0),
    }
}

fn plot_err(e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Plot(e.to_string())
}

type Panel<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Grid, axis labels ("round" across, `y_desc` up) in the figure's font.
fn draw_mesh(chart: &mut Panel<'_, '_>, y_desc: &str) -> Result<(), ExperimentError> {
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)
}

/// The legend of the series drawn so far, top right.
fn draw_legend<'a, 'b: 'a>(chart: &mut Panel<'a, 'b>) -> Result<(), ExperimentError> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)
}

/// Draws the figure into a PNG at `path`.
pub fn draw(results: &ExperimentResults, path: &Path) -> Result<(), ExperimentError> {
    ensure_font();
    let mut steps: Vec<usize> = results.runs.iter().map(|r| r.local_steps).collect();
    steps.sort_unstable();
    steps.dedup();
    let fedit_runs = results
        .runs
        .iter()
        .any(|r| r.arm == Arm::FedIt && !r.fedit_error.is_empty());
    let margins = results.verdicts.iter().any(|v| v.local_only.is_some());
    let panels = steps.len() + usize::from(fedit_runs) + usize::from(margins);
    let width = 520 * panels.min(2) as u32;
    let height = 420 * panels.div_ceil(2) as u32;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((panels.div_ceil(2), panels.min(2)));
    let rounds = results.rounds as f64;

    for (area, &s) in areas.iter().zip(&steps) {
        let runs: Vec<_> = results.runs.iter().filter(|r| r.local_steps == s).collect();
        let values = runs.iter().flat_map(|r| r.rounds.iter().map(|x| x.mean()));
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{s} local step{} per round", if s == 1 { "" } else { "s" }),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..rounds, (lo - pad)..(hi + pad))
            .map_err(plot_err)?;
        draw_mesh(
            &mut chart,
            &format!("held-out loss (nats/{}, mean of labs)", results.loss_unit),
        )?;
        for run in runs {
            let c = colour(run.arm);
            chart
                .draw_series(LineSeries::new(
                    run.rounds.iter().map(|r| (r.round as f64, r.mean())),
                    c.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(run.arm.name())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
            // The rounds actually scored (every round, or only before and after the last).
            chart
                .draw_series(
                    run.rounds
                        .iter()
                        .map(|r| Circle::new((r.round as f64, r.mean()), 3, c.filled())),
                )
                .map_err(plot_err)?;
        }
        draw_legend(&mut chart)?;
    }
    let mut next_area = steps.len();
    if margins {
        draw_margins(results, &areas[next_area])?;
        next_area += 1;
    }
    if !fedit_runs {
        root.present().map_err(plot_err)?;
        return Ok(());
    }

    // FedIT's aggregation error, one line per number of local steps.
    let area = &areas[next_area];
    let fedit: Vec<_> = results
        .runs
        .iter()
        .filter(|r| r.arm == Arm::FedIt && !r.fedit_error.is_empty())
        .collect();
    let top = fedit
        .iter()
        .flat_map(|r| r.fedit_error.iter().copied())
        .fold(0f64, f64::max)
        .max(1e-6)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("FedIT: ‖Σp·BA − B̄Ā‖ / ‖round update‖", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5f64..rounds + 0.5, 0f64..top)
        .map_err(plot_err)?;
    draw_mesh(&mut chart, "relative aggregation error")?;
    let shades = [
        RGBColor(253, 174, 97),
        RGBColor(213, 94, 0),
        RGBColor(127, 39, 4),
    ];
    for (k, run) in fedit.iter().enumerate() {
        let c = shades[k % shades.len()];
        chart
            .draw_series(LineSeries::new(
                run.fedit_error
                    .iter()
                    .enumerate()
                    .map(|(i, e)| ((i + 1) as f64, *e)),
                c.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("{} local steps", run.local_steps))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    if !fedit.is_empty() {
        draw_legend(&mut chart)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Each lab's margin over training alone (local-only loss − federated loss; above zero the
/// lab gains by joining) under every federated arm, at the largest number of local steps.
fn draw_margins(
    results: &ExperimentResults,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> Result<(), ExperimentError> {
    let steps = results
        .verdicts
        .iter()
        .map(|v| v.local_steps)
        .max()
        .unwrap_or(0);
    let arms: Vec<Arm> = results
        .runs
        .iter()
        .filter(|r| r.local_steps == steps && r.arm.is_federated())
        .map(|r| r.arm)
        .collect();
    let margin = |arm: Arm, lab: &str| {
        results
            .verdicts
            .iter()
            .find(|v| v.arm == arm && v.local_steps == steps && v.lab == lab)
            .and_then(|v| v.local_only.map(|l| l - v.federated))
    };
    let values: Vec<f64> = arms
        .iter()
        .flat_map(|a| results.labs.iter().filter_map(move |l| margin(*a, &l.name)))
        .collect();
    let lo = values.iter().copied().fold(0f64, f64::min);
    let hi = values.iter().copied().fold(0f64, f64::max);
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let n = results.labs.len();
    // `lo·m`, `lo·u`, `lo·h` for a language's ministry, university and hospital; `lo` for
    // its one lab.
    let names: Vec<String> = results
        .labs
        .iter()
        .map(|l| {
            let rest = l.name.trim_start_matches("lab-");
            match rest.split_once('-') {
                Some((code, role)) => {
                    format!("{code}·{}", role.chars().next().unwrap_or('?'))
                }
                None => rest.to_string(),
            }
        })
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption("margin over training alone, per lab", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo - pad)..(hi + pad))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc("lab (·m ministry, ·u university, ·h hospital)")
        .y_desc(format!(
            "local-only − federated (nats/{})",
            results.loss_unit
        ))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    let width = 0.8 / arms.len().max(1) as f64;
    for (k, arm) in arms.iter().enumerate() {
        let c = colour(*arm);
        let bars: Vec<_> = results
            .labs
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                margin(*arm, &l.name).map(|m| {
                    let x0 = i as f64 - 0.4 + k as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, m)], c.filled())
                })
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(arm.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    chart
        .draw_series(LineSeries::new(
            [(-0.5, 0.0), (n as f64 - 0.5, 0.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(plot_err)?;
    draw_legend(&mut chart)?;
    Ok(())
}
