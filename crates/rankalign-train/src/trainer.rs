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
//!
//! During training, at the end of each epoch the objective is evaluated on the
//! validation pairs (`data.val_size` digit scenes), and each `[[eval.task]]` runs when
//! its `every_steps` / `every_epochs` falls due; both are [`EvalRecord`] lines of
//! `metrics.jsonl`. Neither chooses a checkpoint: the run keeps its last one.
//!
//! In a data-parallel run ([`VariantOptions::comm`]) every rank runs this loop on the
//! same global batches and steps on its own rows; rank 0 alone writes and evaluates,
//! and the others build from rank 0's checkpoint after a barrier.

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
use crate::dist::Collective;
use crate::eval::{EvalReport, Evaluation, Evaluator, evaluate};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::cosine_with_warmup;
use crate::step::{StepGrads, loss_and_grads, loss_and_grads_across};
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

/// A line of `metrics.jsonl` with an evaluation during training: the validation loss
/// (`eval = "validation"`) or a task (`eval = "<task> on <dataset>"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub epoch: usize,
    pub eval: String,
    #[serde(with = "crate::eval::ordered")]
    pub metrics: Vec<(String, f64)>,
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
    /// Evaluations during training, in step order.
    #[serde(default)]
    pub evals: Vec<EvalRecord>,
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
    /// In a data-parallel run, this rank's collective: each global batch is split by
    /// rank, and only rank 0 writes (metrics, checkpoints, evaluations).
    pub comm: Option<Arc<dyn Collective>>,
}

impl VariantOptions {
    /// Whether this process writes the run's files: always, except on ranks other than
    /// 0 of a data-parallel run.
    pub fn writes(&self) -> bool {
        crate::dist::writes(self.comm.as_deref())
    }
}

/// An error unless every rank starts at rank 0's step with rank 0's weights (a rank
/// that cannot see rank 0's run directory would start over, or resume elsewhere).
fn same_start(comm: &dyn Collective, run: &Run) -> Result<()> {
    // The step, and a checksum of the weights, as f32 values that compare exactly.
    let mut sum = 0f64;
    for v in &run.params {
        sum += v
            .as_tensor()
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let bits = sum.to_bits();
    let row: Vec<f32> = [
        run.start as u64,
        bits >> 48,
        (bits >> 32) & 0xFFFF,
        (bits >> 16) & 0xFFFF,
        bits & 0xFFFF,
    ]
    .iter()
    .map(|&w| w as f32)
    .collect();
    let n = row.len();
    let (all, _) = comm.all_gather_rows(&Tensor::from_vec(row, (1, n), &Device::Cpu)?)?;
    let rows = all.to_vec2::<f32>()?;
    for (rank, r) in rows.iter().enumerate().skip(1) {
        if *r != rows[0] {
            return Err(TrainError::Invalid(format!(
                "data parallel: rank {rank} does not start where rank 0 does ({}: step {} \
                 against rank 0's {}); every rank must see rank 0's run directory (a shared \
                 filesystem)",
                if r[0] == rows[0][0] {
                    "other weights"
                } else {
                    "another step"
                },
                r[0],
                rows[0][0]
            )));
        }
    }
    Ok(())
}

/// This rank's data position in a run with `train.shard_by_rank`: the start, or its
/// entry in the checkpoint, which must come from a sharded run of as many ranks.
fn rank_position(run: &Run, comm: &dyn Collective, start: usize) -> Result<DataPosition> {
    if start == 0 {
        return Ok(DataPosition::default());
    }
    let from = run
        .last_ckpt
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string());
    match &run.data_ranks {
        Some(all) if all.len() == comm.world_size() => Ok(all[comm.rank()].clone()),
        Some(all) => Err(TrainError::Checkpoint {
            path: from.into(),
            msg: format!(
                "was written by a run sharded over {} ranks (train.shard_by_rank); resume it with {} ranks, not {}",
                all.len(),
                all.len(),
                comm.world_size()
            ),
        }),
        None => Err(TrainError::Checkpoint {
            path: from.into(),
            msg: "was written by a run without train.shard_by_rank, which holds one data position, not one per rank".into(),
        }),
    }
}

