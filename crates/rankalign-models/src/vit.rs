//! CLIP's vision transformer (Dosovitskiy et al. 2021 as used by Radford et al. 2021;
//! reference: openai/CLIP `VisionTransformer`, HF `CLIPVisionTransformer`).
//!
//! A bias-free patch embedding, a learned class token and position embedding, a
//! LayerNorm before the encoder (`pre_layrnorm`, HF's spelling), the encoder, and a
//! LayerNorm on the class token. The patch embedding keeps the convolution's weight
//! layout `(width, channels, p, p)` but runs as an unfold and one matmul, which is
//! cheaper on the CPU and differentiable with plain ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::layers::{Encoder, EncoderInit, EncoderShape, LayerNorm};

/// Shape of the vision tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
}

impl VitConfig {
    /// OpenAI CLIP ViT-B/16 at 224 px.
    pub fn b16_224() -> Self {
        Self {
            image_size: 224,
            patch_size: 16,
            channels: 3,
            width: 768,
            layers: 12,
            heads: 12,
            mlp_dim: 3072,
        }
    }

    /// OpenAI CLIP ViT-B/32 at 224 px.
    pub fn b32_224() -> Self {
        Self {
            patch_size: 32,
            ..Self::b16_224()
        }
    }

    /// OpenAI CLIP ViT-L/14 at 224 px.
    pub fn l14_224() -> Self {
        Self {
            image_size: 224,
            patch_size: 14,
            channels: 3,
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_dim: 4096,
        }
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            candle_core::bail!(
                "vit: image size {} is not a multiple of the patch size {}",
                self.image_size,
                self.patch_size
            )
        }
        Ok(())
    }
}

/// The vision tower up to the post-LayerNormed class token (width `width`).
#[derive(Clone, Debug)]
pub struct VisionTransformer {
    class_embedding: Tensor,
    patch_weight: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    cfg: VitConfig,
}

impl VisionTransformer {
    /// Parameters live under `vb` as HF's `vision_model.*` keys.
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.width;
        let scale = (w as f64).powf(-0.5);
        let emb = vb.pp("embeddings");
        let class_embedding = emb.get_with_hints(
            w,
            "class_embedding",
            Init::Randn {
                mean: 0.0,
                stdev: scale,
            },
        )?;
        // PyTorch's Conv2d default: U(±1/√fan_in), fan_in = channels·p².
        let fan_in = cfg.channels * cfg.patch_size * cfg.patch_size;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let patch_weight = emb.pp("patch_embedding").get_with_hints(
            (w, cfg.channels, cfg.patch_size, cfg.patch_size),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let n = cfg.grid() * cfg.grid() + 1;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (n, w),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: scale,
            },
        )?;
        let shape = EncoderShape {
            width: w,
            layers: cfg.layers,
            heads: cfg.heads,
            mlp_dim: cfg.mlp_dim,
            eps: 1e-5,
        };
        Ok(Self {
            class_embedding,
            patch_weight,
            position_embedding,
            pre_layrnorm: LayerNorm::new(w, 1e-5, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(&shape, EncoderInit::TorchDefault, vb.pp("encoder"))?,
            post_layernorm: LayerNorm::new(w, 1e-5, vb.pp("post_layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// `pixels`: `(b, channels, image_size, image_size)`. Returns `(b, width)`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, ch, h, w) = pixels.dims4()?;
        if ch != c.channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "vision tower: expected images (b, {}, {}, {}), got {:?}",
                c.channels,
                c.image_size,
                c.image_size,
                pixels.dims()
            )
        }
        let (g, p) = (c.grid(), c.patch_size);
        // (b, ch, g, p, g, p) -> (b, g, g, ch, p, p) -> (b, g·g, ch·p·p)
        let patches = pixels
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * g * g, ch * p * p))?;
        let weight = self.patch_weight.reshape((c.width, ch * p * p))?;
        let xs = patches.matmul(&weight.t()?)?.reshape((b, g * g, c.width))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.width))?
            .broadcast_as((b, 1, c.width))?;
        let xs = Tensor::cat(&[&cls, &xs], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        // Only the class token is read: the encoder's last layer computes its row alone.
        let s = xs.dim(1)?;
        let cls_rows = Tensor::arange_step(0, (b * s) as u32, s as u32, pixels.device())?;
        let xs = self.encoder.forward_rows(&xs, None, &cls_rows)?;
        self.post_layernorm.forward(&xs)
    }
}
