//! The CUDA path without a GPU: `cargo xtask cuda-check` (it compiles) and `cargo xtask
//! gpu-bundle` (a folder of CUDA binaries and a `run.sh` that a GPU machine without a
//! Rust toolchain runs).
//!
//! PyPI's `nvidia-cuda-nvcc`, `nvidia-cuda-runtime` and `nvidia-cuda-cccl` give an
//! `nvcc`, the headers and `libcudart` without a system CUDA. They are installed once into
//! `~/.cache/rankalign/cuda-venv-13.0.88`. They are pinned to CUDA 13.0, the version of the
//! driver (580) and of the PyTorch wheels on the GPU machines lent to this project: PTX
//! from a newer nvcc carries a PTX ISA version that an older driver refuses to JIT.
//!
//! candle links cudarc's libraries dynamically (`-lcuda -lcublas …`). No GPU machine's
//! libraries exist here, so linking uses *stubs*: for each library, a shared object with
//! the real SONAME (`libcuda.so.1`, `libcublas.so.13`, …) that defines every function
//! name cudarc's bindings declare. The binary records only the SONAMEs; on the GPU
//! machine the dynamic loader binds them to the driver and to PyTorch's wheels. The stubs
//! never travel in the bundle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{cargo, project_root, run};

/// nvcc with its front end (NVVM) and CRT headers, the runtime headers and `libcudart`,
/// and CCCL (`nv/target`, which `cuda_fp16.h` includes), all CUDA 13.0: nvcc's own
/// requirements are unpinned, and a newer NVVM writes PTX that 13.0's ptxas refuses.
const PACKAGES: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];
const VENV: &str = "cuda-venv-13.0.88";
/// The API version cudarc binds (`CUDARC_CUDA_VERSION`), matching [`PACKAGES`].
const CUDARC_VERSION: &str = "13000";
/// candle's kernels are built for this compute capability (PTX that the driver
/// JIT-compiles for any GPU from Ampere on, the H100 and H200 included).
const COMPUTE_CAP: &str = "80";

/// The libraries candle and cudarc link: the name in `-l`, the SONAME of CUDA 13's
/// library, and the bindings in cudarc's source that declare its functions.
const STUBS: [(&str, &str, &str); 6] = [
    ("cuda", "libcuda.so.1", "src/driver/sys/mod.rs"),
    ("cublas", "libcublas.so.13", "src/cublas/sys/mod.rs"),
    ("cublasLt", "libcublasLt.so.13", "src/cublaslt/sys/mod.rs"),
    ("curand", "libcurand.so.10", "src/curand/sys/mod.rs"),
    ("nvrtc", "libnvrtc.so.13", "src/nvrtc/sys/mod.rs"),
    ("nccl", "libnccl.so.2", "src/nccl/sys/mod.rs"),
];

/// The largest bundle that travels to a GPU machine with room to spare (64 MiB limit).
const BUNDLE_LIMIT: u64 = 60 * 1024 * 1024;

/// `~/.cache/rankalign` (or `$XDG_CACHE_HOME/rankalign`): venvs and downloaded models.
pub(crate) fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    std::env::var_os("XDG_CACHE_HOME")
        .map_or_else(|| home.join(".cache"), PathBuf::from)
        .join("rankalign")
}

/// Where the CUDA tools are: the wheels' `nvidia/cu13` and the folder of link stubs.
struct Toolchain {
    root: PathBuf,
    stubs: PathBuf,
}

impl Toolchain {
    fn nvcc(&self) -> PathBuf {
        self.root.join("bin/nvcc")
    }

    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.root.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// A cargo command that builds the `cuda` feature: nvcc for candle's and our
    /// kernels, the headers, the CUDA version, and the stubs as a link root (cudarc
    /// searches `lib/` under every root variable it reads).
    fn cargo(&self) -> Command {
        let mut cmd = cargo();
        cmd.env("PATH", self.path())
            .env("NVCC", self.nvcc())
            .env("CUDA_ROOT", &self.root)
            .env("CUDA_PATH", &self.root)
            .env("CUDA_HOME", &self.root)
            .env("CUDA_TOOLKIT_ROOT_DIR", &self.stubs)
            .env("CUDARC_CUDA_VERSION", CUDARC_VERSION)
            .env("CUDA_COMPUTE_CAP", COMPUTE_CAP);
        cmd
    }
}

