//! Image–caption sources for pre-training: the digit scenes, CSV/TSV lists and
//! webdataset shards (img2dataset's output among them), behind one interface.
//!
//! A [`PairSource`] says how many samples one pass holds, lists the *references* of a
//! pass in order ([`SampleRef`]: an index, or a tar member range) for a seed, a pass
//! number and a rank of a data-parallel group, and loads one reference into a [`Pair`]
//! — or reports it corrupt ([`Loaded::Skip`]) with the reason. Listing touches no pixel
//! (a shard is read header by header, seeking past the contents), so a run that resumes
//! mid-pass replays the references up to its position without decoding anything;
//! [`stream::PairStream`] builds batches from them (shuffle buffer, parallel decoding,
//! skipping and counting, the data position a checkpoint stores).
//!
//! Errors that no skipping can mend — a missing shard, CSV column or image file, a bad
//! CSV line — are [`DataError`]s naming the file (and line, shard or key).

pub mod csv;
pub mod digits;
pub mod stream;
pub mod tools;
pub mod wds;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::augment::TrainTransformConfig;
use crate::image::SourceImage;
use crate::{DataError, mix_seed};

pub use self::csv::{CsvConvention, CsvSource, CsvSourceConfig, PathBase};
pub use self::digits::{DigitsSource, DigitsSourceConfig};
pub use self::stream::{DataPosition, PairStream, Sample, SkipPolicy, SkipStats, eval_pairs};
pub use self::wds::{WdsSource, WdsSourceConfig, expand_shards};

/// One decoded training pair.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The sample's name in messages: a webdataset key, `file:line`, or an index.
    pub key: String,
    pub image: SourceImage,
    pub caption: String,
}

/// A member of a tar shard: its extension (lower-cased, as webdataset groups them) and
/// where its bytes lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub ext: String,
    pub offset: u64,
    pub size: u64,
}

/// Where a sample is, without its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SampleRef {
    /// Item `i` of a random-access source (a digit scene, a CSV row).
    Index(usize),
    /// Adjacent members of shard `shard` that share `key`.
    Tar {
        shard: usize,
        key: String,
        members: Vec<Member>,
    },
    /// The rest of a shard could not be listed (truncated or not a tar); counted as one
    /// skipped sample.
    Broken { shard: usize, reason: String },
}

/// A loaded reference: a pair, or a corrupt sample to skip and count.
#[derive(Clone, Debug)]
pub enum Loaded {
    Pair(Pair),
    Skip { key: String, reason: String },
}

/// This process's part of a data-parallel group: it reads every `world`-th shard (or
/// index) of a pass, starting at `rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sharding {
    pub rank: usize,
    pub world: usize,
}

impl Sharding {
    /// This rank's items of `items`: every `world`-th, starting at `rank`.
    pub fn share<T>(self, items: impl Iterator<Item = T>) -> impl Iterator<Item = T> {
        items.skip(self.rank).step_by(self.world.max(1))
    }
}

impl Default for Sharding {
    fn default() -> Self {
        Self { rank: 0, world: 1 }
    }
}

/// The references of one pass, in order.
pub type RefIter = Box<dyn Iterator<Item = Result<SampleRef, DataError>> + Send>;

/// A source of image–caption pairs.
pub trait PairSource: Send + Sync {
    /// What it reads, for messages and reports (`webdataset: 10 shards in data/cc3m`).
    fn describe(&self) -> String;
    /// Samples in one pass over the whole source (all ranks), as declared: the config,
    /// `sizes.json`, img2dataset's stats, or the row count. Corrupt samples included.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The references of pass `pass` for `sharding`, a pure function of the arguments.
    fn pass(&self, seed: u64, pass: u64, sharding: Sharding) -> Result<RefIter, DataError>;
    /// Every reference in file order (rows, shards in the order listed): what
    /// evaluation and `data check` read.
    fn in_order(&self) -> Result<RefIter, DataError>;
    /// Read and decode one reference. `Err` only for what skipping cannot mend.
    fn load(&self, r: &SampleRef) -> Result<Loaded, DataError>;
    /// Samples held in the seeded shuffle buffer between listing and batching (0: the
    /// pass is already a full permutation).
    fn shuffle_buffer(&self) -> usize {
        0
    }
    /// The training transform of decoded images; `None`: images are used as they are
    /// (they must be the model's size).
    fn transform(&self) -> Option<&ImageTransform> {
        None
    }
}

/// What happens to corrupt samples: skipped and counted, with a stop above a share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorruptPolicy {
    /// Stop the run when more than this share of the samples read were skipped.
    #[serde(default = "default_max_skipped")]
    pub max_skipped: f64,
    /// Refuse images whose header declares more pixels (PIL's `MAX_IMAGE_PIXELS`).
    #[serde(default = "default_max_pixels")]
    pub max_image_pixels: u64,
}

fn default_max_skipped() -> f64 {
    0.01
}
fn default_max_pixels() -> u64 {
    89_478_485
}

impl Default for CorruptPolicy {
    fn default() -> Self {
        Self {
            max_skipped: default_max_skipped(),
            max_image_pixels: default_max_pixels(),
        }
    }
}

/// The training transform of a file source's images, at the model's size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TransformConfig {
    /// torchvision's `RandomResizedCrop` (bicubic) and a horizontal flip; the defaults
    /// are open_clip's training transform (scale 0.9–1, ratio 3/4–4/3, no flip).
    RandomResizedCrop {
        #[serde(default = "default_scale")]
        scale: (f64, f64),
        #[serde(default = "default_ratio")]
        ratio: (f64, f64),
        #[serde(default)]
        hflip: f64,
    },
    /// Resize the shorter side (bicubic) and crop the centre: CLIP's evaluation
    /// transform, which CyCLIP and RankCLIP also train with (no augmentation).
    ResizeCenterCrop,
}

