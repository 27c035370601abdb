//! The training loop for one variant of an experiment, in three parts: [`build`] (the
//! model, the optimiser, and the checkpoint to resume from), [`fit`] (the loop) and
//! [`finish`] (the final evaluation). The loop knows no loss: it calls the variant's
//! [`Objective`] on the batch's embeddings and logs the parts it names.
//!
//! Per step: take the prefetched batch, encode both sides, compute the variant's loss,
//! stop with [`TrainError::Diverged`] if it is not finite (the last good checkpoint
//! stays), back-propagate, step AdamW at the scheduled learning rate, clamp
//! `logit_scale` to [0, ln 100], append metrics, and checkpoint on schedule. The image
//! tower runs in training mode (a ResNet's BatchNorm on batch statistics, updating its
//! running statistics, which checkpoints keep); evaluation runs it in evaluation mode.
//! A run resumes from its newest intact checkpoint when the config is unchanged, at
//! the data position that checkpoint records.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use rankalign_data::batch::collate_pairs;
use rankalign_data::{
    DataPosition, PairSource, PairStream, Prefetcher, Sharding, SkipPolicy, SkipStats,
    SourceConfig, Split, TextTokenizer, mix_seed,
};
use rankalign_losses::{Objective, StepContext};
use rankalign_models::resnet::is_buffer;
use rankalign_models::{ClipModel, SeededVarMap};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::checkpoint::{self, CheckpointState};
use crate::config::{ExperimentConfig, VariantConfig};
use crate::eval::{EvalReport, Evaluation, evaluate};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::cosine_with_warmup;
use crate::{Result, TrainError, io_err};

/// The upper clamp of `logit_scale`: ln 100.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// One line of `metrics.jsonl`: the step's total loss and, flattened beside it, the
/// parts its objective names (`clip`, `cross`, `inmodal`, `rank_weight` for RankCLIP).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    pub loss: f64,
    #[serde(flatten)]
    pub parts: BTreeMap<String, f64>,
    pub logit_scale: f64,
    pub step_ms: f64,
    pub data_wait_ms: f64,
    /// Training samples read so far, and how many of them were corrupt and skipped.
    #[serde(default)]
    pub data_seen: u64,
    #[serde(default)]
    pub data_skipped: u64,
}

impl StepRecord {
    /// The InfoNCE part where the objective reports one, else the total: the curve that
    /// is comparable across variants.
    pub fn contrastive(&self) -> f64 {
        self.parts.get("clip").copied().unwrap_or(self.loss)
    }
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
    /// Corrupt training samples skipped (counts over the whole run, resumed parts too).
    pub skipped: SkipStats,
    /// Damaged checkpoints passed over on resume.
    pub warnings: Vec<String>,
}

/// A callback that receives each logged record with its variant's name and the run's
/// total steps.
pub type LogFn = Arc<dyn Fn(&str, &StepRecord, usize) + Send + Sync>;

/// A callback for lines a person should see as they happen (the data opened, a damaged
/// checkpoint passed over), with the variant's name or the experiment's.
pub type NoticeFn = Arc<dyn Fn(&str, &str) + Send + Sync>;

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
    pub on_notice: Option<NoticeFn>,
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
    shared.train.prefetch = 0;
    shared.train.data_threads = 0;
    // Nor do the held-out files, or the share of corrupt samples tolerated (raising it
    // after a stop must not refuse the resume).
    match &mut shared.data {
        SourceConfig::Csv(c) => {
            c.test_path = None;
            c.corrupt.max_skipped = 0.0;
        }
        SourceConfig::Webdataset(w) => {
            w.test_shards = None;
            w.corrupt.max_skipped = 0.0;
        }
        SourceConfig::Digits(_) => {}
    }
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

