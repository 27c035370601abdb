//! Ordinal classification as vision–language alignment: L2RCLIP and its baselines
//! (zero-shot CLIP, CoOp, OrdinalCLIP, L2RCLIP-I) compared over seeds and folds.
//!
//! - [`config`]: the `kind = "ordinal"` experiment file;
//! - [`data`]: ordinal digits or a benchmark's lists, resolved into folds;
//! - [`metrics`]: MAE / accuracy (argmax and expectation), the ordinality score, and the
//!   rank-similarity heatmap;
//! - `run`: one method × fold × seed, from the pretrained weights to its scores.
//!
//! [`run_ordinal`] runs every method on every fold with every seed, `parallel_runs` at a
//! time, and writes `report.md` (mean ± std), `summary.json` and one heatmap per method.
//! A finished run leaves `result.json` (written atomically); starting the experiment
//! again skips runs whose result was produced by the same configuration, so an
//! interrupted experiment resumes run by run.

pub mod config;
pub mod data;
pub mod metrics;
mod run;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rankalign_data::{ClipTokenizer, mix_seed};
use rankalign_kernels::l2_normalize;
use rankalign_models::{ClipConfig, ClipModel, PromptTokens, SeededVarMap};

pub use config::OrdinalConfig;
pub use run::RunResult;

use crate::{Result, TrainError, io_err};
use data::Fold;

/// Options of an ordinal experiment run.
#[derive(Clone, Default)]
pub struct OrdinalOptions {
    pub overwrite: bool,
    pub progress: Option<MultiProgress>,
    /// Compute threads per run: each of the `parallel_runs` run threads works on a rayon
    /// pool of its own of this size, so that runs side by side never queue on one rayon
    /// pool (candle's elementwise pool, `CANDLE_NUM_THREADS`, stays shared); 0: the
    /// caller's pool.
    pub threads: usize,
}

/// Everything the runs share.
pub(crate) struct Context {
    cfg: OrdinalConfig,
    clip: ClipConfig,
    weights: Option<HashMap<String, Tensor>>,
    tokenizer: ClipTokenizer,
    device: Device,
    folds: Vec<Fold>,
    features: Vec<OnceLock<std::result::Result<Tensor, String>>>,
    flip: bool,
}

/// The model's variables, with the text tower, its projection and `logit_scale` handed
/// out detached: they stay in the map (and in checkpoints) but no gradient is computed
/// for them, as PyTorch's `requires_grad_(False)`.
struct FrozenText(SeededVarMap);

/// Whether a parameter belongs to the frozen language side.
pub fn is_frozen(name: &str) -> bool {
    name.starts_with("text_model.") || name.starts_with("text_projection.") || name == "logit_scale"
}

impl SimpleBackend for FrozenText {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.0.get(s, name, h, dtype, dev)?;
        Ok(if is_frozen(name) { t.detach() } else { t })
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.0.get_unchecked(name, dtype, dev)?;
        Ok(if is_frozen(name) { t.detach() } else { t })
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

impl Context {
    /// A model on the pretrained weights (or a seeded initialisation) whose language
    /// side is frozen.
    fn build_model(&self, vm: &SeededVarMap) -> Result<ClipModel> {
        if let Some(w) = &self.weights {
            vm.preload(
                w.iter().map(|(k, v)| (k.clone(), v.clone())),
                DType::F32,
                &self.device,
            )?;
        }
        let vb = VarBuilder::from_backend(
            Box::new(FrozenText(vm.clone())),
            DType::F32,
            self.device.clone(),
        );
        let model = ClipModel::new(&self.clip, vb)?;
        if self.weights.is_some() {
            vm.finish_preload()?;
        }
        Ok(model)
    }

