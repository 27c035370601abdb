//! The experiment file: one TOML document that fixes data, model, optimiser, schedule
//! and evaluation, and lists the variants (objectives) to train side by side with the
//! same seed and budget.
//!
//! Parsing is strict: an unknown key is an error naming it and its line, and
//! [`ExperimentConfig::validate`] names every bad value by its dotted key.

use std::path::{Path, PathBuf};

use rankalign_data::SourceConfig;
use rankalign_losses::LossConfig;
use rankalign_models::{ClipConfig, VisionConfig};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Names the output directory `out_dir/name`.
    pub name: String,
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    #[serde(rename = "variant")]
    pub variants: Vec<VariantConfig>,
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// `[data]`: the pre-training source, tagged by `source = "digits" | "csv" |
/// "webdataset"` ([`rankalign_data::SourceConfig`]).
pub type DataConfig = SourceConfig;

/// How many steps a run takes, from the training source's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Samples in one pass over the training source (as declared; see
    /// [`rankalign_data::PairSource::len`]).
    pub train_len: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

/// A preset by name, optionally with a few fields changed, or a full inline shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub clip: Option<ClipConfig>,
    /// Start from pretrained weights instead of a random initialisation: a Hugging Face
    /// `CLIPModel` or open_clip directory (e.g. one written by `rankalign export`), a
    /// `.safetensors` / `.bin` / `.pt` checkpoint file (OpenAI / open_clip keys or ours),
    /// or a hub name such as `openai/clip-vit-base-patch16` found in the local Hugging
    /// Face cache (see [`crate::pretrained`]). Its shape must be the model's.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// The text tower: CLIP's (the default) or a pretrained MiniLM; see
    /// [`crate::text_tower`]. Left out of the serialised config when unset, so the
    /// digests of existing runs do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_tower: Option<crate::text_tower::TextTowerConfig>,
}

impl ModelConfig {
    pub fn resolve(&self) -> std::result::Result<ClipConfig, String> {
        match (&self.preset, &self.clip) {
            (Some(name), None) => ClipConfig::preset(name).ok_or_else(|| {
                format!(
                    "model.preset: unknown preset {name:?}, expected one of {:?}",
                    ClipConfig::PRESETS
                )
            }),
            (None, Some(c)) => Ok(c.clone()),
            _ => Err("model: give exactly one of `preset` or a `[model.clip]` table".into()),
        }
    }
}

/// AdamW and the learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.98
}
fn default_eps() -> f64 {
    1e-6
}

/// Budget, checkpoints and threads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub epochs: usize,
    /// Steps between checkpoints (and at the end).
    pub checkpoint_every: usize,
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Train the variants at the same time, one compute thread each.
    #[serde(default)]
    pub parallel_variants: bool,
    /// Batches prepared ahead of the step.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Threads that decode and assemble batches, per variant.
    #[serde(default = "default_data_threads")]
    pub data_threads: usize,
    /// Rows per micro-batch: the step runs the towers per micro-batch, on the compute
    /// threads in parallel, and the loss once on the whole batch (exact; see
    /// [`crate::step`]). Unset: the batch in one piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// With `micro_batch`: keep no activations between a micro-batch's forward and its
    /// backward, and run the forward again, so the batch costs the activation memory of
    /// one micro-batch per thread.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recompute: bool,
    /// In a data-parallel run: each rank reads its own share of the data (every
    /// `world`-th webdataset shard, or CSV / digits index, of a pass) and decodes only
    /// its rows, as open_clip does, instead of every rank reading the whole global batch.
    /// The global batch then depends on the number of ranks, and a checkpoint resumes
    /// only with the number of ranks that wrote it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shard_by_rank: bool,
}

impl TrainConfig {
    /// How a step splits its batch.
    pub fn step_plan(&self) -> crate::step::StepPlan {
        crate::step::StepPlan {
            micro_batch: self.micro_batch,
            recompute: self.recompute,
        }
    }
}

fn default_keep() -> usize {
    2
}
fn default_log_every() -> usize {
    10
}
fn default_prefetch() -> usize {
    4
}
fn default_data_threads() -> usize {
    1
}