/// The training source, the evaluation, the tokenizer and the device shared by every
/// variant.
pub struct Shared {
    pub train: Arc<dyn PairSource>,
    pub eval: Evaluation,
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

/// A variant ready to train: its model and optimiser, restored from the newest intact
/// checkpoint if there is one.
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    pub model: ClipModel,
    vars: Vec<(String, Var)>,
    logit_scale: Var,
    opt: AdamW,
    objective: Box<dyn Objective>,
    digest: String,
    /// Steps done when this process started (0 or the checkpoint's).
    pub start: usize,
    /// The checkpoint's data position (or the start).
    data_position: DataPosition,
    last_ckpt: Option<PathBuf>,
    pub history: Vec<StepRecord>,
    pub warnings: Vec<String>,
}

/// What [`fit`] measured.
#[derive(Clone, Debug)]
pub struct Fitted {
    pub steps: usize,
    pub final_loss: f64,
    pub median_step_ms: f64,
    pub total_data_wait_ms: f64,
    pub train_secs: f64,
    pub skipped: SkipStats,
}

/// The model, the optimiser and the resume point of `variant`.
pub fn build(
    exp: &ExperimentConfig,
    variant: &VariantConfig,
    device: &Device,
    opts: &VariantOptions,
) -> Result<Run> {
    let overwrite = opts.overwrite;
    let dir = exp.run_dir().join(&variant.name);
    let ckpt_dir = dir.join("checkpoints");
    let metrics_path = dir.join("metrics.jsonl");
    if overwrite && dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
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
    let mut data_position = DataPosition::default();
    let (resume, warnings) = checkpoint::resume_point(&ckpt_dir)?;
    if resume.is_none() && !warnings.is_empty() {
        return Err(TrainError::Checkpoint {
            path: ckpt_dir,
            msg: format!(
                "every checkpoint is damaged ({}); nothing to resume from — use --overwrite to start over",
                warnings.join("; ")
            ),
        });
    }
    if let Some(path) = resume {
        let state = checkpoint::load(&path, &vars, &mut opt)?;
        if state.config_digest != digest {
            return Err(TrainError::Checkpoint {
                path,
                msg: "was written by a run with another configuration; use a new experiment name or --overwrite".into(),
            });
        }
        start = state.step;
        data_position = state.data.ok_or_else(|| TrainError::Checkpoint {
            path: path.clone(),
            msg: "was written before checkpoints recorded the data position, so it cannot be resumed exactly; use --overwrite".into(),
        })?;
        last_ckpt = Some(path);
    }
    if let Some(cb) = &opts.on_notice {
        for w in &warnings {
            cb(&variant.name, w);
        }
    }
    let history = read_history(&metrics_path, start)?;
    // Rewrite the metrics so they end where the checkpoint does.
    let mut lines = String::new();
    for rec in &history {
        lines
            .push_str(&serde_json::to_string(rec).map_err(|e| TrainError::Invalid(e.to_string()))?);
        lines.push('\n');
    }
    std::fs::write(&metrics_path, lines).map_err(io_err(&metrics_path))?;
    Ok(Run {
        name: variant.name.clone(),
        dir,
        model,
        vars,
        logit_scale,
        opt,
        objective: variant.loss.objective(),
        digest,
        start,
        data_position,
        last_ckpt,
        history,
        warnings,
    })
}

