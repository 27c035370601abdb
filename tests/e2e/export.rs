//! A trained variant exported in the Hugging Face layout loads back with the same shape
//! and gives the same embeddings; a bad request names what is missing.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rankalign_train::export::{export_run, load_hf};
use rankalign_train::models::ClipModel;
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::{scratch, tiny_config};

const VARIANT: &str = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";

#[test]
fn export_round_trips() {
    let dir = scratch("export");
    let cfg =
        ExperimentConfig::parse(&tiny_config("run", &dir, VARIANT), Path::new("x.toml")).unwrap();
    run_experiment(
        &cfg,
        &Device::Cpu,
        &RunOptions {
            stop_after: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    let out = dir.join("hf");
    let ckpt = export_run(&dir.join("run"), "clip", &out).unwrap();
    assert!(ckpt.ends_with("step-00000004"));

    let (shape, tensors) = load_hf(&out, &Device::Cpu).unwrap();
    assert_eq!(shape, cfg.model.resolve().unwrap());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["architectures"][0], "CLIPModel");
    assert_eq!(json["text_config"]["eos_token_id"], 49407);

    let exported = ClipModel::new(
        &shape,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let original =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
    let original = ClipModel::new(
        &shape,
        VarBuilder::from_tensors(original, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let pixels = Tensor::ones((1, 3, 24, 24), DType::F32, &Device::Cpu).unwrap();
    let a = exported
        .encode_image(&pixels)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = original
        .encode_image(&pixels)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);

    let err = export_run(&dir.join("run"), "nope", &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no variant \"nope\"") && err.contains("clip"),
        "{err}"
    );
    let err = load_hf(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}