/// How much held-out data the final evaluation uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Single-digit test images for zero-shot classification and the linear probe's
    /// test set (digit scenes only).
    #[serde(default)]
    pub zero_shot_size: usize,
    /// Single-digit training images for the linear probe (digit scenes only; 0: no
    /// probe).
    #[serde(default)]
    pub probe_train_size: usize,
    /// Test pairs for image–text retrieval: digit test scenes (at most
    /// `data.test_size`, four captions each), or the first pairs of `data.test_path` /
    /// `data.test_shards`.
    pub retrieval_size: usize,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// `[[eval.task]]`: tasks on files, run at the end and, with `every_steps` /
    /// `every_epochs`, during training.
    #[serde(default, rename = "task")]
    pub tasks: Vec<PeriodicTask>,
}

/// An `[[eval.task]]` table: a task ([`crate::eval::Task`]) and when to run it during
/// training (it always runs at the end).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeriodicTask {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_epochs: Option<usize>,
    #[serde(flatten)]
    pub task: crate::eval::Task,
}

impl PeriodicTask {
    /// Whether it runs after step `done` (1-based) of `steps_per_epoch`-step epochs.
    pub fn due(&self, done: usize, steps_per_epoch: usize) -> bool {
        self.every_steps
            .is_some_and(|n| n > 0 && done.is_multiple_of(n))
            || self
                .every_epochs
                .is_some_and(|n| n > 0 && done.is_multiple_of(n * steps_per_epoch.max(1)))
    }
}

fn default_eval_batch() -> usize {
    256
}

/// One objective to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    pub name: String,
    pub loss: LossConfig,
}

/// Parse TOML text strictly into `T` and validate it; errors name `path` (and, for
/// syntax and unknown keys, the line).
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    validate: impl FnOnce(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let config_err = |msg: String| TrainError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let cfg: T =
        toml::from_str(text).map_err(|e| config_err(e.to_string().trim_end().to_string()))?;
    validate(&cfg).map_err(config_err)?;
    Ok(cfg)
}

/// Read a config file and [`parse_toml`] it.
pub(crate) fn load_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(crate::io_err(path))?;
    parse_toml(&text, path, validate)
}

