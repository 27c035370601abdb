//! One run: a method, a fold and a seed, from the pretrained weights to test scores.
//!
//! - zero-shot: the templates through the pretrained towers;
//! - CoOp / OrdinalCLIP: prompts and image encoder trained together with
//!   cross-entropy (+ KL), stage 2's budget;
//! - L2RCLIP: stage 1 trains the prompts (RankFormer, context) on image features cached
//!   once from the frozen encoder, with `w_c·(L_i2t + L_t2i) + w_cop·L_cop`; stage 2
//!   trains the image encoder against the now fixed rank features with
//!   `CE + w_scop·L_scop`.
//!
//! The text tower and `logit_scale` are always frozen. Features are L2-normalised
//! before every loss. Every random draw is keyed by the seed and the step.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use rankalign_data::{BatchPlan, Prefetcher, mix_seed};
use rankalign_kernels::l2_normalize;
use rankalign_losses::{cop_stage1, cross_entropy, ordinal_kl, scop, sup_con};
use rankalign_models::{ClipModel, PromptLearner, RankSlotConfig, SeededVarMap};
use serde::{Deserialize, Serialize};

use super::Context;
use super::config::{L2rclipRecipe, Recipe, StageConfig};
use super::data::{Fold, OrdinalSet};
use super::metrics::{OrdinalScores, ordinality_score, score};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::cosine_with_warmup;
use crate::{Result, TrainError, io_err};

/// What a finished run records (`result.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub method: String,
    pub fold: String,
    pub seed: u64,
    pub scores: OrdinalScores,
    pub stage1_steps: usize,
    pub stage2_steps: usize,
    pub train_images: usize,
    pub secs: f64,
    /// Rank-feature cosine similarities, `m × m` row-major.
    pub similarity: Vec<f32>,
    pub config_digest: String,
}

/// A logged training step (`metrics.jsonl`).
#[derive(Serialize)]
struct LogLine<'a> {
    stage: &'a str,
    step: usize,
    lr: f64,
    /// The prompts' learning rate where it differs (joint training).
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_prompt: Option<f64>,
    loss: f64,
}

struct Job<'a> {
    ctx: &'a Context,
    fold: &'a Fold,
    seed: u64,
    model: ClipModel,
    model_vars: Vec<(String, Var)>,
    prompts: PromptLearner,
    prompt_vars: Vec<(String, Var)>,
    bar: &'a ProgressBar,
    log: std::fs::File,
    log_path: std::path::PathBuf,
    name: &'a str,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn adam(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<AdamW> {
    // Adam's defaults (the papers use plain Adam), with decoupled weight decay.
    AdamW::new(
        vars,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        },
    )
}

/// Step decay: `lr · gamma^(milestones passed)` at 0-based `epoch`.
fn multistep(s: &StageConfig, epoch: usize) -> f64 {
    let passed = s.milestones.iter().filter(|&&m| epoch >= m).count();
    s.lr * s.gamma().powi(passed as i32)
}

/// A batch plan that tolerates sets smaller than the batch (few-shot).
fn plan(seed: u64, n: usize, batch: usize) -> Result<BatchPlan> {
    Ok(BatchPlan::new(seed, n, batch.min(n).max(1))?)
}

