//! Project automation, run as `cargo xtask <command>` (matklad's xtask convention).
//!
//! - `train [ARGS…]`: builds the release CLI and runs `rankalign train ARGS…` (by default
//!   the embedded-data job `configs/digits-default.toml`);
//! - `test`: the test command of the README, `cargo test --workspace --release`;
//! - `ci`: formatting, clippy with warnings denied, then the tests;
//! - `bench [--quick] [--setup-torch]`: the kernel benchmarks next to PyTorch eager, same
//!   thread count, written to `docs/BENCHMARKS.md`;
//! - `cuda-check`: installs `nvcc` from PyPI into a cached venv, compiles the `.cu` files
//!   to PTX and runs `cargo check` with the `cuda` feature (no GPU needed).
//!
//! xtask links no ML crate: it only spawns cargo, so it builds in seconds and training
//! always runs from an optimised binary.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod bench;
mod cuda;
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

const USAGE: &str = "usage: cargo xtask <train [ARGS…] | test | ci | bench [--quick] [--setup-torch] | cuda-check>
  train       train and evaluate (default: configs/digits-default.toml); ARGS go to `rankalign train`
  test        cargo test --workspace --release
  ci          cargo fmt --check, cargo clippy -D warnings, then the tests
  bench       kernel benchmarks beside PyTorch; --setup-torch first makes a venv with torch
  cuda-check  compile the CUDA kernels to PTX and `cargo check` the cuda feature (no GPU needed)";

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
        Some("train") => {
            let mut cmd = cargo();
            cmd.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "rankalign-cli",
                "--bin",
                "rankalign",
                "--",
                "train",
            ]);
            cmd.args(&args[1..]);
            run(cmd)
        }
        Some("test") => test(),
        Some("bench") => bench::run(&args[1..]),
        Some("cuda-check") => cuda::check(),
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

fn test() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--release"]);
    run(cmd)
}
