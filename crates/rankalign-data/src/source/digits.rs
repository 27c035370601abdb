//! The digit scenes ([`crate::scenes`]) as a [`PairSource`]: random access, so a pass
//! is one seeded permutation of the indices (the order [`crate::BatchPlan`] gives).

use std::path::PathBuf;
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Loaded, Pair, PairSource, RefIter, SampleRef, Sharding};
use crate::image::SourceImage;
use crate::scenes::{DigitScenes, SceneConfig};
use crate::{DataError, Dataset, Digits, Split, mix_seed};

/// `[data] source = "digits"`: generated scenes of real MNIST digits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsSourceConfig {
    pub image_size: usize,
    pub train_size: usize,
    /// Validation scenes (held-out handwriting of the validation pool): the
    /// validation loss is computed on them each epoch. Unset or 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_size: Option<usize>,
    pub test_size: usize,
    /// MNIST IDX files to use instead of the embedded digits (both or neither).
    #[serde(default)]
    pub mnist_images: Option<PathBuf>,
    #[serde(default)]
    pub mnist_labels: Option<PathBuf>,
}

impl DigitsSourceConfig {
    pub fn scenes(&self, seed: u64) -> SceneConfig {
        SceneConfig {
            seed,
            image_size: self.image_size,
            train_size: self.train_size,
            val_size: self.val_size.unwrap_or(0),
            test_size: self.test_size,
        }
    }

    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.train_size == 0 {
            errs.push("data.train_size must be at least 1".into());
        }
        if self.mnist_images.is_some() != self.mnist_labels.is_some() {
            errs.push("data.mnist_images and data.mnist_labels go together".into());
        }
        errs
    }

    /// The MNIST digits this config names (the embedded ones by default).
    pub fn digits(&self) -> Result<Digits, DataError> {
        match (&self.mnist_images, &self.mnist_labels) {
            (Some(i), Some(l)) => Digits::load(i, l),
            _ => Digits::embedded(),
        }
    }

    /// A split of the scenes.
    pub fn split(
        &self,
        digits: Arc<Digits>,
        seed: u64,
        split: Split,
    ) -> Result<DigitScenes, DataError> {
        DigitScenes::new(digits, self.scenes(seed), split).map_err(DataError::Invalid)
    }
}

/// One split of the digit scenes.
#[derive(Clone, Debug)]
pub struct DigitsSource {
    scenes: DigitScenes,
}

impl DigitsSource {
    pub fn open(cfg: &DigitsSourceConfig, seed: u64, split: Split) -> Result<Self, DataError> {
        let digits = Arc::new(cfg.digits()?);
        Ok(Self::new(cfg.split(digits, seed, split)?))
    }

    pub fn new(scenes: DigitScenes) -> Self {
        Self { scenes }
    }
}

/// The indices `0..n` in the order of pass `pass`, then this rank's every `world`-th.
pub(crate) fn permuted(n: usize, seed: u64, pass: u64, sharding: Sharding) -> RefIter {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, 0xE90C, pass]));
    order.shuffle(&mut rng);
    Box::new(
        sharding
            .share(order.into_iter())
            .map(|i| Ok(SampleRef::Index(i))),
    )
}

/// The indices `0..n` in order.
pub(crate) fn in_order(n: usize) -> RefIter {
    Box::new((0..n).map(|i| Ok(SampleRef::Index(i))))
}

impl PairSource for DigitsSource {
    fn describe(&self) -> String {
        format!(
            "digit scenes: {} pairs at {} px",
            self.scenes.len(),
            self.scenes.config().image_size
        )
    }

    fn len(&self) -> usize {
        self.scenes.len()
    }

    fn pass(&self, seed: u64, pass: u64, sharding: Sharding) -> Result<RefIter, DataError> {
        Ok(permuted(self.scenes.len(), seed, pass, sharding))
    }

    fn in_order(&self) -> Result<RefIter, DataError> {
        Ok(in_order(self.scenes.len()))
    }

    fn load(&self, r: &SampleRef) -> Result<Loaded, DataError> {
        match r {
            SampleRef::Index(i) if *i < self.scenes.len() => {
                let item = self.scenes.get(*i);
                Ok(Loaded::Pair(Pair {
                    key: i.to_string(),
                    image: SourceImage::from(item.image),
                    caption: item.caption,
                }))
            }
            other => Err(DataError::Invalid(format!(
                "the digit scenes have no sample {other:?}"
            ))),
        }
    }
}
