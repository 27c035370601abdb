//! *Digit scenes*: image–caption pairs built from real MNIST digits.
//!
//! Each image holds one to three digits, each tinted with a colour, laid out alone,
//! side by side, one above the other, or in a row of three. The caption is generated from
//! the content and the layout ("a red 3 on the left and a 7 on the right", "two digits,
//! a 4 on top and a blue 1 at the bottom"), naming a digit's colour half of the time. Many
//! pairs in a batch are partly alike (same digits, other layout or colour), which is the
//! many-to-many structure RankCLIP's ranking terms exploit.
//!
//! Item `i` of a split is a pure function of `(seed, split, i)`; digits come from the
//! split's own pool of handwriting ([`Digits::pool`]).

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::image::{Image, resize_glyph};
use crate::mnist::{Digits, SIDE};
use crate::{Dataset, Split, mix_seed};

/// Colours a digit may take, with their caption words.
pub const PALETTE: [(&str, [u8; 3]); 5] = [
    ("white", [255, 255, 255]),
    ("red", [255, 64, 64]),
    ("green", [64, 224, 64]),
    ("blue", [80, 128, 255]),
    ("yellow", [255, 232, 48]),
];

/// How the digits of a scene are arranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Single,
    SideBySide,
    Stacked,
    Row,
}

/// Sizes and seed of a digit-scene dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneConfig {
    pub seed: u64,
    /// Side of the square canvas in pixels.
    pub image_size: usize,
    pub train_size: usize,
    pub val_size: usize,
    pub test_size: usize,
}

impl SceneConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.image_size < 24 {
            return Err(format!(
                "image_size must be at least 24 pixels, got {}",
                self.image_size
            ));
        }
        if self.train_size == 0 {
            return Err("train_size must be at least 1".into());
        }
        Ok(())
    }

    pub fn size(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train_size,
            Split::Val => self.val_size,
            Split::Test => self.test_size,
        }
    }
}

/// One scene: the image, its caption, every phrasing of its layout, and the digit
/// labels in reading order.
#[derive(Clone, Debug)]
pub struct SceneItem {
    pub image: Image,
    /// The phrasing drawn for this scene (`captions[k]` for the drawn `k`): what
    /// training reads.
    pub caption: String,
    /// The four phrasings of the same content and layout, in template order: the
    /// several captions per image that multi-caption retrieval is evaluated on.
    pub captions: Vec<String>,
    pub digits: Vec<u8>,
    pub layout: Layout,
}

/// A split of the digit-scene dataset.
#[derive(Clone, Debug)]
pub struct DigitScenes {
    digits: Arc<Digits>,
    pool: Arc<[Vec<usize>; 10]>,
    cfg: SceneConfig,
    split: Split,
}

/// One digit placed in a scene.
struct Placed {
    label: u8,
    glyph: usize,
    colour: usize,
    named_colour: bool,
}

/// A uniform offset in `-j..=j`.
fn jitter(rng: &mut ChaCha8Rng, j: isize) -> isize {
    rng.random_range(-(j as i64)..=j as i64) as isize
}

fn article(phrase: &str) -> &'static str {
    if phrase.starts_with('8') { "an" } else { "a" }
}

impl Placed {
    fn phrase(&self) -> String {
        if self.named_colour {
            format!("{} {}", PALETTE[self.colour].0, self.label)
        } else {
            self.label.to_string()
        }
    }

    fn with_article(&self) -> String {
        let p = self.phrase();
        format!("{} {p}", article(&p))
    }
}

impl DigitScenes {
    pub fn new(digits: Arc<Digits>, cfg: SceneConfig, split: Split) -> Result<Self, String> {
        cfg.validate()?;
        let pool = digits.pool(split);
        if let Some(d) = pool.iter().position(Vec::is_empty) {
            return Err(format!("the {split:?} pool has no image of the digit {d}"));
        }
        Ok(Self {
            digits,
            pool: Arc::new(pool),
            cfg,
            split,
        })
    }

    pub fn config(&self) -> &SceneConfig {
        &self.cfg
    }

