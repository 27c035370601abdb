//! A plain RGB8 image, the few drawing operations the synthetic datasets need, and
//! CLIP's image transforms with PIL's numbers: [`SourceImage`] keeps a decoded file in
//! its own mode (grey, alpha) as PIL does, [`SourceImage::clip_eval`] is open_clip's
//! evaluation transform up to normalisation, and [`SourceImage::resized_crop`] the
//! geometry of its training transform (the random boxes are drawn in
//! [`crate::augment`]). Resampling is Pillow's, exactly ([`crate::resample`]).

use std::path::Path;

use crate::DataError;
use crate::resample::Filter;

/// Row-major RGB8 pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn black(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height * 3],
        }
    }

    /// Draw a grey glyph `(size × size)` tinted with `colour` at `(x0, y0)`, keeping the
    /// brighter value where strokes overlap. Parts outside the canvas are clipped.
    pub fn draw_glyph(&mut self, glyph: &[u8], size: usize, x0: isize, y0: isize, colour: [u8; 3]) {
        for gy in 0..size {
            for gx in 0..size {
                let (x, y) = (x0 + gx as isize, y0 + gy as isize);
                if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
                    continue;
                }
                let v = u16::from(glyph[gy * size + gx]);
                let at = (y as usize * self.width + x as usize) * 3;
                for (px, &tint) in self.data[at..at + 3].iter_mut().zip(&colour) {
                    *px = (*px).max((v * u16::from(tint) / 255) as u8);
                }
            }
        }
    }
}

impl Image {
    /// Decode a PNG or JPEG file to RGB (alpha dropped, grey replicated: PIL's
    /// `convert("RGB")`); errors name the file.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        Ok(SourceImage::open(path)?.to_rgb())
    }

    /// CLIP's evaluation transform up to normalisation (normalisation happens in
    /// collation); see [`SourceImage::clip_eval`], which this equals for an RGB source.
    /// For files, `SourceImage::open(path)?.clip_eval(size)` also follows PIL for grey
    /// and transparent images.
    pub fn clip_eval(&self, size: usize) -> Self {
        clip_eval(&self.data, self.width, self.height, PixelMode::Rgb, size)
    }

    /// The image mirrored left to right (torchvision's `hflip`).
    pub fn hflip(&self) -> Self {
        let mut data = Vec::with_capacity(self.data.len());
        for row in self.data.chunks_exact(self.width * 3) {
            for px in row.chunks_exact(3).rev() {
                data.extend_from_slice(px);
            }
        }
        Self {
            width: self.width,
            height: self.height,
            data,
        }
    }
}

/// How the channels of a [`SourceImage`] are laid out: PIL's modes `L`, `LA`, `RGB`,
/// `RGBA`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelMode {
    L,
    La,
    Rgb,
    Rgba,
}

impl PixelMode {
    pub fn channels(self) -> usize {
        match self {
            PixelMode::L => 1,
            PixelMode::La => 2,
            PixelMode::Rgb => 3,
            PixelMode::Rgba => 4,
        }
    }

    fn has_alpha(self) -> bool {
        matches!(self, PixelMode::La | PixelMode::Rgba)
    }
}

/// A decoded image in its own mode, as PIL keeps a file until `convert("RGB")`.
///
/// open_clip resizes and crops *before* converting to RGB, so what a transform does to
/// a grey or transparent image depends on the mode: grey images are resampled as one
/// channel (the same numbers as three equal channels), and images with alpha are
/// resampled premultiplied (Pillow converts `RGBA` to `RGBa`, resizes, and converts
/// back), which keeps the colour of fully transparent pixels from bleeding into their
/// neighbours. The conversions round exactly as Pillow's.
///
/// Not reproduced: PIL opens palette PNGs as mode `P` and resizes those with nearest
/// neighbour (the `image` crate expands the palette, so we resample them bicubically);
/// a PNG whose `tRNS` chunk marks one RGB colour transparent is `RGB` in PIL and
/// `RGBA` here; 16-bit grey PNGs are `I;16` in PIL, whose conversion to RGB saturates,
/// while we keep the high byte (as PIL does for 16-bit RGB); CMYK JPEGs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceImage {
    pub width: usize,
    pub height: usize,
    pub mode: PixelMode,
    /// Row-major, `mode.channels()` interleaved channels.
    pub data: Vec<u8>,
}