/// The wheels' root, installing them first if needed, and the stubs, made if missing.
fn toolchain() -> Result<Toolchain> {
    let root = cuda_root()?;
    let stubs = cache_dir().join("cuda-stubs-13.0");
    if !stubs.join("made").exists() {
        make_stubs(&root, &stubs)?;
    }
    Ok(Toolchain { root, stubs })
}

/// `site-packages/nvidia/cu13` of the venv, installing it first if needed.
fn cuda_root() -> Result<PathBuf> {
    let venv = cache_dir().join(VENV);
    let find = |venv: &Path| -> Option<PathBuf> {
        let lib = venv.join("lib");
        std::fs::read_dir(&lib)
            .ok()?
            .flatten()
            .map(|e| e.path().join("site-packages/nvidia/cu13"))
            .find(|p| {
                p.join("bin/nvcc").exists()
                    && p.join("include/nv/target").exists()
                    && p.join("lib/libcudart.so.13").exists()
            })
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
            "no nvidia/cu13 with bin/nvcc, include/nv/target and lib/libcudart.so.13 under {} after pip install",
            venv.display()
        )
    })
}

/// cudarc's source folder, from `cargo metadata` (the locked version).
fn cudarc_source() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--all-features"]);
    let out = cmd.output().context("running cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\"manifest_path\":\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|p| {
            Path::new(p)
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|d| d.to_string_lossy().starts_with("cudarc-"))
        })
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
        .context("cargo metadata names no cudarc package (is the cuda feature in Cargo.lock?)")
}

/// The function names a bindings file declares (`pub unsafe fn NAME(`), sorted.
fn declared_functions(src: &str) -> BTreeSet<String> {
    src.lines()
        .filter_map(|l| l.strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// One stub library per [`STUBS`] entry, and `libcudart.so` as a link to the wheel's
/// real `libcudart.so.13` (candle's static MoE kernels call the runtime).
fn make_stubs(root: &Path, stubs: &Path) -> Result<()> {
    let cudarc = cudarc_source()?;
    let lib = stubs.join("lib");
    let src_dir = stubs.join("src");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    std::fs::create_dir_all(&src_dir)?;
    for (name, soname, bindings) in STUBS {
        let path = cudarc.join(bindings);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let functions = declared_functions(&text);
        ensure!(
            !functions.is_empty(),
            "{}: no `pub unsafe fn` declarations (has cudarc's layout changed?)",
            path.display()
        );
        let mut c = format!(
            "/* Link stub for {soname}, made by `cargo xtask` from {bindings} of cudarc. Never run: \
             the GPU machine's real library is loaded in its place. */\n"
        );
        for f in &functions {
            c.push_str(&format!("int {f}(void) {{ return 999; }}\n"));
        }
        let c_path = src_dir.join(format!("{name}.c"));
        std::fs::write(&c_path, c).with_context(|| format!("writing {}", c_path.display()))?;
        let mut cc = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()));
        cc.args(["-shared", "-fPIC", "-w", "-o"])
            .arg(lib.join(format!("lib{name}.so")))
            .arg(format!("-Wl,-soname,{soname}"))
            .arg(&c_path);
        run(cc)?;
        // The SONAME too, so that the bundle's binaries start here (on the CPU) for the
        // smoke test.
        let link = lib.join(soname);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("lib{name}.so"), &link)
            .with_context(|| format!("linking {}", link.display()))?;
        eprintln!("xtask: stub {soname} ({} functions)", functions.len());
    }
    let cudart = lib.join("libcudart.so");
    let _ = std::fs::remove_file(&cudart);
    std::os::unix::fs::symlink(root.join("lib/libcudart.so.13"), &cudart)
        .with_context(|| format!("linking {}", cudart.display()))?;
    std::fs::write(
        stubs.join("made"),
        "link stubs for the cuda feature; see xtask/src/cuda.rs\n",
    )?;
    Ok(())
}

