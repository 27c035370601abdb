//! Tensor-free datasets and the one place where items become tensors.
//!
//! - [`mnist`]: real MNIST digits from the IDX files under `data/mnist/` (embedded);
//! - [`scenes`]: *digit scenes*, image–caption pairs of 1–3 coloured digits with
//!   captions generated from content and layout, many of them partly alike;
//! - [`ordinal`]: *ordinal digits*, images whose rank is the digit value or the count
//!   of digits;
//! - [`tokenize`]: CLIP's BPE tokenizer through the `tokenizers` crate;
//! - [`wordpiece`]: a BERT WordPiece tokenizer from a `tokenizer.json` (MiniLM text
//!   tower) and the [`Tokenize`] trait collation takes;
//! - [`lists`]: parsers for the real ordinal benchmarks' data lists (MORPH II, CLAP2015,
//!   Adience, HCI, CrowdBeauty, OrdinalCLIP's format) and raw label → rank mapping;
//! - [`protocols`]: seeded index sampling for k-fold, per-class splits, few-shot and
//!   distribution shift;
//! - [`image`], [`resample`], [`augment`]: decoding, CLIP's evaluation transform and
//!   the training crops with Pillow's exact resampling (torchvision/open_clip parity);
//! - [`batch`]: collation into tensors (CLIP normalisation, padded token ids, EOT indices);
//! - [`loader`]: deterministic batches by step, assembled ahead of time on a rayon pool;
//! - [`benchmark`]: evaluation sets as the field's tools read them (ImageFolder,
//!   CLIP_benchmark's webdataset layouts, label and caption CSVs, COCO captions) and
//!   the built-in zero-shot class names and templates;
//! - [`source`]: pre-training pairs from the digit scenes, CSV/TSV lists or webdataset
//!   shards behind one [`PairSource`] interface, streamed into batches that resume
//!   exactly mid-pass, with corrupt samples skipped and counted.
//!
//! Every item is a pure function of `(seed, split, index)`, so datasets need no state,
//! batches can be built in any order or in parallel, and a resumed run sees exactly the
//! batches an uninterrupted one would. Architecture invariant: no model, loss or
//! training code here; tensors appear only in [`batch`].
//!
//! ```
//! use std::sync::Arc;
//! use rankalign_data::benchmark::ClassificationData;
//! use rankalign_data::source::DigitsSourceConfig;
//! use rankalign_data::source::tools::{EvalExportFormat, export_eval_digits};
//! use rankalign_data::{ClipTokenizer, Split, collate_texts, preprocess_image};
//! # fn main() -> Result<(), rankalign_data::DataError> {
//! // Write 20 test digits as an ImageFolder, then read it back as torchvision would.
//! let cfg = DigitsSourceConfig { image_size: 48, train_size: 1, val_size: None, test_size: 20,
//!                                mnist_images: None, mnist_labels: None };
//! let scenes = cfg.split(Arc::new(cfg.digits()?), 1, Split::Test)?;
//! let dir = std::env::temp_dir().join(format!("rankalign-doc-{}", std::process::id()));
//! export_eval_digits(&scenes, 20, EvalExportFormat::ImageFolder, &dir, "test", 64)?;
//! let data = ClassificationData::parse_spec(&format!("imagefolder:{}", dir.display()), "test")
//!     .map_err(rankalign_data::DataError::Invalid)?;
//! let set = data.open(None)?;
//! assert_eq!((set.len(), set.num_classes), (20, 10));
//! // An image file to a normalised (1, 3, 224, 224) tensor, CLIP's evaluation transform.
//! let rankalign_data::benchmark::ImageRef::File(first) = &set.images[0] else { unreachable!() };
//! let pixels = preprocess_image(first, 224, &candle_core::Device::Cpu)?;
//! assert_eq!(pixels.dims(), &[1, 3, 224, 224]);
//! // Texts to padded ids and the flat EOT positions the text tower reads.
//! let tok = ClipTokenizer::new(77)?;
//! let (ids, eot) = collate_texts(&["a photo of a 3.", "a 7"], &tok, &candle_core::Device::Cpu)?;
//! assert_eq!(ids.dims()[0], 2);
//! # let _ = (eot, std::fs::remove_dir_all(&dir));
//! # Ok(())
//! # }
//! ```

pub mod augment;
pub mod batch;
pub mod benchmark;
pub mod image;
pub mod lists;
pub mod loader;
pub mod mnist;
pub mod ordinal;
pub mod protocols;
pub mod resample;
pub mod scenes;
pub mod source;
pub mod tokenize;
pub mod wordpiece;

use std::path::PathBuf;

pub use augment::TrainTransformConfig;
pub use batch::{
    Batch, CLIP_MEAN, CLIP_STD, collate_images, collate_pairs, collate_texts, preprocess_image,
};
pub use image::{CropBox, Image, PixelMode, SourceImage};
pub use lists::{LabelRange, ListEntry};
pub use loader::{BatchPlan, Prefetcher};
pub use mnist::Digits;
pub use ordinal::{OrdinalDigits, OrdinalTask};
pub use protocols::{Fold, SplitIndices};
pub use scenes::{DigitScenes, SceneConfig, SceneItem};
pub use source::{
    CorruptPolicy, DataPosition, PairSource, PairStream, Sharding, SkipPolicy, SkipStats,
    SourceConfig,
};
pub use tokenize::ClipTokenizer;
pub use wordpiece::{TextTokenizer, Tokenize, WordPieceTokenizer};

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn index(self) -> u64 {
        match self {
            Split::Train => 0,
            Split::Val => 1,
            Split::Test => 2,
        }
    }
}

/// A random-access collection of items.
pub trait Dataset: Send + Sync {
    type Item: Send;
    fn len(&self) -> usize;
    fn get(&self, index: usize) -> Self::Item;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What went wrong reading or preparing data. File errors name the file (and line).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Format {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A 64-bit mix of several words (SplitMix64 finaliser), for per-item seeds.
pub fn mix_seed(words: &[u64]) -> u64 {
    words.iter().fold(0x9E37_79B9_7F4A_7C15u64, |acc, &w| {
        let mut z = acc
            ^ w.wrapping_add(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(acc << 6)
                .wrapping_add(acc >> 2);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}
