//! A trained variant exported in the Hugging Face layout loads back with the same shape
//! and gives the same embeddings; a bad request names what is missing.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rankalign_train::export::{export_run, load_hf};
use rankalign_train::models::ClipModel;
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::{scratch, tiny_config, train_tiny};

const VARIANT: &str = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";

#[test]
fn export_round_trips() {
    let dir = scratch("export");
    let (cfg, _) = train_tiny(&dir, "run", VARIANT, 4);
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

/// A run can start from an exported (HF-layout) model; the weights stay trainable, and a
/// directory with a tensor missing is refused by name.
#[test]
fn training_starts_from_an_hf_directory() {
    let dir = scratch("init-from");
    train_tiny(&dir, "first", VARIANT, 4);
    let hf = dir.join("hf");
    export_run(&dir.join("first"), "clip", &hf).unwrap();

    let text = tiny_config("second", &dir, VARIANT).replace(
        "[model.clip]",
        &format!("[model]\ninit_from = \"{}\"\n\n[model.clip]", hf.display()),
    );
    let second = ExperimentConfig::parse(&text, Path::new("y.toml")).unwrap();
    let out = run_experiment(
        &second,
        &Device::Cpu,
        &RunOptions {
            stop_after: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    // The first step of the second run starts where the first run ended: its loss is
    // that of trained weights, below a fresh model's.
    let fresh = run_experiment(
        &ExperimentConfig::parse(&tiny_config("fresh", &dir, VARIANT), Path::new("z.toml"))
            .unwrap(),
        &Device::Cpu,
        &RunOptions {
            stop_after: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let first_loss = |o: &rankalign_train::ExperimentOutcome| o.variants[0].history[0].loss;
    assert!(
        first_loss(&out) != first_loss(&fresh),
        "init_from had no effect"
    );
    let ckpt = candle_core::safetensors::load(
        dir.join("second/clip/checkpoints/step-00000001/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        ckpt.len(),
        46,
        "exactly the model's parameters are trained and saved"
    );

    // Remove one tensor: the error names it and the directory.
    let weights = hf.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.remove("text_projection.weight");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let third = ExperimentConfig::parse(
        &text.replace("name = \"second\"", "name = \"third\""),
        Path::new("y.toml"),
    )
    .unwrap();
    let err = run_experiment(
        &third,
        &Device::Cpu,
        &RunOptions {
            stop_after: Some(1),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("text_projection.weight") && err.contains("hf"),
        "{err}"
    );
}

/// `embed` writes unit-norm rows in input order, equal to the model's own forward pass on
/// the transformed images; an unreadable image is named.
#[test]
fn embed_writes_normalised_rows_and_names_bad_files() {
    use rankalign_train::data::Image;
    use rankalign_train::data::batch::collate_images;
    let dir = scratch("embed");
    train_tiny(&dir, "run", VARIANT, 2);
    let hf = dir.join("hf");
    export_run(&dir.join("run"), "clip", &hf).unwrap();
    // Two images of other sizes than the model's 24 px, written as PNG.
    let mut paths = Vec::new();
    for (i, (w, h)) in [(40usize, 30usize), (24, 50)].iter().enumerate() {
        let data: Vec<u8> = (0..w * h * 3)
            .map(|k| ((k * 7 + i * 91) % 256) as u8)
            .collect();
        let p = dir.join(format!("img{i}.png"));
        image::save_buffer(
            &p,
            &data,
            *w as u32,
            *h as u32,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        paths.push(p);
    }
    let texts = vec![
        "a 3".to_string(),
        "two digits, a 4 above a 1".to_string(),
        "an 8".to_string(),
    ];
    let out = dir.join("emb/out.safetensors");
    let bar = indicatif::ProgressBar::hidden();
    let (n, m) =
        rankalign_train::embed::embed(&hf, &paths, &texts, &out, 1, &bar, &Device::Cpu).unwrap();
    assert_eq!((n, m), (2, 3));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["image_embeds"].dims(), [2, 16]);
    assert_eq!(t["text_embeds"].dims(), [3, 16]);
    for norm in t["text_embeds"]
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    {
        assert!((norm - 1.0).abs() < 1e-5);
    }
    // Row 1 is the second image through the same transform and model.
    let (shape, tensors) = load_hf(&hf, &Device::Cpu).unwrap();
    let model = ClipModel::new(
        &shape,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let img = Image::open(&paths[1]).unwrap().clip_eval(24);
    let x = model
        .encode_image(&collate_images(&[&img], 24, &Device::Cpu).unwrap())
        .unwrap();
    // Normalised as `embed` normalises, so that the rows must agree to the bit.
    let x = rankalign_train::kernels::l2_normalize(&x).unwrap();
    let want = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = t["image_embeds"].get(1).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(want, got);
    assert!(
        std::fs::read_to_string(dir.join("emb/out.safetensors.json"))
            .unwrap()
            .contains("img1.png")
    );

    let bad = dir.join("broken.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let err = rankalign_train::embed::embed(&hf, &[bad], &[], &out, 4, &bar, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.png") && err.contains("image"), "{err}");
}
