//! Checkpoint key layouts: OpenAI / open_clip state dicts into our names and back, and a
//! model's shape read off such a state dict.
//!
//! OpenAI's `model.pt` and open_clip's checkpoints name the transformers differently from
//! HF and store two tensors differently: attention projections are one fused
//! `in_proj_weight` `(3w, w)` (split here into q, k, v), and `visual.proj` /
//! `text_projection` are `(w, e)` matrices used as `x @ W` (transposed here into `Linear`
//! weights `(e, w)`). A ResNet image tower (RN50, …) keeps its OpenAI keys `visual.*` in
//! our model, so only its `num_batches_tracked` counters are dropped. The mapping is pure;
//! reading the file is the caller's.

use std::collections::{BTreeSet, HashMap};

use candle_core::{Result, Tensor};

use crate::clip::{CLIP_LOGIT_SCALE_INIT, ClipConfig};
use crate::resnet::ResNetConfig;
use crate::text::TextConfig;
use crate::vit::VitConfig;

/// Our name for one OpenAI/open_clip transformer-block suffix (`ln_1.weight`, …).
fn block_suffix(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "ln_1.weight" => "layer_norm1.weight",
        "ln_1.bias" => "layer_norm1.bias",
        "ln_2.weight" => "layer_norm2.weight",
        "ln_2.bias" => "layer_norm2.bias",
        "mlp.c_fc.weight" => "mlp.fc1.weight",
        "mlp.c_fc.bias" => "mlp.fc1.bias",
        "mlp.c_proj.weight" => "mlp.fc2.weight",
        "mlp.c_proj.bias" => "mlp.fc2.bias",
        "attn.out_proj.weight" => "self_attn.out_proj.weight",
        "attn.out_proj.bias" => "self_attn.out_proj.bias",
        _ => return None,
    })
}

/// Whether an OpenAI/open_clip state dict has a ResNet image tower (its `visual.conv1` is
/// the stem, not a patch embedding).
pub fn has_resnet_tower<T>(state: &HashMap<String, T>) -> bool {
    state
        .keys()
        .any(|k| k.starts_with("visual.attnpool.") || k.starts_with("visual.layer1."))
}

/// Convert an OpenAI/open_clip CLIP state dict, ViT or ResNet image tower, to our
/// parameter names. Buffers that are not variables of ours (`attn_mask`, `position_ids`,
/// BatchNorm's `num_batches_tracked`) are dropped; any other unknown key is an error that
/// names it.
pub fn openai_to_hf(state: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let resnet = has_resnet_tower(&state);
    let mut out = HashMap::new();
    for (key, t) in state {
        if key.ends_with("num_batches_tracked") {
            continue;
        }
        if resnet && key.starts_with("visual.") {
            if !is_resnet_key(&key["visual.".len()..]) {
                candle_core::bail!(
                    "convert: no rankalign parameter for checkpoint key {key} (a ResNet image tower)"
                )
            }
            out.insert(key, t);
            continue;
        }
        let (tower, rest) = match key.strip_prefix("visual.") {
            Some(rest) => ("vision_model", rest),
            None => ("text_model", key.as_str()),
        };
        let direct = match (tower, rest) {
            ("text_model", "token_embedding.weight") => {
                Some("text_model.embeddings.token_embedding.weight".to_string())
            }
            ("text_model", "positional_embedding") => {
                Some("text_model.embeddings.position_embedding.weight".into())
            }
            ("text_model", "ln_final.weight") => Some("text_model.final_layer_norm.weight".into()),
            ("text_model", "ln_final.bias") => Some("text_model.final_layer_norm.bias".into()),
            ("text_model", "logit_scale") => Some("logit_scale".into()),
            ("vision_model", "class_embedding") => {
                Some("vision_model.embeddings.class_embedding".into())
            }
            ("vision_model", "conv1.weight") => {
                Some("vision_model.embeddings.patch_embedding.weight".into())
            }
            ("vision_model", "positional_embedding") => {
                Some("vision_model.embeddings.position_embedding.weight".into())
            }
            ("vision_model", "ln_pre.weight") => Some("vision_model.pre_layrnorm.weight".into()),
            ("vision_model", "ln_pre.bias") => Some("vision_model.pre_layrnorm.bias".into()),
            ("vision_model", "ln_post.weight") => Some("vision_model.post_layernorm.weight".into()),
            ("vision_model", "ln_post.bias") => Some("vision_model.post_layernorm.bias".into()),
            _ => None,
        };
        if let Some(name) = direct {
            out.insert(name, t);
            continue;
        }
        match (tower, rest) {
            ("text_model", "text_projection") => {
                out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            ("vision_model", "proj") => {
                out.insert("visual_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            (_, "attn_mask") | (_, "position_ids") => continue,
            _ => {}
        }
        let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
            candle_core::bail!("convert: no rankalign parameter for checkpoint key {key}")
        };
        let (index, suffix) = block.split_once('.').ok_or_else(|| {
            candle_core::Error::Msg(format!("convert: malformed block key {key}"))
        })?;
        let prefix = format!("{tower}.encoder.layers.{index}");
        match suffix {
            "attn.in_proj_weight" | "attn.in_proj_bias" => {
                let kind = if suffix.ends_with("weight") {
                    "weight"
                } else {
                    "bias"
                };
                let rows = t.dim(0)?;
                if rows % 3 != 0 {
                    candle_core::bail!("convert: {key} has {rows} rows, not three equal parts")
                }
                for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(
                        format!("{prefix}.self_attn.{name}.{kind}"),
                        t.narrow(0, i * rows / 3, rows / 3)?.contiguous()?,
                    );
                }
            }
            other => match block_suffix(other) {
                Some(ours) => {
                    out.insert(format!("{prefix}.{ours}"), t);
                }
                None => {
                    candle_core::bail!("convert: no rankalign parameter for checkpoint key {key}")
                }
            },
        }
    }
    Ok(out)
}

/// Whether `rest` (a key without `visual.`) names a ModifiedResNet tensor: the stem, the
/// four stages and the attention pool.
fn is_resnet_key(rest: &str) -> bool {
    let stem = ["conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3."];
    let stages = ["layer1.", "layer2.", "layer3.", "layer4."];
    rest.starts_with("attnpool.")
        || stem.iter().any(|p| rest.starts_with(p))
        || stages.iter().any(|p| rest.starts_with(p))
}

/// The OpenAI/open_clip name of one of our transformer-block suffixes.
fn block_suffix_back(ours: &str) -> Option<&'static str> {
    Some(match ours {
        "layer_norm1.weight" => "ln_1.weight",
        "layer_norm1.bias" => "ln_1.bias",
        "layer_norm2.weight" => "ln_2.weight",
        "layer_norm2.bias" => "ln_2.bias",
        "mlp.fc1.weight" => "mlp.c_fc.weight",
        "mlp.fc1.bias" => "mlp.c_fc.bias",
        "mlp.fc2.weight" => "mlp.c_proj.weight",
        "mlp.fc2.bias" => "mlp.c_proj.bias",
        "self_attn.out_proj.weight" => "attn.out_proj.weight",
        "self_attn.out_proj.bias" => "attn.out_proj.bias",
        _ => return None,
    })
}

