//! Pillow's convolution resampling of 8-bit images, reproduced operation for operation,
//! so that our CLIP preprocessing gives the same grey levels as torchvision's transforms
//! on PIL images (what open_clip and OpenAI CLIP use).
//!
//! The algorithm (Pillow `src/libImaging/Resample.c`, as of Pillow 13.0): separable, in
//! two passes. For each output pixel of a pass the
//! kernel is centred at `in0 + (x + ½)·scale` of the input and, when shrinking, widened
//! by the scale factor (`support = 2·max(scale, 1)` for bicubic): that widening is the
//! antialiasing. Kernel bounds are rounded by C's truncating cast; weights are computed
//! in f64, divided by their sum, and then turned into 22-bit fixed point (rounded away
//! from zero). Each pass accumulates in i32 starting at ½ (2²¹), shifts right by 22 and
//! clamps to 0..=255, so the intermediate image is rounded to u8 between the passes.
//! A pass whose size does not change is skipped (a copy when neither changes).
//!
//! Pass order: horizontal first (then only the rows the vertical pass reads are
//! resampled), except when the width does not shrink and the height does, where Pillow
//! 13 runs the vertical pass first (Pillow ≤ 12 always went horizontal first, so in
//! that one case its output can differ from 13's, and ours, by a few grey levels). The
//! order matters because of the rounding between the passes.
//!
//! The `image` crate's resize (f32 weights, no u8 rounding between passes) differs from
//! this by up to a few grey levels; this module matches Pillow exactly on the fixtures of
//! `tests/fixtures/gen_preprocess.py`.

/// A resampling kernel, as Pillow defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Pillow's `BICUBIC`: the cubic convolution kernel with a = −0.5, support 2.
    Bicubic,
    /// Pillow's `BILINEAR`: the triangle kernel, support 1.
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    /// The kernel at `x`, with Pillow's order of operations.
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point bits of the weights: 32 − 8 − 2 (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 22;

/// Per output pixel: the first input index, the number of inputs, and `ksize` weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for input
/// coordinates `in0..in1` of an axis of `in_size` pixels resampled to `out_size`.
fn coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let n = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let fixed = kx * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if kx < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: the accumulator shifted back to 8 bits and clamped.
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The accumulator's start: one half in fixed point, so the shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resample `src`, rows `row0..row0 + rows` of an image `width` pixels wide with
/// `channels` interleaved channels, horizontally to `c.bounds.len()` columns.
fn horizontal(
    src: &[u8],
    width: usize,
    channels: usize,
    row0: usize,
    rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; rows * out_w * channels];
    for y in 0..rows {
        let line = &src[(row0 + y) * width * channels..(row0 + y + 1) * width * channels];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            for ch in 0..channels {
                let mut ss = HALF;
                for (x, &w) in k.iter().enumerate() {
                    // |Σ w| · 255 stays below 2³¹: the kernel's absolute sum is < 1.3.
                    ss += i32::from(line[(xmin + x) * channels + ch]) * w;
                }
                out[(y * out_w + xx) * channels + ch] = clip8(ss);
            }
        }
    }
    out
}

/// Resample `src` (`width` pixels wide) vertically to `c.bounds.len()` rows; bounds are
/// relative to the first row of `src`.
fn vertical(src: &[u8], width: usize, channels: usize, c: &Coeffs) -> Vec<u8> {
    let stride = width * channels;
    let mut out = vec![0u8; c.bounds.len() * stride];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        for i in 0..stride {
            let mut ss = HALF;
            for (y, &w) in k.iter().enumerate() {
                ss += i32::from(src[(ymin + y) * stride + i]) * w;
            }
            out[yy * stride + i] = clip8(ss);
        }
    }
    out
}

/// Pillow's `Image.resize((out_w, out_h), filter)` of an 8-bit image with `channels`
/// interleaved channels (row-major, `width × height`), without premultiplication: each
/// channel is resampled on its own. The caller premultiplies alpha (see
/// [`crate::image::SourceImage`]).
pub fn resize(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), width * height * channels);
    if out_w == 0 || out_h == 0 {
        return Vec::new();
    }
    let need_h = out_w != width;
    let need_v = out_h != height;
    if !need_h && !need_v {
        return src.to_vec();
    }
    let horizontal_first = !(out_w >= width && out_h < height);
    if !horizontal_first {
        let vert = coeffs(height, 0.0, height as f32, out_h, filter);
        let tmp = vertical(src, width, channels, &vert);
        if !need_h {
            return tmp;
        }
        let horiz = coeffs(width, 0.0, width as f32, out_w, filter);
        return horizontal(&tmp, width, channels, 0, out_h, &horiz);
    }
    let mut vert = coeffs(height, 0.0, height as f32, out_h, filter);
    let first = vert.bounds.first().map_or(0, |b| b.0);
    let last = vert.bounds.last().map_or(0, |b| b.0 + b.1);
    if !need_h {
        return vertical(src, width, channels, &vert);
    }
    let horiz = coeffs(width, 0.0, width as f32, out_w, filter);
    let tmp = horizontal(src, width, channels, first, last - first, &horiz);
    if !need_v {
        return tmp;
    }
    for b in &mut vert.bounds {
        b.0 -= first;
    }
    vertical(&tmp, out_w, channels, &vert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (n_in, n_out) in [(97, 48), (61, 224), (300, 48), (5, 3), (3, 5)] {
            let c = coeffs(n_in, 0.0, n_in as f32, n_out, Filter::Bicubic);
            for (i, &(xmin, n)) in c.bounds.iter().enumerate() {
                assert!(xmin + n <= n_in);
                let s: i32 = c.weights[i * c.ksize..i * c.ksize + n].iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i32,
                    "{n_in}->{n_out}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_images_stay_constant_and_identity_copies() {
        let src = vec![77u8; 13 * 7 * 3];
        assert_eq!(
            resize(&src, 13, 7, 3, 5, 11, Filter::Bicubic),
            vec![77u8; 5 * 11 * 3]
        );
        let ramp: Vec<u8> = (0..40).collect();
        assert_eq!(resize(&ramp, 8, 5, 1, 8, 5, Filter::Bicubic), ramp);
    }

    #[test]
    fn empty_sizes_give_empty_images_not_panics() {
        assert!(resize(&[1, 2, 3], 3, 1, 1, 0, 4, Filter::Bicubic).is_empty());
        assert_eq!(resize(&[], 0, 0, 3, 2, 2, Filter::Bicubic), vec![0u8; 12]);
    }

    #[test]
    fn overshoot_clips_to_the_u8_range() {
        // A hard 0/255 edge upscaled with a negative-lobe kernel overshoots; Pillow clamps.
        let src = [0u8, 0, 255, 255];
        let out = resize(&src, 4, 1, 1, 9, 1, Filter::Bicubic);
        assert_eq!(out.first(), Some(&0));
        assert_eq!(out.last(), Some(&255));
        assert!(out.windows(2).all(|w| w[0] <= w[1]), "{out:?}");
    }
}