    fn rng(&self, index: usize, stream: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(mix_seed(&[
            self.cfg.seed,
            self.split.index(),
            stream,
            index as u64,
        ]))
    }

    fn pick(&self, rng: &mut ChaCha8Rng, label: u8, colour: bool) -> Placed {
        let pool = &self.pool[label as usize];
        Placed {
            label,
            glyph: pool[rng.random_range(0..pool.len())],
            colour: if colour {
                rng.random_range(0..PALETTE.len())
            } else {
                0
            },
            named_colour: colour && rng.random_bool(0.5),
        }
    }

    fn draw(&self, img: &mut Image, d: &Placed, size: usize, x: isize, y: isize) {
        let glyph = resize_glyph(self.digits.glyph(d.glyph), SIDE, size);
        img.draw_glyph(&glyph, size, x, y, PALETTE[d.colour].1);
    }

    /// A single digit of `label` (or a random one), roughly centred, in a random colour:
    /// the images that zero-shot classification is evaluated on.
    pub fn single(&self, index: usize, label: Option<u8>) -> (Image, u8) {
        let mut rng = self.rng(index, 1);
        let label = label.unwrap_or_else(|| rng.random_range(0..10u8));
        let d = self.pick(&mut rng, label, true);
        let mut img = Image::black(self.cfg.image_size, self.cfg.image_size);
        self.draw_single(&mut img, &d, &mut rng);
        (img, label)
    }

    fn draw_single(&self, img: &mut Image, d: &Placed, rng: &mut ChaCha8Rng) {
        let s = self.cfg.image_size as isize;
        let g = (s * 7 / 12) as usize;
        let j = s / 8;
        let base = (s - g as isize) / 2;
        self.draw(img, d, g, base + jitter(rng, j), base + jitter(rng, j));
    }
}

impl Dataset for DigitScenes {
    type Item = SceneItem;

    fn len(&self) -> usize {
        self.cfg.size(self.split)
    }

    fn get(&self, index: usize) -> SceneItem {
        let mut rng = self.rng(index, 0);
        let s = self.cfg.image_size as isize;
        let roll: f64 = rng.random();
        let layout = match roll {
            r if r < 0.4 => Layout::Single,
            r if r < 0.6 => Layout::SideBySide,
            r if r < 0.8 => Layout::Stacked,
            _ => Layout::Row,
        };
        let count = match layout {
            Layout::Single => 1,
            Layout::SideBySide | Layout::Stacked => 2,
            Layout::Row => 3,
        };
        let ds: Vec<Placed> = (0..count)
            .map(|_| {
                let label = rng.random_range(0..10u8);
                self.pick(&mut rng, label, true)
            })
            .collect();
        let mut img = Image::black(self.cfg.image_size, self.cfg.image_size);
        let template = rng.random_range(0..4usize);
        let captions: Vec<String> = match layout {
            Layout::Single => {
                self.draw_single(&mut img, &ds[0], &mut rng);
                vec![
                    ds[0].with_article(),
                    format!("a picture of {}", ds[0].with_article()),
                    format!("the digit {}", ds[0].phrase()),
                    format!("a handwritten {}", ds[0].phrase()),
                ]
            }
            Layout::SideBySide | Layout::Stacked => {
                let g = (s / 2 - 2) as usize;
                let across = (s / 2 - g as isize) / 2;
                let j = s / 6;
                for (k, d) in ds.iter().enumerate() {
                    let along = k as isize * s / 2 + across + jitter(&mut rng, 1);
                    let cross = (s - g as isize) / 2 + jitter(&mut rng, j);
                    let (x, y) = if layout == Layout::SideBySide {
                        (along, cross)
                    } else {
                        (cross, along)
                    };
                    self.draw(&mut img, d, g, x, y);
                }
                let (a, b) = (ds[0].with_article(), ds[1].with_article());
                if layout == Layout::SideBySide {
                    vec![
                        format!("{a} on the left and {b} on the right"),
                        format!("{a} next to {b}"),
                        format!("two digits, {a} and {b}"),
                        format!("{b} to the right of {a}"),
                    ]
                } else {
                    vec![
                        format!("{a} above {b}"),
                        format!("{b} below {a}"),
                        format!("two digits, {a} on top and {b} at the bottom"),
                        format!("{a} over {b}"),
                    ]
                }
            }
            Layout::Row => {
                let g = (s / 3) as usize;
                let j = s / 5;
                for (k, d) in ds.iter().enumerate() {
                    let x = k as isize * g as isize + jitter(&mut rng, 1);
                    let y = (s - g as isize) / 2 + jitter(&mut rng, j);
                    self.draw(&mut img, d, g, x, y);
                }
                let (p, q, r) = (ds[0].phrase(), ds[1].phrase(), ds[2].phrase());
                vec![
                    format!("three digits: {p}, {q} and {r}"),
                    format!(
                        "{}, {} and {} from left to right",
                        ds[0].with_article(),
                        ds[1].with_article(),
                        ds[2].with_article()
                    ),
                    format!("a row of digits: {p} {q} {r}"),
                    format!("{p}, then {q}, then {r}"),
                ]
            }
        };
        SceneItem {
            image: img,
            caption: captions[template].clone(),
            captions,
            digits: ds.iter().map(|d| d.label).collect(),
            layout,
        }
    }
}

