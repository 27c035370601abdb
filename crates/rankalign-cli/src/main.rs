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
use rankalign_train::trainer::{LogFn, NoticeFn, StepRecord};
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

/// mimalloc, whose per-thread heaps the towers' parallel tasks allocate from without a
/// shared lock (`rankalign_train::memory` says what it measured).
#[global_allocator]
static ALLOCATOR: rankalign_train::memory::MiMalloc = rankalign_train::memory::MiMalloc;

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
        /// Train with this seed instead of the config's, as the experiment
        /// `<name>-seed<N>` (a study runs one per seed; see `rankalign study`).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run N ranks of a data-parallel command on this machine, as `torchrun
    /// --nproc_per_node N`: each gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    /// MASTER_ADDR=127.0.0.1 and MASTER_PORT; the first rank to fail stops the others.
    /// Example: `rankalign launch --nproc 2 -- train --config c.toml`.
    Launch {
        /// Ranks to start.
        #[arg(long)]
        nproc: usize,
        /// Rank 0's port (default: a free one).
        #[arg(long)]
        master_port: Option<u16>,
        /// The rankalign command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Table several runs of one experiment (e.g. `--seed` runs) as mean ± std of every
    /// evaluation metric per variant, with a plot: `study.md` and `study.png`.
    Study {
        /// The experiment directories (each with `summary.json`).
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        /// Where `study.md`, `study.png` and `study.json` go.
        #[arg(long)]
        out: PathBuf,
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
    /// Evaluate a model as CLIP_benchmark does: zero-shot classification, multi-caption
    /// retrieval, a linear probe or the embedding geometry, on ImageFolder, CSV, COCO or
    /// CLIP_benchmark webdataset data. One task from flags, or a suite file; writes one
    /// JSON per task (CLIP_benchmark's schema) and a markdown table. `--collect DIR`
    /// tables the JSON files of a folder instead.
    Eval(Box<EvalArgs>),
    /// Data tools: write the digit scenes as real files, or scan a source.
    Data {
        #[command(subcommand)]
        command: DataCommand,
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

#[derive(clap::Args)]
struct EvalArgs {
    /// The model: a `rankalign export` / HF / open_clip directory, a checkpoint file,
    /// or a hub name in the local Hugging Face cache (overrides the suite's `model`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A suite file (TOML) with `[[task]]` tables.
    #[arg(long, conflicts_with_all = ["task", "collect"])]
    suite: Option<PathBuf>,
    /// One task: zeroshot_classification, zeroshot_retrieval, linear_probe or geometry.
    #[arg(long, value_parser = ["zeroshot_classification", "zeroshot_retrieval", "linear_probe", "geometry"])]
    task: Option<String>,
    /// The dataset as FORMAT:PATH: imagefolder:DIR, wds:ROOT or csv:FILE (labelled
    /// images); csv:FILE, coco:FILE or wds:ROOT (captions). For linear_probe, the test set.
    #[arg(long)]
    dataset: Option<String>,
    /// linear_probe: the training set (FORMAT:PATH).
    #[arg(long)]
    train_dataset: Option<String>,
    /// linear_probe: a validation set for choosing λ (default: 20% of the training set).
    #[arg(long)]
    val_dataset: Option<String>,
    /// The split folder of a CLIP_benchmark webdataset (`test`; the probe's training
    /// set reads `train`).
    #[arg(long, default_value = "test")]
    split: String,
    /// The dataset's name in results (default: from its path).
    #[arg(long)]
    name: Option<String>,
    /// Class names: imagenet1k, cifar10, cifar100, imagenet-r, imagenet-a, or a file.
    #[arg(long)]
    classnames: Option<String>,
    /// Templates with `{c}`: a built-in name, or a file.
    #[arg(long)]
    templates: Option<String>,
    /// A class subset (indices into the class names): imagenet-r, imagenet-a, or a file.
    #[arg(long)]
    subset: Option<String>,
    /// Retrieval: the ks of recall@k.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    recall_k: Vec<usize>,
    /// Where result files go.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Table the result JSONs (ours or CLIP_benchmark's) in this folder, and stop.
    #[arg(long)]
    collect: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write digit scenes as files in a format `[data]` reads: `csv` (CyCLIP's
    /// convention), `tsv` (open_clip's) or `webdataset` shards.
    Export {
        /// Only `digits` is generated here.
        #[arg(long, default_value = "digits")]
        source: String,
        /// Training pairs: `csv`, `tsv`, `webdataset` (one caption per scene).
        /// Evaluation sets: `imagefolder` / `clip-benchmark` (single digits, labelled),
        /// `captions-csv` / `clip-benchmark-retrieval` (scenes with four captions).
        #[arg(long, value_parser = ["csv", "tsv", "webdataset", "imagefolder", "clip-benchmark", "captions-csv", "clip-benchmark-retrieval"])]
        format: String,
        #[arg(long)]
        out: PathBuf,
        /// Scenes to write.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// `train` or `test` scenes (held-out handwriting).
        #[arg(long, default_value = "train", value_parser = ["train", "test"])]
        split: String,
        #[arg(long, default_value_t = 17)]
        seed: u64,
        #[arg(long, default_value_t = 48)]
        image_size: usize,
        /// Samples per webdataset shard.
        #[arg(long, default_value_t = 256)]
        shard_size: usize,
    },
    /// Read every sample of an experiment's training source (and its held-out one) and
    /// report counts, the decodable share, caption and image sizes and the corrupt keys;
    /// exits non-zero when the skipped share is above `data.corrupt.max_skipped`.
    Check {
        /// The experiment file (TOML).
        config: PathBuf,
        /// Read at most this many samples of each source.
        #[arg(long)]
        limit: Option<usize>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// A progress bar of `len` steps drawn with `template` on a terminal, hidden otherwise.
fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("invariant: the templates are valid")
            .progress_chars("=> "),
    );
    bar
}

/// Fix candle's and rayon's thread count before any of their pools start: `n` for
/// rayon (gemm's split), and `elementwise` for candle's pool of elementwise ops. A
/// training step runs its towers (and its micro-batches) as parallel tasks, so
/// elementwise ops run inline (`elementwise = 1`): their pool takes one caller at a
/// time and would serialise the tasks, or add a thread to a full pool.
#[allow(unsafe_code)]
fn set_compute_threads(n: usize, elementwise: usize) {
    // SAFETY: called first thing in `main`, before any thread is spawned, so no other
    // thread can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", elementwise.to_string());
    }
}

/// Candle's elementwise ops inline, unless the user chose their threads: for a run
/// whose `RAYON_NUM_THREADS` the user set (candle would otherwise size its pool by it).
#[allow(unsafe_code)]
fn default_elementwise_inline() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as in `set_compute_threads`, before any thread is spawned.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Training allocates and frees the same large tensors every step: freed memory is
    // kept mapped for reuse.
    rankalign_train::memory::keep_freed_memory();
    match cli.command {
        Command::Train {
            config,
            overwrite,
            stop_after,
            threads,
            out_dir,
            device,
            seed,
        } => {
            let dist = rankalign_train::dist::DistEnv::from_env()?;
            // A data-parallel rank on a bare `cuda` takes the GPU of its local rank.
            let local_gpu = match (device.as_str(), &dist) {
                ("cuda", Some(env)) => format!("cuda:{}", env.local_rank),
                _ => device.clone(),
            };
            let device = parse_device(&local_gpu)?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if is_ordinal(&config)? {
                let mut cfg = OrdinalConfig::load(&config)?;
                if let Some(dir) = out_dir {
                    cfg.out_dir = dir;
                }
                let concurrent = cfg.parallel_runs.max(1);
                let per_run = threads.unwrap_or((cores / concurrent).max(1));
                if std::env::var_os("RAYON_NUM_THREADS").is_none() || threads.is_some() {
                    set_compute_threads(per_run, per_run);
                }
                if seed.is_some() {
                    anyhow::bail!(
                        "--seed applies to pre-training experiments; an ordinal experiment lists its seeds"
                    );
                }
                if stop_after.is_some() {
                    anyhow::bail!(
                        "--stop-after applies to pre-training experiments; an ordinal experiment resumes run by run"
                    );
                }
                if dist.is_some() {
                    anyhow::bail!(
                        "data parallel (WORLD_SIZE > 1) runs pre-training experiments; an ordinal experiment runs in one process"
                    );
                }
                return train_ordinal(&cfg, &device, overwrite, per_run);
            }
            let mut exp = ExperimentConfig::load(&config)?;
            if let Some(dir) = out_dir {
                exp.out_dir = dir;
            }
            if let Some(s) = seed {
                exp.seed = s;
                exp.name = format!("{}-seed{s}", exp.name);
            }
            // Data-parallel ranks train the variants one after the other and share this
            // node's cores with the other local ranks.
            let concurrent = if exp.train.parallel_variants && dist.is_none() {
                exp.variants.len().max(1)
            } else {
                1
            };
            let local_ranks = match &dist {
                Some(_) => std::env::var("LOCAL_WORLD_SIZE")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(1)
                    .max(1),
                None => 1,
            };
            let per_run = threads.unwrap_or((cores / (concurrent * local_ranks)).max(1));
            if std::env::var_os("RAYON_NUM_THREADS").is_none() || threads.is_some() {
                set_compute_threads(per_run, 1);
            } else {
                default_elementwise_inline();
            }
            train(
                &exp, &device, overwrite, stop_after, per_run, concurrent, dist,
            )
        }
        Command::Launch {
            nproc,
            master_port,
            command,
        } => launch(nproc, master_port, &command),
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
            let bar = progress_bar(0, "embedding [{bar:30}] {pos}/{len} {per_sec} ETA {eta}");
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
        Command::Data { command } => data(command),
        Command::Study { runs, out } => {
            let written = rankalign_train::report::write_study(&runs, &out)?;
            eprintln!(
                "rankalign: study of {} run(s): {}",
                runs.len(),
                written.display()
            );
            Ok(())
        }
        // On a pool's worker, so that every parallel op runs with this thread taking
        // part instead of handing each one to the pool and sleeping until it is done
        // (measured, ViT-B/16 image forward at batch 1 on 2 threads: about 4% faster).
        Command::Eval(args) => {
            rankalign_train::experiment::in_pool(rayon::current_num_threads(), || Ok(eval(*args)))?
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

fn train_ordinal(
    cfg: &OrdinalConfig,
    device: &candle_core::Device,
    overwrite: bool,
    threads: usize,
) -> Result<()> {
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
        threads,
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
            "--device {name}: this binary was built without CUDA; rebuild with `--features cuda` on a machine with the CUDA toolkit (README, GPUs)"
        );
    }
    candle_core::Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

/// The engine for a data-parallel run: NCCL on a GPU in a build with the `nccl`
/// feature, else the TCP engine (on a GPU without `nccl`, it moves every collective
/// through the host).
fn collective(
    tcp: rankalign_train::dist::TcpCollective,
    device: &candle_core::Device,
) -> Result<Arc<dyn rankalign_train::dist::Collective>> {
    use rankalign_train::dist::Collective as _;
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(Arc::new(rankalign_train::dist::NcclCollective::new(
            tcp, device,
        )?));
    }
    if device.is_cuda() && tcp.rank() == 0 {
        eprintln!(
            "rankalign: this build has no `nccl` feature; the ranks exchange tensors through the host over TCP"
        );
    }
    Ok(Arc::new(tcp))
}

fn train(
    exp: &ExperimentConfig,
    device: &candle_core::Device,
    overwrite: bool,
    stop_after: Option<usize>,
    per_run: usize,
    concurrent: usize,
    dist: Option<rankalign_train::dist::DistEnv>,
) -> Result<()> {
    let comm: Option<Arc<dyn rankalign_train::dist::Collective>> = match &dist {
        Some(env) => {
            if env.rank == 0 {
                eprintln!(
                    "rankalign: rank 0 of {}, waiting for the others at {}:{}",
                    env.world_size, env.master_addr, env.master_port
                );
            }
            let timeouts = rankalign_train::dist::Timeouts::from_env()?;
            let c = rankalign_train::dist::TcpCollective::connect(env, timeouts)?;
            Some(collective(c, device)?)
        }
        None => None,
    };
    if dist.as_ref().is_some_and(|e| e.rank != 0) {
        // Rank 0 reports; the others only say what stops them (as an error).
        let opts = RunOptions {
            overwrite,
            stop_after,
            threads: per_run,
            comm,
            ..Default::default()
        };
        run_experiment(exp, device, &opts).with_context(|| format!("experiment {}", exp.name))?;
        return Ok(());
    }
    eprintln!(
        "rankalign: {} — {} variant(s), {} at a time with {} compute thread(s) each",
        exp.name,
        exp.variants.len(),
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
    let log_every = exp.train.log_every;
    let on_log: LogFn = Arc::new(move |name: &str, r: &StepRecord, total: usize| {
        let every = (total / 20).max(1);
        if !terminal && (r.step % every < log_every || r.step == total) {
            let parts: Vec<String> = r
                .parts
                .iter()
                .filter(|(k, _)| k.as_str() != "rank_weight")
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            let skipped = if r.data_skipped > 0 {
                format!(", {} of {} samples skipped", r.data_skipped, r.data_seen)
            } else {
                String::new()
            };
            eprintln!(
                "[{name}] step {}/{total} loss {:.4} ({}) lr {:.2e} scale {:.2} {:.0} ms/step{skipped}",
                r.step,
                r.loss,
                parts.join(", "),
                r.lr,
                r.logit_scale.exp(),
                r.step_ms
            );
        }
    });
    let on_notice: NoticeFn = Arc::new(|name: &str, line: &str| eprintln!("[{name}] {line}"));
    let opts = RunOptions {
        overwrite,
        stop_after,
        progress: Some(progress),
        on_log: Some(on_log),
        on_notice: Some(on_notice),
        threads: per_run,
        comm,
    };
    let out =
        run_experiment(exp, device, &opts).with_context(|| format!("experiment {}", exp.name))?;
    let mut table = String::new();
    for v in &out.variants {
        let shown: Vec<String> = v
            .eval
            .metrics
            .iter()
            // The counts the report states in words stay out of this line.
            .filter(|(k, _)| !rankalign_train::eval::is_count(k))
            .take(8)
            .map(|(k, x)| format!("{k} {x:.3}"))
            .collect();
        let skipped = if v.skipped.skipped > 0 {
            format!(
                "  {} of {} training samples skipped",
                v.skipped.skipped, v.skipped.seen
            )
        } else {
            String::new()
        };
        table.push_str(&format!(
            "  {:<12} {}  {:.0} ms/step{}{skipped}\n",
            v.name,
            shown.join("  "),
            v.median_step_ms,
            v.resumed_from
                .map(|s| format!(" (resumed at step {s})"))
                .unwrap_or_default()
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

fn data(command: DataCommand) -> Result<()> {
    use rankalign_train::data::source::tools::{
        EvalExportFormat, ExportFormat, export_digits, export_eval_digits, scan,
    };
    use rankalign_train::data::source::{DigitsSourceConfig, PairSource};
    match command {
        DataCommand::Export {
            source,
            format,
            out,
            count,
            split,
            seed,
            image_size,
            shard_size,
        } => {
            if source != "digits" {
                anyhow::bail!("data export: --source {source:?}: only `digits` can be generated");
            }
            let cfg = DigitsSourceConfig {
                image_size,
                train_size: if split == "train" { count } else { 1 },
                val_size: None,
                test_size: if split == "test" { count } else { 1 },
                mnist_images: None,
                mnist_labels: None,
            };
            let which = if split == "train" {
                rankalign_train::data::Split::Train
            } else {
                rankalign_train::data::Split::Test
            };
            let digits = Arc::new(cfg.digits()?);
            let scenes = cfg.split(digits, seed, which)?;
            let eval_format = match format.as_str() {
                "imagefolder" => Some(EvalExportFormat::ImageFolder),
                "clip-benchmark" => Some(EvalExportFormat::ClipBenchmark),
                "captions-csv" => Some(EvalExportFormat::CaptionsCsv),
                "clip-benchmark-retrieval" => Some(EvalExportFormat::ClipBenchmarkRetrieval),
                _ => None,
            };
            if let Some(f) = eval_format {
                let named = export_eval_digits(&scenes, count, f, &out, &split, shard_size)?;
                eprintln!(
                    "rankalign: wrote {count} {split} items as {format}; point a task at {}",
                    named.display()
                );
                return Ok(());
            }
            let format = match format.as_str() {
                "csv" => ExportFormat::Csv,
                "tsv" => ExportFormat::Tsv,
                _ => ExportFormat::Webdataset,
            };
            let named = export_digits(&scenes, count, format, &out, shard_size)?;
            eprintln!("rankalign: wrote {count} {split} scenes; point the config at {named}");
            Ok(())
        }
        DataCommand::Check {
            config,
            limit,
            json,
        } => {
            let exp = ExperimentConfig::load(&config)?;
            let max = exp.data.corrupt().max_skipped;
            let mut sources: Vec<(&str, Arc<dyn PairSource>)> =
                vec![("train", exp.data.open_train(exp.seed)?)];
            if let Some(t) = exp.data.open_test()? {
                sources.push(("test", t));
            }
            let mut reports = Vec::new();
            let mut over = Vec::new();
            for (which, src) in sources {
                let bar = progress_bar(
                    limit.unwrap_or(src.len()).min(src.len()) as u64,
                    "checking [{bar:30}] {pos}/{len} {per_sec} ETA {eta}",
                );
                let r = scan(src.as_ref(), limit, &|n| bar.set_position(n))?;
                bar.finish_and_clear();
                let s = &r.stats;
                eprintln!("{which}: {}", r.source);
                eprintln!(
                    "  read {} of {} declared; decodable {:.2}% ({} skipped)",
                    s.seen,
                    r.declared,
                    100.0 * r.decodable_share,
                    s.skipped
                );
                let spread = |name: &str, x: &rankalign_train::data::source::tools::Spread| {
                    eprintln!(
                        "  {name:<14} min {} median {} p95 {} max {}",
                        x.min, x.median, x.p95, x.max
                    )
                };
                spread("caption chars", &r.caption_chars);
                spread("caption words", &r.caption_words);
                spread("image width", &r.width);
                spread("image height", &r.height);
                for (reason, n) in &s.by_reason {
                    eprintln!("  skipped: {reason}: {n}");
                }
                for (k, why) in &s.first {
                    eprintln!("  corrupt: {k}: {why}");
                }
                if s.skipped > 0 && s.share() > max {
                    over.push(format!(
                        "{which}: {:.2}% skipped, above data.corrupt.max_skipped = {}%",
                        100.0 * s.share(),
                        100.0 * max
                    ));
                }
                reports.push(serde_json::json!({ "split": which, "report": r }));
            }
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&reports)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if !over.is_empty() {
                anyhow::bail!("data check: {}", over.join("; "));
            }
            eprintln!("rankalign: data check passed");
            Ok(())
        }
    }
}

/// The task that `rankalign eval`'s flags describe.
fn task_from_flags(a: &EvalArgs) -> Result<rankalign_train::eval::Task> {
    use rankalign_train::data::benchmark::{ClassificationData, RetrievalData};
    use rankalign_train::eval::Task;
    use rankalign_train::eval::tasks::{GeometryTask, ProbeTask, RetrievalTask, ZeroShotTask};
    let task = a
        .task
        .as_deref()
        .context("eval: give --task with --dataset, a --suite file, or --collect DIR")?;
    let dataset = a
        .dataset
        .as_deref()
        .context("eval: --task needs --dataset FORMAT:PATH")?;
    let classes = |spec: &str, split: &str| {
        ClassificationData::parse_spec(spec, split).map_err(|e| anyhow::anyhow!("--dataset: {e}"))
    };
    let captions = |spec: &str| {
        RetrievalData::parse_spec(spec, &a.split).map_err(|e| anyhow::anyhow!("--dataset: {e}"))
    };
    Ok(match task {
        "zeroshot_classification" => Task::ZeroshotClassification(ZeroShotTask {
            dataset: classes(dataset, &a.split)?,
            name: a.name.clone(),
            classnames: a.classnames.clone(),
            templates: a.templates.clone(),
            subset: a.subset.clone(),
        }),
        "zeroshot_retrieval" => Task::ZeroshotRetrieval(RetrievalTask {
            dataset: captions(dataset)?,
            name: a.name.clone(),
            recall_k: a.recall_k.clone(),
        }),
        "geometry" => Task::Geometry(GeometryTask {
            dataset: captions(dataset)?,
            name: a.name.clone(),
            plot: true,
        }),
        _ => {
            let train = a
                .train_dataset
                .as_deref()
                .context("eval: linear_probe needs --train-dataset FORMAT:PATH")?;
            Task::LinearProbe(ProbeTask {
                val: a
                    .val_dataset
                    .as_deref()
                    .map(|v| classes(v, "val"))
                    .transpose()?,
                name: a.name.clone(),
                ..ProbeTask::new(classes(train, "train")?, classes(dataset, &a.split)?)
            })
        }
    })
}

fn eval(a: EvalArgs) -> Result<()> {
    use rankalign_train::eval::suite::{ResultFile, SuiteConfig, collect, markdown, model_name};
    if let Some(dir) = &a.collect {
        let (results, other) = collect(dir)?;
        if results.is_empty() {
            anyhow::bail!("eval --collect: no result JSON in {}", dir.display());
        }
        for p in other {
            eprintln!("rankalign: skipped {} (not a result file)", p.display());
        }
        let md = markdown(&results);
        let out = a.output.clone().unwrap_or_else(|| dir.join("results.md"));
        std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
        eprint!("{md}");
        eprintln!(
            "rankalign: {} result(s) tabled in {}",
            results.len(),
            out.display()
        );
        return Ok(());
    }
    let (tasks, suite_model, suite_output, suite_batch) = match &a.suite {
        Some(p) => {
            let s = SuiteConfig::load(p)?;
            (s.task, s.model, s.output, s.batch_size)
        }
        None => (vec![task_from_flags(&a)?], None, None, None),
    };
    let model = a
        .model
        .clone()
        .or(suite_model)
        .context("eval: give --model (or `model` in the suite file)")?;
    let output = a
        .output
        .clone()
        .or(suite_output)
        .unwrap_or_else(|| PathBuf::from("eval-results"));
    let device = parse_device(&a.device)?;
    let clip = rankalign_train::Clip::load(&model, &device)?;
    let arch = model_name(clip.config());
    let pretrained = model.display().to_string();
    let mut ev = rankalign_train::eval::Evaluator::new(&clip.model, &clip.tokenizer, &device);
    ev.batch_size = a.batch_size.or(suite_batch).unwrap_or(64).max(1);
    let bar = progress_bar(0, "{msg} [{bar:30}] {pos}/{len} images {per_sec} ETA {eta}");
    let shown = bar.clone();
    ev.progress = Some(Arc::new(move |what: &str, done: usize, total: usize| {
        shown.set_message(what.split('|').next().unwrap_or(what).to_string());
        shown.set_length(total as u64);
        shown.set_position(done as u64);
    }));
    let mut results = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        eprintln!(
            "rankalign: task {}/{}: {} on {}",
            i + 1,
            tasks.len(),
            task.kind(),
            task.dataset_name()
        );
        let started = std::time::Instant::now();
        let r = ev
            .run(task, Some(&output))
            .with_context(|| format!("{} on {}", task.kind(), task.dataset_name()))?;
        bar.finish_and_clear();
        let file = ResultFile::new(&r, &arch, &pretrained);
        let path = file.write(&output)?;
        let shown: Vec<String> = r
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        eprintln!("  {} ({:.1} s)", r.details, started.elapsed().as_secs_f64());
        eprintln!("  {}", shown.join("  "));
        for f in &r.files {
            eprintln!("  wrote {}", f.display());
        }
        eprintln!("  wrote {}", path.display());
        results.push(file);
    }
    let md = markdown(&results);
    let table = output.join("results.md");
    std::fs::write(&table, &md).with_context(|| format!("writing {}", table.display()))?;
    eprintln!(
        "rankalign: {} task(s) done; table: {}",
        results.len(),
        table.display()
    );
    Ok(())
}

/// On Linux, a rank gets SIGTERM when the launcher dies, however it dies (`kill -9`
/// included, which runs no destructor): no rank outlives its launch.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_launcher(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    unsafe extern "C" {
        fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
        fn getppid() -> std::ffi::c_int;
    }
    const PR_SET_PDEATHSIG: std::ffi::c_int = 1;
    const SIGTERM: std::ffi::c_ulong = 15;
    let launcher = std::process::id() as std::ffi::c_int;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; `prctl` and `getppid` are plain system calls
    // and nothing is allocated. A launcher that died before `prctl` is caught by the
    // parent check.
    unsafe {
        cmd.pre_exec(move || {
            if prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if getppid() != launcher {
                return Err(std::io::Error::other("the launcher has already exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_: &mut std::process::Command) {}

/// `rankalign launch`: `nproc` ranks of `command` on this machine.
fn launch(nproc: usize, master_port: Option<u16>, command: &[String]) -> Result<()> {
    if nproc == 0 {
        anyhow::bail!("launch: --nproc must be at least 1");
    }
    let port = match master_port {
        Some(p) => p,
        // A port the system just gave out and took back: free, barring a race.
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("launch: finding a free port for rank 0")?
            .port(),
    };
    let exe = std::env::current_exe().context("launch: finding the rankalign executable")?;
    let mut ranks = Ranks(Vec::with_capacity(nproc));
    for rank in 0..nproc {
        let mut cmd = std::process::Command::new(&exe);
        die_with_launcher(&mut cmd);
        let child = cmd
            .args(command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("launch: starting rank {rank}"))?;
        ranks.0.push(child);
    }
    // Wait for all; once one fails, give the others a moment to stop on their own (their
    // next collective fails), then stop the rest. The first failure is reported first.
    let mut first: Option<(usize, std::process::ExitStatus, std::time::Instant)> = None;
    loop {
        let mut running = 0;
        for (rank, child) in ranks.0.iter_mut().enumerate() {
            match child.try_wait()? {
                Some(status) if !status.success() && first.is_none() => {
                    first = Some((rank, status, std::time::Instant::now()));
                }
                Some(_) => {}
                None => running += 1,
            }
        }
        if let Some((rank, status, at)) = first
            && (running == 0 || at.elapsed() > std::time::Duration::from_secs(5))
        {
            let mut lines = vec![format!("rank {rank} {}", describe_exit(status))];
            for (r, child) in ranks.0.iter_mut().enumerate().filter(|(r, _)| *r != rank) {
                let stopped = child.try_wait()?.is_none() && child.kill().is_ok();
                let status = child.wait()?;
                if stopped && !status.success() {
                    lines.push(format!("rank {r} was stopped by launch"));
                } else if !status.success() {
                    lines.push(format!("rank {r} {}", describe_exit(status)));
                }
            }
            anyhow::bail!("launch: {}", lines.join("; "));
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The launched ranks; any still running when this is dropped (`launch` returning
/// early with an error) are killed, so that none outlives it.
struct Ranks(Vec<std::process::Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "stopped".into(),
    }
}