impl From<Image> for SourceImage {
    fn from(img: Image) -> Self {
        Self {
            width: img.width,
            height: img.height,
            mode: PixelMode::Rgb,
            data: img.data,
        }
    }
}

/// Whether a JPEG has an end-of-image marker (`FF D9`) after its last start-of-scan
/// (`FF DA`). Entropy-coded data stuffs every `FF` byte (`FF 00`), so neither marker
/// can appear inside a scan; an embedded thumbnail's markers come before the main scan.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// Pillow's `MULDIV255`: `a·b / 255` rounded, the way its premultiplication computes it.
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

impl SourceImage {
    /// Decode a PNG or JPEG file, keeping grey and alpha channels; errors name the
    /// file. 16-bit images keep the high byte of each sample (PIL's `RGB;16B` reading).
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(&bytes, None).map_err(|msg| DataError::Format {
            path: path.to_path_buf(),
            line: None,
            msg,
        })
    }

    /// Decode PNG, JPEG or WebP bytes as [`SourceImage::open`] does. With `max_pixels`,
    /// an image whose header declares more pixels is refused before any pixel is
    /// decoded (a decompression bomb: PIL's `MAX_IMAGE_PIXELS`). The error says why.
    pub fn decode(bytes: &[u8], max_pixels: Option<u64>) -> Result<Self, String> {
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| format!("cannot read the image header: {e}"))
        };
        if bytes.is_empty() {
            return Err("empty image file (0 bytes)".into());
        }
        let format = reader()?.format();
        if format.is_none() {
            return Err("not a readable PNG, JPEG or WebP image (unrecognised signature)".into());
        }
        // zune-jpeg fills a truncated scan with grey where PIL raises "image file is
        // truncated"; refuse a JPEG whose last scan has no end-of-image marker after it.
        if format == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
            return Err("truncated JPEG: no end-of-image marker after the last scan".into());
        }
        if let Some(limit) = max_pixels {
            let (w, h) = reader()?
                .into_dimensions()
                .map_err(|e| format!("not a readable PNG, JPEG or WebP image: {e}"))?;
            let pixels = u64::from(w) * u64::from(h);
            if pixels > limit {
                return Err(format!(
                    "decompression bomb: the header declares {w}×{h} = {pixels} pixels, above the limit of {limit}"
                ));
            }
        }
        let img = reader()?
            .decode()
            .map_err(|e| format!("not a readable PNG, JPEG or WebP image: {e}"))?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        let high = |v: &[u16]| v.iter().map(|&x| (x >> 8) as u8).collect::<Vec<u8>>();
        let (mode, data) = match img {
            image::DynamicImage::ImageLuma8(i) => (PixelMode::L, i.into_raw()),
            image::DynamicImage::ImageLumaA8(i) => (PixelMode::La, i.into_raw()),
            image::DynamicImage::ImageRgb8(i) => (PixelMode::Rgb, i.into_raw()),
            image::DynamicImage::ImageRgba8(i) => (PixelMode::Rgba, i.into_raw()),
            image::DynamicImage::ImageLuma16(i) => (PixelMode::L, high(i.as_raw())),
            image::DynamicImage::ImageLumaA16(i) => (PixelMode::La, high(i.as_raw())),
            image::DynamicImage::ImageRgb16(i) => (PixelMode::Rgb, high(i.as_raw())),
            image::DynamicImage::ImageRgba16(i) => (PixelMode::Rgba, high(i.as_raw())),
            other if other.color().has_alpha() => (PixelMode::Rgba, other.to_rgba8().into_raw()),
            other => (PixelMode::Rgb, other.to_rgb8().into_raw()),
        };
        Ok(Self {
            width,
            height,
            mode,
            data,
        })
    }

    /// PIL's `convert("RGB")`: grey replicated, alpha dropped (not composited).
    pub fn to_rgb(&self) -> Image {
        let data = match self.mode {
            PixelMode::Rgb => self.data.clone(),
            PixelMode::L => self.data.iter().flat_map(|&l| [l, l, l]).collect(),
            PixelMode::La => self
                .data
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0]])
                .collect(),
            PixelMode::Rgba => self
                .data
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        };
        Image {
            width: self.width,
            height: self.height,
            data,
        }
    }

    /// PIL's `Image.resize((width, height), BICUBIC)`, premultiplied when there is an
    /// alpha channel.
    pub fn resize(&self, width: usize, height: usize) -> Self {
        resize_mode(
            &self.data,
            self.width,
            self.height,
            self.mode,
            width,
            height,
        )
    }

    /// The pixels of `rect` (PIL's `crop`, inside the image); an error if it does not fit.
    pub fn crop(&self, rect: CropBox) -> Result<Self, DataError> {
        if rect.width == 0
            || rect.height == 0
            || rect.left + rect.width > self.width
            || rect.top + rect.height > self.height
        {
            return Err(DataError::Invalid(format!(
                "crop {rect:?} does not fit in a {}×{} image",
                self.width, self.height
            )));
        }
        Ok(crop(&self.data, self.width, self.mode, rect))
    }

    /// CLIP's evaluation transform up to normalisation, as torchvision and open_clip do
    /// it on a PIL image: `Resize(size, BICUBIC)` (the shorter side becomes `size`, the
    /// longer `⌊size · long / short⌋`), `CenterCrop(size)` (offsets rounded half to
    /// even, as Python's `round`), then `convert("RGB")`. Grey levels equal Pillow's
    /// (see [`crate::resample`]).
    pub fn clip_eval(&self, size: usize) -> Image {
        clip_eval(&self.data, self.width, self.height, self.mode, size)
    }

    /// torchvision's `resized_crop(img, top, left, height, width, [size, size], BICUBIC)`
    /// on a PIL image, then `convert("RGB")`.
    pub fn resized_crop(&self, rect: CropBox, size: usize) -> Result<Image, DataError> {
        Ok(self.crop(rect)?.resize(size, size).to_rgb())
    }
}