impl ExperimentConfig {
    /// Read and validate a config file; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        load_toml(path, Self::validate)
    }

    /// Parse and validate TOML text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        parse_toml(text, path, Self::validate)
    }

    /// Check every value; the message lists each problem with its key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut errs = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg)
            }
        };
        need(
            !self.name.is_empty() && !self.name.contains(['/', '\\']),
            format!("name must be a non-empty file name, got {:?}", self.name),
        );
        let d = &self.data;
        for e in d.validate() {
            need(false, e);
        }
        match self.model.resolve() {
            Ok(m) => {
                need(
                    m.vision.image_size() == d.image_size(),
                    format!(
                        "model image size {} differs from data.image_size {}",
                        m.vision.image_size(),
                        d.image_size()
                    ),
                );
                let mut widths = vec![("text", m.text.width, m.text.heads)];
                match &m.vision {
                    VisionConfig::Vit(v) => {
                        need(
                            v.patch_size > 0 && v.image_size % v.patch_size == 0,
                            format!(
                                "model.clip.vision.patch_size {} must divide image_size {}",
                                v.patch_size, v.image_size
                            ),
                        );
                        widths.push(("vision", v.width, v.heads));
                    }
                    VisionConfig::ResNet(_) => {
                        if let Err(e) = m.validate() {
                            need(false, format!("model.clip.vision: {e}"));
                        }
                    }
                }
                for (k, w, h) in widths {
                    need(
                        h > 0 && w % h == 0,
                        format!("model.clip.{k}: width {w} must be divisible by heads {h}"),
                    );
                }
                need(
                    m.text.context_length >= 2,
                    "model.clip.text.context_length must be at least 2".into(),
                );
                need(
                    m.text.vocab_size == rankalign_data::tokenize::VOCAB_SIZE,
                    format!(
                        "model.clip.text.vocab_size must be CLIP's {} to use its tokenizer, got {}",
                        rankalign_data::tokenize::VOCAB_SIZE,
                        m.text.vocab_size
                    ),
                );
            }
            Err(e) => need(false, e),
        }
        if let Some(crate::text_tower::TextTowerConfig::Minilm { max_tokens, .. }) =
            &self.model.text_tower
        {
            need(
                *max_tokens >= 2,
                format!("model.text_tower.max_tokens must be at least 2, got {max_tokens}"),
            );
            need(
                self.model.init_from.is_none(),
                "model.init_from (a CLIPModel) and the MiniLM text tower do not go together".into(),
            );
        }
        let o = &self.optim;
        need(
            o.lr.is_finite() && o.lr > 0.0,
            format!("optim.lr must be > 0, got {}", o.lr),
        );
        need(
            (0.0..1.0).contains(&o.beta1),
            format!("optim.beta1 must be in [0, 1), got {}", o.beta1),
        );
        need(
            (0.0..1.0).contains(&o.beta2),
            format!("optim.beta2 must be in [0, 1), got {}", o.beta2),
        );
        need(
            o.eps.is_finite() && o.eps > 0.0,
            format!("optim.eps must be > 0, got {}", o.eps),
        );
        need(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            format!("optim.weight_decay must be >= 0, got {}", o.weight_decay),
        );
        let t = &self.train;
        need(
            t.batch_size >= 2,
            format!("train.batch_size must be at least 2, got {}", t.batch_size),
        );
        if let SourceConfig::Digits(dc) = d {
            need(
                t.batch_size <= dc.train_size,
                format!(
                    "train.batch_size {} exceeds data.train_size {}",
                    t.batch_size, dc.train_size
                ),
            );
        }
        need(t.epochs >= 1, "train.epochs must be at least 1".into());
        need(
            t.checkpoint_every >= 1,
            "train.checkpoint_every must be at least 1".into(),
        );
        need(
            t.keep_checkpoints >= 1,
            "train.keep_checkpoints must be at least 1".into(),
        );
        need(
            t.log_every >= 1,
            "train.log_every must be at least 1".into(),
        );
        let e = &self.eval;
        match d {
            SourceConfig::Digits(dc) => need(
                e.retrieval_size <= dc.test_size,
                format!(
                    "eval.retrieval_size {} exceeds data.test_size {}",
                    e.retrieval_size, dc.test_size
                ),
            ),
            other => {
                need(
                    e.zero_shot_size == 0,
                    "eval.zero_shot_size is for the digit scenes; other sources are evaluated by retrieval on data.test_path / data.test_shards".into(),
                );
                let held_out = match other {
                    SourceConfig::Csv(c) => c.test_path.is_some(),
                    SourceConfig::Webdataset(w) => w.test_shards.is_some(),
                    SourceConfig::Digits(_) => false,
                };
                need(
                    !held_out || e.retrieval_size >= 1,
                    "eval.retrieval_size must be at least 1 when held-out data is named".into(),
                );
            }
        }
        need(
            e.batch_size >= 1,
            "eval.batch_size must be at least 1".into(),
        );
        if !matches!(d, SourceConfig::Digits(_)) {
            need(
                e.probe_train_size == 0,
                "eval.probe_train_size is for the digit scenes; add a linear_probe [[eval.task]] for other data".into(),
            );
        }
        for (i, p) in e.tasks.iter().enumerate() {
            for msg in p.task.validate() {
                need(false, format!("eval.task[{i}] ({}): {msg}", p.task.kind()));
            }
            need(
                p.every_steps != Some(0) && p.every_epochs != Some(0),
                format!("eval.task[{i}]: every_steps / every_epochs must be at least 1"),
            );
        }
        need(
            !self.variants.is_empty(),
            "at least one [[variant]] is needed".into(),
        );
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            need(
                !v.name.is_empty() && !v.name.contains(['/', '\\']),
                format!("variant[{i}].name must be a non-empty file name"),
            );
            need(
                names.insert(&v.name),
                format!("variant[{i}].name {:?} is used twice", v.name),
            );
            if let LossConfig::Rankclip(r) = &v.loss
                && let Err(msg) = r.validate(t.epochs)
            {
                need(false, format!("variant[{i}].loss.{msg}"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    /// The steps of a run over a training source of `train_len` samples per pass: an
    /// epoch is `train_len / batch_size` steps (the remainder is dropped).
    pub fn schedule_for(&self, train_len: usize) -> Schedule {
        let steps_per_epoch = (train_len / self.train.batch_size).max(1);
        Schedule {
            train_len,
            steps_per_epoch,
            total_steps: steps_per_epoch.saturating_mul(self.train.epochs),
        }
    }

    /// [`Self::schedule_for`] the training source, opened to learn its length.
    pub fn schedule(&self) -> Result<Schedule> {
        Ok(self.schedule_for(self.data.open_train(self.seed)?.len()))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.out_dir.join(&self.name)
    }
}