/// Compiles every `.cu` file of the kernels crate to PTX with the wheels' nvcc.
fn compile_ptx(tc: &Toolchain) -> Result<usize> {
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
            let mut cmd = Command::new(tc.nvcc());
            cmd.args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-o"])
                .arg(&out)
                .arg(&src)
                .env("PATH", tc.path());
            run(cmd)?;
            eprintln!("xtask: {} -> {}", src.display(), out.display());
            count += 1;
        }
    }
    if count == 0 {
        bail!("no .cu files in {}", kernels.display());
    }
    Ok(count)
}

/// `cargo xtask cuda-check`: the kernels compile to PTX, and every target passes clippy
/// (warnings denied) with the `cuda` feature and with `nccl`.
pub fn check() -> Result<()> {
    let tc = toolchain()?;
    let count = compile_ptx(&tc)?;
    for features in [
        "rankalign-kernels/cuda,rankalign-cli/cuda",
        "rankalign-cli/nccl",
    ] {
        let mut cmd = tc.cargo();
        cmd.args([
            "clippy",
            "--release",
            "-p",
            "rankalign-kernels",
            "-p",
            "rankalign-train",
            "-p",
            "rankalign-cli",
            "--all-targets",
            "--features",
            features,
            "--",
            "-D",
            "warnings",
        ]);
        run(cmd)?;
    }
    eprintln!(
        "xtask: the CUDA path compiles ({count} kernel files to PTX; cargo clippy -D warnings with the cuda and the nccl features passed)"
    );
    Ok(())
}

/// What the bundle holds besides the binaries: (source in the repository, name in the
/// bundle).
const BUNDLE_FILES: [(&str, &str); 6] = [
    ("xtask/gpu/run.sh", "run.sh"),
    ("xtask/gpu/report.py", "report.py"),
    ("xtask/gpu/README.md", "README.md"),
    ("xtask/gpu/tiny-300.toml", "tiny-300.toml"),
    (
        "crates/rankalign-train/benches/torch_models.py",
        "torch_models.py",
    ),
    (
        "crates/rankalign-kernels/benches/torch_reference.py",
        "torch_reference.py",
    ),
];

