//! End-to-end tests of the training stack as a user drives it: exact resume, every
//! parameter trained, divergence handling, pretrained weights in every layout (and a
//! ResNet CLIP through training, export and loading), and clear errors on bad input.

mod agreement;
mod config_errors;
mod data_parallel;
mod evaluation;
mod export;
mod gradients;
mod micro_batch;
mod minilm;
mod ordinal;
mod pretrained;
mod resume;
mod sources;

use std::path::PathBuf;

/// A fresh directory under the system temp dir for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rankalign-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny experiment `name` under `dir` with one `variant` table, trained for
/// `steps` steps (then stopped with a checkpoint, as an interrupted run).
pub fn train_tiny(
    dir: &std::path::Path,
    name: &str,
    variant: &str,
    steps: usize,
) -> (
    rankalign_train::ExperimentConfig,
    rankalign_train::ExperimentOutcome,
) {
    let cfg = rankalign_train::ExperimentConfig::parse(
        &tiny_config(name, dir, variant),
        std::path::Path::new("tiny.toml"),
    )
    .unwrap();
    let opts = rankalign_train::RunOptions {
        stop_after: Some(steps),
        ..Default::default()
    };
    let out = rankalign_train::run_experiment(&cfg, &candle_core::Device::Cpu, &opts).unwrap();
    (cfg, out)
}

/// One-layer, 32-wide towers on 24 px images: small enough to train in seconds.
pub const TINY_MODEL: &str = r#"
[model.clip]
embed_dim = 16
logit_scale_init = 2.6592600369327779

[model.clip.vision]
image_size = 24
patch_size = 12
channels = 3
width = 32
layers = 1
heads = 2
mlp_dim = 64

[model.clip.text]
vocab_size = 49408
context_length = 24
width = 32
layers = 1
heads = 2
mlp_dim = 64
"#;

/// A config small enough to train in seconds: 24 px scenes, the [`TINY_MODEL`].
pub fn tiny_config(name: &str, out_dir: &std::path::Path, extra_variant: &str) -> String {
    tiny_experiment(
        name,
        out_dir,
        "source = \"digits\"\nimage_size = 24\ntrain_size = 64\ntest_size = 40\n",
        "zero_shot_size = 20\nretrieval_size = 20\nbatch_size = 32\n",
        2,
        extra_variant,
    )
}

/// The [`TINY_MODEL`] experiment over the `[data]` table `data`, with the `[eval]`
/// table `eval`, `epochs` of batch 16.
pub fn tiny_experiment(
    name: &str,
    out_dir: &std::path::Path,
    data: &str,
    eval: &str,
    epochs: usize,
    extra_variant: &str,
) -> String {
    format!(
        r#"
name = "{name}"
out_dir = "{out}"
seed = 5

[data]
{data}
{TINY_MODEL}
[optim]
lr = 1e-3
weight_decay = 0.1
warmup_steps = 2

[train]
batch_size = 16
epochs = {epochs}
checkpoint_every = 4
keep_checkpoints = 3
log_every = 1

[eval]
{eval}
{extra_variant}
"#,
        out = out_dir.display()
    )
}
