//! The image tower of a CLIP model: a vision transformer ([`VitConfig`]) or CLIP's
//! ModifiedResNet ([`ResNetConfig`], RN50 and kin).
//!
//! [`VisionConfig`] is written without a tag: a table with `patch_size` is a ViT (the form
//! every existing config and `config.json` translation uses), one without it is a ResNet,
//! recognised by its four stage depths `layers = [3, 4, 6, 3]` and its `embed_dim`:
//!
//! ```toml
//! vision = { image_size = 48, patch_size = 12, channels = 3, width = 96, layers = 3, heads = 4, mlp_dim = 384 }
//! vision = { image_size = 64, layers = [1, 1, 1, 1], width = 8, heads = 2, embed_dim = 64 }
//! ```
//!
//! Unknown keys are errors that list the known ones, and a key of the other kind of tower
//! is an error that says which key decided the kind.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::layers::{Linear, WeightInit, linear};
use crate::resnet::{ModifiedResNet, ResNetConfig};
use crate::vit::{VisionTransformer, VitConfig};

/// Shape of the image tower.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum VisionConfig {
    /// Keys `vision_model.*` (HF `CLIPModel`) and a bias-free `visual_projection`.
    Vit(VitConfig),
    /// Keys `visual.*` (OpenAI / open_clip); the attention pool's `c_proj` outputs the
    /// embedding itself, so there is no separate projection, and `embed_dim` must be the
    /// model's.
    ResNet(ResNetConfig),
}

impl VisionConfig {
    /// Side of the square input image in pixels.
    pub fn image_size(&self) -> usize {
        match self {
            Self::Vit(v) => v.image_size,
            Self::ResNet(r) => r.image_size,
        }
    }

    /// `"vit"` or `"resnet"`, for messages and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Vit(_) => "vit",
            Self::ResNet(_) => "resnet",
        }
    }

    pub fn as_vit(&self) -> Option<&VitConfig> {
        match self {
            Self::Vit(v) => Some(v),
            Self::ResNet(_) => None,
        }
    }

    pub fn as_resnet(&self) -> Option<&ResNetConfig> {
        match self {
            Self::ResNet(r) => Some(r),
            Self::Vit(_) => None,
        }
    }

    /// Check the shape on its own (the model checks it against `embed_dim` too).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Vit(v) => v.validate(),
            Self::ResNet(r) => r.validate(),
        }
    }
}

impl From<VitConfig> for VisionConfig {
    fn from(v: VitConfig) -> Self {
        Self::Vit(v)
    }
}

impl From<ResNetConfig> for VisionConfig {
    fn from(r: ResNetConfig) -> Self {
        Self::ResNet(r)
    }
}

/// `layers`: a depth (ViT) or four stage depths (ResNet).
enum Layers {
    Depth(usize),
    Stages([usize; 4]),
}

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Layers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a number of layers (ViT) or four stage depths like [3, 4, 6, 3] (ResNet)",
                )
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<Layers, E> {
                Ok(Layers::Depth(n as usize))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<Layers, E> {
                usize::try_from(n)
                    .map(Layers::Depth)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Layers, A::Error> {
                let mut stages = [0usize; 4];
                for (i, slot) in stages.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<usize>()?.is_some() {
                    return Err(de::Error::invalid_length(5, &self));
                }
                Ok(Layers::Stages(stages))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every key either tower has; which ones are present decides the tower.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVision {
    image_size: usize,
    width: usize,
    layers: Layers,
    heads: usize,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    channels: Option<usize>,
    #[serde(default)]
    mlp_dim: Option<usize>,
    #[serde(default)]
    embed_dim: Option<usize>,
}

impl<'de> Deserialize<'de> for VisionConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = RawVision::deserialize(d)?;
        let err = |msg: String| <D::Error as de::Error>::custom(msg);
        match raw.patch_size {
            Some(patch_size) => {
                if raw.embed_dim.is_some() {
                    return Err(err(
                        "`embed_dim` is a ResNet key, but `patch_size` makes this a ViT".into(),
                    ));
                }
                let layers = match raw.layers {
                    Layers::Depth(n) => n,
                    Layers::Stages(s) => {
                        return Err(err(format!(
                            "`layers` = {s:?} gives ResNet stage depths, but `patch_size` makes this a ViT (one number of layers)"
                        )));
                    }
                };
                let need = |v: Option<usize>, key: &str| {
                    v.ok_or_else(|| {
                        err(format!(
                            "missing field `{key}` (a ViT, having `patch_size`)"
                        ))
                    })
                };
                Ok(Self::Vit(VitConfig {
                    image_size: raw.image_size,
                    patch_size,
                    channels: need(raw.channels, "channels")?,
                    width: raw.width,
                    layers,
                    heads: raw.heads,
                    mlp_dim: need(raw.mlp_dim, "mlp_dim")?,
                }))
            }
            None => {
                for (key, present) in [("channels", raw.channels), ("mlp_dim", raw.mlp_dim)] {
                    if present.is_some() {
                        return Err(err(format!(
                            "`{key}` is a ViT key, but without `patch_size` this is a ResNet; a ViT needs `patch_size`"
                        )));
                    }
                }
                let layers = match raw.layers {
                    Layers::Stages(s) => s,
                    Layers::Depth(n) => {
                        return Err(err(format!(
                            "missing field `patch_size`: a ViT with {n} layers needs it (a ResNet has four stage depths, `layers = [3, 4, 6, 3]`)"
                        )));
                    }
                };
                let embed_dim = raw.embed_dim.ok_or_else(|| {
                    err(
                        "missing field `embed_dim` (a ResNet: its attention pool's output size)"
                            .into(),
                    )
                })?;
                Ok(Self::ResNet(ResNetConfig {
                    layers,
                    width: raw.width,
                    image_size: raw.image_size,
                    heads: raw.heads,
                    embed_dim,
                }))
            }
        }
    }
}

/// The built image tower, with its projection for a ViT.
#[derive(Clone, Debug)]
pub(crate) enum VisionTower {
    Vit {
        model: VisionTransformer,
        projection: Linear,
    },
    /// Boxed: a ResNet holds a few hundred bytes of BatchNorm and stage handles.
    ResNet(Box<ModifiedResNet>),
}

impl VisionTower {
    /// A ViT under `vb.pp("vision_model")` and `vb.pp("visual_projection")`, or a ResNet
    /// under `vb.pp("visual")`, producing `embed_dim` features.
    pub(crate) fn new(cfg: &VisionConfig, embed_dim: usize, vb: &VarBuilder) -> Result<Self> {
        match cfg {
            VisionConfig::Vit(v) => {
                let model = VisionTransformer::new(v, vb.pp("vision_model"))?;
                let projection = linear(
                    v.width,
                    embed_dim,
                    WeightInit::Normal((v.width as f64).powf(-0.5)),
                    None,
                    vb.pp("visual_projection"),
                )?;
                Ok(Self::Vit { model, projection })
            }
            VisionConfig::ResNet(r) => {
                if r.embed_dim != embed_dim {
                    candle_core::bail!(
                        "clip: the resnet tower's embed_dim {} differs from the model's embed_dim {embed_dim}",
                        r.embed_dim
                    )
                }
                Ok(Self::ResNet(Box::new(ModifiedResNet::new(
                    r,
                    vb.pp("visual"),
                )?)))
            }
        }
    }

    /// `(b, 3, s, s)` → `(b, embed_dim)`; `train` selects BatchNorm's mode (ViT: ignored).
    pub(crate) fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Vit { model, projection } => projection.forward(&model.forward(pixels)?),
            Self::ResNet(r) => r.forward_t(pixels, train),
        }
    }

    pub(crate) fn buffer_names(&self) -> Vec<String> {
        match self {
            Self::Vit { .. } => Vec::new(),
            Self::ResNet(r) => r.buffer_names(),
        }
    }
}