/// The inverse of [`openai_to_hf`]: our parameters (either image tower) under OpenAI /
/// open_clip keys, q/k/v fused into `in_proj_*`, the projections transposed back to
/// `(w, e)`. Running statistics keep their names; open_clip fills in the missing
/// `num_batches_tracked` counters itself when loading.
pub fn hf_to_openai(tensors: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    // (tower prefix, block index) → the three attention projections, weights and biases.
    let mut fused: HashMap<(String, &'static str), [Option<Tensor>; 3]> = HashMap::new();
    for (key, t) in tensors {
        if key.starts_with("visual.") {
            out.insert(key.clone(), t.clone());
            continue;
        }
        let direct = match key.as_str() {
            "logit_scale" => Some("logit_scale"),
            "text_model.embeddings.token_embedding.weight" => Some("token_embedding.weight"),
            "text_model.embeddings.position_embedding.weight" => Some("positional_embedding"),
            "text_model.final_layer_norm.weight" => Some("ln_final.weight"),
            "text_model.final_layer_norm.bias" => Some("ln_final.bias"),
            "vision_model.embeddings.class_embedding" => Some("visual.class_embedding"),
            "vision_model.embeddings.patch_embedding.weight" => Some("visual.conv1.weight"),
            "vision_model.embeddings.position_embedding.weight" => {
                Some("visual.positional_embedding")
            }
            "vision_model.pre_layrnorm.weight" => Some("visual.ln_pre.weight"),
            "vision_model.pre_layrnorm.bias" => Some("visual.ln_pre.bias"),
            "vision_model.post_layernorm.weight" => Some("visual.ln_post.weight"),
            "vision_model.post_layernorm.bias" => Some("visual.ln_post.bias"),
            _ => None,
        };
        if let Some(name) = direct {
            out.insert(name.to_string(), t.clone());
            continue;
        }
        match key.as_str() {
            "text_projection.weight" => {
                out.insert("text_projection".into(), t.t()?.contiguous()?);
                continue;
            }
            "visual_projection.weight" => {
                out.insert("visual.proj".into(), t.t()?.contiguous()?);
                continue;
            }
            _ => {}
        }
        let (tower, rest) = if let Some(rest) = key.strip_prefix("text_model.encoder.layers.") {
            ("", rest)
        } else if let Some(rest) = key.strip_prefix("vision_model.encoder.layers.") {
            ("visual.", rest)
        } else {
            candle_core::bail!("convert: no OpenAI key for parameter {key}")
        };
        let (index, suffix) = rest
            .split_once('.')
            .ok_or_else(|| candle_core::Error::Msg(format!("convert: malformed key {key}")))?;
        let prefix = format!("{tower}transformer.resblocks.{index}");
        if let Some(proj) = suffix.strip_prefix("self_attn.")
            && let Some((which, kind)) = proj.split_once("_proj.")
            && let Some(slot) = ["q", "k", "v"].iter().position(|p| *p == which)
        {
            let kind: &'static str = if kind == "weight" { "weight" } else { "bias" };
            fused.entry((prefix, kind)).or_default()[slot] = Some(t.clone());
            continue;
        }
        match block_suffix_back(suffix) {
            Some(theirs) => {
                out.insert(format!("{prefix}.{theirs}"), t.clone());
            }
            None => candle_core::bail!("convert: no OpenAI key for parameter {key}"),
        }
    }
    for ((prefix, kind), parts) in fused {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .zip(["q", "k", "v"])
            .map(|(p, which)| {
                p.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "convert: {prefix} has no {which}_proj.{kind} to fuse into in_proj_{kind}"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        out.insert(
            format!("{prefix}.attn.in_proj_{kind}"),
            Tensor::cat(&parts, 0)?,
        );
    }
    Ok(out)
}

/// A checkpoint tensor's dims, or an error naming the key.
fn dims_of<'a>(state: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a [usize]> {
    state.get(key).map(|t| t.dims()).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "convert: the checkpoint has no {key}, needed to read the model's shape"
        ))
    })
}