/// Zero-shot prompt templates for the digit classes (`{}` is the digit).
pub const DIGIT_TEMPLATES: [&str; 4] = [
    "a {}.",
    "a picture of a {}.",
    "the digit {}.",
    "a handwritten {}.",
];

/// The class prompts for digit `d`, with the right article.
pub fn digit_prompts(d: u8) -> Vec<String> {
    DIGIT_TEMPLATES
        .iter()
        .map(|t| {
            let s = t.replace("{}", &d.to_string());
            if d == 8 {
                s.replacen("a 8", "an 8", 1)
            } else {
                s
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenes(seed: u64, split: Split) -> DigitScenes {
        let digits = Arc::new(Digits::embedded().unwrap());
        let cfg = SceneConfig {
            seed,
            image_size: 48,
            train_size: 100,
            val_size: 10,
            test_size: 10,
        };
        DigitScenes::new(digits, cfg, split).unwrap()
    }

    #[test]
    fn items_are_deterministic_and_seed_dependent() {
        let a = scenes(1, Split::Train);
        let b = scenes(1, Split::Train);
        let c = scenes(2, Split::Train);
        for i in [0, 7, 99] {
            let (x, y) = (a.get(i), b.get(i));
            assert_eq!((x.image.data, x.caption), (y.image.data, y.caption));
        }
        let differs = (0..20).any(|i| a.get(i).caption != c.get(i).caption);
        assert!(differs);
    }

    #[test]
    fn captions_name_the_digits_drawn() {
        let s = scenes(3, Split::Train);
        let mut layouts = std::collections::HashSet::new();
        for i in 0..200 {
            let item = s.get(i);
            layouts.insert(format!("{:?}", item.layout));
            for d in &item.digits {
                assert!(
                    item.caption.contains(&d.to_string()),
                    "{} vs {:?}",
                    item.caption,
                    item.digits
                );
            }
            assert!(
                item.image.data.iter().any(|&v| v > 128),
                "scene {i} is blank"
            );
            assert!(!item.caption.contains("a 8"), "{}", item.caption);
        }
        assert_eq!(layouts.len(), 4);
    }

    #[test]
    fn splits_use_disjoint_handwriting() {
        let digits = Digits::embedded().unwrap();
        let train: std::collections::HashSet<usize> =
            digits.pool(Split::Train).concat().into_iter().collect();
        let test = digits.pool(Split::Test).concat();
        assert!(test.len() > 500 && train.len() > 7000);
        assert!(test.iter().all(|i| !train.contains(i)));
    }

    #[test]
    fn prompts_use_an_before_eight() {
        assert_eq!(digit_prompts(8)[0], "an 8.");
        assert_eq!(digit_prompts(3)[1], "a picture of a 3.");
    }
}
