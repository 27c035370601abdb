//! CLIP towers for rankalign, trainable from a candle `VarMap`.
//!
//! - [`vit`]: CLIP's vision transformer (patch embedding, class token, pre-LN, post-LN);
//! - [`resnet`]: CLIP's ModifiedResNet image tower (RN50) under OpenAI's `visual.*` keys,
//!   with BatchNorm train and eval modes;
//! - [`text`]: CLIP's causal text transformer (QuickGELU, pooled at the EOT token);
//! - [`vision`]: the image tower of a CLIP, ViT or ResNet, and its config (one TOML table
//!   for either, told apart by its keys);
//! - [`text_tower`]: which text tower a CLIP model uses (CLIP's or MiniLM);
//! - [`minilm`]: a pretrained all-MiniLM-L6-v2 (BERT, candle-transformers) text tower,
//!   frozen, mean-pooled, with a trainable projection;
//! - [`clip`]: the two towers, their projections and the learned `logit_scale`;
//! - [`convert`]: OpenAI / open_clip checkpoint keys into ours and back (fused q/k/v
//!   split, projections transposed), and a model's shape read off such a state dict;
//! - [`prompt`]: learned prompts for ordinal ranks (CoOp context, OrdinalCLIP
//!   interpolation, L2RCLIP's RankFormer);
//! - [`params`]: a seeded `VarMap` backend, so that initialisation is reproducible and
//!   every parameter — `logit_scale` and `class_embedding` included — is a trainable `Var`.
//!
//! Architecture invariant: models do no file IO and know nothing of datasets or losses.
//! Weights arrive through `VarBuilder`, and `pp()` paths are the Hugging Face
//! `CLIPModel` state-dict keys (OpenAI's for the ResNet tower), so a checkpoint in that
//! layout loads by name.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use rankalign_models::{ClipConfig, ClipModel, SeededVarMap};
//! let cfg = ClipConfig::tiny();
//! let vm = SeededVarMap::new(17); // reproducible initialisation
//! let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &Device::Cpu))?;
//! let size = cfg.vision.image_size();
//! let pixels = Tensor::zeros((2, 3, size, size), DType::F32, &Device::Cpu)?;
//! // Token ids padded with zeros; each row is read at its last token (the EOT).
//! let ids = Tensor::new(&[[49406u32, 320, 1929, 49407], [49406, 49407, 0, 0]], &Device::Cpu)?;
//! let image = model.encode_image(&pixels)?;
//! let text = model.encode_text_ids(&ids)?;
//! let logits = model.logits(&image, &text)?; // (images, texts): exp(logit_scale) · cos
//! assert_eq!(logits.dims(), &[2, 2]);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod clip;
pub mod convert;
pub mod layers;
pub mod minilm;
pub mod params;
pub mod prompt;
pub mod resnet;
pub mod text;
pub mod text_tower;
pub mod vision;
pub mod vit;

pub use clip::{ClipConfig, ClipModel};
pub use minilm::{MiniLmConfig, MiniLmTextTower};
pub use params::SeededVarMap;
pub use prompt::{PromptLearner, PromptTokens, RankFormer, RankFormerConfig, RankSlotConfig};
pub use resnet::{ModifiedResNet, ResNetConfig};
pub use text::{TextConfig, TextTransformer};
pub use text_tower::TextTower;
pub use vision::{VisionConfig, is_vision_param};
pub use vit::{VisionTransformer, VitConfig};
