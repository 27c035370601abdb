//! The geometry of the joint embedding space.
//!
//! With `Î_j`, `T̂_j` normalised and row `j` of each a pair (an image and its caption,
//! or an image and its class embedding):
//!
//! - alignment `S_A = (1/N) Σ_j Î_j·T̂_j` (RankCLIP Eq. 11; higher = better aligned);
//! - uniformity `S_U = log (1/(N(N−1))) Σ_{j≠k} exp(−Î_j·T̂_k)` (Eq. 12);
//! - the modality gap `‖mean_j Î_j − mean_j T̂_j‖` (Liang et al., 2022): the distance
//!   between the two centroids;
//! - a PNG of both sets projected on the first two principal components of their union,
//!   coloured by modality, with the centroids marked.

use std::path::Path;

use candle_core::{DType, Tensor};
use plotters::prelude::*;

use crate::{Result, TrainError};

/// `S_A` and `S_U` of paired normalised embeddings, in row blocks (no `N × N` matrix
/// is held).
pub fn alignment_uniformity(img: &Tensor, txt: &Tensor) -> Result<(f64, f64)> {
    let n = img.dim(0)?;
    let diag = img
        .mul(txt)?
        .sum(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let alignment = diag.iter().sum::<f64>() / n.max(1) as f64;
    let txt_t = txt.t()?;
    let mut off = 0f64;
    let block = 1024;
    for start in (0..n).step_by(block) {
        let len = block.min(n - start);
        let sims = img
            .narrow(0, start, len)?
            .matmul(&txt_t)?
            .to_dtype(DType::F64)?;
        off += sims.neg()?.exp()?.sum_all()?.to_scalar::<f64>()?;
    }
    off -= diag.iter().map(|d| (-d).exp()).sum::<f64>();
    let uniformity = (off / (n * n.saturating_sub(1)).max(1) as f64).ln();
    Ok((alignment, uniformity))
}

/// The distance between the centroids of two sets of normalised embeddings.
pub fn modality_gap(img: &Tensor, txt: &Tensor) -> Result<f64> {
    let d = (img.to_dtype(DType::F64)?.mean(0)? - txt.to_dtype(DType::F64)?.mean(0)?)?;
    Ok(d.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// The first two principal axes of the rows of `x` (f64, centred inside), by power
/// iteration with deflation from a fixed start: deterministic.
fn principal_axes(x: &[Vec<f64>]) -> [Vec<f64>; 2] {
    let d = x.first().map_or(0, Vec::len);
    let n = x.len().max(1) as f64;
    let mean: Vec<f64> = (0..d)
        .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let centred: Vec<Vec<f64>> = x
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(a, m)| a - m).collect())
        .collect();
    let apply = |v: &[f64]| -> Vec<f64> {
        // C v = Xᵀ (X v) / n
        let xv: Vec<f64> = centred
            .iter()
            .map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect();
        (0..d)
            .map(|j| centred.iter().zip(&xv).map(|(r, s)| r[j] * s).sum::<f64>() / n)
            .collect()
    };
    let normalise = |v: &mut Vec<f64>| {
        let s = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-300);
        v.iter_mut().for_each(|a| *a /= s);
    };
    let mut axes: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for a in 0..2 {
        let mut v: Vec<f64> = (0..d)
            .map(|j| 1.0 + ((j * 7 + a * 3) % 11) as f64 * 0.1)
            .collect();
        for _ in 0..200 {
            let mut w = apply(&v);
            for prev in axes.iter().take(a) {
                let p: f64 = w.iter().zip(prev).map(|(x, y)| x * y).sum();
                w.iter_mut().zip(prev).for_each(|(x, y)| *x -= p * y);
            }
            normalise(&mut w);
            v = w;
        }
        axes[a] = v;
    }
    axes
}

/// Plot both sets on their first two principal components.
pub fn plot_modalities(path: &Path, img: &Tensor, txt: &Tensor, title: &str) -> Result<()> {
    crate::report::register_fonts();
    let plot_err = |e: String| TrainError::Invalid(format!("plotting {}: {e}", path.display()));
    let a = img.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let b = txt.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let all: Vec<Vec<f64>> = a.iter().chain(&b).cloned().collect();
    if all.is_empty() {
        return Ok(());
    }
    let axes = principal_axes(&all);
    let project = |r: &Vec<f64>| -> (f64, f64) {
        let p = |ax: &Vec<f64>| r.iter().zip(ax).map(|(x, y)| x * y).sum::<f64>();
        (p(&axes[0]), p(&axes[1]))
    };
    let pa: Vec<(f64, f64)> = a.iter().map(project).collect();
    let pb: Vec<(f64, f64)> = b.iter().map(project).collect();
    let pts = pa.iter().chain(&pb);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad = |lo: f64, hi: f64| {
        let m = ((hi - lo) * 0.05).max(1e-6);
        (lo - m)..(hi + m)
    };
    let root = BitMapBackend::new(path, (720, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(pad(x0, x1), pad(y0, y1))
        .map_err(|e| plot_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("principal component 1")
        .y_desc("principal component 2")
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    let centroid = |p: &[(f64, f64)]| {
        let n = p.len().max(1) as f64;
        (
            p.iter().map(|q| q.0).sum::<f64>() / n,
            p.iter().map(|q| q.1).sum::<f64>() / n,
        )
    };
    for (points, colour, label) in [
        (&pa, RGBColor(31, 119, 180), "images"),
        (&pb, RGBColor(214, 39, 40), "texts"),
    ] {
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 2, colour.mix(0.45).filled())),
            )
            .map_err(|e| plot_err(e.to_string()))?
            .label(label)
            .legend(move |(x, y)| Circle::new((x, y), 4, colour.filled()));
        let c = centroid(points);
        chart
            .draw_series(std::iter::once(Cross::new(c, 9, colour.stroke_width(3))))
            .map_err(|e| plot_err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| plot_err(e.to_string()))?;
    root.present().map_err(|e| plot_err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gap_and_alignment_of_known_sets() {
        let img = Tensor::new(&[[1f32, 0.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let txt = Tensor::new(&[[0f32, 1.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        assert!((modality_gap(&img, &txt).unwrap() - 2f64.sqrt()).abs() < 1e-12);
        let (a, u) = alignment_uniformity(&img, &txt).unwrap();
        assert_eq!(a, 0.0);
        assert!((u - 0.0).abs() < 1e-12, "exp(-0) = 1 off the diagonal");
        assert_eq!(modality_gap(&img, &img).unwrap(), 0.0);
    }

    #[test]
    fn principal_axes_find_the_widest_direction() {
        let x: Vec<Vec<f64>> = (0..50)
            .map(|i| {
                let t = i as f64 - 25.0;
                vec![0.1 * (i % 3) as f64, 3.0 * t, 0.5 * ((i * 7) % 5) as f64]
            })
            .collect();
        let [a, _] = principal_axes(&x);
        assert!(a[1].abs() > 0.99, "{a:?}");
    }
}
