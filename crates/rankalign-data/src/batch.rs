//! Collation: the one place where items become tensors.
//!
//! Images are scaled to [0, 1] and normalised with CLIP's mean and std into
//! `(b, 3, h, w)` f32. Captions are tokenised, padded with zeros to the longest sequence
//! in the batch (not to the full context: causal attention makes the EOT feature the
//! same), and the EOT position of each row is recorded as a flat index `row · s + pos`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::DataError;
use crate::image::Image;
use crate::wordpiece::Tokenize;

/// OpenAI CLIP's per-channel normalisation.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// A batch ready for a CLIP forward pass.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(b, 3, h, w)` f32, normalised.
    pub pixels: Tensor,
    /// `(b, s)` u32 token ids.
    pub ids: Tensor,
    /// `(b)` u32 flat EOT indices into `(b·s)`.
    pub eot: Tensor,
}

impl Batch {
    /// Rows `start..start + len`, with the EOT indices rebased onto the slice.
    pub fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Batch> {
        let s = self.ids.dim(1)?;
        let base = Tensor::new(&[(start * s) as u32], self.eot.device())?;
        Ok(Batch {
            pixels: self.pixels.narrow(0, start, len)?,
            ids: self.ids.narrow(0, start, len)?,
            eot: self.eot.narrow(0, start, len)?.broadcast_sub(&base)?,
        })
    }

    pub fn len(&self) -> usize {
        self.pixels.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Images to a normalised `(b, 3, size, size)` tensor; every image must be `size × size`.
pub fn collate_images(
    images: &[&Image],
    size: usize,
    device: &Device,
) -> Result<Tensor, DataError> {
    let plane = size * size;
    for (i, img) in images.iter().enumerate() {
        if img.width != size || img.height != size || img.data.len() != plane * 3 {
            return Err(DataError::Invalid(format!(
                "image {i} of the batch is {}×{}, the model expects {size}×{size}",
                img.width, img.height
            )));
        }
    }
    let mut out = vec![0f32; images.len() * 3 * plane];
    // One image per task on the caller's rayon pool (the data threads).
    out.par_chunks_mut((3 * plane).max(1))
        .zip(images.par_iter())
        .for_each(|(dst, img)| {
            for (c, channel) in dst.chunks_exact_mut(plane.max(1)).enumerate() {
                let (mean, std) = (CLIP_MEAN[c], CLIP_STD[c]);
                for (p, o) in channel.iter_mut().enumerate() {
                    *o = (f32::from(img.data[p * 3 + c]) / 255.0 - mean) / std;
                }
            }
        });
    Ok(Tensor::from_vec(
        out,
        (images.len(), 3, size, size),
        device,
    )?)
}

/// An image file (PNG, JPEG, WebP) through CLIP's evaluation transform (shorter side
/// to `size`, bicubic as Pillow; centre crop; CLIP normalisation): `(1, 3, size, size)`.
pub fn preprocess_image(
    path: &std::path::Path,
    size: usize,
    device: &Device,
) -> Result<Tensor, DataError> {
    let img = crate::image::SourceImage::open(path)?.clip_eval(size);
    collate_images(&[&img], size, device)
}

/// Token ids `(b, s)` padded with zeros, and flat EOT indices `(b)` (each row's last
/// token: CLIP's EOT, BERT's `[SEP]`).
pub fn collate_texts(
    texts: &[&str],
    tokenizer: &(impl Tokenize + ?Sized),
    device: &Device,
) -> Result<(Tensor, Tensor), DataError> {
    let rows = texts
        .iter()
        .map(|t| tokenizer.encode(t))
        .collect::<Result<Vec<_>, _>>()?;
    let s = rows.iter().map(Vec::len).max().unwrap_or(2).max(2);
    let mut ids = vec![0u32; rows.len() * s];
    let mut eot = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        ids[i * s..i * s + row.len()].copy_from_slice(row);
        eot.push((i * s + row.len() - 1) as u32);
    }
    let n = rows.len();
    Ok((
        Tensor::from_vec(ids, (n, s), device)?,
        Tensor::from_vec(eot, n, device)?,
    ))
}

/// Image–caption pairs into a [`Batch`].
pub fn collate_pairs(
    images: &[&Image],
    captions: &[&str],
    image_size: usize,
    tokenizer: &(impl Tokenize + ?Sized),
    device: &Device,
) -> Result<Batch, DataError> {
    let pixels = collate_images(images, image_size, device)?;
    let (ids, eot) = collate_texts(captions, tokenizer, device)?;
    Ok(Batch { pixels, ids, eot })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::ClipTokenizer;

    #[test]
    fn wrong_image_size_is_an_error_not_a_panic() {
        let img = Image::black(32, 32);
        let err = collate_images(&[&img], 48, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("32×32") && err.contains("48×48"), "{err}");
    }

    #[test]
    fn normalisation_and_eot_positions() {
        let mut img = Image::black(2, 2);
        img.data[0] = 255;
        let t = collate_images(&[&img], 2, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((v[1] + CLIP_MEAN[0] / CLIP_STD[0]).abs() < 1e-6);
        let tok = ClipTokenizer::new(77).unwrap();
        let (ids, eot) =
            collate_texts(&["a 3", "a red 3 on the left"], &tok, &Device::Cpu).unwrap();
        let s = ids.dim(1).unwrap();
        let eot = eot.to_vec1::<u32>().unwrap();
        let ids = ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(ids[eot[0] as usize], crate::tokenize::EOT);
        assert_eq!(ids[eot[1] as usize], crate::tokenize::EOT);
        assert_eq!(eot[1] as usize, 2 * s - 1);
    }
}
