//! A pretrained sentence encoder as CLIP's text tower: all-MiniLM-L6-v2 (Wang et al.
//! 2020, "MiniLM: Deep Self-Attention Distillation…"; sentence-transformers'
//! `all-MiniLM-L6-v2`, a BERT of 6 layers × 384), run by candle-transformers' BERT.
//!
//! The sentence feature is sentence-transformers' mean pooling: the mean of the last
//! hidden states over the real tokens (`[CLS] … [SEP]`, padding excluded). A bias-free
//! learned projection (`text_projection.weight`, `(embed_dim, 384)`, N(0, 384^-½) like
//! CLIP's) maps it into the shared embedding space.
//!
//! The token mask comes from the same flat EOT indices as CLIP's text tower (the index
//! of each row's last real token, here `[SEP]`), so batches collate the same way for
//! both towers and the forward pass never copies from the device.
//!
//! The BERT weights are *frozen*: they come from their own `VarBuilder` (constants,
//! e.g. the pretrained `model.safetensors`), not from the training `VarMap`, so only the
//! projection trains (LiT's "locked" tower, here on the text side). Fine-tuning BERT is
//! not possible with candle 0.11.1: its BERT normalises with `candle_nn`'s fused
//! `layer_norm`, applied without a backward (`apply_op3_no_bwd`), so the graph is cut at
//! every LayerNorm and BERT variables would silently get no gradient (a test records
//! this). Fine-tuning needs a BERT on our differentiable LayerNorm.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};

use crate::layers::{Linear, WeightInit, linear};

/// Shape of the MiniLM text tower: the BERT config (its `config.json`) and the width
/// of the shared embedding space.
#[derive(Clone, Debug, PartialEq)]
pub struct MiniLmConfig {
    pub bert: BertConfig,
    pub embed_dim: usize,
}

impl MiniLmConfig {
    /// Parse a BERT `config.json` (as text; the caller reads the file).
    pub fn from_json(config_json: &str, embed_dim: usize) -> Result<Self> {
        let bert: BertConfig = serde_json::from_str(config_json)
            .map_err(|e| candle_core::Error::Msg(format!("minilm: bad BERT config.json: {e}")))?;
        Ok(Self { bert, embed_dim })
    }
}

/// Frozen BERT + mean pooling + a trainable projection. Clones share the BERT.
#[derive(Clone)]
pub struct MiniLmTextTower {
    bert: Arc<BertModel>,
    projection: Linear,
    cfg: MiniLmConfig,
}

impl std::fmt::Debug for MiniLmTextTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLmTextTower")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl MiniLmTextTower {
    /// `vb`: the model's trainable root (the projection is `text_projection.weight`);
    /// `bert`: the pretrained BERT weights, keys `embeddings.*` and `encoder.*` (with or
    /// without a `bert.` prefix), held as constants.
    pub fn new(cfg: &MiniLmConfig, vb: VarBuilder, bert: VarBuilder) -> Result<Self> {
        let width = cfg.bert.hidden_size;
        let projection = linear(
            width,
            cfg.embed_dim,
            WeightInit::Normal((width as f64).powf(-0.5)),
            None,
            vb.pp("text_projection"),
        )?;
        let bert = BertModel::load(bert, &cfg.bert).map_err(|e| {
            candle_core::Error::Msg(format!("minilm: loading the BERT weights: {e}"))
        })?;
        Ok(Self {
            bert: Arc::new(bert),
            projection,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &MiniLmConfig {
        &self.cfg
    }

    /// Mean-pooled sentence features `(b, hidden)` of `ids` `(b, s)` u32 whose last real
    /// token of row `r` sits at flat index `eot[r] = r · s + position`.
    pub fn pooled(&self, ids: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if s > self.cfg.bert.max_position_embeddings {
            candle_core::bail!(
                "minilm text tower: {s} tokens exceed the {} positions",
                self.cfg.bert.max_position_embeddings
            )
        }
        let mask = mask_from_eot(eot, b, s, ids.device())?;
        let types = ids.zeros_like()?;
        let hidden = self.bert.forward(ids, &types, Some(&mask))?;
        let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
        // sentence-transformers: Σ h·m / max(Σ m, 1e-9).
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
        summed.broadcast_div(&counts)
    }

    /// Unnormalised text embeddings `(b, embed_dim)`: the projected pooled feature.
    pub fn forward(&self, ids: &Tensor, eot: &Tensor) -> Result<Tensor> {
        self.projection.forward(&self.pooled(ids, eot)?)
    }
}

/// The `(b, s)` u8 mask of real tokens: 1 where the flat position `r · s + p` is at most
/// row `r`'s EOT index (a comparison with a host-built constant, so nothing is copied
/// back from the device and a bad index cannot underflow).
pub fn mask_from_eot(eot: &Tensor, b: usize, s: usize, device: &Device) -> Result<Tensor> {
    if eot.dims() != [b] || eot.dtype() != DType::U32 {
        candle_core::bail!(
            "text tower: eot must be u32 [{b}], got {:?} {:?}",
            eot.dtype(),
            eot.dims()
        )
    }
    let flat = Tensor::arange(0u32, (b * s) as u32, device)?.reshape((b, s))?;
    flat.broadcast_le(&eot.unsqueeze(1)?)
}
