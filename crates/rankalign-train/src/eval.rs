//! Evaluation on held-out digits (spec `rankclip.md` §4, CyCLIP's protocol):
//!
//! - zero-shot classification of single-digit test images: each class embedding is the
//!   re-normalised mean of its normalised prompt embeddings; top-1/3/5 accuracy;
//! - image→text and text→image retrieval over paired test scenes, R@1/5/10, where a
//!   query's rank is the number of candidates scoring strictly above its pair
//!   (open_clip's rule; identical captions tie and do not count against);
//! - alignment `S_A = mean_j Î_j·T̂_{y_j}` and uniformity
//!   `S_U = log mean_{j≠k} exp(−Î_j·T̂_{y_k})` with `T̂_y` the class embedding.

use candle_core::{Device, Tensor};
use rankalign_data::batch::{collate_images, collate_texts};
use rankalign_data::scenes::digit_prompts;
use rankalign_data::{Dataset, DigitScenes, Image, Tokenize};
use rankalign_models::ClipModel;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::config::EvalConfig;

/// Final metrics of one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub zero_shot_top1: f64,
    pub zero_shot_top3: f64,
    pub zero_shot_top5: f64,
    pub image_to_text_r1: f64,
    pub image_to_text_r5: f64,
    pub image_to_text_r10: f64,
    pub text_to_image_r1: f64,
    pub text_to_image_r5: f64,
    pub text_to_image_r10: f64,
    pub alignment: f64,
    pub uniformity: f64,
    pub zero_shot_images: usize,
    pub retrieval_pairs: usize,
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

/// All metrics on the test split of `scenes`.
pub fn evaluate(
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
    let s = si.matmul(&st.t()?)?.to_vec2::<f32>()?;
    let i2t: Vec<usize> = (0..r).map(|i| rank_in(&s[i], i)).collect();
    let t2i: Vec<usize> = (0..r)
        .map(|j| {
            let column: Vec<f32> = s.iter().map(|row| row[j]).collect();
            rank_in(&column, j)
        })
        .collect();

    Ok(EvalReport {
        zero_shot_top1: recall(&ranks, 1),
        zero_shot_top3: recall(&ranks, 3),
        zero_shot_top5: recall(&ranks, 5),
        image_to_text_r1: recall(&i2t, 1),
        image_to_text_r5: recall(&i2t, 5),
        image_to_text_r10: recall(&i2t, 10),
        text_to_image_r1: recall(&t2i, 1),
        text_to_image_r5: recall(&t2i, 5),
        text_to_image_r10: recall(&t2i, 10),
        alignment,
        uniformity,
        zero_shot_images: n,
        retrieval_pairs: r,
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
