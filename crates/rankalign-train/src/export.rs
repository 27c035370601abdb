//! Trained models out, in the layout other tools load: the Hugging Face `CLIPModel`
//! layout (`config.json` + `model.safetensors`) for a ViT, open_clip's
//! (`open_clip_config.json` + `open_clip_model.safetensors`) for a ResNet image tower,
//! which `transformers` has no `CLIPModel` for (docs/decisions.md).
//!
//! Our parameter names are HF's keys, so a ViT's weights go out as they are; the config is
//! translated both ways ([`hf_config`], [`clip_config_from_hf`]). A directory written by
//! [`export_hf`] loads in `transformers.CLIPModel.from_pretrained`, and one written by
//! `save_pretrained` loads here (`tests/e2e`, and the model parity test). A ResNet model's
//! keys are converted to OpenAI's ([`rankalign_models::convert::hf_to_openai`]) and its
//! config to open_clip's ([`open_clip_config`], [`clip_config_from_open_clip`]); the
//! directory loads with `open_clip.create_model_from_pretrained("local-dir:DIR")`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rankalign_models::{ClipConfig, ResNetConfig, TextConfig, VisionConfig, VitConfig};
use serde_json::{Value, json};

use crate::{Result, TrainError, io_err};

/// `config.json` of a `CLIPModel` with this shape (QuickGELU, LayerNorm ε 1e-5, CLIP's
/// special token ids).
///
/// `transformers` has no ResNet CLIP; for one, the vision section is left out (use
/// [`open_clip_config`]).
pub fn hf_config(cfg: &ClipConfig) -> Value {
    let t = &cfg.text;
    let vision = match &cfg.vision {
        VisionConfig::Vit(v) => json!({
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
        }),
        VisionConfig::ResNet(_) => Value::Null,
    };
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
        "vision_config": vision
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
        }
        .into(),
    })
}

/// open_clip's files (`open_clip/constants.py`), weights in order of preference.
pub const OPEN_CLIP_CONFIG: &str = "open_clip_config.json";
pub const OPEN_CLIP_WEIGHTS: [&str; 2] =
    ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

/// CLIP's image normalisation (OpenAI), written as open_clip's `preprocess_cfg`.
const OPENAI_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const OPENAI_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// open_clip's `mlp_ratio` for an MLP width, if it gives that width back exactly
/// (open_clip builds `int(width * mlp_ratio)`).
fn mlp_ratio(width: usize, mlp_dim: usize) -> Result<f64> {
    let ratio = mlp_dim as f64 / width as f64;
    if (width as f64 * ratio) as usize != mlp_dim {
        return Err(TrainError::Invalid(format!(
            "open_clip cannot express an MLP width {mlp_dim} for width {width}"
        )));
    }
    Ok(ratio)
}

/// `open_clip_config.json` of a model with this shape: `model_cfg` as open_clip's
/// `CLIP(**model_cfg)` takes it (QuickGELU, heads as `head_width`) and CLIP's
/// normalisation as `preprocess_cfg`.
pub fn open_clip_config(cfg: &ClipConfig) -> Result<Value> {
    let t = &cfg.text;
    let head_width = |width: usize, heads: usize| -> Result<usize> {
        if heads == 0 || !width.is_multiple_of(heads) {
            return Err(TrainError::Invalid(format!(
                "width {width} is not divisible by {heads} heads"
            )));
        }
        Ok(width / heads)
    };
    let vision = match &cfg.vision {
        VisionConfig::ResNet(r) => json!({
            "image_size": r.image_size,
            "layers": r.layers,
            "width": r.width,
            "head_width": head_width(r.feature_dim(), r.heads)?,
            "patch_size": null
        }),
        VisionConfig::Vit(v) => json!({
            "image_size": v.image_size,
            "layers": v.layers,
            "width": v.width,
            "head_width": head_width(v.width, v.heads)?,
            "mlp_ratio": mlp_ratio(v.width, v.mlp_dim)?,
            "patch_size": v.patch_size
        }),
    };
    head_width(t.width, t.heads)?;
    Ok(json!({
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "quick_gelu": true,
            "init_logit_scale": cfg.logit_scale_init,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": t.context_length,
                "vocab_size": t.vocab_size,
                "width": t.width,
                "heads": t.heads,
                "layers": t.layers,
                "mlp_ratio": mlp_ratio(t.width, t.mlp_dim)?
            }
        },
        "preprocess_cfg": { "mean": OPENAI_MEAN, "std": OPENAI_STD }
    }))
}

