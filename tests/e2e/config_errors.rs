//! Bad configs and data files give errors that name the file, the key and what was
//! expected, and never panic.

use std::path::Path;

use candle_core::Device;
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::{scratch, tiny_config};

const VARIANT: &str = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";

fn parse_err(text: &str) -> String {
    ExperimentConfig::parse(text, Path::new("bad.toml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let dir = scratch("cfg-unknown");
    let text = tiny_config("x", &dir, VARIANT)
        .replace("weight_decay = 0.1", "weight_decay = 0.1\nlrr = 3");
    let err = parse_err(&text);
    assert!(
        err.starts_with("bad.toml") && err.contains("lrr") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn bad_values_are_named_by_key() {
    let dir = scratch("cfg-values");
    let text = tiny_config("x", &dir, VARIANT)
        .replace("lr = 1e-3", "lr = -1.0")
        .replace("batch_size = 16", "batch_size = 1000");
    let err = parse_err(&text);
    assert!(err.contains("optim.lr must be > 0, got -1"), "{err}");
    assert!(
        err.contains("train.batch_size 1000 exceeds data.train_size 64"),
        "{err}"
    );
    let err =
        parse_err(&tiny_config("x", &dir, VARIANT).replace("kind = \"clip\"", "kind = \"clipp\""));
    assert!(err.contains("clipp"), "{err}");
    let err = parse_err(&tiny_config(
        "x",
        &dir,
        "[[variant]]\nname = \"r\"\nloss = { kind = \"rankclip\", lambda_in = -2.0 }\n",
    ));
    assert!(err.contains("variant[0].loss.lambda_in"), "{err}");
    let err = parse_err("name = \"x\"\nseed = \"seven\"\n");
    assert!(err.contains("seed") || err.contains("string"), "{err}");
}

#[test]
fn a_model_for_another_image_size_is_rejected() {
    let dir = scratch("cfg-size");
    let text = tiny_config("x", &dir, VARIANT).replacen(
        "image_size = 24\ntrain_size",
        "image_size = 36\ntrain_size",
        1,
    );
    let err = parse_err(&text);
    assert!(
        err.contains("model image size 24 differs from data.image_size 36"),
        "{err}"
    );
}

#[test]
fn a_missing_data_file_is_named() {
    let dir = scratch("cfg-missing");
    let text = tiny_config("x", &dir, VARIANT).replace(
        "test_size = 40",
        "test_size = 40\nmnist_images = \"/nonexistent/digits.idx3-ubyte.gz\"\nmnist_labels = \"/nonexistent/labels.idx1-ubyte.gz\"",
    );
    let cfg = ExperimentConfig::parse(&text, Path::new("x.toml")).unwrap();
    let err = run_experiment(&cfg, &Device::Cpu, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/digits.idx3-ubyte.gz"), "{err}");
}

#[test]
fn a_missing_config_file_is_named() {
    let err = ExperimentConfig::load(Path::new("/nonexistent/exp.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/exp.toml"), "{err}");
}
