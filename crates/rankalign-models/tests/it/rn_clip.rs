//! CLIP with a ResNet image tower: an open_clip RN CLIP state dict (OpenAI keys,
//! `gen_open_clip_rn50.py`) converted and loaded computes open_clip's image features (eval
//! and train mode), text features and logits; RN50's parameter count; the key mapping both
//! ways and the shape read off a state dict; and a mis-shaped tensor named with both shapes.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rankalign_models::convert::{clip_config_from_openai, hf_to_openai, openai_to_hf};
use rankalign_models::resnet::is_buffer;
use rankalign_models::{ClipConfig, ClipModel, ResNetConfig, SeededVarMap, TextConfig, VitConfig};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// The shape `gen_open_clip_rn50.py` builds for the whole CLIP.
fn small_rn() -> ClipConfig {
    ClipConfig {
        embed_dim: 32,
        vision: ResNetConfig {
            layers: [1, 1, 1, 1],
            width: 4,
            image_size: 64,
            heads: 2,
            embed_dim: 32,
        }
        .into(),
        text: TextConfig {
            vocab_size: 512,
            context_length: 16,
            width: 32,
            layers: 2,
            heads: 2,
            mlp_dim: 64,
        },
        logit_scale_init: 2.659_260_036_932_778,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn state() -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(
        format!("{FIXTURES}/open_clip_rn_clip_small/open_clip_model.safetensors"),
        &Device::Cpu,
    )
}

/// Flat EOT indices at open_clip's pooling position, argmax(ids).
fn eot_index(ids: &Tensor) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let eot = ids.argmax(1)?.to_vec1::<u32>()?;
    Tensor::from_vec(
        eot.iter()
            .enumerate()
            .map(|(i, &p)| i as u32 * s as u32 + p)
            .collect::<Vec<_>>(),
        b,
        ids.device(),
    )
}

#[test]
fn matches_open_clip_rn_clip_in_eval_and_train_mode() -> Result<()> {
    let dev = Device::Cpu;
    let io = candle_core::safetensors::load(
        format!("{FIXTURES}/open_clip_rn_clip_small_io.safetensors"),
        &dev,
    )?;
    let raw = state()?;
    let weights = openai_to_hf(raw.clone())?;
    assert!(!weights.keys().any(|k| k.ends_with("num_batches_tracked")));
    assert_eq!(
        weights.len(),
        raw.keys()
            .filter(|k| !k.ends_with("num_batches_tracked"))
            .count()
            + 2 * 4, // each text block's in_proj weight and bias become three tensors each
    );
    let n_weights = weights.len();
    // Loaded as the trainer does: every tensor a variable, nothing left over.
    let vm = SeededVarMap::new(0);
    vm.preload(weights, DType::F32, &dev)?;
    let model = ClipModel::new(&small_rn(), vm.var_builder(DType::F32, &dev))?;
    vm.finish_preload()?;
    assert_eq!(vm.named_vars().len(), n_weights);
    assert!(!model.buffer_names().is_empty());

    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let eot = eot_index(&ids)?;
    let pixels = &io["pixel_values"];
    let img = model.encode_image(pixels)?;
    let txt = model.encode_text(&ids, &eot)?;
    let norm = rankalign_kernels::l2_normalize;
    let logits = norm(&img)?
        .matmul(&norm(&txt)?.t()?)?
        .broadcast_mul(&model.logit_scale().exp()?)?;
    let e_img = max_abs_diff(&img, &io["image_features"])?;
    let e_txt = max_abs_diff(&txt, &io["text_features"])?;
    let e_logits = max_abs_diff(&logits, &io["logits_per_image"])?;
    // Train mode: batch statistics (and an update of the running ones).
    let img_train = model.encode_image_t(pixels, true)?;
    let e_train = max_abs_diff(&img_train, &io["image_features_train"])?;
    assert!(
        max_abs_diff(&img, &img_train)? > 1e-2,
        "modes should differ"
    );
    let again = model.encode_image(pixels)?;
    assert!(
        max_abs_diff(&img, &again)? > 0.0,
        "train mode moved the running statistics"
    );
    eprintln!(
        "RN CLIP parity with open_clip, max |Δ|: image {e_img:e}, image (train mode) {e_train:e}, \
         text {e_txt:e}, logits {e_logits:e}"
    );
    assert!(
        e_img < 1e-4 && e_train < 1e-4 && e_txt < 1e-4 && e_logits < 1e-4,
        "image {e_img:e}, train {e_train:e}, text {e_txt:e}, logits {e_logits:e}"
    );
    Ok(())
}

