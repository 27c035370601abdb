//! The final evaluation of a pre-training run (spec `rankclip.md` §4, CyCLIP's
//! protocol). On the digit scenes:
//!
//! - zero-shot classification of single-digit test images: each class embedding is the
//!   re-normalised mean of its normalised prompt embeddings; top-1/3/5 accuracy;
//! - image→text and text→image retrieval over paired test scenes, R@1/5/10, where a
//!   query's rank is the number of candidates scoring strictly above its pair
//!   (open_clip's rule; identical captions tie and do not count against);
//! - alignment `S_A = mean_j Î_j·T̂_{y_j}` and uniformity
//!   `S_U = log mean_{j≠k} exp(−Î_j·T̂_{y_k})` with `T̂_y` the class embedding.
//!
//! On a CSV or webdataset source: the same retrieval over the first pairs of the
//! held-out list or shards that `data.test_path` / `data.test_shards` name.

use candle_core::{Device, Tensor};
use rankalign_data::batch::{collate_images, collate_texts};
use rankalign_data::scenes::digit_prompts;
use std::sync::Arc;

use rankalign_data::source::eval_pairs;
use rankalign_data::{Dataset, DigitScenes, Image, PairSource, Tokenize};
use rankalign_models::ClipModel;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::config::EvalConfig;

/// Final metrics of one model: named values in a fixed order, and a sentence saying
/// what they were measured on. `eval.json` holds `{"description", "metrics": {…}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub description: String,
    #[serde(with = "ordered")]
    pub metrics: Vec<(String, f64)>,
}