/// Whether a parameter name belongs to the image tower (its projection included), in
/// either layout: `vision_model.*`, `visual_projection.*` or `visual.*`.
pub fn is_vision_param(name: &str) -> bool {
    name.starts_with("vision_model.")
        || name.starts_with("visual_projection.")
        || name.starts_with("visual.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Holder {
        vision: VisionConfig,
    }

    fn parse(text: &str) -> std::result::Result<VisionConfig, String> {
        serde_json::from_str::<Holder>(text)
            .map(|h| h.vision)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn vit_and_resnet_tables_are_told_apart() {
        let vit = parse(
            r#"{"vision": {"image_size": 48, "patch_size": 12, "channels": 3, "width": 96, "layers": 3, "heads": 4, "mlp_dim": 384}}"#,
        )
        .unwrap();
        assert_eq!(vit.as_vit().map(|v| v.mlp_dim), Some(384));
        let rn = parse(
            r#"{"vision": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "heads": 2, "embed_dim": 32}}"#,
        )
        .unwrap();
        assert_eq!(rn, VisionConfig::ResNet(ResNetConfig::tiny()));
        // Serialised back, each reads as itself.
        for cfg in [vit, rn] {
            let text = format!(r#"{{"vision": {}}}"#, serde_json::to_string(&cfg).unwrap());
            assert_eq!(parse(&text).unwrap(), cfg);
        }
    }

    #[test]
    fn mixed_or_unknown_keys_are_named() {
        for (text, wanted) in [
            (
                r#"{"image_size": 48, "patch_size": 12, "channels": 3, "width": 96, "layers": 3, "heads": 4, "mlp_dim": 384, "mlp": 1}"#,
                "unknown field `mlp`",
            ),
            (
                r#"{"image_size": 48, "patch_size": 12, "channels": 3, "width": 96, "layers": 3, "heads": 4, "mlp_dim": 384, "embed_dim": 3}"#,
                "`embed_dim` is a ResNet key",
            ),
            (
                r#"{"image_size": 48, "patch_size": 12, "channels": 3, "width": 96, "layers": 3, "heads": 4}"#,
                "missing field `mlp_dim`",
            ),
            (
                r#"{"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "heads": 2, "embed_dim": 32, "mlp_dim": 5}"#,
                "`mlp_dim` is a ViT key",
            ),
            (
                r#"{"image_size": 64, "layers": 3, "width": 8, "heads": 2, "mlp_dim": 5, "channels": 3}"#,
                "is a ViT key, but without `patch_size` this is a ResNet",
            ),
            (
                r#"{"image_size": 64, "layers": 3, "width": 8, "heads": 2}"#,
                "missing field `patch_size`",
            ),
            (
                r#"{"image_size": 64, "layers": [1, 1, 1], "width": 8, "heads": 2, "embed_dim": 32}"#,
                "four stage depths",
            ),
            (
                r#"{"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "heads": 2}"#,
                "missing field `embed_dim`",
            ),
        ] {
            let err = parse(&format!(r#"{{"vision": {text}}}"#)).unwrap_err();
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }
}