/// Every rank's data position, in rank order (JSON bytes gathered as rows).
fn gather_positions(comm: &dyn Collective, mine: &DataPosition) -> Result<Vec<DataPosition>> {
    let bytes = serde_json::to_vec(mine).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let n = bytes.len();
    let rows = Tensor::from_vec(
        bytes.into_iter().map(f32::from).collect::<Vec<_>>(),
        (n, 1),
        &Device::Cpu,
    )?;
    let (all, counts) = comm.all_gather_rows(&rows)?;
    let all: Vec<u8> = all
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let mut at = 0;
    counts
        .iter()
        .enumerate()
        .map(|(rank, &c)| {
            let part = &all[at..at + c];
            at += c;
            serde_json::from_slice(part).map_err(|e| {
                TrainError::Invalid(format!("data parallel: rank {rank}'s data position: {e}"))
            })
        })
        .collect()
}

/// Waits until every rank has called it (a one-element sum).
pub fn barrier(comm: &dyn Collective) -> Result<()> {
    comm.all_reduce_sum(&Tensor::zeros(1, DType::F32, &Device::Cpu)?)?;
    Ok(())
}

/// A stable digest of what determines a run, so that a checkpoint is only resumed by
/// the run that wrote it.
pub fn config_digest(exp: &ExperimentConfig, variant: &VariantConfig) -> String {
    let mut shared = exp.clone();
    shared.variants.clear();
    // Evaluation sizes and checkpoint cadence do not change the trained weights.
    shared.eval = crate::config::EvalConfig {
        zero_shot_size: 0,
        probe_train_size: 0,
        retrieval_size: 0,
        batch_size: 0,
        tasks: Vec::new(),
    };
    shared.train.prefetch = 0;
    shared.train.data_threads = 0;
    // Recomputing a micro-batch's forward gives the same bits as keeping it.
    shared.train.recompute = false;
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
        SourceConfig::Digits(d) => d.val_size = None,
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
    /// Validation pairs: the objective on them each epoch.
    pub val: Option<Arc<dyn PairSource>>,
    pub eval: Evaluation,
    pub tokenizer: TextTokenizer,
    pub device: Device,
}

