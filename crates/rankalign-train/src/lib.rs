//! Training and evaluation for rankalign.
//!
//! - [`config`]: the TOML experiment file (data, model, optimiser, schedule, variants),
//!   parsed strictly: unknown keys and bad values are errors that name them;
//! - [`optim`]: AdamW with parameter groups and moments that are saved and restored;
//! - [`schedule`]: linear warm-up then cosine decay;
//! - [`checkpoint`]: atomic checkpoints (model, optimiser, step) and exact resume;
//! - [`step`]: one step's loss and gradients, in one piece or over micro-batches
//!   (exact, in parallel, optionally in bounded memory);
//! - [`dist`]: data parallel across processes: the launch variables of torchrun, SLURM
//!   and OpenMPI, and the collectives (gather rows, sum) behind a trait, over TCP on CPU;
//! - [`trainer`]: the loop for one variant: prefetched batches, loss, step, clamp,
//!   NaN guard, metrics JSONL, progress;
//! - [`eval`]: zero-shot classification, retrieval, alignment and uniformity;
//! - [`experiment`]: every variant of a config, side by side, and the report;
//! - [`ordinal`]: L2RCLIP and its baselines (zero-shot, CoOp, OrdinalCLIP, L2RCLIP-I)
//!   on ordinal tasks, over seeds and folds, with MAE / accuracy / OS and heatmaps;
//! - [`report`]: `report.md` and the loss-curve PNG;
//! - [`export`]: trained models out, in the Hugging Face `CLIPModel` layout (ViT) or
//!   open_clip's (ResNet), and their configs translated both ways;
//! - [`pretrained`]: pretrained weights in, from an HF or open_clip directory, a
//!   `.safetensors` / `.bin` / `.pt` file, or a hub name in the local Hugging Face cache;
//! - [`memory`]: a counting allocator, for peak-memory figures in benchmarks and tests;
//! - [`embed`]: L2-normalised image and text embeddings of such a model, to a file.
//!
//! Load a CLIP from any supported checkpoint in one call, and evaluate it:
//!
//! ```
//! use std::collections::HashMap;
//! use candle_core::{DType, Device};
//! use rankalign_train::Clip;
//! use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};
//! # fn main() -> rankalign_train::Result<()> {
//! // A model in the Hugging Face layout (here a freshly initialised one).
//! let dir = std::env::temp_dir().join(format!("rankalign-doc-clip-{}", std::process::id()));
//! let cfg = ClipConfig::tiny();
//! let vm = SeededVarMap::new(3);
//! ClipModel::new(&cfg, vm.var_builder(DType::F32, &Device::Cpu))?;
//! let weights: HashMap<_, _> =
//!     vm.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
//! rankalign_train::export::export_hf(&cfg, &weights, &dir)?;
//!
//! let clip = Clip::load(&dir, &Device::Cpu)?; // also an open_clip dir, a .pt/.bin/.safetensors, a hub name
//! let text = clip.encode_texts(&["a red 3 on the left and a 7 on the right", "the digit 5"])?;
//! let pixels = candle_core::Tensor::zeros((1, 3, 48, 48), DType::F32, &Device::Cpu)?;
//! let image = clip.model.encode_image(&pixels)?;
//! let logits = clip.model.logits(&image, &text)?;
//! assert_eq!(logits.dims(), &[1, 2]);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod embed;
pub mod eval;
pub mod experiment;
pub mod export;
pub mod memory;
pub mod optim;
pub mod ordinal;
pub mod pretrained;
pub mod report;
pub mod schedule;
pub mod step;
pub mod text_tower;
pub mod trainer;

use std::path::PathBuf;

pub use config::ExperimentConfig;
pub use experiment::{ExperimentOutcome, RunOptions, run_experiment};
pub use pretrained::Clip;
pub use rankalign_data as data;
pub use rankalign_kernels as kernels;
pub use rankalign_losses as losses;
pub use rankalign_models as models;

/// What can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error(transparent)]
    Data(#[from] rankalign_data::DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "training diverged at step {step}: the loss is {loss}; the last good checkpoint is kept{}",
        checkpoint.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default()
    )]
    Diverged {
        step: usize,
        loss: f64,
        checkpoint: Option<PathBuf>,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// `std::io::Error` with the path it concerns.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