/// Our shape from open_clip's `open_clip_config.json` (`{"model_cfg": …}`) or a bare
/// `model_cfg`; `path` names the file in errors. open_clip's defaults fill in absent keys
/// (`head_width` 64, `mlp_ratio` 4, the text tower 12 × 512 with 8 heads and context 77).
/// Options our towers do not implement are refused by name, and so is a model without
/// QuickGELU (open_clip's default GELU is not CLIP's activation).
pub fn clip_config_from_open_clip(json: &Value, path: &Path) -> Result<ClipConfig> {
    let err = |msg: String| TrainError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let model = json.get("model_cfg").unwrap_or(json);
    if model["quick_gelu"].as_bool() != Some(true) {
        return Err(err(
            "model_cfg.quick_gelu: only QuickGELU models (OpenAI's) are supported; this one uses GELU".into(),
        ));
    }
    let (v, t) = (&model["vision_cfg"], &model["text_cfg"]);
    const VISION_KEYS: &[&str] = &[
        "image_size",
        "layers",
        "width",
        "head_width",
        "mlp_ratio",
        "patch_size",
    ];
    const TEXT_KEYS: &[&str] = &[
        "context_length",
        "vocab_size",
        "width",
        "heads",
        "layers",
        "mlp_ratio",
    ];
    for (section, value, known) in [("vision_cfg", v, VISION_KEYS), ("text_cfg", t, TEXT_KEYS)] {
        for (key, val) in value.as_object().into_iter().flatten() {
            let inert = val.is_null()
                || val.as_bool() == Some(false)
                || val.as_f64() == Some(0.0)
                || (key == "pool_type"
                    && val.as_str()
                        == Some(if section == "text_cfg" {
                            "argmax"
                        } else {
                            "tok"
                        }));
            if !known.contains(&key.as_str()) && !inert {
                return Err(err(format!(
                    "model_cfg.{section}.{key} = {val}: not supported by rankalign's towers"
                )));
            }
        }
    }
    let num = |section: &str, value: &Value, key: &str, default: Option<usize>| -> Result<usize> {
        let at = if section.is_empty() {
            format!("model_cfg.{key}")
        } else {
            format!("model_cfg.{section}.{key}")
        };
        match value.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| err(format!("{at}: missing"))),
            Some(x) => x
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| err(format!("{at}: expected a whole number, got {x}"))),
        }
    };
    let ratio = |section: &str, value: &Value, width: usize| -> Result<usize> {
        match value.get("mlp_ratio") {
            None | Some(Value::Null) => Ok(width * 4),
            Some(x) => x
                .as_f64()
                .filter(|r| *r > 0.0)
                .map(|r| (width as f64 * r) as usize)
                .ok_or_else(|| {
                    err(format!(
                        "model_cfg.{section}.mlp_ratio: expected a positive number, got {x}"
                    ))
                }),
        }
    };
    let image_size = match &v["image_size"] {
        Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].clone(),
        Value::Array(a) => {
            return Err(err(format!(
                "model_cfg.vision_cfg.image_size {a:?}: only square images are supported"
            )));
        }
        other => other.clone(),
    };
    let image_size = num(
        "vision_cfg",
        &json!({ "image_size": image_size }),
        "image_size",
        Some(224),
    )?;
    let width = num("vision_cfg", v, "width", Some(768))?;
    let head_width = num("vision_cfg", v, "head_width", Some(64))?.max(1);
    let embed_dim = num("", model, "embed_dim", None)?;
    let vision: VisionConfig = match &v["layers"] {
        Value::Array(stages) => {
            let stages: Vec<usize> = stages
                .iter()
                .map(|s| s.as_u64().map(|n| n as usize))
                .collect::<Option<_>>()
                .filter(|s: &Vec<usize>| s.len() == 4)
                .ok_or_else(|| {
                    err(format!(
                        "model_cfg.vision_cfg.layers: expected four stage depths, got {}",
                        v["layers"]
                    ))
                })?;
            ResNetConfig {
                layers: [stages[0], stages[1], stages[2], stages[3]],
                width,
                image_size,
                heads: width * 32 / head_width,
                embed_dim,
            }
            .into()
        }
        _ => VitConfig {
            image_size,
            patch_size: num("vision_cfg", v, "patch_size", Some(16))?,
            channels: 3,
            width,
            layers: num("vision_cfg", v, "layers", Some(12))?,
            heads: width / head_width,
            mlp_dim: ratio("vision_cfg", v, width)?,
        }
        .into(),
    };
    let text_width = num("text_cfg", t, "width", Some(512))?;
    Ok(ClipConfig {
        embed_dim,
        vision,
        text: TextConfig {
            vocab_size: num("text_cfg", t, "vocab_size", Some(49408))?,
            context_length: num("text_cfg", t, "context_length", Some(77))?,
            width: text_width,
            layers: num("text_cfg", t, "layers", Some(12))?,
            heads: num("text_cfg", t, "heads", Some(8))?,
            mlp_dim: ratio("text_cfg", t, text_width)?,
        },
        logit_scale_init: model["init_logit_scale"]
            .as_f64()
            .unwrap_or(rankalign_models::clip::CLIP_LOGIT_SCALE_INIT),
    })
}

