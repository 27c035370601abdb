//! A plain RGB8 image, the few drawing operations the synthetic datasets need, and
//! CLIP's evaluation transform for image files.

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
    /// Decode a PNG or JPEG file; errors name the file.
    pub fn open(path: &std::path::Path) -> Result<Self, crate::DataError> {
        let img = image::ImageReader::open(path)
            .map_err(|source| crate::DataError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .with_guessed_format()
            .map_err(|source| crate::DataError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .decode()
            .map_err(|e| crate::DataError::Format {
                path: path.to_path_buf(),
                line: None,
                msg: format!("not a readable PNG or JPEG image: {e}"),
            })?
            .to_rgb8();
        let (width, height) = (img.width() as usize, img.height() as usize);
        Ok(Self {
            width,
            height,
            data: img.into_raw(),
        })
    }

    /// CLIP's evaluation transform up to normalisation: resize so that the shorter side
    /// is `size` (bicubic, Catmull–Rom, a = −0.5, as PIL's `BICUBIC`), then crop the
    /// centre `size × size`. Normalisation happens in collation.
    ///
    /// PIL antialiases when shrinking by widening the kernel; the `image` crate does the
    /// same, but rounds differently between its two passes, so pixels can differ from
    /// torchvision's by a few grey levels (documented tolerance: the L2-normalised
    /// embeddings, not the pixels, are what users compare).
    pub fn clip_eval(&self, size: usize) -> Self {
        let (w, h) = (self.width as f64, self.height as f64);
        let scale = size as f64 / w.min(h);
        let (nw, nh) = (
            ((w * scale).round() as u32).max(size as u32),
            ((h * scale).round() as u32).max(size as u32),
        );
        let src =
            image::RgbImage::from_raw(self.width as u32, self.height as u32, self.data.clone())
                .expect("invariant: data holds width·height RGB pixels");
        let resized =
            image::imageops::resize(&src, nw, nh, image::imageops::FilterType::CatmullRom);
        let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
        let cropped =
            image::imageops::crop_imm(&resized, x0, y0, size as u32, size as u32).to_image();
        Self {
            width: size,
            height: size,
            data: cropped.into_raw(),
        }
    }
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
    fn glyphs_clip_and_keep_the_brighter_stroke() {
        let mut img = Image::black(2, 2);
        img.draw_glyph(&[255, 128, 0, 255], 2, 1, 0, [255, 0, 255]);
        img.draw_glyph(&[100; 4], 2, 0, 0, [255, 255, 255]);
        assert_eq!(&img.data[..6], &[100, 100, 100, 255, 100, 255]);
    }
}