/// 102,007,137 is `sum(p.numel() for p in open_clip.create_model("RN50-quickgelu").parameters())`
/// (open_clip 3.3.0, printed by `gen_open_clip_rn50.py`); BatchNorm's running statistics
/// are buffers, not parameters.
#[test]
fn rn50_preset_has_open_clip_parameter_count() -> Result<()> {
    let names = crate::Recorder::default();
    let rec = std::sync::Arc::new(names);
    let vb = VarBuilder::from_backend(
        Box::new(crate::Shared(rec.clone())),
        DType::F32,
        Device::Cpu,
    );
    let model = ClipModel::new(&ClipConfig::rn50(), vb)?;
    let recorded = rec.0.lock().unwrap().clone();
    let params: usize = recorded
        .iter()
        .filter(|(n, _)| !is_buffer(n))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(params, 102_007_137);
    let buffers = recorded.iter().filter(|(n, _)| is_buffer(n)).count();
    assert_eq!(buffers, model.buffer_names().len());
    for key in [
        "visual.layer1.0.conv1.weight",
        "visual.attnpool.c_proj.weight",
        "text_model.encoder.layers.11.self_attn.q_proj.weight",
        "text_projection.weight",
        "logit_scale",
    ] {
        assert!(recorded.iter().any(|(n, _)| n == key), "missing {key}");
    }
    assert!(
        !recorded
            .iter()
            .any(|(n, _)| n.starts_with("visual_projection"))
    );
    Ok(())
}

/// Our parameters → OpenAI keys → ours is the identity, and the shape read off the
/// OpenAI state dict is the model's (64-channel heads, as every OpenAI CLIP).
#[test]
fn keys_round_trip_and_shapes_are_read_off_the_state_dict() -> Result<()> {
    let dev = Device::Cpu;
    let text = TextConfig {
        vocab_size: 100,
        context_length: 8,
        width: 64,
        layers: 2,
        heads: 1,
        mlp_dim: 256,
    };
    let rn = ClipConfig {
        embed_dim: 16,
        vision: ResNetConfig {
            layers: [1, 2, 1, 1],
            width: 2,
            image_size: 64,
            heads: 1,
            embed_dim: 16,
        }
        .into(),
        text: text.clone(),
        logit_scale_init: rankalign_models::clip::CLIP_LOGIT_SCALE_INIT,
    };
    let vit = ClipConfig {
        vision: VitConfig {
            image_size: 32,
            patch_size: 16,
            channels: 3,
            width: 128,
            layers: 3,
            heads: 2,
            mlp_dim: 512,
        }
        .into(),
        ..rn.clone()
    };
    for cfg in [rn, vit] {
        let vm = SeededVarMap::new(3);
        ClipModel::new(&cfg, vm.var_builder(DType::F32, &dev))?;
        let ours: HashMap<String, Tensor> = vm
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let theirs = hf_to_openai(&ours)?;
        assert!(theirs.contains_key("text_projection"));
        assert!(theirs.contains_key("transformer.resblocks.1.attn.in_proj_weight"));
        assert_eq!(clip_config_from_openai(&theirs)?, cfg);
        let back = openai_to_hf(theirs)?;
        assert_eq!(back.len(), ours.len());
        for (name, t) in &ours {
            assert_eq!(max_abs_diff(t, &back[name])?, 0.0, "{name}");
        }
    }
    Ok(())
}

#[test]
fn heads_that_cannot_be_read_off_and_misshaped_tensors_are_named() -> Result<()> {
    let dev = Device::Cpu;
    let err = clip_config_from_openai(&state()?).unwrap_err().to_string();
    assert!(
        err.contains("text width 32") && err.contains("config"),
        "{err}"
    );

    let mut weights = openai_to_hf(state()?)?;
    weights.insert(
        "visual.layer2.0.conv2.weight".into(),
        Tensor::zeros((8, 8, 1, 1), DType::F32, &dev)?,
    );
    let err = ClipModel::new(
        &small_rn(),
        VarBuilder::from_tensors(weights, DType::F32, &dev),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("visual.layer2.0.conv2.weight")
            && err.contains("[8, 8, 3, 3]")
            && err.contains("[8, 8, 1, 1]"),
        "{err}"
    );

    let mut cfg = small_rn();
    cfg.embed_dim = 16;
    let err = ClipModel::new(&cfg, SeededVarMap::new(0).var_builder(DType::F32, &dev))
        .unwrap_err()
        .to_string();
    assert!(err.contains("embed_dim 32") && err.contains("16"), "{err}");
    assert!(cfg.validate().is_err());
    Ok(())
}

#[test]
fn tiny_rn_preset_runs_in_both_modes() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = ClipConfig::preset("tiny-rn").unwrap();
    cfg.validate()?;
    let model = ClipModel::new(&cfg, SeededVarMap::new(1).var_builder(DType::F32, &dev))?;
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev)?;
    assert_eq!(model.encode_image(&pixels)?.dims(), [2, 32]);
    assert_eq!(model.encode_image_t(&pixels, true)?.dims(), [2, 32]);
    Ok(())
}
