//! Training-time image augmentation: torchvision's `RandomResizedCrop` (the sampler of
//! `RandomResizedCrop.get_params` and the geometry of `resized_crop`, bicubic as
//! open_clip uses it) and a random horizontal flip, drawn from a seeded ChaCha stream.
//!
//! The sampler is torchvision's algorithm step for step: up to ten attempts, each
//! drawing an area fraction uniformly from `scale` and a log-uniform aspect ratio from
//! `ratio`, rounding the box's sides half to even (Python's `round`) and accepting it if
//! it fits, with a uniform top-left corner; after ten misses, a centre crop of the whole
//! image clamped to the ratio range. torchvision draws from torch's global generator; we
//! draw from `ChaCha8Rng` seeded by the caller (e.g. `mix_seed(&[seed, step, index])`),
//! so a box is a pure function of that seed, the same on every machine and on resume.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::image::{CropBox, Image, SourceImage};

/// Parameters of the training transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTransformConfig {
    /// Output side in pixels.
    pub size: usize,
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio, width / height.
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub hflip: f64,
}

impl TrainTransformConfig {
    /// torchvision's defaults: scale (0.08, 1), ratio (3/4, 4/3), flip with p = ½.
    pub fn torchvision(size: usize) -> Self {
        Self {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: 0.5,
        }
    }

    /// open_clip's training transform: scale (0.9, 1), ratio (3/4, 4/3), no flip.
    pub fn open_clip(size: usize) -> Self {
        Self {
            scale: (0.9, 1.0),
            hflip: 0.0,
            ..Self::torchvision(size)
        }
    }

    /// Ranges that are ordered and positive, a flip probability in [0, 1], a size > 0.
    pub fn validate(&self) -> Result<(), DataError> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        let bad = |msg: String| Err(DataError::Invalid(format!("train transform: {msg}")));
        if self.size == 0 {
            return bad("size must be at least 1".into());
        }
        if !(s0 > 0.0 && s0 <= s1 && s1.is_finite()) {
            return bad(format!("scale must be 0 < min ≤ max, got ({s0}, {s1})"));
        }
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return bad(format!("ratio must be 0 < min ≤ max, got ({r0}, {r1})"));
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return bad(format!("hflip must be a probability, got {}", self.hflip));
        }
        Ok(())
    }

    /// Crop, resize to `size × size` and maybe flip `img`, with every draw from
    /// `ChaCha8Rng::seed_from_u64(seed)`: first the box (as [`sample_crop`]), then the
    /// flip. Returns the image and the box.
    pub fn apply(&self, img: &SourceImage, seed: u64) -> Result<(Image, CropBox), DataError> {
        self.validate()?;
        if img.width == 0 || img.height == 0 {
            return Err(DataError::Invalid(format!(
                "train transform: cannot crop an empty {}×{} image",
                img.width, img.height
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rect = sample_crop(img.width, img.height, self.scale, self.ratio, &mut rng);
        let out = img.resized_crop(rect, self.size)?;
        let flip = self.hflip > 0.0 && rng.random::<f64>() < self.hflip;
        Ok((if flip { out.hflip() } else { out }, rect))
    }
}

/// A uniform draw from `[lo, hi)` (`lo` when the range is empty), as torch's `uniform_`.
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// torchvision's `RandomResizedCrop.get_params` for a `width × height` image: ten
/// attempts, then [`fallback_crop`]. The box always lies inside the image and is at
/// least one pixel on each side.
pub fn sample_crop(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
            let (w, h) = (w as usize, h as usize);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    fallback_crop(width, height, ratio)
}

/// torchvision's fallback: the whole image, narrowed to the nearest allowed aspect
/// ratio if it lies outside `ratio`, centred (offsets floored).
pub fn fallback_crop(width: usize, height: usize, ratio: (f64, f64)) -> CropBox {
    let (r_min, r_max) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < r_min {
        let h = (width as f64 / r_min).round_ties_even() as usize;
        (width, h.clamp(1, height))
    } else if in_ratio > r_max {
        let w = (height as f64 * r_max).round_ties_even() as usize;
        (w.clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_errors_that_say_why() {
        let mut c = TrainTransformConfig::torchvision(32);
        c.scale = (0.5, 0.1);
        assert!(c.validate().unwrap_err().to_string().contains("scale"));
        let mut c = TrainTransformConfig::open_clip(32);
        c.hflip = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("hflip"));
        let mut c = TrainTransformConfig::open_clip(32);
        c.ratio = (0.0, 1.0);
        assert!(c.validate().unwrap_err().to_string().contains("ratio"));
    }
}