    /// Every rank's prompt `[SOT] X×n_ctx prefix rank suffix [EOT]` as token ids, with
    /// the positions of the rank's own tokens. The template must tokenize as its prefix,
    /// the rank words and its suffix one after the other (true when `{rank}` stands
    /// between spaces or punctuation).
    fn prompt_tokens(&self, n_ctx: usize) -> Result<PromptTokens> {
        let ctx_len = self.tokenizer.context_length();
        let template = &self.cfg.prompt.template;
        let (prefix, suffix) = template.split_once("{rank}").ok_or_else(|| {
            TrainError::Invalid(format!("prompt.template {template:?} has no {{rank}}"))
        })?;
        let inner = |text: &str| -> Result<Vec<u32>> {
            let ids = self.tokenizer.encode(text)?;
            Ok(ids[1..ids.len().saturating_sub(1).max(1)].to_vec())
        };
        let (p, s, x) = (inner(prefix)?, inner(suffix)?, inner("X")?);
        let mut rows = Vec::new();
        let mut rank_lens = Vec::new();
        for word in self.cfg.rank_words() {
            let r = inner(&word)?;
            let text = template.replace("{rank}", &word);
            let need = 2 + n_ctx + p.len() + r.len() + s.len();
            if need > ctx_len {
                return Err(TrainError::Invalid(format!(
                    "prompt {text:?} with {n_ctx} context tokens needs {need} tokens; the text tower takes {ctx_len}"
                )));
            }
            let ids = self
                .tokenizer
                .encode(&format!("{}{text}", "X ".repeat(n_ctx)))?;
            let mut want = vec![rankalign_data::tokenize::SOT];
            for _ in 0..n_ctx {
                want.extend(&x);
            }
            want.extend(&p);
            want.extend(&r);
            want.extend(&s);
            want.push(rankalign_data::tokenize::EOT);
            if ids != want || r.is_empty() {
                return Err(TrainError::Invalid(format!(
                    "prompt.template {template:?}: {text:?} does not tokenize as prefix, rank {word:?} and suffix; put a space or punctuation on both sides of {{rank}}"
                )));
            }
            rows.push(ids);
            rank_lens.push(r.len());
        }
        Ok(PromptTokens::new(
            &rows,
            n_ctx,
            p.len(),
            &rank_lens,
            &self.device,
        )?)
    }