/// `cargo xtask gpu-bundle [--out DIR]`: the `cuda` + `nccl` release CLI, the kernels'
/// CUDA test binary and the model bench, stripped and xz-compressed, with `run.sh`
/// (default `target/gpu-bundle`); fails if the folder is over 60 MiB.
pub fn bundle(args: &[String]) -> Result<()> {
    let out = match args {
        [] => project_root().join("target/gpu-bundle"),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask gpu-bundle [--out DIR]"),
    };
    let tc = toolchain()?;
    let mut cmd = tc.cargo();
    cmd.args([
        "build",
        "--release",
        "--message-format=json-render-diagnostics",
        "-p",
        "rankalign-cli",
        "--bin",
        "rankalign",
        "-p",
        "rankalign-train",
        "--example",
        "bench_models",
        "-p",
        "rankalign-kernels",
        "--test",
        "it",
        "--features",
        "rankalign-cli/nccl,rankalign-train/nccl,rankalign-kernels/cuda",
    ]);
    eprintln!(
        "xtask: building the CUDA binaries (candle's kernels take minutes to compile the first time)"
    );
    let output = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(
        output.status.success(),
        "cargo build of the CUDA binaries failed"
    );
    let artifacts = String::from_utf8_lossy(&output.stdout);
    let wanted = [
        ("rankalign", "\"kind\":[\"bin\"]", "rankalign"),
        ("bench_models", "\"kind\":[\"example\"]", "bench_models"),
        ("it", "\"kind\":[\"test\"]", "kernel_tests"),
    ];
    // Stripped binaries are staged beside the bundle, checked, then compressed into it:
    // candle's kernels (PTX text, and SASS for its MoE kernels) make each binary 50–75
    // MiB, which xz shrinks about sixfold; run.sh unpacks them on the GPU machine.
    let staging = out.with_extension("staging");
    for dir in [&out, &staging] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let bin = out.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    for (target, kind, name) in wanted {
        let exe = artifacts
            .lines()
            .filter(|l| l.contains(&format!("\"name\":\"{target}\"")) && l.contains(kind))
            .find_map(|l| l.split("\"executable\":\"").nth(1)?.split('"').next())
            .filter(|p| !p.is_empty())
            .with_context(|| format!("cargo reported no executable for {target}"))?;
        let dst = staging.join(name);
        let mut strip = Command::new("strip");
        strip.args(["--strip-all", "-o"]).arg(&dst).arg(exe);
        run(strip)?;
    }
    // The binaries load and run on the CPU with the stubs in the library path: their
    // CUDA libraries are only named, never called, until a CUDA device is asked for.
    let mut smoke = Command::new(staging.join("rankalign"));
    smoke.arg("--version").env(
        "LD_LIBRARY_PATH",
        format!(
            "{}:{}",
            tc.stubs.join("lib").display(),
            tc.root.join("lib").display()
        ),
    );
    run(smoke).context("the bundled rankalign does not start on the CPU with the link stubs")?;
    for (_, _, name) in wanted {
        let packed = bin.join(format!("{name}.xz"));
        let file = std::fs::File::create(&packed)
            .with_context(|| format!("creating {}", packed.display()))?;
        let mut xz = Command::new("xz");
        xz.args(["-6", "-T0", "-c"])
            .arg(staging.join(name))
            .stdout(file);
        run(xz).context("compressing with xz (install xz-utils)")?;
    }
    for (src, name) in BUNDLE_FILES {
        let from = project_root().join(src);
        std::fs::copy(&from, out.join(name))
            .with_context(|| format!("copying {} into the bundle", from.display()))?;
    }
    let size = folder_size(&out)?;
    eprintln!(
        "xtask: bundle {} is {:.1} MiB (limit {} MiB)",
        out.display(),
        size as f64 / 1048576.0,
        BUNDLE_LIMIT / 1048576
    );
    ensure!(
        size <= BUNDLE_LIMIT,
        "the bundle is {size} bytes, over the {BUNDLE_LIMIT}-byte limit"
    );
    if !has_driver() {
        no_gpu_check(&out)?;
    }
    eprintln!(
        "xtask: on a GPU machine run `bash {}/run.sh OUT_DIR` (see {}/README.md)",
        out.display(),
        out.display()
    );
    Ok(())
}

/// Whether this machine has an NVIDIA driver (then `run.sh` would really run).
fn has_driver() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1"))
        || Path::new("/usr/local/nvidia/lib64/libcuda.so.1").exists()
}

/// Here, without a GPU: `run.sh` must say so in one line, exit 3 and still write its
/// report.
fn no_gpu_check(bundle: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("rankalign-bundle-check-{}", std::process::id()));
    let out = Command::new("bash")
        .arg(bundle.join("run.sh"))
        .arg(&dir)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .context("running the bundle's run.sh")?;
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    let report = std::fs::read_to_string(dir.join("report.json")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        out.status.code() == Some(3)
            && said.contains("no NVIDIA driver here")
            && report.contains("\"status\": \"no_gpu\""),
        "run.sh on a machine without a GPU should exit 3, say \"no NVIDIA driver here\" and report status no_gpu; it exited {:?} and said:\n{said}\nreport: {report}",
        out.status.code()
    );
    eprintln!(
        "xtask: without a GPU, run.sh says so and exits 3: {}",
        said.lines().next().unwrap_or("")
    );
    Ok(())
}

fn folder_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            folder_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::declared_functions;

    #[test]
    fn declared_functions_reads_binding_names() {
        let src = "pub unsafe fn cuInit(Flags: u32) -> CUresult {\n    x\n}\n\
                   pub fn not_this() {}\n    pub unsafe fn nested_not_this() {}\n\
                   pub unsafe fn cuMemAlloc_v2(p: *mut u64, n: usize) -> CUresult {}\n";
        let names: Vec<_> = declared_functions(src).into_iter().collect();
        assert_eq!(names, ["cuInit", "cuMemAlloc_v2"]);
    }
}
