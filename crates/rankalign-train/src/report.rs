//! The experiment report: `report.md` with the side-by-side table, and `loss.png` with
//! the training curves of every variant.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::config::ExperimentConfig;
use crate::trainer::VariantOutcome;
use crate::{Result, TrainError, io_err};

pub(crate) fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded DejaVu Sans makes plots independent of the system's fonts.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Plot the InfoNCE part of the loss (comparable across variants) and, dashed, the
/// total, against the step.
pub fn plot_losses(path: &Path, outcomes: &[VariantOutcome]) -> Result<()> {
    register_fonts();
    let plot_err = |e: String| TrainError::Invalid(format!("plotting {}: {e}", path.display()));
    let points: Vec<(f64, f64)> = outcomes
        .iter()
        .flat_map(|o| {
            o.history
                .iter()
                .flat_map(|r| [(r.step as f64, r.contrastive()), (r.step as f64, r.loss)])
        })
        .filter(|p| p.1.is_finite())
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "training loss (solid: InfoNCE part, dashed: total)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max.max(1e-3))
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    for (i, o) in outcomes.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let clip: Vec<(f64, f64)> = o
            .history
            .iter()
            .map(|r| (r.step as f64, r.contrastive()))
            .collect();
        chart
            .draw_series(LineSeries::new(clip, colour.stroke_width(2)))
            .map_err(|e| plot_err(e.to_string()))?
            .label(o.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        let total: Vec<(f64, f64)> = o.history.iter().map(|r| (r.step as f64, r.loss)).collect();
        chart
            .draw_series(DashedLineSeries::new(total, 6, 4, colour.stroke_width(1)))
            .map_err(|e| plot_err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}

/// Column headings of the metrics the evaluations name (others appear by name).
fn heading(metric: &str) -> &str {
    match metric {
        "zero_shot_top1" => "zero-shot top-1",
        "zero_shot_top3" => "top-3",
        "zero_shot_top5" => "top-5",
        "image_to_text_r1" => "I→T R@1",
        "text_to_image_r1" => "T→I R@1",
        "image_to_text_r5" | "text_to_image_r5" => "R@5",
        "image_to_text_r10" | "text_to_image_r10" => "R@10",
        "alignment" => "S_A",
        "uniformity" => "S_U",
        other => other,
    }
}

/// Write `report.md` for the experiment; `data` describes the training source and
/// `steps` is the budget.
pub fn write_report(
    path: &Path,
    exp: &ExperimentConfig,
    data: &str,
    steps: usize,
    outcomes: &[VariantOutcome],
    wall_secs: f64,
) -> Result<()> {
    let clip = exp.model.resolve().map_err(TrainError::Invalid)?;
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", exp.name);
    let _ = writeln!(
        md,
        "Training data: {data}; {}×{} px. Model: {} / text {}×{}, embed {}; \
         batch {}, {} epochs = {} steps, lr {}, warm-up {}, seed {}. Wall time {:.0} s.\n",
        exp.data.image_size(),
        exp.data.image_size(),
        vision_summary(&clip.vision),
        clip.text.layers,
        clip.text.width,
        clip.embed_dim,
        exp.train.batch_size,
        exp.train.epochs,
        steps,
        exp.optim.lr,
        exp.optim.warmup_steps,
        exp.seed,
        wall_secs
    );
    if let Some(first) = outcomes.first() {
        let _ = writeln!(md, "{}\n", first.eval.description);
    }
    let names: Vec<&str> = outcomes
        .first()
        .map(|o| {
            o.eval
                .metrics
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| !crate::eval::is_count(n))
                .collect()
        })
        .unwrap_or_default();
    let mut head = String::from("| variant |");
    let mut rule = String::from("|---|");
    for n in &names {
        let _ = write!(head, " {} |", heading(n));
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{head} final loss | ms/step | skipped |");
    let _ = writeln!(md, "{rule}---|---|---|");
    for o in outcomes {
        let mut row = format!("| {} |", o.name);
        for n in &names {
            let v = o.eval.get(n).unwrap_or(f64::NAN);
            if matches!(*n, "alignment" | "uniformity") {
                let _ = write!(row, " {v:.3} |");
            } else {
                let _ = write!(row, " {v:.1} |");
            }
        }
        let _ = writeln!(
            md,
            "{row} {:.3} | {:.0} | {} of {} |",
            o.final_loss, o.median_step_ms, o.skipped.skipped, o.skipped.seen
        );
    }
    let _ = writeln!(md, "\n![training loss](loss.png)\n");
    let _ = writeln!(
        md,
        "Time per step is the median wall time of forward, loss, backward and optimiser step; the data wait over the whole run was {}.",
        outcomes
            .iter()
            .map(|o| format!("{:.0} ms ({})", o.total_data_wait_ms, o.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let skipped: Vec<&VariantOutcome> = outcomes.iter().filter(|o| o.skipped.skipped > 0).collect();
    if let Some(o) = skipped.first() {
        let _ = writeln!(
            md,
            "\n## Corrupt training samples\n\n{} of {} samples read were skipped ({:.2}%). By reason: {}.\n\nThe first:\n",
            o.skipped.skipped,
            o.skipped.seen,
            100.0 * o.skipped.share(),
            o.skipped
                .by_reason
                .iter()
                .map(|(r, n)| format!("{r} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (k, r) in &o.skipped.first {
            let _ = writeln!(md, "- `{k}`: {r}");
        }
    }
    let warnings: Vec<&String> = outcomes.iter().flat_map(|o| &o.warnings).collect();
    if !warnings.is_empty() {
        let _ = writeln!(md, "\n## Damaged checkpoints\n");
        for w in warnings {
            let _ = writeln!(md, "- {w}");
        }
    }
    std::fs::write(path, md).map_err(io_err(path))
}

/// `ViT 3×96` or `ResNet [3, 4, 6, 3]×64`: depth × width of the image tower.
fn vision_summary(v: &rankalign_models::VisionConfig) -> String {
    match v {
        rankalign_models::VisionConfig::Vit(v) => format!("ViT {}×{}", v.layers, v.width),
        rankalign_models::VisionConfig::ResNet(r) => {
            format!("ResNet {:?}×{}", r.layers, r.width)
        }
    }
}