/// Check that `tensors` are a complete model of shape `cfg` (every tensor there with
/// its shape), naming `dir` in the error.
fn check_complete(cfg: &ClipConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    rankalign_models::ClipModel::new(
        cfg,
        VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu),
    )
    .map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("not a complete model of this shape: {e}"),
    })?;
    Ok(())
}

/// Write `tensors` as `dir/weights` and `config` as `dir/config_name`, each to a
/// temporary name first and then renamed, so a reader never sees half a file.
fn write_model_dir(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    weights: &str,
    config: &Value,
    config_name: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(".{weights}.tmp"));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join(weights)).map_err(io_err(dir.join(weights)))?;
    let text =
        serde_json::to_string_pretty(config).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let tmp = dir.join(format!(".{config_name}.tmp"));
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, dir.join(config_name)).map_err(io_err(dir.join(config_name)))
}

/// Write `dir/config.json` and `dir/model.safetensors` (a ViT model; a ResNet one is
/// refused, see [`export_model`]).
pub fn export_hf(cfg: &ClipConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    if let VisionConfig::ResNet(_) = cfg.vision {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            msg: "transformers has no CLIPModel with a ResNet image tower; export it in open_clip's layout (export_open_clip)".into(),
        });
    }
    check_complete(cfg, tensors, dir)?;
    write_model_dir(
        dir,
        tensors,
        "model.safetensors",
        &hf_config(cfg),
        "config.json",
    )
}

/// Write `dir/open_clip_config.json` and `dir/open_clip_model.safetensors` with OpenAI
/// keys: what open_clip's `save_for_hf` writes (less the tokenizer files, which are
/// CLIP's own), loadable by `open_clip.create_model_from_pretrained("local-dir:DIR")`.
pub fn export_open_clip(
    cfg: &ClipConfig,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    check_complete(cfg, tensors, dir)?;
    let config = open_clip_config(cfg)?;
    let theirs = rankalign_models::convert::hf_to_openai(tensors)?;
    write_model_dir(
        dir,
        &theirs,
        OPEN_CLIP_WEIGHTS[0],
        &config,
        OPEN_CLIP_CONFIG,
    )
}

/// Export in the layout that fits the model: HF `CLIPModel` for a ViT, open_clip for a
/// ResNet image tower.
pub fn export_model(cfg: &ClipConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    match cfg.vision {
        VisionConfig::Vit(_) => export_hf(cfg, tensors, dir),
        VisionConfig::ResNet(_) => export_open_clip(cfg, tensors, dir),
    }
}

/// Read a HF `CLIPModel` directory: its shape and its tensors. (Every other way of naming
/// a model, open_clip directories, single files and hub names, is
/// [`crate::pretrained::load`].)
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
/// written by `rankalign train`) to `out` ([`export_model`]: HF layout for a ViT,
/// open_clip's for a ResNet); returns the checkpoint used.
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
    let ckpt = crate::checkpoint::resume_point(&ckpt_dir)?
        .0
        .ok_or_else(|| TrainError::Checkpoint {
            path: ckpt_dir.clone(),
            msg: "no intact checkpoint (none yet, or every one is damaged)".into(),
        })?;
    let weights = ckpt.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
        TrainError::Checkpoint {
            path: weights.clone(),
            msg: e.to_string(),
        }
    })?;
    export_model(&model, &tensors, out)?;
    Ok(ckpt)
}
