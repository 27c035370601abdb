//! The training loop for one variant of an experiment.
//!
//! Per step: take the prefetched batch, encode both sides, compute the variant's loss,
//! stop with [`TrainError::Diverged`] if it is not finite (the last good checkpoint
//! stays), back-propagate, step AdamW at the scheduled learning rate, clamp
//! `logit_scale` to [0, ln 100], append metrics, and checkpoint on schedule. The image
//! tower runs in training mode (a ResNet's BatchNorm on batch statistics, updating its
//! running statistics, which checkpoints keep); evaluation runs it in evaluation mode.
//! A run resumes from its latest checkpoint when the config is unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use rankalign_data::batch::collate_pairs;
use rankalign_data::{BatchPlan, Dataset, DigitScenes, Prefetcher, Split, TextTokenizer, mix_seed};
use rankalign_losses::{ListPerms, LossConfig, clip_loss, rankclip_loss};
use rankalign_models::SeededVarMap;
use rankalign_models::resnet::is_buffer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointState};
use crate::config::{ExperimentConfig, VariantConfig};
use crate::eval::{EvalReport, evaluate};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::cosine_with_warmup;
use crate::{Result, TrainError, io_err};

/// The upper clamp of `logit_scale`: ln 100.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    pub loss: f64,
    pub clip: f64,
    pub cross: f64,
    pub inmodal: f64,
    pub rank_weight: f64,
    pub logit_scale: f64,
    pub step_ms: f64,
    pub data_wait_ms: f64,
}

/// What a finished variant reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VariantOutcome {
    pub name: String,
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub final_loss: f64,
    pub median_step_ms: f64,
    pub total_data_wait_ms: f64,
    pub train_secs: f64,
    pub eval: EvalReport,
    pub history: Vec<StepRecord>,
}

/// A callback that receives each logged record with its variant's name.
pub type LogFn = Arc<dyn Fn(&str, &StepRecord) + Send + Sync>;

/// How to run: resume or start over, stop early, and where progress goes.
#[derive(Clone)]
pub struct VariantOptions {
    /// Delete earlier checkpoints and metrics of this variant and start at step 0.
    pub overwrite: bool,
    /// Stop (with a checkpoint) once this many steps are done, as an interrupted run.
    pub stop_after: Option<usize>,
    pub progress: ProgressBar,
    /// Called with each logged record (e.g. to print lines when there is no terminal).
    pub on_log: Option<LogFn>,
}

/// A stable digest of what determines a run, so that a checkpoint is only resumed by
/// the run that wrote it.
pub fn config_digest(exp: &ExperimentConfig, variant: &VariantConfig) -> String {
    let mut shared = exp.clone();
    shared.variants.clear();
    // Evaluation sizes and checkpoint cadence do not change the trained weights.
    shared.eval = crate::config::EvalConfig {
        zero_shot_size: 0,
        retrieval_size: 0,
        batch_size: 0,
    };
    shared.train.checkpoint_every = 0;
    shared.train.keep_checkpoints = 0;
    shared.train.log_every = 0;
    shared.train.parallel_variants = false;
    shared.out_dir = PathBuf::new();
    let text = format!(
        "{}\n{}",
        serde_json::to_string(&shared).unwrap_or_default(),
        serde_json::to_string(variant).unwrap_or_default()
    );
    format!(
        "{:016x}",
        mix_seed(&text.bytes().map(u64::from).collect::<Vec<_>>())
    )
}

/// The digit-scene splits, tokenizer and model shape shared by every variant.
pub struct Shared {
    pub train: DigitScenes,
    pub test: DigitScenes,
    pub tokenizer: TextTokenizer,
    pub device: Device,
}

fn read_history(path: &Path, upto: usize) -> Result<Vec<StepRecord>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: StepRecord = serde_json::from_str(line)
            .map_err(|e| TrainError::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
        // A record's `step` counts completed steps, so the checkpoint's own step stays.
        if rec.step <= upto {
            out.push(rec);
        }
    }
    Ok(out)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Train one variant to the end (or `stop_after`) and evaluate it.