impl Job<'_> {
    fn device(&self) -> &Device {
        &self.ctx.device
    }

    fn scale(&self) -> Result<Tensor> {
        Ok(self.model.logit_scale().detach().exp()?)
    }

    fn rank_features(&self) -> Result<Tensor> {
        let r = self
            .prompts
            .text_features(|e, eot| self.model.encode_text_embeds(e, eot))?;
        Ok(l2_normalize(&r)?)
    }

    fn labels(&self, set: &OrdinalSet, idx: &[usize]) -> (Vec<u32>, Tensor) {
        let y: Vec<u32> = idx.iter().map(|&i| set.labels[i]).collect();
        let t = Tensor::from_vec(y.clone(), y.len(), self.device()).expect("invariant: u32 vector");
        (y, t)
    }

    fn record(
        &mut self,
        stage: &str,
        (step, last): (usize, usize),
        (lr, lr_prompt): (f64, Option<f64>),
        loss: f64,
    ) -> Result<()> {
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss,
                checkpoint: None,
            });
        }
        self.bar.inc(1);
        if step.is_multiple_of(10) || step + 1 == last {
            self.bar
                .set_message(format!("{} {stage} loss {loss:.3}", self.name));
            let line = serde_json::to_string(&LogLine {
                stage,
                step,
                lr,
                lr_prompt,
                loss,
            })
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
            writeln!(self.log, "{line}").map_err(io_err(&self.log_path))?;
        }
        Ok(())
    }

    fn vision_vars(&self) -> Vec<(String, Var)> {
        self.model_vars
            .iter()
            .filter(|(n, _)| {
                rankalign_models::vision::is_vision_param(n)
                    && !rankalign_models::resnet::is_buffer(n)
            })
            .cloned()
            .collect()
    }

    /// Batches of training pixels for steps `0..steps`, built ahead.
    fn batches(
        &self,
        plan: BatchPlan,
        steps: usize,
        tag: u64,
    ) -> Result<Prefetcher<(Vec<usize>, Tensor)>> {
        let set = self.fold.train.clone();
        let flip = self.ctx.flip;
        let (dev, seed) = (self.device().clone(), self.seed);
        Ok(Prefetcher::new(0, steps, 3, 1, move |step| {
            let idx = plan.indices(step);
            let flip_seed = flip.then(|| mix_seed(&[seed, tag, step as u64]));
            let px = set.pixels(&idx, flip_seed, &dev)?;
            Ok((idx, px))
        })?)
    }

    /// The next training batch's labels and normalised image features (BatchNorm, if
    /// any, in train mode).
    fn next_images(
        &self,
        batches: &mut Prefetcher<(Vec<usize>, Tensor)>,
    ) -> Result<(Vec<u32>, Tensor)> {
        let (_, batch) = batches
            .next_batch()
            .ok_or_else(|| TrainError::Invalid("the data thread stopped early".into()))?;
        let (idx, pixels) = batch?;
        let (y, _) = self.labels(&self.fold.train, &idx);
        let v = l2_normalize(&self.model.encode_image_t(&pixels, true)?)?;
        Ok((y, v))
    }

    /// L2RCLIP stage 1: prompts on cached image features.
    fn stage1(&mut self, r: &L2rclipRecipe, feats: &Tensor) -> Result<usize> {
        let s = &self.ctx.cfg.stage1;
        let n = self.fold.train.len();
        let plan = plan(mix_seed(&[self.seed, 0x5A61]), n, s.batch_size())?;
        let steps = s.epochs() * plan.steps_per_epoch();
        let warmup = s.warmup_epochs * plan.steps_per_epoch();
        let mut opt = adam(self.prompt_vars.clone(), s.weight_decay)?;
        let raw_scale = self.model.logit_scale().detach();
        for step in 0..steps {
            let idx = plan.indices(step);
            let (y, yt) = self.labels(&self.fold.train, &idx);
            let rows = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                idx.len(),
                self.device(),
            )?;
            let v = feats.index_select(&rows, 0)?;
            let ranks = self.rank_features()?;
            let ry = ranks.index_select(&yt, 0)?;
            let mut loss = Tensor::zeros((), DType::F32, self.device())?;
            if r.contrastive_weight > 0.0 {
                let i2t = sup_con(&v, &ry, &y, &y, &raw_scale)?;
                let t2i = sup_con(&ry, &v, &y, &y, &raw_scale)?;
                loss = (loss + ((i2t + t2i)? * r.contrastive_weight)?)?;
            }
            if r.cop_weight > 0.0 {
                let cop = cop_stage1(&v, &ry, &ry, &y, r.cop, r.form)?;
                loss = (loss + (cop * r.cop_weight)?)?;
            }
            let value = scalar(&loss)?;
            let lr = cosine_with_warmup(s.lr, warmup, steps, step);
            self.record("stage1", (step, steps), (lr, None), value)?;
            opt.step(&loss.backward()?, lr)?;
        }
        Ok(steps)
    }

    /// L2RCLIP stage 2: the image encoder against fixed rank features.
    fn stage2(&mut self, r: &L2rclipRecipe) -> Result<usize> {
        let s = self.ctx.cfg.stage2.clone();
        let ranks = self.rank_features()?.detach();
        let scale = self.scale()?;
        let n = self.fold.train.len();
        let plan = plan(mix_seed(&[self.seed, 0x5A62]), n, s.batch_size())?;
        let steps = s.epochs() * plan.steps_per_epoch();
        let mut opt = adam(self.vision_vars(), s.weight_decay)?;
        let mut batches = self.batches(plan, steps, 0xF11B2)?;
        for step in 0..steps {
            let (y, v) = self.next_images(&mut batches)?;
            let logits = v.matmul(&ranks.t()?)?.broadcast_mul(&scale)?;
            let mut loss = cross_entropy(&logits, &y)?;
            if r.scop_weight > 0.0 {
                loss = (loss + (scop(&v, &ranks, &y, r.form)? * r.scop_weight)?)?;
            }
            let value = scalar(&loss)?;
            let lr = multistep(&s, plan.epoch(step));
            self.record("stage2", (step, steps), (lr, None), value)?;
            opt.step(&loss.backward()?, lr)?;
        }
        Ok(steps)
    }

    /// CoOp / OrdinalCLIP: prompts (stage 1's learning rate, cosine) and image encoder
    /// (stage 2's, step decay) trained together for stage 2's epochs.
    fn one_stage(&mut self, kl_weight: f64) -> Result<usize> {
        let (s1, s2) = (self.ctx.cfg.stage1.clone(), self.ctx.cfg.stage2.clone());
        let scale = self.scale()?;
        let n = self.fold.train.len();
        let plan = plan(mix_seed(&[self.seed, 0x5A63]), n, s2.batch_size())?;
        let steps = s2.epochs() * plan.steps_per_epoch();
        let warmup = s1.warmup_epochs.min(s2.epochs().saturating_sub(1)) * plan.steps_per_epoch();
        let mut opt_p = adam(self.prompt_vars.clone(), s1.weight_decay)?;
        let mut opt_v = adam(self.vision_vars(), s2.weight_decay)?;
        let mut batches = self.batches(plan, steps, 0xF11B1)?;
        for step in 0..steps {
            let (y, v) = self.next_images(&mut batches)?;
            let ranks = self.rank_features()?;
            let logits = v.matmul(&ranks.t()?)?.broadcast_mul(&scale)?;
            let mut loss = cross_entropy(&logits, &y)?;
            if kl_weight > 0.0 {
                loss = (loss + (ordinal_kl(&logits, &y)? * kl_weight)?)?;
            }
            let value = scalar(&loss)?;
            let lr_p = cosine_with_warmup(s1.lr, warmup, steps, step);
            let lr_v = multistep(&s2, plan.epoch(step));
            self.record("joint", (step, steps), (lr_v, Some(lr_p)), value)?;
            let grads = loss.backward()?;
            opt_p.step(&grads, lr_p)?;
            opt_v.step(&grads, lr_v)?;
        }
        Ok(steps)
    }

    /// Test-set probabilities, scores and the rank similarity matrix.
    fn evaluate(&self) -> Result<(OrdinalScores, Vec<f32>)> {
        let ranks = self.rank_features()?.detach();
        let m = ranks.dim(0)?;
        let scale = self.scale()?;
        let test = &self.fold.test;
        let mut probs = Vec::with_capacity(test.len());
        let all: Vec<usize> = (0..test.len()).collect();
        for chunk in all.chunks(self.ctx.cfg.eval.batch_size) {
            let pixels = test.pixels(chunk, None, self.device())?;
            let v = l2_normalize(&self.model.encode_image(&pixels)?.detach())?;
            let logits = v.matmul(&ranks.t()?)?.broadcast_mul(&scale)?;
            let p = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
            if p.iter().flatten().any(|x| !x.is_finite()) {
                return Err(TrainError::Invalid(format!(
                    "{}: the test predictions are not finite (the model diverged)",
                    self.name
                )));
            }
            probs.extend(p);
        }
        let (mae_max, mae_exp, acc_max, acc_exp) = score(&probs, &test.labels);
        let sim = ranks.matmul(&ranks.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((
            OrdinalScores {
                mae_max,
                mae_exp,
                acc_max,
                acc_exp,
                os: ordinality_score(&sim, m),
                test_images: test.len(),
            },
            sim,
        ))
    }
}

