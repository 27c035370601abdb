//! `rankalign`: train and evaluate CLIP-style models with ranking objectives.
//!
//! `rankalign train --config configs/digits-default.toml` trains every variant of the
//! experiment (CLIP and RankCLIP by default), evaluates them, and writes
//! `runs/<name>/report.md`. A run resumes from its checkpoints when started again.
//!
//! This binary is the only place that prints, sets up threads and picks the device.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressDrawTarget};
use rankalign_train::ordinal::{OrdinalConfig, OrdinalOptions, run_ordinal};
use rankalign_train::trainer::{LogFn, StepRecord};
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

#[derive(Parser)]
#[command(
    name = "rankalign",
    version,
    about = "Vision-language alignment with ranking objectives"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train and evaluate every variant of an experiment config.
    Train {
        /// The experiment file (TOML).
        #[arg(long, default_value = "configs/digits-default.toml")]
        config: PathBuf,
        /// Start over: delete this experiment's earlier checkpoints and metrics.
        #[arg(long)]
        overwrite: bool,
        /// Stop after this many steps (with a checkpoint); a later run resumes.
        #[arg(long)]
        stop_after: Option<usize>,
        /// Compute threads per variant (default: the cores divided among the variants
        /// that train at the same time). Candle reads this once, at start.
        #[arg(long)]
        threads: Option<usize>,
        /// Write runs under this directory instead of the config's `out_dir`.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Embed images and texts with a pretrained model: L2-normalised `image_embeds`,
    /// `text_embeds` and `logit_scale` in one safetensors file.
    Embed {
        /// A model: a Hugging Face `CLIPModel` or open_clip directory (e.g. from `export`),
        /// a .safetensors/.bin/.pt checkpoint, or a hub name such as
        /// `openai/clip-vit-base-patch16` already in the local Hugging Face cache.
        #[arg(long)]
        model: PathBuf,
        /// Image files or directories of PNG/JPEG files.
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// A text file with one text per line.
        #[arg(long)]
        texts: Option<PathBuf>,
        /// The safetensors file to write (an index `<out>.json` goes beside it).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
    /// Write a trained variant in the Hugging Face `CLIPModel` layout (`config.json` +
    /// `model.safetensors`, loadable by `CLIPModel.from_pretrained`), or, for a ResNet
    /// image tower, in open_clip's (`open_clip_config.json` + `open_clip_model.safetensors`).
    Export {
        /// The experiment directory, e.g. `runs/digits-clip-vs-rankclip`.
        #[arg(long)]
        run: PathBuf,
        /// The variant to export, e.g. `rankclip`.
        #[arg(long)]
        variant: String,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Fix candle's and rayon's thread count before any of their pools start.
#[allow(unsafe_code)]
fn set_compute_threads(n: usize) {
    // SAFETY: called first thing in `main`, before any thread is spawned, so no other
    // thread can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train {
            config,
            overwrite,
            stop_after,
            threads,
            out_dir,
            device,
        } => {
            let device = parse_device(&device)?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if is_ordinal(&config)? {
                let mut cfg = OrdinalConfig::load(&config)?;
                if let Some(dir) = out_dir {
                    cfg.out_dir = dir;
                }
                let concurrent = cfg.parallel_runs.max(1);
                let per_run = threads.unwrap_or((cores / concurrent).max(1));
                if std::env::var_os("RAYON_NUM_THREADS").is_none() || threads.is_some() {
                    set_compute_threads(per_run);
                }
                if stop_after.is_some() {
                    anyhow::bail!(
                        "--stop-after applies to pre-training experiments; an ordinal experiment resumes run by run"
                    );
                }
                return train_ordinal(&cfg, &device, overwrite);
            }
            let mut exp = ExperimentConfig::load(&config)?;
            if let Some(dir) = out_dir {
                exp.out_dir = dir;
            }
            let concurrent = if exp.train.parallel_variants {
                exp.variants.len().max(1)
            } else {
                1
            };
            let per_run = threads.unwrap_or((cores / concurrent).max(1));
            if std::env::var_os("RAYON_NUM_THREADS").is_none() || threads.is_some() {
                set_compute_threads(per_run);
            }
            train(&exp, &device, overwrite, stop_after, per_run, concurrent)
        }
        Command::Embed {
            model,
            images,
            texts,
            out,
            batch_size,
        } => {
            let images = rankalign_train::embed::image_files(&images)?;
            let texts: Vec<String> = match &texts {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .lines()
                    .map(str::to_string)
                    .filter(|l| !l.trim().is_empty())
                    .collect(),
                None => Vec::new(),
            };
            if images.is_empty() && texts.is_empty() {
                anyhow::bail!("embed: nothing to do; give --images and/or --texts");
            }
            let bar = if std::io::stderr().is_terminal() {
                indicatif::ProgressBar::new(0)
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "embedding [{bar:30}] {pos}/{len} {per_sec} ETA {eta}",
                )
                .expect("invariant: the template is valid")
                .progress_chars("=> "),
            );
            let (n, m) = rankalign_train::embed::embed(
                &model,
                &images,
                &texts,
                &out,
                batch_size,
                &bar,
                &candle_core::Device::Cpu,
            )?;
            eprintln!(
                "rankalign: {n} image and {m} text embeddings written to {}",
                out.display()
            );
            Ok(())
        }
        Command::Export { run, variant, out } => {
            let ckpt = rankalign_train::export::export_run(&run, &variant, &out)?;
            eprintln!("rankalign: wrote {} from {}", out.display(), ckpt.display());
            Ok(())
        }
    }
}