pub fn train_variant(
    exp: &ExperimentConfig,
    variant: &VariantConfig,
    shared: &Shared,
    opts: &VariantOptions,
) -> Result<VariantOutcome> {
    let dir = exp.run_dir().join(&variant.name);
    let ckpt_dir = dir.join("checkpoints");
    let metrics_path = dir.join("metrics.jsonl");
    if opts.overwrite && dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let device = &shared.device;
    let clip_cfg = exp.model.resolve().map_err(TrainError::Invalid)?;
    let vm = SeededVarMap::new(mix_seed(&[exp.seed, 0x30DE1]));
    if let Some(spec) = &exp.model.init_from {
        let (_, tensors) = crate::pretrained::load(spec, Some(&clip_cfg), device)?;
        vm.preload(tensors, DType::F32, device)?;
    }
    let model = crate::text_tower::build_model(
        &clip_cfg,
        exp.model.text_tower.as_ref(),
        vm.var_builder(DType::F32, device),
        device,
    )
    .and_then(|m| {
        if exp.model.init_from.is_some() {
            vm.finish_preload()?;
        }
        Ok(m)
    });
    let model = model.map_err(|e| match (&exp.model.init_from, e) {
        (Some(dir), e) => TrainError::Checkpoint {
            path: dir.clone(),
            msg: e.to_string(),
        },
        (None, e) => e,
    })?;
    // Every variable is checkpointed; BatchNorm's running statistics (a ResNet tower's)
    // are not parameters and stay out of the optimiser.
    let vars = vm.named_vars();
    let params: Vec<(String, Var)> = vars
        .iter()
        .filter(|(n, _)| !is_buffer(n))
        .cloned()
        .collect();
    let logit_scale: Var = vars
        .iter()
        .find(|(n, _)| n == "logit_scale")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| TrainError::Invalid("the model has no logit_scale parameter".into()))?;
    let o = &exp.optim;
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
    )?;
    let digest = config_digest(exp, variant);

    let mut start = 0;
    let mut last_ckpt = None;
    if let Some(path) = checkpoint::latest(&ckpt_dir)? {
        let state = checkpoint::load(&path, &vars, &mut opt)?;
        if state.config_digest != digest {
            return Err(TrainError::Checkpoint {
                path,
                msg: "was written by a run with another configuration; use a new experiment name or --overwrite".into(),
            });
        }
        start = state.step;
        last_ckpt = Some(path);
    }
    let resumed_from = (start > 0).then_some(start);
    let mut history = read_history(&metrics_path, start)?;
    // Rewrite the metrics so they end where the checkpoint does.
    let mut lines = String::new();
    for rec in &history {
        lines
            .push_str(&serde_json::to_string(rec).map_err(|e| TrainError::Invalid(e.to_string()))?);
        lines.push('\n');
    }
    std::fs::write(&metrics_path, lines).map_err(io_err(&metrics_path))?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(io_err(&metrics_path))?;

    let total = exp.total_steps();
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    let plan = BatchPlan::new(
        mix_seed(&[exp.seed, 0xBA7C4]),
        shared.train.len(),
        exp.train.batch_size,
    )?;
    let (train, tokenizer, image_size) = (
        shared.train.clone(),
        shared.tokenizer.clone(),
        exp.data.image_size,
    );
    let dev = device.clone();
    let mut prefetch = Prefetcher::new(
        start,
        end,
        exp.train.prefetch,
        exp.train.data_threads,
        move |step| {
            let indices = plan.indices(step);
            let items: Vec<_> = indices.par_iter().map(|&i| train.get(i)).collect();
            let images: Vec<_> = items.iter().map(|it| &it.image).collect();
            let captions: Vec<_> = items.iter().map(|it| it.caption.as_str()).collect();
            collate_pairs(
                &images,
                &captions,
                indices.clone(),
                image_size,
                &tokenizer,
                &dev,
            )
        },
    )?;

    opts.progress.set_length(total as u64);
    opts.progress.set_position(start as u64);
    opts.progress.reset_eta();
    let started = Instant::now();
    let mut step_times = Vec::new();
    let mut data_wait_ms = 0.0;
    let mut final_loss = f64::NAN;
    for step in start..end {
        let wait = Instant::now();
        let (got, batch) = prefetch
            .next_batch()
            .ok_or_else(|| TrainError::Invalid("the data thread stopped early".into()))?;
        debug_assert_eq!(got, step);
        let batch = batch?;
        let waited = wait.elapsed().as_secs_f64() * 1e3;
        data_wait_ms += waited;
        let t0 = Instant::now();
        let image = model.encode_image_t(&batch.pixels, true)?;
        let text = model.encode_text(&batch.ids, &batch.eot)?;
        let epoch = step / exp.steps_per_epoch() + 1;
        let (loss, clip, cross, inmodal, w) = match &variant.loss {
            LossConfig::Clip => {
                let v = rankalign_kernels::l2_normalize(&image)?;
                let t = rankalign_kernels::l2_normalize(&text)?;
                let logits = v
                    .matmul(&t.t()?)?
                    .broadcast_mul(&logit_scale.as_tensor().exp()?)?;
                let l = clip_loss(&logits)?;
                (l.clone(), l, None, None, 0.0)
            }
            LossConfig::Rankclip(rc) => {
                let w = rc.weight(epoch, exp.train.epochs);
                let perms = ListPerms::from_seed(
                    exp.train.batch_size,
                    mix_seed(&[exp.seed, 0x9E53, step as u64]),
                );
                let terms = rankclip_loss(rc, &image, &text, logit_scale.as_tensor(), w, &perms)?;
                (
                    terms.total,
                    terms.clip,
                    Some(terms.cross),
                    Some(terms.inmodal),
                    w,
                )
            }
        };
        let loss_value = scalar(&loss)?;
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: loss_value,
                checkpoint: last_ckpt,
            });
        }
        let grads = loss.backward()?;
        let lr = cosine_with_warmup(o.lr, o.warmup_steps, total, step);
        opt.step(&grads, lr)?;
        logit_scale.set(&logit_scale.as_tensor().clamp(0.0, MAX_LOGIT_SCALE)?)?;
        let step_ms = t0.elapsed().as_secs_f64() * 1e3;
        step_times.push(step_ms);
        final_loss = loss_value;
        let done = step + 1;
        if done % exp.train.log_every == 0 || done == end {
            let rec = StepRecord {
                step: done,
                epoch,
                lr,
                loss: loss_value,
                clip: scalar(&clip)?,
                cross: cross.as_ref().map(scalar).transpose()?.unwrap_or(0.0),
                inmodal: inmodal.as_ref().map(scalar).transpose()?.unwrap_or(0.0),
                rank_weight: w,
                logit_scale: scalar(logit_scale.as_tensor())?,
                step_ms,
                data_wait_ms: waited,
            };
            let line =
                serde_json::to_string(&rec).map_err(|e| TrainError::Invalid(e.to_string()))?;
            writeln!(metrics, "{line}").map_err(io_err(&metrics_path))?;
            if let Some(cb) = &opts.on_log {
                cb(&variant.name, &rec);
            }
            history.push(rec);
        }
        opts.progress.set_position(done as u64);
        opts.progress.set_message(format!("loss {loss_value:.3}"));
        if done % exp.train.checkpoint_every == 0 || done == end {
            let state = CheckpointState {
                step: done,
                optimizer_steps: opt.steps(),
                seed: exp.seed,
                config_digest: digest.clone(),
                rng: format!(
                    "counter-based: every draw keyed by (seed {}, step); next step {done}",
                    exp.seed
                ),
            };
            last_ckpt = Some(checkpoint::save(
                &ckpt_dir,
                &vars,
                &opt,
                &state,
                exp.train.keep_checkpoints,
            )?);
        }
    }
    drop(prefetch);
    let train_secs = started.elapsed().as_secs_f64();
    opts.progress.set_message("evaluating");
    let eval = evaluate(&model, &shared.tokenizer, &shared.test, &exp.eval, device)?;
    let eval_path = dir.join("eval.json");
    std::fs::write(
        &eval_path,
        serde_json::to_string_pretty(&eval).map_err(|e| TrainError::Invalid(e.to_string()))?,
    )
    .map_err(io_err(&eval_path))?;
    opts.progress
        .finish_with_message(format!("done, zero-shot top-1 {:.1}%", eval.zero_shot_top1));
    let mut sorted = step_times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_step_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    if final_loss.is_nan() {
        final_loss = history.last().map_or(f64::NAN, |r| r.loss);
    }
    Ok(VariantOutcome {
        name: variant.name.clone(),
        steps: end,
        resumed_from,
        final_loss,
        median_step_ms,
        total_data_wait_ms: data_wait_ms,
        train_secs,
        eval,
        history,
    })
}

/// Build the shared data for an experiment.
pub fn prepare(exp: &ExperimentConfig, device: &Device) -> Result<Shared> {
    let digits = match (&exp.data.mnist_images, &exp.data.mnist_labels) {
        (Some(i), Some(l)) => rankalign_data::Digits::load(i, l)?,
        _ => rankalign_data::Digits::embedded()?,
    };
    let digits = Arc::new(digits);
    let scenes = exp.data.scenes(exp.seed);
    let clip_cfg = exp.model.resolve().map_err(TrainError::Invalid)?;
    let make = |split| {
        DigitScenes::new(digits.clone(), scenes.clone(), split).map_err(TrainError::Invalid)
    };
    Ok(Shared {
        train: make(Split::Train)?,
        test: make(Split::Test)?,
        tokenizer: crate::text_tower::tokenizer(&clip_cfg, exp.model.text_tower.as_ref())?,
        device: device.clone(),
    })
}
