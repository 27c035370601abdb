//! The MiniLM text tower chosen in a config: parsing and errors everywhere, and, when
//! `cargo xtask fetch minilm` has put the model in place (or `RANKALIGN_MINILM_DIR`
//! names it), a short training run whose checkpoints hold the trained projection and
//! none of the frozen BERT weights.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::{scratch, tiny_config};

const VARIANT: &str = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";

fn with_tower(name: &str, dir: &Path, tower: &str) -> String {
    tiny_config(name, dir, VARIANT).replacen(
        "[model.clip]",
        &format!("[model]\ntext_tower = {tower}\n\n[model.clip]"),
        1,
    )
}

fn minilm_dir() -> Option<PathBuf> {
    let dir = rankalign_train::data::wordpiece::minilm_cache_dir()?;
    if ["model.safetensors", "config.json", "tokenizer.json"]
        .iter()
        .all(|f| dir.join(f).is_file())
    {
        Some(dir)
    } else {
        eprintln!(
            "skipped: no all-MiniLM-L6-v2 in {} (run `cargo xtask fetch minilm`)",
            dir.display()
        );
        None
    }
}

#[test]
fn text_tower_config_parses_and_bad_ones_are_explained() {
    let dir = scratch("minilm-cfg");
    let text = with_tower(
        "m",
        &dir,
        r#"{ kind = "minilm", dir = "/nonexistent/minilm" }"#,
    );
    let cfg = ExperimentConfig::parse(&text, Path::new("m.toml")).unwrap();
    assert!(format!("{:?}", cfg.model.text_tower).contains("max_tokens: 256"));
    let clip = with_tower("m", &dir, r#"{ kind = "clip" }"#);
    ExperimentConfig::parse(&clip, Path::new("m.toml")).unwrap();

    let err = ExperimentConfig::parse(
        &with_tower("m", &dir, r#"{ kind = "bert" }"#),
        Path::new("bad.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.toml") && err.contains("bert"), "{err}");
    let err = ExperimentConfig::parse(
        &with_tower(
            "m",
            &dir,
            r#"{ kind = "minilm", dir = "x", max_tokens = 1 }"#,
        ),
        Path::new("bad.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.text_tower.max_tokens"), "{err}");

    // A missing model directory is an error naming the file, not a panic.
    let err = run_experiment(&cfg, &Device::Cpu, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/minilm/tokenizer.json"), "{err}");
}

#[test]
fn training_with_the_minilm_tower_checkpoints_only_the_projection() {
    let Some(model_dir) = minilm_dir() else {
        return;
    };
    let dir = scratch("minilm-train");
    let tower = format!(
        r#"{{ kind = "minilm", dir = "{}", max_tokens = 32 }}"#,
        model_dir.display()
    );
    let cfg = ExperimentConfig::parse(&with_tower("m", &dir, &tower), Path::new("m.toml")).unwrap();
    let opts = RunOptions {
        stop_after: Some(4),
        ..Default::default()
    };
    let out = run_experiment(&cfg, &Device::Cpu, &opts).unwrap();
    let v = &out.variants[0];
    assert!(v.final_loss.is_finite(), "{}", v.final_loss);
    let ckpt = rankalign_train::checkpoint::latest(&dir.join("m/clip/checkpoints"))
        .unwrap()
        .expect("a checkpoint after 4 steps")
        .join("model.safetensors");
    let tensors = candle_core::safetensors::load(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(tensors["text_projection.weight"].dims(), [16, 384]);
    let bert: Vec<&String> = tensors
        .keys()
        .filter(|k| {
            k.starts_with("embeddings.")
                || k.starts_with("encoder.")
                || k.starts_with("text_model.")
        })
        .collect();
    assert!(
        bert.is_empty(),
        "frozen or absent weights in the checkpoint: {bert:?}"
    );
    // Export to a CLIPModel is refused with the reason.
    let err = rankalign_train::export::export_run(&dir.join("m"), "clip", &dir.join("hf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("MiniLM"), "{err}");
}
