//! The text side of a [`crate::ClipModel`]: which tower turns token ids into text
//! embeddings, and its projection into the shared space.
//!
//! - [`TextTower::Clip`]: CLIP's causal transformer (`text_model.*`) pooled at EOT, and
//!   `text_projection.weight`, all trainable (the default, HF `CLIPModel` keys);
//! - [`TextTower::MiniLm`]: the pretrained, frozen all-MiniLM-L6-v2 BERT with mean
//!   pooling and a trainable `text_projection.weight` ([`crate::minilm`]).
//!
//! Both take the same inputs, `ids` `(b, s)` and flat EOT indices `(b)`, so collation
//! and the training loop do not change with the tower; only the tokenizer does (CLIP's
//! BPE or the model's WordPiece).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Linear, WeightInit, linear};
use crate::minilm::MiniLmTextTower;
use crate::text::{TextConfig, TextTransformer};

/// A text tower with its projection.
#[derive(Clone, Debug)]
pub enum TextTower {
    Clip {
        model: TextTransformer,
        projection: Linear,
    },
    MiniLm(MiniLmTextTower),
}

impl TextTower {
    /// CLIP's text transformer under `vb.pp("text_model")` and its projection
    /// `text_projection.weight` `(embed_dim, width)`, N(0, width^-½).
    pub fn clip(cfg: &TextConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let model = TextTransformer::new(cfg, vb.pp("text_model"))?;
        let projection = linear(
            cfg.width,
            embed_dim,
            WeightInit::Normal((cfg.width as f64).powf(-0.5)),
            None,
            vb.pp("text_projection"),
        )?;
        Ok(Self::Clip { model, projection })
    }

    /// Unnormalised text embeddings `(b, embed_dim)`.
    pub fn encode(&self, ids: &Tensor, eot: &Tensor) -> Result<Tensor> {
        match self {
            Self::Clip { model, projection } => projection.forward(&model.forward(ids, eot)?),
            Self::MiniLm(tower) => tower.forward(ids, eot),
        }
    }

    /// Text embeddings from token embeddings (prompt learning); CLIP's tower only.
    pub fn encode_embeds(&self, embeds: &Tensor, eot: &Tensor) -> Result<Tensor> {
        match self {
            Self::Clip { model, projection } => {
                projection.forward(&model.forward_embeds(embeds, eot)?)
            }
            Self::MiniLm(_) => candle_core::bail!(
                "the MiniLM text tower takes token ids, not token embeddings (prompt \
                 learning needs the CLIP text tower)"
            ),
        }
    }

    /// CLIP's text transformer; an error for another tower.
    pub fn clip_transformer(&self) -> Result<&TextTransformer> {
        match self {
            Self::Clip { model, .. } => Ok(model),
            Self::MiniLm(_) => candle_core::bail!(
                "the MiniLM text tower has no CLIP token embeddings: prompt learning needs \
                 the CLIP text tower"
            ),
        }
    }
}