/// Whether a config file is an ordinal experiment (`kind = "ordinal"` at the top).
fn is_ordinal(path: &std::path::Path) -> Result<bool> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml::Table = match text.parse() {
        Ok(t) => t,
        // Let the strict parser report the syntax error with its line.
        Err(_) => return Ok(false),
    };
    Ok(doc.get("kind").and_then(|k| k.as_str()) == Some("ordinal"))
}

fn train_ordinal(cfg: &OrdinalConfig, device: &candle_core::Device, overwrite: bool) -> Result<()> {
    let folds_note = match &cfg.data {
        rankalign_train::ordinal::config::OrdinalDataConfig::Digits { .. } => {
            "ordinal digits".to_string()
        }
        rankalign_train::ordinal::config::OrdinalDataConfig::List(l) => {
            format!("{:?} lists", l.format)
        }
    };
    eprintln!(
        "rankalign: {} — {} method(s) × {} seed(s) on {folds_note}, {} run(s) at a time",
        cfg.name,
        cfg.methods.len(),
        cfg.seeds.len(),
        cfg.parallel_runs
    );
    let terminal = std::io::stderr().is_terminal();
    let progress = MultiProgress::with_draw_target(if terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let opts = OrdinalOptions {
        overwrite,
        progress: Some(progress),
    };
    let out =
        run_ordinal(cfg, device, &opts).with_context(|| format!("experiment {}", cfg.name))?;
    let mut rows: Vec<(&str, Vec<&rankalign_train::ordinal::RunResult>)> = Vec::new();
    for m in &cfg.methods {
        rows.push((
            m.name.as_str(),
            out.results.iter().filter(|r| r.method == m.name).collect(),
        ));
    }
    for (name, rs) in rows {
        let n = rs.len().max(1) as f64;
        let mean = |f: &dyn Fn(&rankalign_train::ordinal::RunResult) -> f64| {
            rs.iter().map(|r| f(r)).sum::<f64>() / n
        };
        eprintln!(
            "  {name:<14} MAE {:.3}  Acc {:5.1}%  OS {:5.1}%  ({} run(s))",
            mean(&|r| r.scores.mae_max),
            mean(&|r| r.scores.acc_max),
            mean(&|r| r.scores.os),
            rs.len()
        );
    }
    eprintln!(
        "rankalign: finished in {:.0} s; report: {}",
        out.wall_secs,
        out.report.display()
    );
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`.
fn parse_device(name: &str) -> Result<candle_core::Device> {
    let ordinal = match name {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => anyhow::bail!("--device: expected cpu, cuda or cuda:N, got {other:?}"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!(
            "--device {name}: this binary was built without CUDA; rebuild with `--features cuda` on a machine with the CUDA toolkit (README, CUDA)"
        );
    }
    candle_core::Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

fn train(
    exp: &ExperimentConfig,
    device: &candle_core::Device,
    overwrite: bool,
    stop_after: Option<usize>,
    per_run: usize,
    concurrent: usize,
) -> Result<()> {
    let total = exp.total_steps();
    eprintln!(
        "rankalign: {} — {} variant(s) × {} steps ({} epochs of {} steps), {} at a time with {} compute thread(s) each",
        exp.name,
        exp.variants.len(),
        total,
        exp.train.epochs,
        exp.steps_per_epoch(),
        concurrent,
        per_run
    );
    let terminal = std::io::stderr().is_terminal();
    let progress = MultiProgress::with_draw_target(if terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    // Without a terminal the bars are hidden; print about twenty lines per variant instead.
    let every = (total / 20).max(1);
    let log_every = exp.train.log_every;
    let on_log: LogFn = Arc::new(move |name: &str, r: &StepRecord| {
        if !terminal && (r.step % every < log_every || r.step == total) {
            eprintln!(
                "[{name}] step {}/{total} loss {:.4} (InfoNCE {:.4}) lr {:.2e} scale {:.2} {:.0} ms/step",
                r.step,
                r.loss,
                r.clip,
                r.lr,
                r.logit_scale.exp(),
                r.step_ms
            );
        }
    });
    let opts = RunOptions {
        overwrite,
        stop_after,
        progress: Some(progress),
        on_log: Some(on_log),
    };
    let out =
        run_experiment(exp, device, &opts).with_context(|| format!("experiment {}", exp.name))?;
    let mut table = String::new();
    for v in &out.variants {
        let e = &v.eval;
        table.push_str(&format!(
            "  {:<12} zero-shot top-1 {:5.1}%  I→T R@1 {:5.1}%  T→I R@1 {:5.1}%  S_A {:.3}  S_U {:.3}  {:.0} ms/step{}\n",
            v.name,
            e.zero_shot_top1,
            e.image_to_text_r1,
            e.text_to_image_r1,
            e.alignment,
            e.uniformity,
            v.median_step_ms,
            v.resumed_from.map(|s| format!(" (resumed at step {s})")).unwrap_or_default()
        ));
    }
    eprint!("{table}");
    eprintln!(
        "rankalign: finished in {:.0} s; report: {}",
        out.wall_secs,
        out.report.display()
    );
    Ok(())
}
