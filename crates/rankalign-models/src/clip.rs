//! The CLIP model: an image tower, a text tower, their projections into a shared
//! embedding space, and the learned temperature `logit_scale` (a raw parameter; the scale
//! applied to cosine similarities is `exp(logit_scale)`).
//!
//! Keys are HF `CLIPModel`'s: `vision_model.*`, `text_model.*`, `visual_projection.weight`,
//! `text_projection.weight`, `logit_scale`. A ResNet image tower (RN50) has no HF
//! counterpart and keeps OpenAI's keys, `visual.*` (see [`crate::vision`]).
//!
//! BatchNorm makes the ResNet tower behave differently in training and evaluation:
//! [`ClipModel::encode_image_t`] takes the mode, and [`ClipModel::encode_image`] is the
//! evaluation mode. The running statistics are variables of the map, so checkpoints keep
//! them, but they are not parameters: [`ClipModel::buffer_names`] lists what an optimiser
//! must not be given.
//!
//! The text side is a [`TextTower`]: CLIP's by default, or another
//! ([`ClipModel::with_text_tower`]).

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::resnet::ResNetConfig;
use crate::text::{TextConfig, TextTransformer};
use crate::text_tower::TextTower;
use crate::vision::{VisionConfig, VisionTower};
use crate::vit::VitConfig;

/// Shape of a CLIP model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    pub embed_dim: usize,
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Initial raw `logit_scale`; CLIP uses ln(1/0.07) ≈ 2.6593.
    pub logit_scale_init: f64,
}

/// CLIP's initial temperature, ln(1/0.07).
pub const CLIP_LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;

impl ClipConfig {
    /// OpenAI CLIP ViT-B/16: 224 px, patch 16, vision 12 × 768, text 12 × 512, embed 512.
    pub fn vit_b16() -> Self {
        Self {
            embed_dim: 512,
            vision: VitConfig::b16_224().into(),
            text: TextConfig::clip_base(),
            logit_scale_init: CLIP_LOGIT_SCALE_INIT,
        }
    }

    /// OpenAI CLIP ViT-B/32.
    pub fn vit_b32() -> Self {
        Self {
            vision: VitConfig::b32_224().into(),
            ..Self::vit_b16()
        }
    }

    /// OpenAI CLIP ViT-L/14: vision 24 × 1024, text 12 × 768 (12 heads), embed 768.
    pub fn vit_l14() -> Self {
        Self {
            embed_dim: 768,
            vision: VitConfig::l14_224().into(),
            text: TextConfig {
                width: 768,
                heads: 12,
                mlp_dim: 3072,
                ..TextConfig::clip_base()
            },
            logit_scale_init: CLIP_LOGIT_SCALE_INIT,
        }
    }

    /// A small CLIP that trains on two CPU cores: 48 px images in 12 px patches
    /// (17 tokens), 3 × 96 vision and text encoders (4 heads), 32-token context, embed 64.
    /// Measured here: a batch-128 step takes about 0.45 s on one core.
    pub fn tiny() -> Self {
        Self {
            embed_dim: 64,
            vision: VitConfig {
                image_size: 48,
                patch_size: 12,
                channels: 3,
                width: 96,
                layers: 3,
                heads: 4,
                mlp_dim: 384,
            }
            .into(),
            text: TextConfig {
                vocab_size: 49408,
                context_length: 32,
                width: 96,
                layers: 3,
                heads: 4,
                mlp_dim: 384,
            },
            logit_scale_init: CLIP_LOGIT_SCALE_INIT,
        }
    }

    /// OpenAI CLIP RN50: the ModifiedResNet-50 image tower at 224 px (attention pool with
    /// 32 heads straight to the embedding), text 12 × 512 (8 heads, context 77), embed 1024.
    pub fn rn50() -> Self {
        Self {
            embed_dim: 1024,
            vision: ResNetConfig::rn50().into(),
            text: TextConfig::clip_base(),
            logit_scale_init: CLIP_LOGIT_SCALE_INIT,
        }
    }

    /// A small RN-style CLIP for CPU tests: the tiny ResNet tower (64 px, stages
    /// [1, 1, 1, 1], width 8) with the tiny preset's text tower, embed 32.
    pub fn tiny_rn() -> Self {
        Self {
            embed_dim: 32,
            vision: ResNetConfig::tiny().into(),
            ..Self::tiny()
        }
    }

