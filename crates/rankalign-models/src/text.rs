//! CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models
//! From Natural Language Supervision"; reference: openai/CLIP `model.py`, HF
//! `CLIPTextTransformer`).
//!
//! Token + learned position embeddings, a causal pre-LN encoder with QuickGELU, a final
//! LayerNorm, and the hidden state at the EOT token as the sequence feature. The EOT
//! positions come in as flat indices computed on the host with the batch, so a forward
//! pass never copies from the device.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::layers::{Encoder, EncoderInit, EncoderShape, LayerNorm};

/// Shape of the text tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
}

impl TextConfig {
    /// The text tower of OpenAI CLIP ViT-B/16 and ViT-B/32 (and RN50): 12 × 512, 8 heads.
    pub fn clip_base() -> Self {
        Self {
            vocab_size: 49408,
            context_length: 77,
            width: 512,
            layers: 12,
            heads: 8,
            mlp_dim: 2048,
        }
    }

    fn encoder_shape(&self) -> EncoderShape {
        EncoderShape {
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            mlp_dim: self.mlp_dim,
            eps: 1e-5,
        }
    }
}

/// Additive causal mask `(n, n)`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (n, n), device)
}

/// The text tower up to the pooled, final-LayerNormed EOT feature (width `width`).
#[derive(Clone, Debug)]
pub struct TextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    mask: Tensor,
    cfg: TextConfig,
}

impl TextTransformer {
    /// Parameters live under `vb` as HF's `text_model.*` keys.
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let tok = emb.pp("token_embedding").get_with_hints(
            (cfg.vocab_size, cfg.width),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (cfg.context_length, cfg.width),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        let shape = cfg.encoder_shape();
        Ok(Self {
            token_embedding: Embedding::new(tok, cfg.width),
            position_embedding,
            encoder: Encoder::new(&shape, EncoderInit::OpenAiText, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(cfg.width, shape.eps, vb.pp("final_layer_norm"))?,
            mask: causal_mask(cfg.context_length, vb.device())?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embeddings `(b, s, width)` of `ids` `(b, s)`, the input a learned prompt
    /// edits before [`TextTransformer::forward_embeds`].
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        // One node (ours): the backward adds rows into one zeroed table-sized gradient
        // instead of candle's zeros-then-copying `index_add`; the same values and bits.
        rankalign_kernels::embedding(self.token_embedding.embeddings(), ids)
    }

    /// `ids`: `(b, s)` u32 with `s ≤ context_length`; `eot`: `(b)` u32 flat indices
    /// `row · s + position` of each row's EOT token. Returns `(b, width)`.
    pub fn forward(&self, ids: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        if s > self.cfg.context_length {
            candle_core::bail!(
                "text tower: {s} tokens exceed the context length {}",
                self.cfg.context_length
            )
        }
        self.forward_embeds(&self.embed_tokens(ids)?, eot)
    }

    /// As [`TextTransformer::forward`], from token embeddings `(b, s, width)` instead of
    /// ids: prompt learning (CoOp, OrdinalCLIP, L2RCLIP) replaces some of them.
    pub fn forward_embeds(&self, xs: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let (b, s, w) = xs.dims3()?;
        if s > self.cfg.context_length || w != self.cfg.width {
            candle_core::bail!(
                "text tower: embeddings {:?} need at most {} tokens of width {}",
                xs.dims(),
                self.cfg.context_length,
                self.cfg.width
            )
        }
        if eot.dims() != [b] || eot.dtype() != DType::U32 {
            candle_core::bail!(
                "text tower: eot must be u32 [{b}], got {:?} {:?}",
                eot.dtype(),
                eot.dims()
            )
        }
        let xs = xs.broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        let mask = self.mask.narrow(0, 0, s)?.narrow(1, 0, s)?.contiguous()?;
        // Only the EOT tokens are read: the encoder's last layer computes their rows alone.
        let xs = self.encoder.forward_rows(&xs, Some(&mask), eot)?;
        self.final_layer_norm.forward(&xs)
    }
}
