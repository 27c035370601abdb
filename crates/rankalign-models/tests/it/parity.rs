//! Our CLIP loads checkpoints written by Hugging Face `CLIPModel.save_pretrained` and by
//! open_clip (OpenAI key layout, converted), with random weights and small configs
//! (`tests/fixtures/gen_hf_clip.py`, `gen_open_clip.py`), and computes the references'
//! image features, text features and logits.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rankalign_models::{ClipConfig, ClipModel, TextConfig, VitConfig};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// The shape `gen_hf_clip.py` builds.
fn small() -> ClipConfig {
    ClipConfig {
        embed_dim: 32,
        vision: VitConfig {
            image_size: 32,
            patch_size: 8,
            channels: 3,
            width: 64,
            layers: 2,
            heads: 4,
            mlp_dim: 128,
        }
        .into(),
        text: TextConfig {
            vocab_size: 512,
            context_length: 16,
            width: 64,
            layers: 2,
            heads: 4,
            mlp_dim: 128,
        },
        logit_scale_init: 2.659_260_036_932_778,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn matches_transformers_forward_pass() -> Result<()> {
    let dev = Device::Cpu;
    let weights = candle_core::safetensors::load(
        format!("{FIXTURES}/hf_clip_small/model.safetensors"),
        &dev,
    )?;
    let io =
        candle_core::safetensors::load(format!("{FIXTURES}/hf_clip_small_io.safetensors"), &dev)?;
    let model = ClipModel::new(
        &small(),
        VarBuilder::from_tensors(weights, DType::F32, &dev),
    )?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let (b, s) = ids.dims2()?;
    let eot_pos = io["eot"].to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let eot = Tensor::from_vec(
        eot_pos
            .iter()
            .enumerate()
            .map(|(i, &p)| i as u32 * s as u32 + p)
            .collect::<Vec<_>>(),
        b,
        &dev,
    )?;

    let img = model.encode_image(&io["pixel_values"])?;
    let txt = model.encode_text(&ids, &eot)?;
    let e_img = max_abs_diff(&img, &io["image_features"])?;
    let e_txt = max_abs_diff(&txt, &io["text_features"])?;
    let norm = rankalign_kernels::l2_normalize;
    let logits = norm(&img)?
        .matmul(&norm(&txt)?.t()?)?
        .broadcast_mul(&model.logit_scale().exp()?)?;
    let e_logits = max_abs_diff(&logits, &io["logits_per_image"])?;
    eprintln!(
        "parity with transformers, max |Δ|: image {e_img:e}, text {e_txt:e}, logits {e_logits:e}"
    );
    assert!(
        e_img < 1e-4 && e_txt < 1e-4 && e_logits < 1e-4,
        "max |Δ|: image {e_img:e}, text {e_txt:e}, logits {e_logits:e}"
    );
    Ok(())
}

#[test]
fn a_missing_or_misshaped_tensor_is_named() -> Result<()> {
    let dev = Device::Cpu;
    let path = format!("{FIXTURES}/hf_clip_small/model.safetensors");
    let mut weights = candle_core::safetensors::load(&path, &dev)?;
    weights.remove("text_model.final_layer_norm.weight");
    let err = ClipModel::new(
        &small(),
        VarBuilder::from_tensors(weights, DType::F32, &dev),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("text_model.final_layer_norm.weight"), "{err}");

    let mut weights = candle_core::safetensors::load(&path, &dev)?;
    weights.insert(
        "visual_projection.weight".into(),
        Tensor::zeros((16, 64), DType::F32, &dev)?,
    );
    let err = ClipModel::new(
        &small(),
        VarBuilder::from_tensors(weights, DType::F32, &dev),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("visual_projection.weight")
            && err.contains("32, 64")
            && err.contains("16, 64"),
        "{err}"
    );
    Ok(())
}

/// An open_clip (OpenAI layout) checkpoint, converted to our names, computes open_clip's
/// image and text features (`tests/fixtures/gen_open_clip.py`).
#[test]
fn matches_open_clip_forward_pass() -> Result<()> {
    let dev = Device::Cpu;
    let state =
        candle_core::safetensors::load(format!("{FIXTURES}/open_clip_small.safetensors"), &dev)?;
    let io =
        candle_core::safetensors::load(format!("{FIXTURES}/open_clip_small_io.safetensors"), &dev)?;
    let cfg = small();
    let weights = rankalign_models::convert::openai_to_hf(state)?;
    let model = ClipModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev))?;
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let (b, s) = ids.dims2()?;
    // open_clip pools at argmax(ids): the EOT, the largest id.
    let eot = ids.argmax(1)?.to_vec1::<u32>()?;
    let eot = Tensor::from_vec(
        eot.iter()
            .enumerate()
            .map(|(i, &p)| i as u32 * s as u32 + p)
            .collect::<Vec<_>>(),
        b,
        &dev,
    )?;
    let e_img = max_abs_diff(
        &model.encode_image(&io["pixel_values"])?,
        &io["image_features"],
    )?;
    let e_txt = max_abs_diff(&model.encode_text(&ids, &eot)?, &io["text_features"])?;
    eprintln!("parity with open_clip, max |Δ|: image {e_img:e}, text {e_txt:e}");
    assert!(
        e_img < 1e-4 && e_txt < 1e-4,
        "image {e_img:e}, text {e_txt:e}"
    );
    Ok(())
}

#[test]
fn unknown_checkpoint_keys_are_named() {
    let dev = Device::Cpu;
    for (keys, bad) in [
        (
            &["visual.ln_pre.weight", "visual.head.weight"][..],
            "visual.head.weight",
        ),
        (
            &["visual.layer1.0.conv1.weight", "visual.fc.weight"],
            "visual.fc.weight",
        ),
        (
            &["transformer.resblocks.0.attn.qkv"],
            "transformer.resblocks.0.attn.qkv",
        ),
    ] {
        let state = keys
            .iter()
            .map(|k| (k.to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap()))
            .collect();
        let err = rankalign_models::convert::openai_to_hf(state)
            .unwrap_err()
            .to_string();
        assert!(err.contains(bad), "{err}");
    }
}
