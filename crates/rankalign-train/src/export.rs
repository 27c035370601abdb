//! Checkpoints in the Hugging Face `CLIPModel` layout: `config.json` + `model.safetensors`.
//!
//! Our parameter names are HF's keys, so the weights go out as they are; the config is
//! translated both ways ([`hf_config`], [`clip_config_from_hf`]). A directory written by
//! [`export_hf`] loads in `transformers.CLIPModel.from_pretrained`, and one written by
//! `save_pretrained` loads here (`tests/e2e`, and the model parity test).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rankalign_models::{ClipConfig, TextConfig, VitConfig};
use serde_json::{Value, json};

use crate::{Result, TrainError, io_err};

/// `config.json` of a `CLIPModel` with this shape (QuickGELU, LayerNorm ε 1e-5, CLIP's
/// special token ids).
pub fn hf_config(cfg: &ClipConfig) -> Value {
    let (t, v) = (&cfg.text, &cfg.vision);
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.context_length,
            "hidden_size": t.width,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "intermediate_size": t.mlp_dim,
            "projection_dim": cfg.embed_dim,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": rankalign_data::tokenize::SOT,
            "eos_token_id": rankalign_data::tokenize::EOT,
            "pad_token_id": 0
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.channels,
            "hidden_size": v.width,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "intermediate_size": v.mlp_dim,
            "projection_dim": cfg.embed_dim,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5
        }
    })
}

/// Our shape from a HF `CLIPModel` `config.json`; `path` names the file in errors.
pub fn clip_config_from_hf(json: &Value, path: &Path) -> Result<ClipConfig> {
    let err = |msg: String| TrainError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let get = |section: &str, key: &str| -> Result<usize> {
        let v = if section.is_empty() {
            &json[key]
        } else {
            &json[section][key]
        };
        v.as_u64().map(|n| n as usize).ok_or_else(|| {
            err(format!(
                "{}{key}: expected a whole number",
                if section.is_empty() {
                    String::new()
                } else {
                    format!("{section}.")
                }
            ))
        })
    };
    for (section, act) in [
        ("text_config", &json["text_config"]["hidden_act"]),
        ("vision_config", &json["vision_config"]["hidden_act"]),
    ] {
        if !act.is_null() && act.as_str() != Some("quick_gelu") {
            return Err(err(format!(
                "{section}.hidden_act: only quick_gelu is supported, got {act}"
            )));
        }
    }
    Ok(ClipConfig {
        embed_dim: get("", "projection_dim")?,
        logit_scale_init: json["logit_scale_init_value"]
            .as_f64()
            .unwrap_or(rankalign_models::clip::CLIP_LOGIT_SCALE_INIT),
        text: TextConfig {
            vocab_size: get("text_config", "vocab_size")?,
            context_length: get("text_config", "max_position_embeddings")?,
            width: get("text_config", "hidden_size")?,
            layers: get("text_config", "num_hidden_layers")?,
            heads: get("text_config", "num_attention_heads")?,
            mlp_dim: get("text_config", "intermediate_size")?,
        },
        vision: VitConfig {
            image_size: get("vision_config", "image_size")?,
            patch_size: get("vision_config", "patch_size")?,
            channels: json["vision_config"]["num_channels"].as_u64().unwrap_or(3) as usize,
            width: get("vision_config", "hidden_size")?,
            layers: get("vision_config", "num_hidden_layers")?,
            heads: get("vision_config", "num_attention_heads")?,
            mlp_dim: get("vision_config", "intermediate_size")?,
        },
    })
}

/// Write `dir/config.json` and `dir/model.safetensors` (written to temporary names, then
/// renamed, so a reader never sees half a file).
pub fn export_hf(cfg: &ClipConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    // Building the model checks that every tensor is there with its shape.
    rankalign_models::ClipModel::new(
        cfg,
        VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu),
    )
    .map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("not a complete model of this shape: {e}"),
    })?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))
        .map_err(io_err(dir.join("model.safetensors")))?;
    let text = serde_json::to_string_pretty(&hf_config(cfg))
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let tmp = dir.join(".config.json.tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, dir.join("config.json")).map_err(io_err(dir.join("config.json")))
}

/// Read a HF `CLIPModel` directory: its shape and its tensors.
pub fn load_hf(
    dir: &Path,
    device: &candle_core::Device,
) -> Result<(ClipConfig, HashMap<String, Tensor>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| TrainError::Config {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    let cfg = clip_config_from_hf(&json, &cfg_path)?;
    let weights = dir.join("model.safetensors");
    if !weights.exists() {
        return Err(TrainError::Checkpoint {
            path: weights,
            msg: "missing: a CLIPModel directory holds model.safetensors".into(),
        });
    }
    let tensors =
        candle_core::safetensors::load(&weights, device).map_err(|e| TrainError::Checkpoint {
            path: weights.clone(),
            msg: e.to_string(),
        })?;
    Ok((cfg, tensors))
}

/// Export the latest checkpoint of `variant` in the experiment directory `run_dir` (as
/// written by `rankalign train`) to `out` in the HF layout; returns the checkpoint used.
pub fn export_run(run_dir: &Path, variant: &str, out: &Path) -> Result<std::path::PathBuf> {
    let cfg_path = run_dir.join("config.toml");
    let exp = crate::ExperimentConfig::load(&cfg_path)?;
    if !exp.variants.iter().any(|v| v.name == variant) {
        let names: Vec<&str> = exp.variants.iter().map(|v| v.name.as_str()).collect();
        return Err(TrainError::Config {
            path: cfg_path,
            msg: format!("no variant {variant:?}; the run has {names:?}"),
        });
    }
    let model = exp.model.resolve().map_err(|msg| TrainError::Config {
        path: cfg_path.clone(),
        msg,
    })?;
    if let Some(crate::text_tower::TextTowerConfig::Minilm { .. }) = exp.model.text_tower {
        return Err(TrainError::Config {
            path: cfg_path,
            msg: "a model with the MiniLM text tower has no CLIPModel layout to export".into(),
        });
    }
    let ckpt_dir = run_dir.join(variant).join("checkpoints");
    let ckpt = crate::checkpoint::latest(&ckpt_dir)?.ok_or_else(|| TrainError::Checkpoint {
        path: ckpt_dir.clone(),
        msg: "no checkpoint yet".into(),
    })?;
    let weights = ckpt.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
        TrainError::Checkpoint {
            path: weights.clone(),
            msg: e.to_string(),
        }
    })?;
    export_hf(&model, &tensors, out)?;
    Ok(ckpt)
}