/// A rectangle of pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

fn crop(data: &[u8], width: usize, mode: PixelMode, r: CropBox) -> SourceImage {
    let ch = mode.channels();
    let mut out = Vec::with_capacity(r.width * r.height * ch);
    for y in r.top..r.top + r.height {
        let row = (y * width + r.left) * ch;
        out.extend_from_slice(&data[row..row + r.width * ch]);
    }
    SourceImage {
        width: r.width,
        height: r.height,
        mode,
        data: out,
    }
}

/// Pillow's resize of an image in `mode`: `LA`/`RGBA` go through `La`/`RGBa`
/// (colour premultiplied by alpha, [`muldiv255`]) and come back dividing by the
/// resampled alpha (`255·c / a`, truncated and clamped; left alone where alpha is 0 or
/// 255), exactly as Pillow's `lA2la`/`la2lA` and `rgbA2rgba`/`rgba2rgbA`.
fn resize_mode(
    data: &[u8],
    width: usize,
    height: usize,
    mode: PixelMode,
    out_w: usize,
    out_h: usize,
) -> SourceImage {
    let ch = mode.channels();
    let same = out_w == width && out_h == height;
    let out = if same {
        data.to_vec()
    } else if mode.has_alpha() {
        let mut pre = data.to_vec();
        for px in pre.chunks_exact_mut(ch) {
            let a = px[ch - 1];
            for c in &mut px[..ch - 1] {
                *c = muldiv255(*c, a);
            }
        }
        let mut out =
            crate::resample::resize(&pre, width, height, ch, out_w, out_h, Filter::Bicubic);
        for px in out.chunks_exact_mut(ch) {
            let a = u32::from(px[ch - 1]);
            if a != 0 && a != 255 {
                for c in &mut px[..ch - 1] {
                    *c = (255 * u32::from(*c) / a).min(255) as u8;
                }
            }
        }
        out
    } else {
        crate::resample::resize(data, width, height, ch, out_w, out_h, Filter::Bicubic)
    };
    SourceImage {
        width: out_w,
        height: out_h,
        mode,
        data: out,
    }
}