/// Distinct block indices under `prefix` (`transformer.resblocks.` → 0, 1, …).
fn count_blocks(state: &HashMap<String, Tensor>, prefix: &str) -> usize {
    state
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next())
        .collect::<BTreeSet<_>>()
        .len()
}

/// The shape of the CLIP in an OpenAI/open_clip state dict, read off its tensors as
/// OpenAI's `build_model` does. Attention heads cannot be read off the tensors; like
/// `build_model` this assumes 64 channels per head (text `width / 64`, a ViT's
/// `width / 64`, a ResNet's attention pool `32 · width / 64`), true of every released
/// OpenAI CLIP. A checkpoint with another head width needs its config.
pub fn clip_config_from_openai(state: &HashMap<String, Tensor>) -> Result<ClipConfig> {
    let dim = |key: &str, i: usize| -> Result<usize> {
        let dims = dims_of(state, key)?;
        dims.get(i).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "convert: {key} has shape {dims:?}, expected at least {} dims",
                i + 1
            ))
        })
    };
    let heads = |width: usize, what: &str| -> Result<usize> {
        if width == 0 || !width.is_multiple_of(64) {
            candle_core::bail!(
                "convert: {what} width {width} is not a multiple of 64, so its heads cannot be guessed; give the model's config"
            )
        }
        Ok(width / 64)
    };
    let side = |tokens: usize, key: &str| -> Result<usize> {
        let grid = ((tokens.saturating_sub(1)) as f64).sqrt().round() as usize;
        if grid * grid + 1 != tokens {
            candle_core::bail!("convert: {key} has {tokens} rows, not a square grid plus one")
        }
        Ok(grid)
    };
    let embed_dim = dim("text_projection", 1)?;
    let text_width = dim("ln_final.weight", 0)?;
    let text = TextConfig {
        vocab_size: dim("token_embedding.weight", 0)?,
        context_length: dim("positional_embedding", 0)?,
        width: text_width,
        layers: count_blocks(state, "transformer.resblocks."),
        heads: heads(text_width, "text")?,
        mlp_dim: dim("transformer.resblocks.0.mlp.c_fc.weight", 0)?,
    };
    let vision = if has_resnet_tower(state) {
        let mut layers = [0; 4];
        for (i, n) in layers.iter_mut().enumerate() {
            *n = count_blocks(state, &format!("visual.layer{}.", i + 1));
        }
        let width = dim("visual.layer1.0.conv1.weight", 0)?;
        let key = "visual.attnpool.positional_embedding";
        ResNetConfig {
            layers,
            width,
            image_size: side(dim(key, 0)?, key)? * 32,
            heads: heads(width * 32, "resnet attention pool")?,
            embed_dim: dim("visual.attnpool.c_proj.weight", 0)?,
        }
        .into()
    } else {
        let width = dim("visual.conv1.weight", 0)?;
        let patch_size = dim("visual.conv1.weight", 3)?;
        let key = "visual.positional_embedding";
        VitConfig {
            image_size: side(dim(key, 0)?, key)? * patch_size,
            patch_size,
            channels: dim("visual.conv1.weight", 1)?,
            width,
            layers: count_blocks(state, "visual.transformer.resblocks."),
            heads: heads(width, "vision")?,
            mlp_dim: dim("visual.transformer.resblocks.0.mlp.c_fc.weight", 0)?,
        }
        .into()
    };
    Ok(ClipConfig {
        embed_dim,
        vision,
        text,
        logit_scale_init: CLIP_LOGIT_SCALE_INIT,
    })
}