/// Train `run` from its start to the end of the budget (or `stop_after`): batches from
/// the shared source, the objective, the NaN guard, AdamW on the schedule, the
/// `logit_scale` clamp, metrics and checkpoints.
pub fn fit(
    exp: &ExperimentConfig,
    run: &mut Run,
    shared: &Shared,
    opts: &VariantOptions,
) -> Result<Fitted> {
    let device = &shared.device;
    let metrics_path = run.dir.join("metrics.jsonl");
    let ckpt_dir = run.dir.join("checkpoints");
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(io_err(&metrics_path))?;
    let sched = exp.schedule_for(shared.train.len());
    let total = sched.total_steps;
    let start = run.start;
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    let policy = exp.data.corrupt();
    let mut stream = PairStream::new(
        shared.train.clone(),
        mix_seed(&[exp.seed, 0xBA7C4]),
        Sharding::default(),
        SkipPolicy::from(&policy),
        run.data_position.clone(),
    )?;
    let mut skipped = stream.position().stats.clone();
    let (tokenizer, image_size, batch_size) = (
        shared.tokenizer.clone(),
        exp.data.image_size(),
        exp.train.batch_size,
    );
    let dev = device.clone();
    let mut prefetch = Prefetcher::new(
        start,
        end,
        exp.train.prefetch,
        exp.train.data_threads,
        move |_step| {
            let (samples, pos) = stream.next_batch(batch_size, image_size)?;
            let images: Vec<_> = samples.iter().map(|s| &s.image).collect();
            let captions: Vec<_> = samples.iter().map(|s| s.caption.as_str()).collect();
            let batch = collate_pairs(&images, &captions, image_size, &tokenizer, &dev)?;
            Ok((batch, pos))
        },
    )?;

    opts.progress.set_length(total as u64);
    opts.progress.set_position(start as u64);
    opts.progress.reset_eta();
    let o = &exp.optim;
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
        let (batch, position) = batch?;
        let waited = wait.elapsed().as_secs_f64() * 1e3;
        data_wait_ms += waited;
        let t0 = Instant::now();
        let image = run.model.encode_image_t(&batch.pixels, true)?;
        let text = run.model.encode_text(&batch.ids, &batch.eot)?;
        let epoch = step / sched.steps_per_epoch + 1;
        let ctx = StepContext {
            epoch,
            epochs: exp.train.epochs,
            tie_seed: mix_seed(&[exp.seed, 0x9E53, step as u64]),
            labels: None,
        };
        let terms = run
            .objective
            .loss(&image, &text, run.logit_scale.as_tensor(), &ctx)?;
        let loss_value = scalar(&terms.total)?;
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: loss_value,
                checkpoint: run.last_ckpt.clone(),
            });
        }
        let grads = terms.total.backward()?;
        let lr = cosine_with_warmup(o.lr, o.warmup_steps, total, step);
        run.opt.step(&grads, lr)?;
        run.logit_scale
            .set(&run.logit_scale.as_tensor().clamp(0.0, MAX_LOGIT_SCALE)?)?;
        let step_ms = t0.elapsed().as_secs_f64() * 1e3;
        step_times.push(step_ms);
        final_loss = loss_value;
        skipped = position.stats.clone();
        let done = step + 1;
        if done % exp.train.log_every == 0 || done == end {
            let rec = StepRecord {
                step: done,
                epoch,
                lr,
                loss: loss_value,
                parts: terms
                    .parts
                    .iter()
                    .map(|(n, t)| Ok((n.to_string(), scalar(t)?)))
                    .collect::<Result<_>>()?,
                logit_scale: scalar(run.logit_scale.as_tensor())?,
                step_ms,
                data_wait_ms: waited,
                data_seen: position.stats.seen,
                data_skipped: position.stats.skipped,
            };
            let line =
                serde_json::to_string(&rec).map_err(|e| TrainError::Invalid(e.to_string()))?;
            writeln!(metrics, "{line}").map_err(io_err(&metrics_path))?;
            if let Some(cb) = &opts.on_log {
                cb(&run.name, &rec, total);
            }
            run.history.push(rec);
        }
        opts.progress.set_position(done as u64);
        opts.progress.set_message(format!("loss {loss_value:.3}"));
        if done % exp.train.checkpoint_every == 0 || done == end {
            let state = CheckpointState {
                step: done,
                optimizer_steps: run.opt.steps(),
                seed: exp.seed,
                config_digest: run.digest.clone(),
                rng: format!(
                    "counter-based: every draw keyed by (seed {}, step) or the data position; next step {done}",
                    exp.seed
                ),
                data: Some(position),
                checksums: BTreeMap::new(),
            };
            run.last_ckpt = Some(checkpoint::save(
                &ckpt_dir,
                &run.vars,
                &run.opt,
                &state,
                exp.train.keep_checkpoints,
            )?);
        }
    }
    drop(prefetch);
    let mut sorted = step_times.clone();
    sorted.sort_by(f64::total_cmp);
    if final_loss.is_nan() {
        final_loss = run.history.last().map_or(f64::NAN, |r| r.loss);
    }
    Ok(Fitted {
        steps: end,
        final_loss,
        median_step_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        total_data_wait_ms: data_wait_ms,
        train_secs: started.elapsed().as_secs_f64(),
        skipped,
    })
}