fn default_scale() -> (f64, f64) {
    (0.9, 1.0)
}
fn default_ratio() -> (f64, f64) {
    (3.0 / 4.0, 4.0 / 3.0)
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self::RandomResizedCrop {
            scale: default_scale(),
            ratio: default_ratio(),
            hflip: 0.0,
        }
    }
}

impl TransformConfig {
    pub fn at_size(&self, size: usize) -> ImageTransform {
        match self {
            Self::RandomResizedCrop {
                scale,
                ratio,
                hflip,
            } => ImageTransform::RandomResizedCrop(TrainTransformConfig {
                size,
                scale: *scale,
                ratio: *ratio,
                hflip: *hflip,
            }),
            Self::ResizeCenterCrop => ImageTransform::ResizeCenterCrop(size),
        }
    }
}

/// A training transform ready to apply.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageTransform {
    RandomResizedCrop(TrainTransformConfig),
    ResizeCenterCrop(usize),
}

impl ImageTransform {
    /// The transformed image; `seed` keys the random draws.
    pub fn apply(&self, img: &SourceImage, seed: u64) -> Result<crate::image::Image, DataError> {
        match self {
            Self::RandomResizedCrop(t) => t.apply(img, seed).map(|(out, _)| out),
            Self::ResizeCenterCrop(size) => Ok(img.clip_eval(*size)),
        }
    }

    pub fn validate(&self) -> Result<(), DataError> {
        match self {
            Self::RandomResizedCrop(t) => t.validate(),
            Self::ResizeCenterCrop(_) => Ok(()),
        }
    }
}

/// `[data]` of an experiment: which source, tagged by `source`, with its settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    Digits(DigitsSourceConfig),
    Csv(CsvSourceConfig),
    Webdataset(WdsSourceConfig),
}

impl SourceConfig {
    /// The side of the square images the model takes.
    pub fn image_size(&self) -> usize {
        match self {
            SourceConfig::Digits(c) => c.image_size,
            SourceConfig::Csv(c) => c.image_size,
            SourceConfig::Webdataset(c) => c.image_size,
        }
    }

    /// The corrupt-data policy (the digit scenes have none to skip).
    pub fn corrupt(&self) -> CorruptPolicy {
        match self {
            SourceConfig::Digits(_) => CorruptPolicy::default(),
            SourceConfig::Csv(c) => c.corrupt.clone(),
            SourceConfig::Webdataset(c) => c.corrupt.clone(),
        }
    }

    /// Every problem with the values, by dotted key.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.image_size() < 24 {
            errs.push(format!(
                "data.image_size must be at least 24, got {}",
                self.image_size()
            ));
        }
        let (corrupt, transform) = match self {
            SourceConfig::Digits(d) => {
                errs.extend(d.validate());
                return errs;
            }
            SourceConfig::Csv(c) => (&c.corrupt, &c.transform),
            SourceConfig::Webdataset(w) => {
                errs.extend(w.validate());
                (&w.corrupt, &w.transform)
            }
        };
        if !(0.0..=1.0).contains(&corrupt.max_skipped) {
            errs.push(format!(
                "data.corrupt.max_skipped must be a share in [0, 1], got {}",
                corrupt.max_skipped
            ));
        }
        if corrupt.max_image_pixels == 0 {
            errs.push("data.corrupt.max_image_pixels must be at least 1".into());
        }
        if let Err(e) = transform.at_size(self.image_size()).validate() {
            errs.push(format!("data.transform: {e}"));
        }
        errs
    }

    /// Open the training source (files are checked now: a missing shard, CSV file or
    /// column is an error here, not at step 1000).
    pub fn open_train(&self, seed: u64) -> Result<Arc<dyn PairSource>, DataError> {
        Ok(match self {
            SourceConfig::Digits(c) => Arc::new(DigitsSource::open(c, seed, crate::Split::Train)?),
            SourceConfig::Csv(c) => Arc::new(CsvSource::open(c, &c.path)?),
            SourceConfig::Webdataset(c) => Arc::new(WdsSource::open(c, &c.shards)?),
        })
    }

    /// The held-out source of a file-based config (`test_path` / `test_shards`), if any.
    pub fn open_test(&self) -> Result<Option<Arc<dyn PairSource>>, DataError> {
        Ok(match self {
            SourceConfig::Digits(_) => None,
            SourceConfig::Csv(c) => match &c.test_path {
                Some(p) => Some(Arc::new(CsvSource::open(c, p)?) as Arc<dyn PairSource>),
                None => None,
            },
            SourceConfig::Webdataset(c) => match &c.test_shards {
                Some(s) => Some(Arc::new(WdsSource::open_held_out(c, s)?) as Arc<dyn PairSource>),
                None => None,
            },
        })
    }
}

/// The seed of the training transform of the `ordinal`-th reference of a pass on
/// `rank`.
pub fn transform_seed(seed: u64, pass: u64, rank: usize, ordinal: u64) -> u64 {
    mix_seed(&[seed, 0x7A4F, pass, rank as u64, ordinal])
}

/// A caption from raw bytes: valid UTF-8 with something besides white space.
pub(crate) fn caption_from_bytes(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("the caption is not UTF-8 ({e})"))?;
    if text.trim().is_empty() {
        return Err("the caption is empty".into());
    }
    Ok(text.to_string())
}
