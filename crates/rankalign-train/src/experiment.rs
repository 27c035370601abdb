//! An experiment: every variant of a config trained with the same seed, data order and
//! budget, evaluated the same way, and reported side by side.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::ExperimentConfig;
use crate::dist::Collective;
use crate::report::{plot_evals, plot_losses, write_report};
use crate::trainer::{LogFn, NoticeFn, VariantOptions, VariantOutcome, prepare_for, train_variant};
use crate::{Result, TrainError, io_err};

/// Options of a whole experiment run.
#[derive(Clone, Default)]
pub struct RunOptions {
    pub overwrite: bool,
    pub stop_after: Option<usize>,
    /// Where the progress bars draw; hidden if `None`.
    pub progress: Option<MultiProgress>,
    pub on_log: Option<LogFn>,
    /// Lines to show as they happen (see [`NoticeFn`]).
    pub on_notice: Option<NoticeFn>,
    /// Compute threads per variant: each variant trains on a rayon pool of its own of
    /// this size, so that variants side by side never queue on one pool; 0: the
    /// caller's pool.
    pub threads: usize,
    /// This rank's collective in a data-parallel run (variants then train one after
    /// the other, and only rank 0 writes).
    pub comm: Option<Arc<dyn Collective>>,
}

/// `f` on a new rayon pool of `threads` workers (the caller waits); 0: on the current
/// pool.
pub fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    if threads == 0 {
        return f();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("rankalign-compute-{i}"))
        .build()
        .map_err(|e| TrainError::Invalid(format!("starting {threads} compute threads: {e}")))?;
    pool.install(f)
}

/// The results and where they were written.
#[derive(Debug)]
pub struct ExperimentOutcome {
    pub run_dir: PathBuf,
    pub report: PathBuf,
    pub plot: PathBuf,
    pub variants: Vec<VariantOutcome>,
    pub wall_secs: f64,
}

/// Train and evaluate every variant of `exp`, then write the report.
pub fn run_experiment(
    exp: &ExperimentConfig,
    device: &Device,
    opts: &RunOptions,
) -> Result<ExperimentOutcome> {
    let started = Instant::now();
    let run_dir = exp.run_dir();
    let writes = crate::dist::writes(opts.comm.as_deref());
    if writes {
        std::fs::create_dir_all(&run_dir).map_err(io_err(&run_dir))?;
        let cfg_path = run_dir.join("config.toml");
        let text = toml::to_string_pretty(exp)
            .map_err(|e| TrainError::Invalid(format!("serialising the config: {e}")))?;
        std::fs::write(&cfg_path, text).map_err(io_err(&cfg_path))?;
    }
    let shared = prepare_for(exp, device, writes)?;
    let sched = exp.schedule_for(shared.train.len());
    if let Some(cb) = &opts.on_notice {
        cb(
            &exp.name,
            &format!(
                "training data: {}; {} steps ({} epochs of {})",
                shared.train.describe(),
                sched.total_steps,
                exp.train.epochs,
                sched.steps_per_epoch
            ),
        );
    }
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))?
    .progress_chars("=> ");
    let bars: Vec<ProgressBar> = exp
        .variants
        .iter()
        .map(|v| {
            let pb = ProgressBar::hidden();
            let pb = match &opts.progress {
                Some(mp) => mp.add(pb),
                None => pb,
            };
            pb.set_style(style.clone());
            pb.set_prefix(v.name.clone());
            pb
        })
        .collect();
    let variant_opts = |i: usize| VariantOptions {
        overwrite: opts.overwrite,
        stop_after: opts.stop_after,
        progress: bars[i].clone(),
        on_log: opts.on_log.clone(),
        on_notice: opts.on_notice.clone(),
        comm: opts.comm.clone(),
    };
    let side_by_side = exp.train.parallel_variants && exp.variants.len() > 1 && opts.comm.is_none();
    let outcomes: Vec<VariantOutcome> = if side_by_side {
        std::thread::scope(|s| {
            let handles: Vec<_> = exp
                .variants
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let (shared, o) = (&shared, variant_opts(i));
                    let threads = opts.threads;
                    s.spawn(move || in_pool(threads, || train_variant(exp, v, shared, &o)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TrainError::Invalid("a training thread panicked".into()))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?
    } else {
        exp.variants
            .iter()
            .enumerate()
            .map(|(i, v)| {
                in_pool(opts.threads, || {
                    train_variant(exp, v, &shared, &variant_opts(i))
                })
            })
            .collect::<Result<_>>()?
    };
    let wall_secs = started.elapsed().as_secs_f64();
    let plot = run_dir.join("loss.png");
    let report = run_dir.join("report.md");
    if !writes {
        return Ok(ExperimentOutcome {
            run_dir,
            report,
            plot,
            variants: outcomes,
            wall_secs,
        });
    }
    plot_losses(&plot, &outcomes)?;
    plot_evals(&run_dir.join("evals.png"), &outcomes)?;
    write_report(
        &report,
        exp,
        &shared.train.describe(),
        sched.total_steps,
        &outcomes,
        wall_secs,
    )?;
    let summary = run_dir.join("summary.json");
    /// A line of `summary.json` (typed, so that metrics keep their order).
    #[derive(serde::Serialize)]
    struct SummaryRow<'a> {
        variant: &'a str,
        eval: &'a crate::eval::EvalReport,
        steps: usize,
        final_loss: f64,
        median_step_ms: f64,
        train_secs: f64,
        data_wait_ms: f64,
        data_seen: u64,
        data_skipped: u64,
        /// The last validation loss and its parts.
        validation: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let rows: Vec<SummaryRow> = outcomes
        .iter()
        .map(|o| SummaryRow {
            variant: &o.name,
            eval: &o.eval,
            steps: o.steps,
            final_loss: o.final_loss,
            median_step_ms: o.median_step_ms,
            train_secs: o.train_secs,
            data_wait_ms: o.total_data_wait_ms,
            data_seen: o.skipped.seen,
            data_skipped: o.skipped.skipped,
            validation: o
                .evals
                .iter()
                .rev()
                .find(|e| e.eval == "validation")
                .map(|e| {
                    e.metrics
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                        .collect()
                }),
        })
        .collect();
    let json =
        serde_json::to_string_pretty(&rows).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(&summary, json).map_err(io_err(&summary))?;
    Ok(ExperimentOutcome {
        run_dir,
        report,
        plot,
        variants: outcomes,
        wall_secs,
    })
}
