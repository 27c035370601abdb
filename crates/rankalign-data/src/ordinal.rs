//! *Ordinal digits*: images whose label has a true order, for ordinal regression
//! (L2RCLIP and its baselines).
//!
//! - [`OrdinalTask::DigitValue`]: one digit; the rank is its value 0–9.
//! - [`OrdinalTask::DigitCount`]: one to four white digits in the cells of a 2×2 grid;
//!   the rank is the count minus one (0–3).

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::image::{Image, resize_glyph};
use crate::mnist::{Digits, SIDE};
use crate::scenes::{DigitScenes, SceneConfig};
use crate::{Dataset, Split, mix_seed};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrdinalTask {
    DigitValue,
    DigitCount,
}

impl OrdinalTask {
    pub fn num_ranks(self) -> usize {
        match self {
            OrdinalTask::DigitValue => 10,
            OrdinalTask::DigitCount => 4,
        }
    }
}

/// A split of an ordinal-digits task; items are `(image, rank)`.
#[derive(Clone, Debug)]
pub struct OrdinalDigits {
    scenes: DigitScenes,
    digits: Arc<Digits>,
    pool: Arc<[Vec<usize>; 10]>,
    task: OrdinalTask,
    seed: u64,
    split: Split,
}

impl OrdinalDigits {
    pub fn new(
        digits: Arc<Digits>,
        cfg: SceneConfig,
        split: Split,
        task: OrdinalTask,
    ) -> Result<Self, String> {
        let pool = Arc::new(digits.pool(split));
        let seed = cfg.seed;
        let scenes = DigitScenes::new(digits.clone(), cfg, split)?;
        Ok(Self {
            scenes,
            digits,
            pool,
            task,
            seed,
            split,
        })
    }

    pub fn task(&self) -> OrdinalTask {
        self.task
    }
}

impl Dataset for OrdinalDigits {
    type Item = (Image, u32);

    fn len(&self) -> usize {
        self.scenes.len()
    }

    fn get(&self, index: usize) -> (Image, u32) {
        match self.task {
            OrdinalTask::DigitValue => {
                let (img, label) = self.scenes.single(index, None);
                (img, u32::from(label))
            }
            OrdinalTask::DigitCount => {
                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[
                    self.seed,
                    self.split.index(),
                    2,
                    index as u64,
                ]));
                let s = self.scenes.config().image_size;
                let count = rng.random_range(1..=4usize);
                let mut cells = [0usize, 1, 2, 3];
                cells.shuffle(&mut rng);
                let g = s / 2 - 4;
                let mut img = Image::black(s, s);
                for &cell in &cells[..count] {
                    let label = rng.random_range(0..10usize);
                    let glyph_index = self.pool[label][rng.random_range(0..self.pool[label].len())];
                    let glyph = resize_glyph(self.digits.glyph(glyph_index), SIDE, g);
                    let x = (cell % 2) * s / 2 + 2 + rng.random_range(0..=2);
                    let y = (cell / 2) * s / 2 + 2 + rng.random_range(0..=2);
                    img.draw_glyph(&glyph, g, x as isize, y as isize, [255, 255, 255]);
                }
                (img, count as u32 - 1)
            }
        }
    }
}