    /// A preset by name: one of [`ClipConfig::PRESETS`].
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "tiny-rn" => Some(Self::tiny_rn()),
            "vit-b16" => Some(Self::vit_b16()),
            "vit-b32" => Some(Self::vit_b32()),
            "vit-l14" => Some(Self::vit_l14()),
            "rn50" => Some(Self::rn50()),
            _ => None,
        }
    }

    pub const PRESETS: &'static [&'static str] =
        &["tiny", "tiny-rn", "vit-b16", "vit-b32", "vit-l14", "rn50"];

    /// Check the shape: the image tower on its own, and a ResNet's output size against
    /// `embed_dim`.
    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        if let VisionConfig::ResNet(r) = &self.vision
            && r.embed_dim != self.embed_dim
        {
            candle_core::bail!(
                "clip: the resnet tower's embed_dim {} differs from the model's embed_dim {}",
                r.embed_dim,
                self.embed_dim
            )
        }
        Ok(())
    }
}

/// Both towers, their projections and the temperature.
#[derive(Clone, Debug)]
pub struct ClipModel {
    vision: VisionTower,
    text: TextTower,
    logit_scale: Tensor,
    cfg: ClipConfig,
}

impl ClipModel {
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let text = TextTower::clip(&cfg.text, cfg.embed_dim, vb.clone())?;
        Self::with_text_tower(cfg, vb, text)
    }

    /// The vision tower and temperature of `cfg` with another text tower (built on the
    /// same `vb`; `cfg.text` is then unused).
    pub fn with_text_tower(cfg: &ClipConfig, vb: VarBuilder, text: TextTower) -> Result<Self> {
        let vision = VisionTower::new(&cfg.vision, cfg.embed_dim, &vb)?;
        let logit_scale =
            vb.get_with_hints((), "logit_scale", Init::Const(cfg.logit_scale_init))?;
        Ok(Self {
            vision,
            text,
            logit_scale,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Unnormalised image embeddings `(b, embed_dim)` in evaluation mode (a ResNet's
    /// BatchNorm uses, and leaves alone, its running statistics); see
    /// [`ClipModel::encode_image_t`].
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        self.encode_image_t(pixels, false)
    }

    /// Unnormalised image embeddings `(b, embed_dim)`. With `train`, a ResNet's BatchNorm
    /// normalises with the batch's statistics and updates its running statistics in place
    /// (use it in the training loop only); a ViT ignores the flag.
    pub fn encode_image_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        self.vision.forward_t(pixels, train)
    }

    /// Names of the variables that are buffers, not parameters (a ResNet's BatchNorm
    /// running statistics): keep them in checkpoints, keep them out of the optimiser.
    pub fn buffer_names(&self) -> Vec<String> {
        self.vision.buffer_names()
    }

    /// Unnormalised text embeddings `(b, embed_dim)`; see [`TextTransformer::forward`]
    /// and [`TextTower::encode`].
    pub fn encode_text(&self, ids: &Tensor, eot: &Tensor) -> Result<Tensor> {
        self.text.encode(ids, eot)
    }

    /// Unnormalised text embeddings `(b, embed_dim)` from padded token ids `(b, s)`
    /// alone: each row is read at its last non-zero token (CLIP's EOT, BERT's `[SEP]`),
    /// the rows padded with zeros as `collate_texts` and OpenAI's `clip.tokenize` pad.
    pub fn encode_text_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let rows = ids.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?;
        let mut eot = Vec::with_capacity(b);
        for (i, row) in rows.iter().enumerate() {
            let last = row.iter().rposition(|&t| t != 0).ok_or_else(|| {
                candle_core::Error::Msg(format!("row {i} of the token ids is all padding"))
            })?;
            eot.push((i * s + last) as u32);
        }
        let eot = Tensor::from_vec(eot, b, ids.device())?;
        self.encode_text(ids, &eot)
    }

    /// `logits_per_image` `(n_images, n_texts)`: `exp(logit_scale)` times the cosine of
    /// each pair of (unnormalised) image and text embeddings; its transpose is
    /// `logits_per_text`.
    pub fn logits(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let img = rankalign_kernels::l2_normalize(image_embeds)?;
        let txt = rankalign_kernels::l2_normalize(text_embeds)?;
        img.matmul(&txt.t()?)?
            .broadcast_mul(&self.logit_scale.exp()?)
    }

    /// Unnormalised text embeddings `(b, embed_dim)` from token embeddings; see
    /// [`TextTransformer::forward_embeds`]. CLIP's text tower only.
    pub fn encode_text_embeds(&self, embeds: &Tensor, eot: &Tensor) -> Result<Tensor> {
        self.text.encode_embeds(embeds, eot)
    }

    /// CLIP's text transformer; an error when the model has another text tower.
    pub fn text_model(&self) -> Result<&TextTransformer> {
        self.text.clip_transformer()
    }

    pub fn text_tower(&self) -> &TextTower {
        &self.text
    }

    /// The raw temperature parameter (a scalar); the similarity scale is its `exp`.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }
}