    /// Normalised features of `set`'s images under `model`, without augmentation.
    fn encode(&self, model: &ClipModel, set: &data::OrdinalSet) -> Result<Tensor> {
        let all: Vec<usize> = (0..set.len()).collect();
        let mut parts = Vec::new();
        for chunk in all.chunks(self.cfg.eval.batch_size) {
            let px = set.pixels(chunk, None, &self.device)?;
            parts.push(l2_normalize(&model.encode_image(&px)?.detach())?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Stage 1's image features of fold `i`'s training images under the run's frozen
    /// encoder. With pretrained weights every run starts from the same encoder, so the
    /// features are computed once per fold and shared; from a seeded initialisation they
    /// are the run's own.
    fn stage1_features(&self, i: usize, model: &ClipModel) -> Result<Tensor> {
        if self.weights.is_none() {
            return self.encode(model, &self.folds[i].train);
        }
        self.features[i]
            .get_or_init(|| {
                self.encode(model, &self.folds[i].train)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(TrainError::Invalid)
    }
}

/// The results and where they were written.
#[derive(Debug)]
pub struct OrdinalOutcome {
    pub run_dir: PathBuf,
    pub report: PathBuf,
    pub results: Vec<RunResult>,
    pub wall_secs: f64,
}

/// Size and modification time of a file, or `missing`.
fn stamp(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{}:{:?}",
            m.len(),
            m.modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        ),
        Err(_) => "missing".into(),
    }
}

/// Everything a run's result depends on: the settings, the method, the fold and seed,
/// the pretrained weights' and list files' stamps, the device and the code version.
fn digest(
    cfg: &OrdinalConfig,
    method: usize,
    fold: &str,
    seed: u64,
    device: &Device,
) -> Result<String> {
    let weights = cfg
        .model
        .init_from
        .as_ref()
        .map(|d| stamp(&d.join("model.safetensors")));
    let lists: Vec<String> = match &cfg.data {
        config::OrdinalDataConfig::Digits { .. } => Vec::new(),
        config::OrdinalDataConfig::List(l) => l.protocol.files().iter().map(|f| stamp(f)).collect(),
    };
    let shared = serde_json::json!({
        "data": cfg.data, "model": cfg.model, "prompt": cfg.prompt,
        "stage1": cfg.stage1, "stage2": cfg.stage2,
        "method": cfg.methods[method], "fold": fold, "seed": seed,
        "weights": weights, "lists": lists, "device": format!("{:?}", device.location()),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let text = serde_json::to_string(&shared).map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(format!(
        "{:016x}",
        mix_seed(&text.bytes().map(u64::from).collect::<Vec<_>>())
    ))
}

/// Write `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Run every method on every fold with every seed, then write the report.
pub fn run_ordinal(
    cfg: &OrdinalConfig,
    device: &Device,
    opts: &OrdinalOptions,
) -> Result<OrdinalOutcome> {
    let started = Instant::now();
    let run_dir = cfg.run_dir();
    if opts.overwrite && run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(io_err(&run_dir))?;
    }
    std::fs::create_dir_all(&run_dir).map_err(io_err(&run_dir))?;
    let text = toml::to_string_pretty(cfg)
        .map_err(|e| TrainError::Invalid(format!("serialising the config: {e}")))?;
    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, text).map_err(io_err(&cfg_path))?;

    let clip = cfg.model.resolve().map_err(TrainError::Invalid)?;
    let weights = match &cfg.model.init_from {
        Some(dir) => {
            let (_, tensors) =
                crate::pretrained::load(dir, Some(&clip), &Device::Cpu).map_err(|e| match e {
                    TrainError::Io { path, source } => TrainError::Checkpoint {
                        path,
                        msg: format!("{source} (the default job writes it: `cargo xtask train`, or `rankalign export`)"),
                    },
                    e => e,
                })?;
            Some(tensors)
        }
        None => None,
    };
    let folds = data::folds(&cfg.data)?;
    let flip = matches!(&cfg.data, config::OrdinalDataConfig::List(l) if l.flip);
    let ctx = Context {
        cfg: cfg.clone(),
        tokenizer: ClipTokenizer::new(clip.text.context_length)?,
        clip,
        weights,
        device: device.clone(),
        features: folds.iter().map(|_| OnceLock::new()).collect(),
        folds,
        flip,
    };

    // Every (method, fold, seed), methods outermost so that the report fills in order.
    let mut jobs = Vec::new();
    // Zero-shot from pretrained weights has nothing random: one run per fold.
    for m in 0..cfg.methods.len() {
        let once =
            matches!(cfg.methods[m].recipe, config::Recipe::ZeroShot) && ctx.weights.is_some();
        let seeds = if once {
            &cfg.seeds[..1]
        } else {
            &cfg.seeds[..]
        };
        for f in 0..ctx.folds.len() {
            for &s in seeds {
                jobs.push((m, f, s));
            }
        }
    }
    let style = ProgressStyle::with_template(
        "{prefix:>24} [{bar:28}] {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))?
    .progress_chars("=> ");
    let overall = ProgressBar::hidden();
    let overall = match &opts.progress {
        Some(mp) => mp.add(overall),
        None => overall,
    };
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:>24} [{bar:28}] {pos}/{len} runs, {elapsed} elapsed, ETA {eta}",
        )
        .map_err(|e| TrainError::Invalid(e.to_string()))?
        .progress_chars("=> "),
    );
    overall.set_prefix("ordinal runs");
    overall.set_length(jobs.len() as u64);

    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<RunResult>>> = Mutex::new(vec![None; jobs.len()]);
    let failure: Mutex<Option<TrainError>> = Mutex::new(None);
    let work = || {
        loop {
            let k = next.fetch_add(1, Ordering::SeqCst);
            if k >= jobs.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                break;
            }
            let (m, f, seed) = jobs[k];
            let outcome = run_job(&ctx, &run_dir, m, f, seed, opts, &style);
            match outcome {
                Ok(r) => {
                    if let Ok(mut all) = results.lock() {
                        all[k] = Some(r);
                    }
                    overall.inc(1);
                }
                Err(e) => {
                    if let Ok(mut slot) = failure.lock() {
                        slot.get_or_insert(e);
                    }
                    break;
                }
            }
        }
    };
    // Each run thread takes jobs on a pool of its own: with the global pool, every
    // parallel op of both runs queued on its threads (measured: the default ordinal job
    // 121 s on its own pools of one thread against 150 s on a shared one).
    let worker = || {
        let pooled = crate::experiment::in_pool(opts.threads, || {
            work();
            Ok(())
        });
        if let Err(e) = pooled
            && let Ok(mut slot) = failure.lock()
        {
            slot.get_or_insert(e);
        }
    };
    let threads = cfg.parallel_runs.min(jobs.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(worker);
        }
    });
    overall.finish();
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let results: Vec<RunResult> = results
        .into_inner()
        .map_err(|_| TrainError::Invalid("a run thread panicked".into()))?
        .into_iter()
        .flatten()
        .collect();
    let wall_secs = started.elapsed().as_secs_f64();
    let report = report::write(cfg, &ctx.folds, &run_dir, &results, wall_secs)?;
    Ok(OrdinalOutcome {
        run_dir,
        report,
        results,
        wall_secs,
    })
}

