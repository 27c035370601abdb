//! Ordinal metrics: MAE and accuracy with the argmax and with the expectation of the
//! rank distribution (OrdinalCLIP reports both), the ordinality score OS of the rank
//! features (L2RCLIP §4.2), and the heatmap of their cosine similarities (its Fig. 3).

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Test-set scores of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrdinalScores {
    /// Mean |ŷ − y| in rank units, ŷ = argmax.
    pub mae_max: f64,
    /// Mean |ŷ − y| with ŷ = Σ_k p_k·k.
    pub mae_exp: f64,
    /// % of exact matches, argmax.
    pub acc_max: f64,
    /// % with round(Σ_k p_k·k) = y.
    pub acc_exp: f64,
    /// Ordinality score of the rank features, in %.
    pub os: f64,
    pub test_images: usize,
}

/// MAE and accuracy from each test item's probabilities over the ranks.
pub fn score(probs: &[Vec<f32>], labels: &[u32]) -> (f64, f64, f64, f64) {
    let n = labels.len().max(1) as f64;
    let (mut mae_max, mut mae_exp, mut acc_max, mut acc_exp) = (0.0, 0.0, 0.0, 0.0);
    for (p, &y) in probs.iter().zip(labels) {
        let y = f64::from(y);
        let arg = p
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (k, &v)| {
                if v > best.1 { (k, v) } else { best }
            })
            .0 as f64;
        let exp: f64 = p
            .iter()
            .enumerate()
            .map(|(k, &v)| k as f64 * f64::from(v))
            .sum();
        mae_max += (arg - y).abs();
        mae_exp += (exp - y).abs();
        acc_max += f64::from(u8::from(arg == y));
        acc_exp += f64::from(u8::from(exp.round() == y));
    }
    (
        mae_max / n,
        mae_exp / n,
        100.0 * acc_max / n,
        100.0 * acc_exp / n,
    )
}

/// The ordinality score of a similarity matrix `s` (`m × m`, row-major) in %: the share
/// of entries `(i, j)`, `i ≤ j ≤ m − 2`, with `s[i][j] > s[i][j+1]` — similarity must
/// fall as `j` moves away from `i` (OrdinalCLIP `vis_ordinality.py`, full span; the
/// `m − 1` diagonal comparisons are counted, as there).
pub fn ordinality_score(s: &[f32], m: usize) -> f64 {
    if m < 2 {
        return 0.0;
    }
    let mut hits = 0usize;
    for i in 0..m - 1 {
        for j in i..m - 1 {
            if s[i * m + j] > s[i * m + j + 1] {
                hits += 1;
            }
        }
    }
    100.0 * hits as f64 / (m * (m - 1) / 2) as f64
}

fn colour(t: f64) -> RGBColor {
    // A blue–white–red ramp for t in [0, 1].
    let t = t.clamp(0.0, 1.0);
    let (r, g, b) = if t < 0.5 {
        let u = t / 0.5;
        (40.0 + 215.0 * u, 80.0 + 175.0 * u, 200.0 + 55.0 * u)
    } else {
        let u = (t - 0.5) / 0.5;
        (255.0 - 35.0 * u, 255.0 - 205.0 * u, 255.0 - 215.0 * u)
    };
    RGBColor(r as u8, g as u8, b as u8)
}

/// A PNG heatmap of the rank-feature cosine similarities, labelled with the rank words.
pub fn plot_heatmap(path: &Path, s: &[f32], ranks: &[String], title: &str) -> Result<()> {
    crate::report::register_fonts();
    let m = ranks.len();
    let err = |e: String| TrainError::Invalid(format!("plotting {}: {e}", path.display()));
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = f64::from((hi - lo).max(1e-6));
    let root = BitMapBackend::new(path, (640, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..m - 1).into_segmented(), (0..m - 1).into_segmented())
        .map_err(|e| err(e.to_string()))?;
    let step = m.div_ceil(12).max(1);
    // `(0..m - 1).into_segmented()` has m cells. Labels sit at cell centres; row 0 is
    // drawn at the top, as a matrix is printed.
    let name = |v: &SegmentValue<usize>, flip: bool| match v {
        SegmentValue::CenterOf(i) if *i < m => {
            let r = if flip { m - 1 - i } else { *i };
            if r.is_multiple_of(step) {
                ranks[r].clone()
            } else {
                String::new()
            }
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(m)
        .y_labels(m)
        .x_label_formatter(&|v| name(v, false))
        .y_label_formatter(&|v| name(v, true))
        .x_desc(format!("rank (cosine {lo:.3} blue … {hi:.3} red)"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series((0..m).flat_map(|i| {
            (0..m).map(move |j| {
                let t = f64::from(s[i * m + j] - lo) / span;
                let y = m - 1 - i;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(j), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(j + 1), SegmentValue::Exact(y + 1)),
                    ],
                    colour(t).filled(),
                )
            })
        }))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mae_and_accuracy_by_hand() {
        // Item 1: argmax 2 (y = 2), expectation 0.1·0 + 0.2·1 + 0.7·2 = 1.6.
        // Item 2: argmax 0 (y = 1), expectation 0.6·0 + 0.4·1 = 0.4.
        let probs = vec![vec![0.1, 0.2, 0.7], vec![0.6, 0.4, 0.0]];
        let (mae_max, mae_exp, acc_max, acc_exp) = score(&probs, &[2, 1]);
        assert!((mae_max - 0.5).abs() < 1e-9);
        assert!((mae_exp - (0.4 + 0.6) / 2.0).abs() < 1e-6);
        assert!((acc_max - 50.0).abs() < 1e-9);
        // round(1.6) = 2 = y; round(0.4) = 0 ≠ 1.
        assert!((acc_exp - 50.0).abs() < 1e-9);
    }

    #[test]
    fn ordinality_score_by_hand() {
        // Similarity falling with |i − j|: every comparison holds.
        let m = 4;
        let s: Vec<f32> = (0..m * m)
            .map(|k| 1.0 - ((k / m) as f32 - (k % m) as f32).abs() * 0.1)
            .collect();
        assert!((ordinality_score(&s, m) - 100.0).abs() < 1e-9);
        // All equal: nothing strictly decreases.
        assert_eq!(ordinality_score(&[0.5; 16], 4), 0.0);
        // m = 3, one violated comparison of three: s[0][1] < s[0][2].
        let s = [1.0, 0.2, 0.5, 0.2, 1.0, 0.3, 0.5, 0.3, 1.0];
        // Pairs: (0,0): 1 > .2 ✓; (0,1): .2 > .5 ✗; (1,1): 1 > .3 ✓.
        assert!((ordinality_score(&s, 3) - 200.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn heatmap_is_a_png() {
        let m = 10;
        let s: Vec<f32> = (0..m * m)
            .map(|k| 1.0 - ((k / m) as f32 - (k % m) as f32).abs() * 0.15)
            .collect();
        let ranks: Vec<String> = (0..m).map(|r| r.to_string()).collect();
        let path =
            std::env::temp_dir().join(format!("rankalign-heatmap-{}.png", std::process::id()));
        plot_heatmap(&path, &s, &ranks, "test").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
