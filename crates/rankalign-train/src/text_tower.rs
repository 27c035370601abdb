//! Choosing the text tower of an experiment (`[model] text_tower = { kind = … }`):
//! CLIP's own (the default) or the pretrained, frozen all-MiniLM-L6-v2 from a directory
//! (`cargo xtask fetch minilm` puts one in `~/.cache/rankalign/minilm/model`). This is
//! where its files are read: `config.json`, `model.safetensors` (the BERT weights, kept
//! out of the trained and checkpointed variables) and `tokenizer.json`. Errors name the
//! file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use rankalign_data::{ClipTokenizer, TextTokenizer, WordPieceTokenizer};
use rankalign_models::{ClipConfig, ClipModel, MiniLmConfig, MiniLmTextTower, TextTower};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Which text tower the model uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TextTowerConfig {
    /// CLIP's causal transformer, shaped by `model.clip.text` (the default).
    Clip,
    /// all-MiniLM-L6-v2 from `dir`: BERT frozen, mean-pooled, a trained projection.
    Minilm {
        dir: PathBuf,
        /// Longest token sequence (`[CLS]` and `[SEP]` included); sentence-transformers
        /// uses 256 for this model.
        #[serde(default = "default_max_tokens")]
        max_tokens: usize,
    },
}

fn default_max_tokens() -> usize {
    256
}

fn checkpoint_err(path: PathBuf, msg: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path,
        msg: msg.to_string(),
    }
}

/// Build the CLIP model of `cfg` with the configured text tower on `vb`.
pub fn build_model(
    cfg: &ClipConfig,
    tower: Option<&TextTowerConfig>,
    vb: VarBuilder,
    device: &Device,
) -> Result<ClipModel> {
    match tower {
        None | Some(TextTowerConfig::Clip) => Ok(ClipModel::new(cfg, vb)?),
        Some(TextTowerConfig::Minilm { dir, .. }) => {
            let text = TextTower::MiniLm(load_minilm(dir, cfg.embed_dim, vb.clone(), device)?);
            Ok(ClipModel::with_text_tower(cfg, vb, text)?)
        }
    }
}

/// The MiniLM tower from `dir`, its projection on `vb`.
pub fn load_minilm(
    dir: &Path,
    embed_dim: usize,
    vb: VarBuilder,
    device: &Device,
) -> Result<MiniLmTextTower> {
    let config = dir.join("config.json");
    let json = std::fs::read_to_string(&config).map_err(crate::io_err(&config))?;
    let cfg = MiniLmConfig::from_json(&json, embed_dim).map_err(|e| checkpoint_err(config, e))?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(checkpoint_err(
            weights,
            "missing (run `cargo xtask fetch minilm` for all-MiniLM-L6-v2)",
        ));
    }
    let tensors = candle_core::safetensors::load(&weights, device)
        .map_err(|e| checkpoint_err(weights.clone(), e))?;
    let bert = VarBuilder::from_tensors(tensors, DType::F32, device);
    MiniLmTextTower::new(&cfg, vb, bert).map_err(|e| checkpoint_err(weights, e))
}

/// The tokenizer that goes with the text tower.
pub fn tokenizer(cfg: &ClipConfig, tower: Option<&TextTowerConfig>) -> Result<TextTokenizer> {
    Ok(match tower {
        None | Some(TextTowerConfig::Clip) => {
            TextTokenizer::Clip(ClipTokenizer::new(cfg.text.context_length)?)
        }
        Some(TextTowerConfig::Minilm { dir, max_tokens }) => TextTokenizer::WordPiece(
            WordPieceTokenizer::from_file(&dir.join("tokenizer.json"), *max_tokens)?,
        ),
    })
}