/// The step and evaluation records of `metrics.jsonl` up to step `upto`, and those
/// lines as they were.
fn read_history(path: &Path, upto: usize) -> Result<(Vec<StepRecord>, Vec<EvalRecord>, String)> {
    let mut steps = Vec::new();
    let mut evals = Vec::new();
    let mut kept = String::new();
    if !path.exists() {
        return Ok((steps, evals, kept));
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |e: serde_json::Error| {
            TrainError::Invalid(format!("{}:{}: {e}", path.display(), i + 1))
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
        // A record's `step` counts completed steps, so the checkpoint's own step stays.
        let step = if value.get("eval").is_some() {
            let rec: EvalRecord = serde_json::from_value(value).map_err(bad)?;
            let step = rec.step;
            if step <= upto {
                evals.push(rec);
            }
            step
        } else {
            let rec: StepRecord = serde_json::from_value(value).map_err(bad)?;
            let step = rec.step;
            if step <= upto {
                steps.push(rec);
            }
            step
        };
        if step <= upto {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    Ok((steps, evals, kept))
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
    /// The optimised variables (not BatchNorm's running statistics).
    params: Vec<Var>,
    logit_scale: Var,
    opt: AdamW,
    objective: Box<dyn Objective>,
    digest: String,
    /// Steps done when this process started (0 or the checkpoint's).
    pub start: usize,
    /// The checkpoint's data position (or the start).
    data_position: DataPosition,
    /// The checkpoint's per-rank positions, from a run with `train.shard_by_rank`.
    data_ranks: Option<Vec<DataPosition>>,
    last_ckpt: Option<PathBuf>,
    pub history: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
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
    let writes = opts.writes();
    if writes {
        if overwrite && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
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
    exp.train.step_plan().check(&model)?;
    let param_vars = params.iter().map(|(_, v)| v.clone()).collect();
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
    let mut data_ranks = None;
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
        data_ranks = state.data_ranks;
        last_ckpt = Some(path);
    }
    if let Some(cb) = &opts.on_notice {
        for w in &warnings {
            cb(&variant.name, w);
        }
    }
    let (history, evals, lines) = read_history(&metrics_path, start)?;
    if writes {
        // Rewrite the metrics so they end where the checkpoint does.
        std::fs::write(&metrics_path, lines).map_err(io_err(&metrics_path))?;
    }
    Ok(Run {
        name: variant.name.clone(),
        dir,
        model,
        vars,
        params: param_vars,
        logit_scale,
        opt,
        objective: variant.loss.objective(),
        digest,
        start,
        data_position,
        data_ranks,
        last_ckpt,
        history,
        evals,
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
    let writes = opts.writes();
    let comm = opts.comm.as_deref();
    let mut metrics = if writes {
        Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&metrics_path)
                .map_err(io_err(&metrics_path))?,
        )
    } else {
        None
    };
    let mut log_line = |line: &str| -> Result<()> {
        match metrics.as_mut() {
            Some(m) => writeln!(m, "{line}").map_err(io_err(&metrics_path)),
            None => Ok(()),
        }
    };
    if let Some(c) = comm
        && !exp.train.batch_size.is_multiple_of(c.world_size())
    {
        return Err(TrainError::Invalid(format!(
            "train.batch_size {} is not divisible by the {} ranks of this data-parallel run",
            exp.train.batch_size,
            c.world_size()
        )));
    }
    let sched = exp.schedule_for(shared.train.len());
    let total = sched.total_steps;
    let start = run.start;
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    let policy = exp.data.corrupt();
    // With `shard_by_rank` each rank streams its own share, `B / world` rows a step.
    let sharded = comm.filter(|_| exp.train.shard_by_rank);
    let (sharding, position) = match sharded {
        Some(c) => (
            Sharding {
                rank: c.rank(),
                world: c.world_size(),
            },
            rank_position(run, c, start)?,
        ),
        None => match &run.data_ranks {
            Some(all) => {
                return Err(TrainError::Checkpoint {
                    path: run.last_ckpt.clone().unwrap_or_default(),
                    msg: format!(
                        "was written by a run sharded over {} ranks (train.shard_by_rank), whose ranks read different data; resume it that way",
                        all.len()
                    ),
                });
            }
            None => (Sharding::default(), run.data_position.clone()),
        },
    };
    let mut stream = PairStream::new(
        shared.train.clone(),
        mix_seed(&[exp.seed, 0xBA7C4]),
        sharding,
        SkipPolicy::from(&policy),
        position,
    )?;
    let mut skipped = stream.position().stats.clone();
    let (tokenizer, image_size, batch_size) = (
        shared.tokenizer.clone(),
        exp.data.image_size(),
        exp.train.batch_size / sharding.world,
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

    let val_batches = match &shared.val {
        Some(v) => validation_batches(
            v.as_ref(),
            batch_size,
            image_size,
            &shared.tokenizer,
            device,
        )?,
        None => Vec::new(),
    };
    let periodic: Vec<&crate::config::PeriodicTask> = exp
        .eval
        .tasks
        .iter()
        .filter(|t| t.every_steps.is_some() || t.every_epochs.is_some())
        .collect();

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
        let epoch = step / sched.steps_per_epoch + 1;
        let ctx = StepContext {
            epoch,
            epochs: exp.train.epochs,
            tie_seed: mix_seed(&[exp.seed, 0x9E53, step as u64]),
            labels: None,
        };
        let StepGrads { terms, grads } = match comm {
            // Every rank reads the same global batch (so the data position, and exact
            // resume, are the single-process ones) and steps on its own rows.
            Some(c) => {
                let part = batch.len() / c.world_size();
                let mine = if sharded.is_some() {
                    batch.clone()
                } else {
                    batch.narrow(c.rank() * part, part)?
                };
                loss_and_grads_across(
                    &run.model,
                    &run.params,
                    &run.logit_scale,
                    run.objective.as_ref(),
                    &mine,
                    &ctx,
                    exp.train.step_plan(),
                    c,
                )?
            }
            None => loss_and_grads(
                &run.model,
                &run.params,
                &run.logit_scale,
                run.objective.as_ref(),
                &batch,
                &ctx,
                exp.train.step_plan(),
            )?,
        };
        let loss_value = scalar(&terms.total)?;
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: loss_value,
                checkpoint: run.last_ckpt.clone(),
            });
        }
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
            log_line(&line)?;
            if let Some(cb) = &opts.on_log {
                cb(&run.name, &rec, total);
            }
            run.history.push(rec);
        }
        let epoch_end = done % sched.steps_per_epoch == 0;
        let mut records = Vec::new();
        if epoch_end && writes && !val_batches.is_empty() {
            opts.progress.set_message("validation loss");
            let metrics = validation_loss(
                &run.model,
                run.objective.as_ref(),
                run.logit_scale.as_tensor(),
                &val_batches,
                epoch,
                exp,
            )?;
            records.push(EvalRecord {
                step: done,
                epoch,
                eval: "validation".into(),
                metrics,
            });
        }
        let due: Vec<_> = periodic
            .iter()
            .filter(|t| writes && t.due(done, sched.steps_per_epoch))
            .collect();
        if !due.is_empty() {
            // A new evaluator per round: its feature cache belongs to these weights.
            let mut evaluator = Evaluator::new(&run.model, &shared.tokenizer, device);
            evaluator.batch_size = exp.eval.batch_size.max(1);
            for t in due {
                opts.progress.set_message(format!(
                    "{} on {}",
                    t.task.kind(),
                    t.task.dataset_name()
                ));
                let r = evaluator.run(&t.task, Some(&run.dir.join("eval")))?;
                records.push(EvalRecord {
                    step: done,
                    epoch,
                    eval: format!("{} on {}", r.task, r.dataset),
                    metrics: r.metrics,
                });
            }
        }
        for rec in records {
            let line =
                serde_json::to_string(&rec).map_err(|e| TrainError::Invalid(e.to_string()))?;
            log_line(&line)?;
            run.evals.push(rec);
        }
        opts.progress.set_position(done as u64);
        opts.progress.set_message(format!("loss {loss_value:.3}"));
        let checkpoint_due = done % exp.train.checkpoint_every == 0 || done == end;
        // Every rank sends its position at a checkpoint, whichever rank writes it.
        let data_ranks = match sharded {
            Some(c) if checkpoint_due => Some(gather_positions(c, &position)?),
            _ => None,
        };
        if writes && checkpoint_due {
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
                data_ranks,
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
    if !opts.writes() {
        opts.progress.finish_with_message("done (rank 0 evaluates)");
        return Ok(outcome(run, fitted, EvalReport::default()));
    }
    opts.progress.set_message("evaluating");
    let eval_dir = run.dir.join("eval");
    let eval = evaluate(
        &run.model,
        &shared.tokenizer,
        &shared.eval,
        &exp.eval,
        &shared.device,
        Some(&eval_dir),
    )?;
    // One CLIP_benchmark-style file per task, as `rankalign eval` writes them.
    let arch = crate::eval::suite::model_name(run.model.config());
    for sec in &eval.sections {
        let pretrained = format!("{}/{}", exp.name, run.name);
        crate::eval::ResultFile::of(&sec.task, &sec.dataset, &sec.metrics, &arch, &pretrained)
            .write(&eval_dir)?;
    }
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
    Ok(outcome(run, fitted, eval))
}

fn outcome(run: Run, fitted: Fitted, eval: EvalReport) -> VariantOutcome {
    VariantOutcome {
        name: run.name,
        steps: fitted.steps,
        resumed_from: (run.start > 0).then_some(run.start),
        final_loss: fitted.final_loss,
        median_step_ms: fitted.median_step_ms,
        total_data_wait_ms: fitted.total_data_wait_ms,
        train_secs: fitted.train_secs,
        eval,
        history: run.history,
        evals: run.evals,
        skipped: fitted.skipped,
        warnings: run.warnings,
    }
}

/// Train one variant to the end (or `stop_after`) and evaluate it.
pub fn train_variant(
    exp: &ExperimentConfig,
    variant: &VariantConfig,
    shared: &Shared,
    opts: &VariantOptions,
) -> Result<VariantOutcome> {
    // In a data-parallel run rank 0 prepares the directory (starting over or resuming)
    // before the other ranks read the checkpoint it resumes from.
    let comm = opts.comm.as_deref();
    if let Some(c) = comm.filter(|c| c.rank() != 0) {
        barrier(c)?;
    }
    let mut run = build(exp, variant, &shared.device, opts)?;
    if let Some(c) = comm.filter(|c| c.rank() == 0) {
        barrier(c)?;
    }
    if let Some(c) = comm {
        same_start(c, &run)?;
    }
    let fitted = fit(exp, &mut run, shared, opts)?;
    finish(exp, run, fitted, shared, opts)
}

/// Open the training source and the evaluation data of an experiment.
pub fn prepare(exp: &ExperimentConfig, device: &Device) -> Result<Shared> {
    prepare_for(exp, device, true)
}

/// [`prepare`]; without `with_eval` (a data-parallel rank other than 0) only the
/// training data: nothing is written and no test data is opened.
pub fn prepare_for(exp: &ExperimentConfig, device: &Device, with_eval: bool) -> Result<Shared> {
    let clip_cfg = exp.model.resolve().map_err(TrainError::Invalid)?;
    let (train, val, mut eval): (Arc<dyn PairSource>, Option<Arc<dyn PairSource>>, Evaluation) =
        match &exp.data {
            SourceConfig::Digits(d) => {
                let digits = Arc::new(d.digits()?);
                let train = d.split(digits.clone(), exp.seed, Split::Train)?;
                let test = d.split(digits.clone(), exp.seed, Split::Test)?;
                let val: Option<Arc<dyn PairSource>> = match d.val_size {
                    Some(n) if n > 0 => Some(Arc::new(rankalign_data::source::DigitsSource::new(
                        d.split(digits, exp.seed, Split::Val)?,
                    ))),
                    _ => None,
                };
                let tasks = if with_eval {
                    crate::eval::digits::write_eval_data(
                        &train,
                        &test,
                        &exp.eval,
                        &exp.run_dir().join("eval-data"),
                    )?
                } else {
                    Vec::new()
                };
                (
                    Arc::new(rankalign_data::source::DigitsSource::new(train)),
                    val,
                    Evaluation {
                        held_out: None,
                        tasks,
                    },
                )
            }
            other => (
                other.open_train(exp.seed)?,
                None,
                Evaluation {
                    held_out: if with_eval { other.open_test()? } else { None },
                    tasks: Vec::new(),
                },
            ),
        };
    if with_eval {
        eval.tasks
            .extend(exp.eval.tasks.iter().map(|t| t.task.clone()));
    }
    if train.len() < exp.train.batch_size {
        return Err(TrainError::Invalid(format!(
            "{} holds fewer samples than train.batch_size {}",
            train.describe(),
            exp.train.batch_size
        )));
    }
    Ok(Shared {
        train,
        val,
        eval,
        tokenizer: crate::text_tower::tokenizer(&clip_cfg, exp.model.text_tower.as_ref())?,
        device: device.clone(),
    })
}

/// The validation pairs as batches of the training size, read once (a remainder is
/// dropped, as in training; a set smaller than one batch is one batch).
fn validation_batches(
    source: &dyn PairSource,
    batch_size: usize,
    image_size: usize,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<Vec<rankalign_data::Batch>> {
    let (pairs, _) = rankalign_data::source::eval_pairs(source, source.len(), image_size)?;
    let size = batch_size.min(pairs.len()).max(1);
    pairs
        .chunks(size)
        .filter(|c| c.len() == size)
        .map(|c| {
            let images: Vec<_> = c.iter().map(|s| &s.image).collect();
            let captions: Vec<_> = c.iter().map(|s| s.caption.as_str()).collect();
            Ok(collate_pairs(
                &images, &captions, image_size, tokenizer, device,
            )?)
        })
        .collect()
}

/// The objective's mean total and parts over the validation batches, without
/// gradients, the image tower in evaluation mode.
fn validation_loss(
    model: &ClipModel,
    objective: &dyn Objective,
    logit_scale: &Tensor,
    batches: &[rankalign_data::Batch],
    epoch: usize,
    exp: &ExperimentConfig,
) -> Result<Vec<(String, f64)>> {
    let mut sums: Vec<(String, f64)> = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let image = model.encode_image(&batch.pixels)?.detach();
        let text = model.encode_text(&batch.ids, &batch.eot)?.detach();
        let ctx = StepContext {
            epoch,
            epochs: exp.train.epochs,
            tie_seed: mix_seed(&[exp.seed, 0x7A11D, b as u64]),
            labels: None,
        };
        let terms = objective.loss(&image, &text, &logit_scale.detach(), &ctx)?;
        let mut values = vec![("loss".to_string(), scalar(&terms.total)?)];
        for (n, t) in &terms.parts {
            values.push((n.to_string(), scalar(t)?));
        }
        if sums.is_empty() {
            sums = values.iter().map(|(n, _)| (n.clone(), 0.0)).collect();
        }
        for ((_, acc), (_, v)) in sums.iter_mut().zip(&values) {
            *acc += v;
        }
    }
    let n = batches.len().max(1) as f64;
    Ok(sums.into_iter().map(|(k, v)| (k, v / n)).collect())
}