fn run_job(
    ctx: &Context,
    run_dir: &Path,
    m: usize,
    f: usize,
    seed: u64,
    opts: &OrdinalOptions,
    style: &ProgressStyle,
) -> Result<RunResult> {
    let cfg = &ctx.cfg;
    let method = &cfg.methods[m];
    let fold = &ctx.folds[f].name;
    let dir = run_dir
        .join(&method.name)
        .join(fold)
        .join(format!("seed-{seed}"));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let digest = digest(cfg, m, fold, seed, &ctx.device)?;
    let result_path = dir.join("result.json");
    if let Ok(text) = std::fs::read_to_string(&result_path)
        && let Ok(done) = serde_json::from_str::<RunResult>(&text)
        && done.config_digest == digest
    {
        return Ok(done);
    }
    let bar = ProgressBar::hidden();
    let bar = match &opts.progress {
        Some(mp) => mp.add(bar),
        None => bar,
    };
    bar.set_style(style.clone());
    bar.set_prefix(format!("{} {fold} s{seed}", method.name));
    let result = run::run(ctx, f, method, seed, &dir, &bar, digest).map_err(|e| match e {
        TrainError::Diverged { step, loss, .. } => TrainError::Invalid(format!(
            "{} ({fold}, seed {seed}) diverged at step {step}: loss {loss}",
            method.name
        )),
        e => e,
    })?;
    let words = cfg.rank_words();
    metrics::plot_heatmap(
        &dir.join("heatmap.png"),
        &result.similarity,
        &words,
        &format!(
            "{}: rank similarity, OS {:.1}%",
            method.name, result.scores.os
        ),
    )?;
    let json =
        serde_json::to_string_pretty(&result).map_err(|e| TrainError::Invalid(e.to_string()))?;
    write_atomic(&result_path, json.as_bytes())?;
    bar.finish_and_clear();
    if let Some(mp) = &opts.progress {
        mp.remove(&bar);
    }
    Ok(result)
}

mod report {
    //! `report.md` and `summary.json` of an ordinal experiment.

    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    use super::RunResult;
    use super::config::OrdinalConfig;
    use super::data::Fold;
    use crate::{Result, TrainError, io_err};

    /// Mean and sample standard deviation.
    pub fn mean_std(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        if xs.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        (mean, var.sqrt())
    }