/// Build, train and evaluate one run; `dir` receives its metrics.
pub(super) fn run(
    ctx: &Context,
    fold_ix: usize,
    method: &super::config::MethodConfig,
    seed: u64,
    dir: &Path,
    bar: &ProgressBar,
    digest: String,
) -> Result<RunResult> {
    let started = Instant::now();
    let fold = &ctx.folds[fold_ix];
    let device = &ctx.device;
    let vm = SeededVarMap::new(mix_seed(&[seed, 0x30DE1]));
    let model = ctx.build_model(&vm)?;
    let zero_shot = matches!(method.recipe, Recipe::ZeroShot);
    let n_ctx = if zero_shot { 0 } else { ctx.cfg.prompt.n_ctx };
    let tokens = ctx.prompt_tokens(n_ctx)?;
    let embeds = model.text_model()?.embed_tokens(&tokens.ids)?.detach();
    let slot = match &method.recipe {
        Recipe::ZeroShot => RankSlotConfig::Fixed,
        Recipe::Coop { slot } | Recipe::Ordinalclip { slot, .. } => slot.clone(),
        Recipe::L2rclip(r) => r.slot.clone(),
    };
    let pm = SeededVarMap::new(mix_seed(&[seed, 0x9A0E7]));
    let prompts = PromptLearner::new(tokens, embeds, &slot, pm.var_builder(DType::F32, device))?;
    let log_path = dir.join("metrics.jsonl");
    let log = std::fs::File::create(&log_path).map_err(io_err(&log_path))?;
    let spe = |s: &crate::ordinal::config::StageConfig| -> Result<usize> {
        Ok(plan(0, fold.train.len(), s.batch_size())?.steps_per_epoch())
    };
    let total = match &method.recipe {
        Recipe::ZeroShot => 0,
        Recipe::Coop { .. } | Recipe::Ordinalclip { .. } => {
            ctx.cfg.stage2.epochs() * spe(&ctx.cfg.stage2)?
        }
        Recipe::L2rclip(r) => {
            ctx.cfg.stage1.epochs() * spe(&ctx.cfg.stage1)?
                + if r.stage2 {
                    ctx.cfg.stage2.epochs() * spe(&ctx.cfg.stage2)?
                } else {
                    0
                }
        }
    };
    bar.set_length(total as u64);
    let mut job = Job {
        ctx,
        fold,
        seed,
        model_vars: vm.named_vars(),
        model,
        prompts,
        prompt_vars: pm.named_vars(),
        bar,
        log,
        log_path,
        name: &method.name,
    };
    let (mut stage1_steps, mut stage2_steps) = (0, 0);
    match &method.recipe {
        Recipe::ZeroShot => {}
        Recipe::Coop { .. } => stage2_steps = job.one_stage(0.0)?,
        Recipe::Ordinalclip { kl_weight, .. } => stage2_steps = job.one_stage(*kl_weight)?,
        Recipe::L2rclip(r) => {
            bar.set_message(format!("{} caching image features", method.name));
            let feats = ctx.stage1_features(fold_ix, &job.model)?;
            stage1_steps = job.stage1(r, &feats)?;
            if r.stage2 {
                stage2_steps = job.stage2(r)?;
            }
        }
    }
    bar.set_message(format!("{} evaluating", method.name));
    let (scores, similarity) = job.evaluate()?;
    Ok(RunResult {
        method: method.name.clone(),
        fold: fold.name.clone(),
        seed,
        scores,
        stage1_steps,
        stage2_steps,
        train_images: fold.train.len(),
        secs: started.elapsed().as_secs_f64(),
        similarity,
        config_digest: digest,
    })
}
