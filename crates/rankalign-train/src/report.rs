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
fn heading(metric: &str) -> String {
    let short = |k: &str| {
        k.strip_prefix("image_retrieval_recall@")
            .map(|k| format!("T→I R@{k}"))
            .or_else(|| {
                k.strip_prefix("text_retrieval_recall@")
                    .map(|k| format!("I→T R@{k}"))
            })
    };
    match metric {
        "acc1" => "top-1".into(),
        "acc5" => "top-5".into(),
        "mean_per_class_recall" => "mean recall".into(),
        "lp_acc1" => "probe top-1".into(),
        "lp_acc5" => "probe top-5".into(),
        "lp_mean_per_class_recall" => "probe mean recall".into(),
        "alignment" => "S_A".into(),
        "uniformity" => "S_U".into(),
        "modality_gap" => "gap".into(),
        other => short(other).unwrap_or_else(|| other.to_string()),
    }
}

fn value_cell(metric: &str, v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if metric.contains("acc") || metric.contains("recall") {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// One table per evaluation task: a row per variant, a column per metric.
fn eval_tables(md: &mut String, outcomes: &[VariantOutcome]) {
    let Some(first) = outcomes.first() else {
        return;
    };
    for (i, sec) in first.eval.sections.iter().enumerate() {
        let cols: Vec<&str> = sec
            .metrics
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !crate::eval::is_count(n))
            .collect();
        if cols.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "**{} on {}** ({})\n",
            sec.task, sec.dataset, sec.details
        );
        let _ = writeln!(
            md,
            "| variant | {} |",
            cols.iter()
                .map(|c| heading(c))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(md, "|---|{}", "---:|".repeat(cols.len()));
        for o in outcomes {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    let v = o
                        .eval
                        .sections
                        .get(i)
                        .and_then(|s| s.metrics.iter().find(|(n, _)| n == c))
                        .map_or(f64::NAN, |(_, v)| *v);
                    value_cell(c, v)
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", o.name, vals.join(" | "));
        }
        md.push('\n');
    }
}

/// Each evaluation during training against the step: the validation loss's InfoNCE part
/// (comparable across objectives) or a task's first metric, one line per variant, one
/// panel per series.
pub fn plot_evals(path: &Path, outcomes: &[VariantOutcome]) -> Result<bool> {
    register_fonts();
    let plot_err = |e: String| TrainError::Invalid(format!("plotting {}: {e}", path.display()));
    let mut series: Vec<(String, String)> = Vec::new();
    for o in outcomes {
        for r in &o.evals {
            let clip_part = r.metrics.iter().find(|(n, _)| n == "clip");
            let headline = match (r.eval.as_str(), clip_part) {
                ("validation", Some(c)) => Some(c),
                _ => r.metrics.first(),
            };
            if let Some((m, _)) = headline
                && !series.iter().any(|(e, _)| e == &r.eval)
            {
                series.push((r.eval.clone(), m.clone()));
            }
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    let cols = series.len().min(2);
    let rows = series.len().div_ceil(cols);
    let root = BitMapBackend::new(path, (520 * cols as u32, 360 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let panels = root.split_evenly((rows, cols));
    for ((eval, metric), panel) in series.iter().zip(panels.iter()) {
        let lines: Vec<(usize, Vec<(f64, f64)>)> = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let pts = o
                    .evals
                    .iter()
                    .filter(|r| &r.eval == eval)
                    .filter_map(|r| {
                        r.metrics
                            .iter()
                            .find(|(n, _)| n == metric)
                            .map(|(_, v)| (r.step as f64, *v))
                    })
                    .filter(|p| p.1.is_finite())
                    .collect();
                (i, pts)
            })
            .collect();
        let all: Vec<(f64, f64)> = lines.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        if all.is_empty() {
            continue;
        }
        let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
        let y_lo = all.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        let y_hi = all.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let pad = ((y_hi - y_lo) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{eval}: {metric}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max * 1.02, (y_lo - pad)..(y_hi + pad))
            .map_err(|e| plot_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
        for (i, pts) in lines {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(|e| plot_err(e.to_string()))?
                .label(outcomes[i].name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| plot_err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
    }
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(true)
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
    eval_tables(&mut md, outcomes);
    let _ = writeln!(md, "| variant | final loss | ms/step | skipped |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for o in outcomes {
        let _ = writeln!(
            md,
            "| {} | {:.3} | {:.0} | {} of {} |",
            o.name, o.final_loss, o.median_step_ms, o.skipped.skipped, o.skipped.seen
        );
    }
    if outcomes.iter().any(|o| !o.evals.is_empty()) {
        let _ = writeln!(
            md,
            "\nDuring training (validation loss each epoch, `[[eval.task]]` on schedule; no checkpoint is chosen by them):\n\n![evaluations during training](evals.png)"
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

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// One variant's values of one metric across the runs of a study.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StudyCell {
    pub variant: String,
    pub metric: String,
    pub values: Vec<f64>,
    pub mean: f64,
    pub std: f64,
}

/// Table the final evaluations of several runs of one experiment (one per seed) as
/// mean ± std per variant and metric: `out/study.md`, `out/study.json` and a bar chart
/// of the headline metrics with one-std error bars, `out/study.png`.
pub fn write_study(runs: &[std::path::PathBuf], out: &Path) -> Result<std::path::PathBuf> {
    let mut variants: Vec<String> = Vec::new();
    let mut metrics: Vec<String> = Vec::new();
    let mut values: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for dir in runs {
        let path = dir.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        // Typed, so that the metrics keep the report's order.
        #[derive(serde::Deserialize)]
        struct SummaryRow {
            variant: String,
            eval: crate::eval::EvalReport,
            #[serde(default)]
            validation: Option<std::collections::BTreeMap<String, Option<f64>>>,
        }
        let rows: Vec<SummaryRow> =
            serde_json::from_str(&text).map_err(|e| TrainError::Config {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        for row in rows {
            let (name, report) = (row.variant, row.eval);
            if !variants.contains(&name) {
                variants.push(name.clone());
            }
            // The last validation loss's InfoNCE part: comparable across objectives.
            let validation = row
                .validation
                .as_ref()
                .and_then(|v| v.get("clip").copied().flatten())
                .map(|v| ("validation/clip_loss".to_string(), v));
            for (k, v) in report.metrics.iter().chain(validation.iter()) {
                if crate::eval::is_count(k) || !v.is_finite() {
                    continue;
                }
                if !metrics.contains(k) {
                    metrics.push(k.clone());
                }
                values
                    .entry((name.clone(), k.clone()))
                    .or_default()
                    .push(*v);
            }
        }
    }
    // Runs written before summaries kept their order have their metrics sorted by name:
    // order them by dataset (as the report lists them) and then in the report's order.
    let datasets: Vec<String> = {
        let mut d: Vec<String> = Vec::new();
        for m in &metrics {
            let ds = m.split('/').next().unwrap_or(m).to_string();
            if !d.contains(&ds) {
                d.push(ds);
            }
        }
        d
    };
    let canonical = |m: &str| -> (usize, usize, String) {
        let (ds, k) = m.rsplit_once('/').unwrap_or(("", m));
        let group = datasets
            .iter()
            .position(|d| d == ds.split('/').next().unwrap_or(ds));
        let order = [
            "acc1",
            "acc5",
            "mean_per_class_recall",
            "lp_acc1",
            "lp_acc5",
            "lp_mean_per_class_recall",
        ];
        let rank = order.iter().position(|o| *o == k).unwrap_or_else(|| {
            let at = |p: &str| k.strip_prefix(p).and_then(|n| n.parse::<usize>().ok());
            if let Some(n) = at("image_retrieval_recall@") {
                100 + n
            } else if let Some(n) = at("text_retrieval_recall@") {
                200 + n
            } else {
                match k {
                    "alignment" => 300,
                    "uniformity" => 301,
                    "modality_gap" => 302,
                    _ => 400,
                }
            }
        });
        (group.unwrap_or(usize::MAX), rank, k.to_string())
    };
    metrics.sort_by_key(|m| canonical(m));
    let cells: Vec<StudyCell> = metrics
        .iter()
        .flat_map(|m| {
            variants.iter().filter_map(|v| {
                values.get(&(v.clone(), m.clone())).map(|xs| {
                    let (mean, std) = mean_std(xs);
                    StudyCell {
                        variant: v.clone(),
                        metric: m.clone(),
                        values: xs.clone(),
                        mean,
                        std,
                    }
                })
            })
        })
        .collect();
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut md = String::new();
    let n = runs.len();
    let _ = writeln!(
        md,
        "Mean ± sample standard deviation over {n} run(s): {}.\n",
        runs.iter()
            .map(|r| format!("`{}`", r.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "| metric | {} |", variants.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(variants.len()));
    for m in &metrics {
        let row: Vec<String> = variants
            .iter()
            .map(|v| {
                cells
                    .iter()
                    .find(|c| &c.variant == v && &c.metric == m)
                    .map_or_else(String::new, |c| {
                        if m.contains("acc") || m.contains("recall") {
                            format!("{:.1} ± {:.1}", c.mean, c.std)
                        } else {
                            format!("{:.3} ± {:.3}", c.mean, c.std)
                        }
                    })
            })
            .collect();
        let _ = writeln!(md, "| {m} | {} |", row.join(" | "));
    }
    let md_path = out.join("study.md");
    std::fs::write(&md_path, md).map_err(io_err(&md_path))?;
    let json_path = out.join("study.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&cells).map_err(|e| TrainError::Invalid(e.to_string()))?,
    )
    .map_err(io_err(&json_path))?;
    let headline: Vec<&String> = metrics
        .iter()
        .filter(|m| {
            let k = m.rsplit('/').next().unwrap_or(m);
            matches!(
                k,
                "acc1" | "lp_acc1" | "image_retrieval_recall@1" | "text_retrieval_recall@1"
            )
        })
        .collect();
    plot_study(&out.join("study.png"), &variants, &headline, &cells)?;
    Ok(md_path)
}

/// Grouped bars (a group per metric, a bar per variant) with one-std error bars.
fn plot_study(
    path: &Path,
    variants: &[String],
    metrics: &[&String],
    cells: &[StudyCell],
) -> Result<()> {
    register_fonts();
    let plot_err = |e: String| TrainError::Invalid(format!("plotting {}: {e}", path.display()));
    if metrics.is_empty() || variants.is_empty() {
        return Ok(());
    }
    let top = cells
        .iter()
        .filter(|c| metrics.contains(&&c.metric))
        .map(|c| c.mean + c.std)
        .fold(1.0, f64::max)
        * 1.35;
    let width = 1.0 / (variants.len() as f64 + 1.0);
    let root =
        BitMapBackend::new(path, (260 * metrics.len() as u32 + 160, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let labels: Vec<String> = metrics.iter().map(|m| m.to_string()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption("mean ± std over seeds (%)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..metrics.len() as f64, 0.0..top)
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    // Each group's metric name under its middle.
    for (i, label) in labels.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let style = TextStyle::from(("sans-serif", 13).into_font()).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ),
        );
        root.draw(&Text::new(label.clone(), (px, py + 8), style))
            .map_err(|e| plot_err(e.to_string()))?;
    }
    for (vi, v) in variants.iter().enumerate() {
        let colour = COLOURS[vi % COLOURS.len()];
        let bars: Vec<(f64, f64, f64)> = metrics
            .iter()
            .enumerate()
            .filter_map(|(mi, m)| {
                cells
                    .iter()
                    .find(|c| &c.variant == v && &c.metric == *m)
                    .map(|c| (mi as f64 + width * (vi as f64 + 0.5), c.mean, c.std))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x, m, _)| {
                Rectangle::new([(x, 0.0), (x + width * 0.9, m)], colour.filled())
            }))
            .map_err(|e| plot_err(e.to_string()))?
            .label(v.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        chart
            .draw_series(bars.iter().map(|&(x, m, s)| {
                let c = x + width * 0.45;
                PathElement::new(vec![(c, m - s), (c, m + s)], BLACK.stroke_width(2))
            }))
            .map_err(|e| plot_err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}
