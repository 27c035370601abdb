//! `cargo xtask cuda-check`: the CUDA path must compile even where no GPU exists.
//!
//! PyPI's `nvidia-cuda-nvcc` and `nvidia-cuda-runtime` give an `nvcc` and the headers
//! without a system CUDA. They are installed once into `~/.cache/rankalign/cuda-venv`;
//! then every `.cu` file is compiled to PTX, and `cargo check` runs with the `cuda`
//! feature (linking would need libcuda, which only a GPU machine has).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root, run};

/// nvcc, the runtime headers, and CCCL (`nv/target`, which `cuda_fp16.h` includes).
const PACKAGES: [&str; 3] = [
    "nvidia-cuda-nvcc==13.5.37",
    "nvidia-cuda-runtime==13.5.37",
    "nvidia-cuda-cccl==13.3.5.0.6",
];

/// `~/.cache/rankalign` (or `$XDG_CACHE_HOME/rankalign`): venvs and downloaded models.
pub(crate) fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    std::env::var_os("XDG_CACHE_HOME")
        .map_or_else(|| home.join(".cache"), PathBuf::from)
        .join("rankalign")
}

/// `site-packages/nvidia/cu13` of the venv, installing it first if needed.
fn cuda_root() -> Result<PathBuf> {
    let venv = cache_dir().join("cuda-venv");
    let find = |venv: &Path| -> Option<PathBuf> {
        let lib = venv.join("lib");
        std::fs::read_dir(&lib)
            .ok()?
            .flatten()
            .map(|e| e.path().join("site-packages/nvidia/cu13"))
            .find(|p| p.join("bin/nvcc").exists() && p.join("include/nv/target").exists())
    };
    if let Some(root) = find(&venv) {
        return Ok(root);
    }
    eprintln!(
        "xtask: installing {} into {}",
        PACKAGES.join(" "),
        venv.display()
    );
    std::fs::create_dir_all(cache_dir())
        .with_context(|| format!("creating {}", cache_dir().display()))?;
    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(&venv);
    run(mk)?;
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES);
    run(pip)?;
    find(&venv).with_context(|| {
        format!(
            "no nvidia/cu13/bin/nvcc under {} after pip install",
            venv.display()
        )
    })
}

pub fn check() -> Result<()> {
    let root = cuda_root()?;
    let nvcc = root.join("bin/nvcc");
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ptx_dir = project_root().join("target/ptx");
    std::fs::create_dir_all(&ptx_dir)?;
    let kernels = project_root().join("crates/rankalign-kernels/src/cuda");
    let mut count = 0;
    for entry in
        std::fs::read_dir(&kernels).with_context(|| format!("reading {}", kernels.display()))?
    {
        let src = entry?.path();
        if src.extension().is_some_and(|e| e == "cu") {
            let out = ptx_dir.join(
                src.with_extension("ptx")
                    .file_name()
                    .expect("a .cu file has a name"),
            );
            let mut cmd = Command::new(&nvcc);
            cmd.args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-o"])
                .arg(&out)
                .arg(&src)
                .env("PATH", &path);
            run(cmd)?;
            eprintln!("xtask: {} -> {}", src.display(), out.display());
            count += 1;
        }
    }
    if count == 0 {
        bail!("no .cu files in {}", kernels.display());
    }
    let mut cmd = cargo();
    cmd.args([
        "check",
        "--release",
        "-p",
        "rankalign-kernels",
        "-p",
        "rankalign-cli",
        "--all-targets",
        "--features",
        "cuda",
    ])
    .env("PATH", &path)
    .env("NVCC", &nvcc)
    .env("CUDA_ROOT", &root)
    .env("CUDA_PATH", &root)
    .env("CUDA_HOME", &root)
    .env("CUDARC_CUDA_VERSION", "13000")
    .env("CUDA_COMPUTE_CAP", "80");
    run(cmd)?;
    eprintln!(
        "xtask: the CUDA path compiles ({count} kernel files to PTX, cargo check --features cuda passed)"
    );
    Ok(())
}