/// Evaluate the trained model, write `eval.json`, and gather the outcome.
pub fn finish(
    exp: &ExperimentConfig,
    run: Run,
    fitted: Fitted,
    shared: &Shared,
    opts: &VariantOptions,
) -> Result<VariantOutcome> {
    opts.progress.set_message("evaluating");
    let eval = evaluate(
        &run.model,
        &shared.tokenizer,
        &shared.eval,
        &exp.eval,
        &shared.device,
    )?;
    let eval_path = run.dir.join("eval.json");
    std::fs::write(
        &eval_path,
        serde_json::to_string_pretty(&eval).map_err(|e| TrainError::Invalid(e.to_string()))?,
    )
    .map_err(io_err(&eval_path))?;
    let headline = eval
        .metrics
        .first()
        .map(|(k, v)| format!(", {k} {v:.1}"))
        .unwrap_or_default();
    opts.progress.finish_with_message(format!("done{headline}"));
    Ok(VariantOutcome {
        name: run.name,
        steps: fitted.steps,
        resumed_from: (run.start > 0).then_some(run.start),
        final_loss: fitted.final_loss,
        median_step_ms: fitted.median_step_ms,
        total_data_wait_ms: fitted.total_data_wait_ms,
        train_secs: fitted.train_secs,
        eval,
        history: run.history,
        skipped: fitted.skipped,
        warnings: run.warnings,
    })
}

/// Train one variant to the end (or `stop_after`) and evaluate it.
pub fn train_variant(
    exp: &ExperimentConfig,
    variant: &VariantConfig,
    shared: &Shared,
    opts: &VariantOptions,
) -> Result<VariantOutcome> {
    let mut run = build(exp, variant, &shared.device, opts)?;
    let fitted = fit(exp, &mut run, shared, opts)?;
    finish(exp, run, fitted, shared, opts)
}

/// Open the training source and the evaluation data of an experiment.
pub fn prepare(exp: &ExperimentConfig, device: &Device) -> Result<Shared> {
    let clip_cfg = exp.model.resolve().map_err(TrainError::Invalid)?;
    let (train, eval): (Arc<dyn PairSource>, Evaluation) = match &exp.data {
        SourceConfig::Digits(d) => {
            let digits = Arc::new(d.digits()?);
            let train = d.split(digits.clone(), exp.seed, Split::Train)?;
            let test = d.split(digits, exp.seed, Split::Test)?;
            (
                Arc::new(rankalign_data::source::DigitsSource::new(train)),
                Evaluation::Digits(test),
            )
        }
        other => (
            other.open_train(exp.seed)?,
            match other.open_test()? {
                Some(t) => Evaluation::Retrieval(t),
                None => Evaluation::None,
            },
        ),
    };
    if train.len() < exp.train.batch_size {
        return Err(TrainError::Invalid(format!(
            "{} holds fewer samples than train.batch_size {}",
            train.describe(),
            exp.train.batch_size
        )));
    }
    Ok(Shared {
        train,
        eval,
        tokenizer: crate::text_tower::tokenizer(&clip_cfg, exp.model.text_tower.as_ref())?,
        device: device.clone(),
    })
}
