//! Checkpoint key layouts: OpenAI / open_clip state dicts into our (Hugging Face) names.
//!
//! OpenAI's `model.pt` and open_clip's ViT checkpoints name things differently and store
//! two tensors differently: attention projections are one fused `in_proj_weight`
//! `(3w, w)` (split here into q, k, v), and `visual.proj` / `text_projection` are `(w, e)`
//! matrices used as `x @ W` (transposed here into `Linear` weights `(e, w)`). The mapping
//! is pure; reading the file is the caller's.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

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

/// Convert an OpenAI/open_clip ViT CLIP state dict to our parameter names. Keys that are
/// buffers (`attn_mask`, `position_ids`) are dropped; any other unknown key is an error
/// that names it (ResNet image towers are not supported yet).
pub fn openai_to_hf(state: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (key, t) in state {
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
            candle_core::bail!(
                "convert: no rankalign parameter for checkpoint key {key} (ResNet image towers are not supported yet)"
            )
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