/// torchvision's output size for `Resize(size)` (an int): the shorter side becomes
/// `size`, the longer `int(size · long / short)` (Python's float division, truncated).
pub fn shortest_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // `max(size)` only matters for an empty image, which then resizes to black.
    let new_long = ((size as f64 * long as f64 / short.max(1) as f64) as usize).max(size);
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

fn clip_eval(data: &[u8], width: usize, height: usize, mode: PixelMode, size: usize) -> Image {
    let (nw, nh) = shortest_side_size(width, height, size);
    let resized = resize_mode(data, width, height, mode, nw, nh);
    // torchvision's center_crop: int(round((h - size) / 2.0)), Python's round half to even.
    let offset = |n: usize| ((n - size) as f64 / 2.0).round_ties_even() as usize;
    let rect = CropBox {
        top: offset(nh),
        left: offset(nw),
        height: size,
        width: size,
    };
    crop(&resized.data, nw, mode, rect).to_rgb()
}

/// Resize a square grey glyph `(src × src)` to `(dst × dst)` by area averaging (each
/// output pixel is the mean of the source area it covers), which keeps thin strokes
/// visible when shrinking.
pub fn resize_glyph(glyph: &[u8], src: usize, dst: usize) -> Vec<u8> {
    if src == dst {
        return glyph.to_vec();
    }
    let scale = src as f32 / dst as f32;
    let mut out = vec![0u8; dst * dst];
    for oy in 0..dst {
        let (y0, y1) = (oy as f32 * scale, (oy + 1) as f32 * scale);
        for ox in 0..dst {
            let (x0, x1) = (ox as f32 * scale, (ox + 1) as f32 * scale);
            let (mut acc, mut area) = (0f32, 0f32);
            let mut sy = y0.floor() as usize;
            while (sy as f32) < y1 && sy < src {
                let hy = (y1.min(sy as f32 + 1.0) - y0.max(sy as f32)).max(0.0);
                let mut sx = x0.floor() as usize;
                while (sx as f32) < x1 && sx < src {
                    let wx = (x1.min(sx as f32 + 1.0) - x0.max(sx as f32)).max(0.0);
                    acc += wx * hy * f32::from(glyph[sy * src + sx]);
                    area += wx * hy;
                    sx += 1;
                }
                sy += 1;
            }
            out[oy * dst + ox] = (acc / area.max(1e-6)).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_keeps_mean() {
        let glyph: Vec<u8> = (0..16).map(|i| (i * 16) as u8).collect();
        let out = resize_glyph(&glyph, 4, 2);
        // Each output pixel averages a 2×2 block.
        assert_eq!(out, vec![40, 72, 168, 200]);
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        assert_eq!(Image::black(0, 0).clip_eval(4), Image::black(4, 4));
        assert_eq!(Image::black(5, 3).clip_eval(0).data.len(), 0);
        assert_eq!(shortest_side_size(97, 61, 48), (76, 48));
        assert_eq!(shortest_side_size(61, 97, 224), (224, 356));
    }

    #[test]
    fn glyphs_clip_and_keep_the_brighter_stroke() {
        let mut img = Image::black(2, 2);
        img.draw_glyph(&[255, 128, 0, 255], 2, 1, 0, [255, 0, 255]);
        img.draw_glyph(&[100; 4], 2, 0, 0, [255, 255, 255]);
        assert_eq!(&img.data[..6], &[100, 100, 100, 255, 100, 255]);
    }
}
