//! Embeddings out: L2-normalised image and text embeddings of a pretrained model (any
//! that [`crate::pretrained::load`] reads: an HF or open_clip directory such as one
//! written by `rankalign export`, a checkpoint file, or a hub name in the local cache),
//! for use in other tools.
//!
//! Images are decoded (PNG, JPEG), put through CLIP's evaluation transform (shorter side
//! to the model's size, bicubic; centre crop; CLIP normalisation) and encoded in batches;
//! texts use CLIP's tokenizer. The output is one safetensors file with `image_embeds`
//! `(n, e)`, `text_embeds` `(m, e)` and the raw `logit_scale` (logits are
//! `exp(logit_scale)·cos`), plus `<out>.json` listing the inputs in row order.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use rankalign_data::batch::collate_images;
use rankalign_data::{Image, SourceImage};
use rayon::prelude::*;

use crate::eval::embed_texts;
use crate::{Result, TrainError, io_err};

/// Image files under `inputs`: files as given, directories expanded to their PNG and
/// JPEG files in name order.
pub fn image_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(io_err(p))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                    })
                })
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Embed `images` and `texts` with the model named by `model_dir` (a directory, a file or
/// a hub name; see [`crate::pretrained`]); writes `out` and `out.json`. Returns the number
/// of image and text rows.
pub fn embed(
    model_dir: &Path,
    images: &[PathBuf],
    texts: &[String],
    out: &Path,
    batch: usize,
    progress: &ProgressBar,
    device: &Device,
) -> Result<(usize, usize)> {
    let clip = crate::pretrained::Clip::load(model_dir, device)?;
    let (model, tokenizer, cfg) = (&clip.model, &clip.tokenizer, clip.config().clone());
    let size = cfg.vision.image_size();
    progress.set_length((images.len() + texts.len()) as u64);
    let mut image_rows = Vec::new();
    for chunk in images.chunks(batch.max(1)) {
        let decoded = chunk
            .par_iter()
            .map(|p| SourceImage::open(p).map(|img| img.clip_eval(size)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let refs: Vec<&Image> = decoded.iter().collect();
        let pixels = collate_images(&refs, size, device)?;
        image_rows.push(rankalign_kernels::l2_normalize(&model.encode_image(&pixels)?)?.detach());
        progress.inc(chunk.len() as u64);
    }
    let e = cfg.embed_dim;
    let image_embeds = if image_rows.is_empty() {
        Tensor::zeros((0, e), DType::F32, device)?
    } else {
        Tensor::cat(&image_rows, 0)?
    };
    let text_embeds = if texts.is_empty() {
        Tensor::zeros((0, e), DType::F32, device)?
    } else {
        embed_texts(model, texts, tokenizer, batch, device)?
    };
    progress.inc(texts.len() as u64);
    let tensors = std::collections::HashMap::from([
        ("image_embeds".to_string(), image_embeds),
        ("text_embeds".to_string(), text_embeds),
        ("logit_scale".to_string(), model.logit_scale().detach()),
    ]);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    candle_core::safetensors::save(&tensors, out)?;
    let index = serde_json::json!({ "model": model_dir, "images": images, "texts": texts });
    let index_path = PathBuf::from(format!("{}.json", out.display()));
    std::fs::write(
        &index_path,
        serde_json::to_string_pretty(&index).map_err(|e| TrainError::Invalid(e.to_string()))?,
    )
    .map_err(io_err(&index_path))?;
    progress.finish();
    Ok((images.len(), texts.len()))
}