    pub fn write(
        cfg: &OrdinalConfig,
        folds: &[Fold],
        run_dir: &Path,
        results: &[RunResult],
        wall_secs: f64,
    ) -> Result<PathBuf> {
        let mut md = String::new();
        let m = cfg.data.num_ranks();
        let _ = writeln!(md, "# {}\n", cfg.name);
        let _ = writeln!(
            md,
            "{m} ranks; prompt template {:?}; {} fold(s) × seeds {:?}; {:.0} s in all.\n",
            cfg.prompt.template,
            folds.len(),
            cfg.seeds,
            wall_secs
        );
        for f in folds {
            let _ = writeln!(
                md,
                "- fold `{}`: {} training images, {} test images{}",
                f.name,
                f.train.len(),
                f.test.len(),
                if f.dropped > 0 {
                    format!(
                        ", {} list entries outside the label range dropped",
                        f.dropped
                    )
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            md,
            "\nMean ± sample std over folds and seeds. MAE in rank units; max = argmax, exp = expectation over ranks; OS = ordinality score of the rank features.\n"
        );
        let _ = writeln!(
            md,
            "| method | MAE (max) | MAE (exp) | Acc % (max) | Acc % (exp) | OS % | runs | s / run |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        let mut summary = Vec::new();
        for meth in &cfg.methods {
            let rs: Vec<&RunResult> = results.iter().filter(|r| r.method == meth.name).collect();
            let col = |f: &dyn Fn(&RunResult) -> f64| {
                mean_std(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let cells = [
                col(&|r| r.scores.mae_max),
                col(&|r| r.scores.mae_exp),
                col(&|r| r.scores.acc_max),
                col(&|r| r.scores.acc_exp),
                col(&|r| r.scores.os),
            ];
            let secs = col(&|r| r.secs).0;
            let _ = writeln!(
                md,
                "| {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.1} ± {:.1} | {:.1} ± {:.1} | {:.1} ± {:.1} | {} | {:.0} |",
                meth.name,
                cells[0].0,
                cells[0].1,
                cells[1].0,
                cells[1].1,
                cells[2].0,
                cells[2].1,
                cells[3].0,
                cells[3].1,
                cells[4].0,
                cells[4].1,
                rs.len(),
                secs
            );
            summary.push(serde_json::json!({
                "method": meth.name,
                "recipe": meth.recipe,
                "mae_max": cells[0], "mae_exp": cells[1],
                "acc_max": cells[2], "acc_exp": cells[3], "os": cells[4],
                "runs": rs.len(),
            }));
        }
        let _ = writeln!(md, "\n## Rank similarity (first fold, first seed)\n");
        for meth in &cfg.methods {
            if let Some(r) = results.iter().find(|r| r.method == meth.name) {
                let _ = writeln!(
                    md,
                    "![{0}]({0}/{1}/seed-{2}/heatmap.png)",
                    meth.name, r.fold, r.seed
                );
            }
        }
        let _ = writeln!(md, "\n## Every run\n");
        let _ = writeln!(
            md,
            "| method | fold | seed | MAE (max) | MAE (exp) | Acc % (max) | OS % | stage-1 steps | stage-2 steps | s |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
        for r in results {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {} | {:.0} |",
                r.method,
                r.fold,
                r.seed,
                r.scores.mae_max,
                r.scores.mae_exp,
                r.scores.acc_max,
                r.scores.os,
                r.stage1_steps,
                r.stage2_steps,
                r.secs
            );
        }
        let report = run_dir.join("report.md");
        std::fs::write(&report, md).map_err(io_err(&report))?;
        let path = run_dir.join("summary.json");
        let json = serde_json::to_string_pretty(&summary)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        std::fs::write(&path, json).map_err(io_err(&path))?;
        Ok(report)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn mean_and_sample_std() {
            let (m, s) = super::mean_std(&[1.0, 2.0, 3.0]);
            assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
            assert_eq!(super::mean_std(&[4.0]), (4.0, 0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use rankalign_models::{ClipConfig, ClipModel, SeededVarMap};

    use super::{FrozenText, is_frozen};

    /// The language side gets no gradient; every vision parameter does.
    #[test]
    fn the_text_tower_and_logit_scale_are_frozen() {
        let dev = Device::Cpu;
        let vm = SeededVarMap::new(4);
        let vb =
            VarBuilder::from_backend(Box::new(FrozenText(vm.clone())), DType::F32, dev.clone());
        let model = ClipModel::new(&ClipConfig::tiny(), vb).unwrap();
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &dev).unwrap();
        let ids = Tensor::new(&[[49406u32, 320, 49407], [49406, 321, 49407]], &dev).unwrap();
        let eot = Tensor::new(&[2u32, 5], &dev).unwrap();
        let v = model.encode_image(&pixels).unwrap();
        let t = model.encode_text(&ids, &eot).unwrap();
        let loss = v
            .matmul(&t.t().unwrap())
            .unwrap()
            .broadcast_mul(&model.logit_scale().exp().unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = vm.named_vars();
        assert!(vars.iter().any(|(n, _)| n.starts_with("text_model.")));
        for (name, var) in vars {
            let got = grads.get(&var).is_some();
            assert_eq!(got, !is_frozen(&name), "{name}");
        }
    }
}