impl EvalReport {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// A `Vec<(String, f64)>` as a JSON object in its own order.
mod ordered {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (k, x) in v {
            m.serialize_entry(k, x)?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, f64)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of metric names to numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = a.next_entry()? {
                    out.push(e);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether `metric` is a count that the report's description states in words (kept out
/// of tables and summary lines).
pub fn is_count(metric: &str) -> bool {
    matches!(
        metric,
        "zero_shot_images" | "retrieval_pairs" | "eval_skipped"
    )
}

/// What the final evaluation runs on.
pub enum Evaluation {
    /// The digit scenes' test split: zero-shot digits, 1:1 retrieval, S_A / S_U.
    Digits(DigitScenes),
    /// The first `eval.retrieval_size` good pairs of a held-out source: 1:1 retrieval.
    Retrieval(Arc<dyn PairSource>),
    /// No held-out data was named: training losses only.
    None,
}

/// Normalised image embeddings `(n, e)`, computed in batches.
pub fn embed_images(
    model: &ClipModel,
    images: &[Image],
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let size = model.config().vision.image_size();
    let mut parts = Vec::new();
    for chunk in images.chunks(batch.max(1)) {
        let refs: Vec<&Image> = chunk.iter().collect();
        let pixels = collate_images(&refs, size, device)?;
        parts.push(rankalign_kernels::l2_normalize(&model.encode_image(&pixels)?)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Normalised text embeddings `(n, e)`, computed in batches.
pub fn embed_texts(
    model: &ClipModel,
    texts: &[String],
    tokenizer: &(impl Tokenize + ?Sized),
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, eot) = collate_texts(&refs, tokenizer, device)?;
        parts.push(rankalign_kernels::l2_normalize(&model.encode_text(&ids, &eot)?)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Rank of entry `pos` in `row`: how many entries score strictly higher.
fn rank_in(row: &[f32], pos: usize) -> usize {
    row.iter().filter(|&&s| s > row[pos]).count()
}

fn recall(ranks: &[usize], k: usize) -> f64 {
    100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len().max(1) as f64
}

/// The class embeddings `(10, e)` of the digit prompts.
pub fn digit_classifier(
    model: &ClipModel,
    tokenizer: &(impl Tokenize + ?Sized),
    device: &Device,
) -> Result<Tensor> {
    let rows = (0..10u8)
        .map(|d| {
            let emb = embed_texts(model, &digit_prompts(d), tokenizer, 16, device)?;
            Ok(rankalign_kernels::l2_normalize(&emb.mean_keepdim(0)?)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Image→text and text→image R@1/5/10 of paired embeddings (row `i` of each is a pair).
fn retrieval_metrics(si: &Tensor, st: &Tensor) -> Result<Vec<(String, f64)>> {
    let s = si.matmul(&st.t()?)?.to_vec2::<f32>()?;
    let r = s.len();
    let i2t: Vec<usize> = (0..r).map(|i| rank_in(&s[i], i)).collect();
    let t2i: Vec<usize> = (0..r)
        .map(|j| {
            let column: Vec<f32> = s.iter().map(|row| row[j]).collect();
            rank_in(&column, j)
        })
        .collect();
    let mut out = Vec::new();
    for (dir, ranks) in [("image_to_text", &i2t), ("text_to_image", &t2i)] {
        for k in [1, 5, 10] {
            out.push((format!("{dir}_r{k}"), recall(ranks, k)));
        }
    }
    Ok(out)
}

/// Run the final evaluation.
pub fn evaluate(
    model: &ClipModel,
    tokenizer: &(impl Tokenize + ?Sized),
    what: &Evaluation,
    cfg: &EvalConfig,
    device: &Device,
) -> Result<EvalReport> {
    match what {
        Evaluation::Digits(test) => evaluate_digits(model, tokenizer, test, cfg, device),
        Evaluation::Retrieval(source) => {
            let size = model.config().vision.image_size();
            let (pairs, skipped) = eval_pairs(source.as_ref(), cfg.retrieval_size, size)?;
            if pairs.is_empty() {
                return Err(crate::TrainError::Invalid(format!(
                    "the held-out data has no good pair to evaluate on ({}; {} of {} read were corrupt)",
                    source.describe(),
                    skipped.skipped,
                    skipped.seen
                )));
            }
            let (images, captions): (Vec<Image>, Vec<String>) =
                pairs.into_iter().map(|p| (p.image, p.caption)).unzip();
            let si = embed_images(model, &images, cfg.batch_size, device)?;
            let st = embed_texts(model, &captions, tokenizer, cfg.batch_size, device)?;
            let mut metrics = retrieval_metrics(&si, &st)?;
            metrics.push(("retrieval_pairs".into(), images.len() as f64));
            metrics.push(("eval_skipped".into(), skipped.skipped as f64));
            Ok(EvalReport {
                description: format!(
                    "Retrieval: the first {} good pairs of {} (one caption each; {} corrupt skipped), CLIP's evaluation transform.",
                    images.len(),
                    source.describe(),
                    skipped.skipped
                ),
                metrics,
            })
        }
        Evaluation::None => Ok(EvalReport {
            description: "No held-out data: set data.test_path (CSV) or data.test_shards (webdataset) for a retrieval evaluation.".into(),
            metrics: Vec::new(),
        }),
    }
}

/// All metrics on the test split of `scenes`.
fn evaluate_digits(
    model: &ClipModel,
    tokenizer: &(impl Tokenize + ?Sized),
    test: &DigitScenes,
    cfg: &EvalConfig,
    device: &Device,
) -> Result<EvalReport> {
    let n = cfg.zero_shot_size;
    let singles: Vec<(Image, u8)> = (0..n)
        .into_par_iter()
        .map(|i| test.single(i, Some((i % 10) as u8)))
        .collect();
    let (images, labels): (Vec<Image>, Vec<u8>) = singles.into_iter().unzip();
    let img = embed_images(model, &images, cfg.batch_size, device)?;
    let classes = digit_classifier(model, tokenizer, device)?;
    let logits = img.matmul(&classes.t()?)?.to_vec2::<f32>()?;
    let ranks: Vec<usize> = logits
        .iter()
        .zip(&labels)
        .map(|(row, &y)| rank_in(row, y as usize))
        .collect();

    // Alignment and uniformity against the class embedding of each image's label.
    let y = Tensor::from_vec(
        labels.iter().map(|&l| u32::from(l)).collect::<Vec<_>>(),
        n,
        device,
    )?;
    let targets = classes.index_select(&y, 0)?;
    let sims = img.matmul(&targets.t()?)?;
    let alignment = sims
        .to_vec2::<f32>()?
        .iter()
        .enumerate()
        .map(|(j, r)| f64::from(r[j]))
        .sum::<f64>()
        / n.max(1) as f64;
    let expd = sims.neg()?.exp()?.to_vec2::<f32>()?;
    let off_diag: f64 = expd
        .iter()
        .enumerate()
        .map(|(j, r)| r.iter().map(|&v| f64::from(v)).sum::<f64>() - f64::from(r[j]))
        .sum();
    let uniformity = (off_diag / (n * n.saturating_sub(1)).max(1) as f64).ln();

    let r = cfg.retrieval_size;
    let scenes: Vec<_> = (0..r).into_par_iter().map(|i| test.get(i)).collect();
    let (scene_images, captions): (Vec<Image>, Vec<String>) =
        scenes.into_iter().map(|s| (s.image, s.caption)).unzip();
    let si = embed_images(model, &scene_images, cfg.batch_size, device)?;
    let st = embed_texts(model, &captions, tokenizer, cfg.batch_size, device)?;

    let mut metrics = vec![
        ("zero_shot_top1".to_string(), recall(&ranks, 1)),
        ("zero_shot_top3".to_string(), recall(&ranks, 3)),
        ("zero_shot_top5".to_string(), recall(&ranks, 5)),
    ];
    metrics.extend(retrieval_metrics(&si, &st)?);
    metrics.extend([
        ("alignment".to_string(), alignment),
        ("uniformity".to_string(), uniformity),
        ("zero_shot_images".to_string(), n as f64),
        ("retrieval_pairs".to_string(), r as f64),
    ]);
    Ok(EvalReport {
        description: format!(
            "Zero-shot: {n} single-digit test images, 10 classes, 4 prompt templates. Retrieval: {r} test scenes, one caption each. S_A / S_U as RankCLIP Eq. 11–12 (higher S_A = better aligned; higher S_U = more uniform)."
        ),
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_count_strictly_higher_scores() {
        assert_eq!(rank_in(&[0.1, 0.5, 0.5, 0.2], 1), 0);
        assert_eq!(rank_in(&[0.1, 0.5, 0.5, 0.2], 3), 2);
        assert_eq!(recall(&[0, 1, 5, 12], 5), 50.0);
    }
}
