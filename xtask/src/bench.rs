//! `cargo xtask bench`: the kernel benchmarks (`rankalign-kernels/examples/bench.rs`)
//! beside their PyTorch eager references (`rankalign-kernels/benches/torch_reference.py`),
//! and the model benchmarks (`rankalign-train/examples/bench_models.rs`: ViT-B/16
//! forward, tiny-CLIP training step) beside the same models in Hugging Face
//! `transformers` (`rankalign-train/benches/torch_models.py`). Each pair runs with the
//! same thread count; the tables of times, ratios and peak memory go to
//! `docs/BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root, run as run_cmd};

fn torch_venv() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/rankalign/ref-venv")
}

#[derive(Debug, Clone)]
struct Row {
    op: String,
    size: String,
    imp: String,
    ms: f64,
    peak_mb: f64,
}

/// Reads the flat JSON objects both benchmark programs print.
fn parse(line: &str) -> Option<Row> {
    let field = |key: &str| -> Option<String> {
        let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = line[at..].trim_start();
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim().trim_matches('"').to_string())
    };
    Some(Row {
        op: field("op")?,
        size: field("size")?,
        imp: field("impl")?,
        ms: field("ms")?.parse().ok()?,
        peak_mb: field("peak_mb")?.parse().ok()?,
    })
}

fn capture(mut cmd: Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Rust benchmark example and its PyTorch script, which print rows of the same shape.
struct Suite {
    package: &'static str,
    example: &'static str,
    /// Relative to the workspace root.
    script: &'static str,
    /// Python modules whose versions the table names.
    modules: &'static [&'static str],
    /// More runs of the Rust example: an argument and its `RAYON_NUM_THREADS` (`None`:
    /// the bench's threads), each with candle's elementwise ops inline
    /// (`CANDLE_NUM_THREADS=1`), as `rankalign train` runs its steps.
    inline_passes: &'static [(&'static str, Option<usize>)],
}

const KERNELS: Suite = Suite {
    package: "rankalign-kernels",
    example: "bench",
    script: "crates/rankalign-kernels/benches/torch_reference.py",
    modules: &["torch"],
    inline_passes: &[],
};

const MODELS: Suite = Suite {
    package: "rankalign-train",
    example: "bench_models",
    script: "crates/rankalign-train/benches/torch_models.py",
    modules: &["torch", "transformers"],
    inline_passes: &[("--train-steps", None), ("--one-thread-steps", Some(1))],
};

/// glibc malloc settings for the programs that allocate through it (PyTorch, and the
/// kernel bench, which runs on the system allocator): keep freed memory instead of
/// returning it to the kernel, so that neither pays page faults on every large
/// temporary (measured: 247k faults and 1.25 s of system time in a 1.2 s quick run),
/// and one arena for all threads, whose own arenas would unmap their large blocks
/// anyway. `bench_models` and `rankalign` allocate through mimalloc, set up by
/// `rankalign_train::memory::keep_freed_memory`, and ignore these.
const MALLOC: [(&str, &str); 3] = [
    ("MALLOC_MMAP_THRESHOLD_", "1073741824"),
    ("MALLOC_TRIM_THRESHOLD_", "4294967296"),
    ("MALLOC_ARENA_MAX", "1"),
];

/// A table of docs/BENCHMARKS.md that `flag` reruns in place: the text from `start`
/// (`None`: the top) up to `end` is replaced.
struct Section {
    flag: &'static str,
    suite: &'static Suite,
    /// Our column's implementation name in the rows.
    ours: &'static str,
    what: &'static str,
    start: Option<&'static str>,
    end: &'static str,
    render: fn(&[Row], usize, &str, bool) -> String,
}

const SECTIONS: [Section; 2] = [
    Section {
        flag: "--kernels-only",
        suite: &KERNELS,
        ours: "fused",
        what: "kernel",
        start: None,
        end: "## Models",
        render,
    },
    Section {
        flag: "--models-only",
        suite: &MODELS,
        ours: "ours",
        what: "model",
        start: Some("## Models"),
        end: "## Data loading",
        render: render_models,
    },
];

/// Runs `section`'s suite `repeat` times and rewrites its table (the last run), with
/// each ratio's spread over the runs when there are several.
fn rerun_section(
    section: &Section,
    path: &Path,
    threads: usize,
    quick: bool,
    python: &Path,
    repeat: usize,
) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut runs = Vec::with_capacity(repeat);
    let mut note = String::new();
    for r in 0..repeat {
        eprintln!(
            "xtask: {} benchmarks, run {} of {repeat}",
            section.what,
            r + 1
        );
        let (rows, n) = run_suite(section.suite, threads, quick, python)?;
        // Each run's own times, so that a spread can be traced to one side.
        for row in &rows {
            eprintln!(
                "xtask: run {}: {} {} {}: {:.1} ms",
                r + 1,
                row.op,
                row.size,
                row.imp,
                row.ms
            );
        }
        runs.push(rows);
        note = n;
    }
    let last = runs.last().cloned().unwrap_or_default();
    let mut table = (section.render)(&last, threads, &note, quick);
    if repeat > 1 {
        table.push_str(&render_spread(
            &runs,
            section.ours,
            &format!("cargo xtask bench {} --repeat {repeat}", section.flag),
        ));
    }
    let start = section
        .start
        .map_or(0, |m| old.find(m).unwrap_or(old.len()));
    let end = old.find(section.end).unwrap_or(old.len()).max(start);
    let doc = format!("{}{table}\n{}", &old[..start], &old[end..]);
    eprintln!("{table}");
    std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// Builds a release example of `package` and returns its path.
fn build_example(package: &str, example: &str) -> Result<PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        package,
        "--example",
        example,
    ]);
    run_cmd(build)?;
    Ok(project_root().join("target/release/examples").join(example))
}

/// Runs one suite's Rust example and, if the venv exists, its PyTorch script; returns
/// their rows and a note on the PyTorch column.
fn run_suite(
    suite: &Suite,
    threads: usize,
    quick: bool,
    python: &Path,
) -> Result<(Vec<Row>, String)> {
    let exe = build_example(suite.package, suite.example)?;
    let mut rust = Command::new(&exe);
    rust.env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .envs(MALLOC);
    if quick {
        rust.arg("--quick");
    }
    eprintln!("xtask: running {} with {threads} thread(s)", exe.display());
    let mut rows: Vec<Row> = capture(rust)?.lines().filter_map(parse).collect();
    for &(arg, rayon) in suite.inline_passes {
        let mut inline = Command::new(&exe);
        inline
            .env("RAYON_NUM_THREADS", rayon.unwrap_or(threads).to_string())
            .env("CANDLE_NUM_THREADS", "1")
            .envs(MALLOC)
            .arg(arg);
        if quick {
            inline.arg("--quick");
        }
        eprintln!(
            "xtask: running {} {arg} with {} thread(s)",
            exe.display(),
            rayon.unwrap_or(threads)
        );
        rows.extend(capture(inline)?.lines().filter_map(parse));
    }
    if !python.exists() {
        let note = format!(
            "PyTorch column missing: no venv at {}; run `cargo xtask bench --setup-torch`",
            torch_venv().display()
        );
        return Ok((rows, note));
    }
    let mut py = Command::new(python);
    py.arg(project_root().join(suite.script))
        .args(["--threads", &threads.to_string()])
        .envs(MALLOC);
    if quick {
        py.arg("--quick");
    }
    eprintln!("xtask: running {} with {threads} thread(s)", suite.script);
    let note = match capture(py) {
        Ok(out) => {
            rows.extend(out.lines().filter_map(parse));
            let versions = suite
                .modules
                .iter()
                .map(|m| {
                    let mut v = Command::new(python);
                    v.args(["-c", &format!("import {m}; print({m}.__version__)")]);
                    let name = if *m == "torch" { "PyTorch" } else { m };
                    format!("{name} {}", capture(v).unwrap_or_default().trim())
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!("{versions} eager (`{}`)", suite.script)
        }
        Err(e) => format!("PyTorch column missing: the torch script failed ({e})"),
    };
    Ok((rows, note))
}

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let venv = torch_venv();
    let python = venv.join("bin/python");
    if args.iter().any(|a| a == "--setup-torch") {
        if !python.exists() {
            eprintln!(
                "xtask: creating {} with torch (a large download)",
                venv.display()
            );
            let mut mk = Command::new("python3");
            mk.args(["-m", "venv"]).arg(&venv);
            run_cmd(mk)?;
        }
        // Also on an existing venv, so that one made before the model benchmarks gets
        // transformers; pip leaves satisfied requirements alone.
        let mut pip = Command::new(venv.join("bin/pip"));
        pip.args([
            "install",
            "--quiet",
            "torch",
            "torchvision",
            "numpy",
            "transformers",
            "webdataset",
            "pillow",
            "scikit-learn",
        ]);
        run_cmd(pip)?;
    }
    let path = project_root().join("docs/BENCHMARKS.md");
    if args.iter().any(|a| a == "--data-only") {
        // Replace the data section (the last one) of the existing document.
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let keep = old
            .find("## Data loading")
            .map_or(old.as_str(), |i| &old[..i]);
        let doc = format!(
            "{}{}",
            keep.trim_end().to_string() + "\n\n",
            run_data(&python, quick)?
        );
        eprintln!("{doc}");
        std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
        return Ok(());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let repeat: usize = match args.iter().position(|a| a == "--repeat") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .context("--repeat takes a number of runs, at least 1")?,
        None => 1,
    };
    for section in &SECTIONS {
        if args.iter().any(|a| a == section.flag) {
            return rerun_section(section, &path, threads, quick, &python, repeat);
        }
    }
    let (kernel_rows, kernel_note) = run_suite(&KERNELS, threads, quick, &python)?;
    let (model_rows, model_note) = run_suite(&MODELS, threads, quick, &python)?;
    let data = run_data(&python, quick)?;
    let mut doc = render(&kernel_rows, threads, &kernel_note, quick);
    doc.push('\n');
    doc.push_str(&render_models(&model_rows, threads, &model_note, quick));
    doc.push('\n');
    doc.push_str(&data);
    eprintln!("{doc}");
    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// The data-throughput comparison: `bench_data` (ours) and `torch_data.py` (a
/// `DataLoader` over webdataset with PIL and torchvision) on the same JPEG shards, with
/// 1 and 2 data threads / workers, each pair run `reps` times in turn; returns the
/// markdown section.
fn run_data(python: &Path, quick: bool) -> Result<String> {
    let mut s = String::from("## Data loading\n\n");
    if !python.exists() {
        s.push_str("Not run: the shards are written and read by the PyTorch venv's Pillow and webdataset; run `cargo xtask bench --setup-torch`.\n");
        return Ok(s);
    }
    let shards = project_root().join("target/bench-shards");
    if !shards.join("sizes.json").exists() {
        let mut mk = Command::new(python);
        mk.arg(project_root().join("crates/rankalign-data/benches/make_bench_shards.py"))
            .arg("--out")
            .arg(&shards);
        run_cmd(mk)?;
    }
    let exe = build_example("rankalign-data", "bench_data")?;
    let reps = if quick { 1 } else { 3 };
    // threads → (ours, torch) rows over the repetitions
    let mut got: BTreeMap<usize, (Vec<Row>, Vec<Row>)> = BTreeMap::new();
    for rep in 0..reps {
        for threads in [1usize, 2] {
            eprintln!(
                "xtask: data throughput, {threads} thread(s), run {}",
                rep + 1
            );
            let mut ours = Command::new(&exe);
            ours.args(["--shards"])
                .arg(&shards)
                .args(["--threads", &threads.to_string(), "--quick"])
                .envs(MALLOC);
            let mut torch = Command::new(python);
            torch
                .arg(project_root().join("crates/rankalign-data/benches/torch_data.py"))
                .arg("--shards")
                .arg(&shards)
                .args(["--threads", &threads.to_string(), "--quick"])
                .envs(MALLOC);
            let entry = got.entry(threads).or_default();
            entry.0.extend(capture(ours)?.lines().filter_map(parse));
            entry.1.extend(capture(torch)?.lines().filter_map(parse));
        }
    }
    let mut v = Command::new(python);
    v.args([
        "-c",
        "import torch, torchvision, webdataset, PIL; print(f'PyTorch {torch.__version__}, torchvision {torchvision.__version__}, webdataset {webdataset.__version__}, Pillow {PIL.__version__}')",
    ]);
    let versions = capture(v).unwrap_or_default().trim().to_string();
    s.push_str(&format!(
        "Decode + `RandomResizedCrop(224, scale 0.9–1, bicubic)` + normalisation + batching of 64, over 10 webdataset shards of 200 JPEGs \
         (320×256 to 400×300, quality 90; `benches/make_bench_shards.py`) on {}. Ours: `examples/bench_data.rs` (`PairStream`: tar listing, \
         seeded shuffle buffer, zune-jpeg, Pillow-exact resampling, collation into one f32 tensor) on N data threads. PyTorch: \
         `benches/torch_data.py`, open_clip's webdataset pipeline in a `DataLoader` with N worker processes, PIL and torchvision ({versions}). \
         Images per second of one full pass, {reps} run(s) each, in turn; the ratio is ours / PyTorch's (above 1× = ours is faster), \
         median and range over the runs. Peak memory: our process's peak RSS over the whole 10-shard stream; PyTorch's is the sum of \
         the main process's and its workers' peak RSS (shared library pages counted once per process).\n\n",
        cpu_model()
    ));
    s.push_str("| data threads | ours img/s | torch img/s | ours / torch (range) | peak MB ours | torch |\n");
    s.push_str("|---|---|---|---|---|---|\n");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    for (threads, (ours, torch)) in &got {
        let rate = |r: &Row| 64_000.0 / r.ms;
        let ratios: Vec<f64> = ours
            .iter()
            .zip(torch)
            .map(|(o, t)| rate(o) / rate(t))
            .collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        s.push_str(&format!(
            "| {threads} | {:.0} | {:.0} | {:.2}× ({lo:.2}–{hi:.2}) | {:.0} | {:.0} |\n",
            median(ours.iter().map(rate).collect()),
            median(torch.iter().map(rate).collect()),
            median(ratios.clone()),
            median(ours.iter().map(|r| r.peak_mb).collect()),
            median(torch.iter().map(|r| r.peak_mb).collect()),
        ));
    }
    Ok(s)
}

/// The CPU's model name and its widest vector extension: the ratios against PyTorch
/// depend on it (gemm's AVX-512 kernels against PyTorch's on one machine, AVX2 on both
/// on another), so a table names it.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim)
    };
    let model = field("model name").unwrap_or("unknown CPU");
    let flags: Vec<&str> = field("flags").unwrap_or("").split_whitespace().collect();
    let widest = [("avx512f", "AVX-512"), ("avx2", "AVX2")]
        .into_iter()
        .find(|(flag, _)| flags.contains(flag));
    match widest {
        Some((_, name)) => format!("{model}, {name}"),
        None => model.to_string(),
    }
}

fn render(rows: &[Row], threads: usize, torch_note: &str, quick: bool) -> String {
    let mut by: BTreeMap<(String, String), BTreeMap<String, (f64, f64)>> = BTreeMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    for r in rows {
        let key = (r.op.clone(), r.size.clone());
        if !order.contains(&key) {
            order.push(key.clone());
        }
        by.entry(key)
            .or_default()
            .insert(r.imp.clone(), (r.ms, r.peak_mb));
    }
    let cell =
        |m: &BTreeMap<String, (f64, f64)>, k: &str, f: fn(&(f64, f64)) -> f64, digits: usize| {
            m.get(k)
                .map_or_else(|| "–".to_string(), |v| format!("{:.*}", digits, f(v)))
        };
    let ratio = |m: &BTreeMap<String, (f64, f64)>, k: &str| match (m.get(k), m.get("fused")) {
        (Some(a), Some(b)) if b.0 > 0.0 => format!("{:.2}×", a.0 / b.0),
        _ => "–".into(),
    };
    let mut s = String::new();
    s.push_str(
        "# Benchmarks\n\nReproduce: `cargo xtask bench` (add `--setup-torch` once to create the PyTorch venv \
         with torch and transformers; `--quick` for a smoke test with fewer runs and sizes).\n\n\
         The ratios depend on the machine, above all on its vector width: candle's gemm has AVX-512 kernels, \
         and the `matmul` rows show how it fares against PyTorch's on the machine that made these tables \
         (the CPU is named with its widest vector extension).\n\n## Kernels\n\n",
    );
    s.push_str(&format!(
        "Forward + backward, median of {} runs after {} warm-up runs, {threads} thread(s) for every column, on {} ({}). \
Peak memory is the growth of live heap bytes during one run over those live before it: \
         exact on the Rust side (a counting allocator), from the profiler's per-op allocation events on the PyTorch side \
         (`profile_memory=True`). Both programs run with `MALLOC_MMAP_THRESHOLD_=1GiB MALLOC_TRIM_THRESHOLD_=4GiB MALLOC_ARENA_MAX=1`, so \
         that neither pays page faults for every large temporary. Ratios are the other column's time divided by the fused time (above 1× = fused is faster).\n\n",
        if quick { 3 } else { 15 },
        if quick { 1 } else { 3 },
        cpu_model(),
        torch_note
    ));
    s.push_str("| op | size | fused ms | candle ms | torch ms | vs candle | vs torch | peak MB fused | candle | torch |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for key in &order {
        let m = &by[key];
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            key.0,
            key.1,
            cell(m, "fused", |v| v.0, 3),
            cell(m, "candle", |v| v.0, 3),
            cell(m, "torch", |v| v.0, 3),
            ratio(m, "candle"),
            ratio(m, "torch"),
            cell(m, "fused", |v| v.1, 1),
            cell(m, "candle", |v| v.1, 1),
            cell(m, "torch", |v| v.1, 1),
        ));
    }
    s.push_str("\nOps: `pl_nll` = Plackett–Luce NLL (ListMLE) of a B×B score matrix in the authors' parity form (PyTorch: allRank's listMLE as in RankCLIP's code); \
`pairwise_dist` = L2RCLIP's weighted mean pairwise Euclidean distance of two B×512 feature sets (PyTorch: `torch.cdist`); \
`layer_norm` = LayerNorm over the last dimension at transformer shapes (PyTorch: `F.layer_norm`).\n");
    s
}

/// The model table: our time, PyTorch's, their ratio (above 1× = ours is faster) and
/// peak memory.
/// Rows by (op, size), then by implementation: (ms, peak MB).
type RowsBy<'a> = BTreeMap<(&'a str, &'a str), BTreeMap<&'a str, (f64, f64)>>;

/// The reference of a row: PyTorch's row of the same size, else of the size before the
/// first `; ` (ours split into micro-batches against PyTorch's plain step); none for a
/// row of ours on one thread (PyTorch ran on all of them). (Sizes carry no commas: the
/// row reader splits on them.)
fn torch_cell(by: &RowsBy, op: &str, size: &str) -> Option<(f64, f64)> {
    if size.ends_with("; 1 thread") {
        return None;
    }
    let base = size.split("; ").next().unwrap_or(size);
    by.get(&(op, size))
        .and_then(|m| m.get("torch"))
        .or_else(|| by.get(&(op, base)).and_then(|m| m.get("torch")))
        .copied()
}

/// Each row's ratio (PyTorch's time over ours) over several runs, as median [min–max],
/// and how our steps scale from one thread.
/// `ours` names our column ("ours" for models, "fused" for kernels); `command`
/// reproduces the runs.
fn render_spread(runs: &[Vec<Row>], ours: &str, command: &str) -> String {
    let mut ratios: Vec<((String, String), Vec<f64>)> = Vec::new();
    let mut scaling: Vec<(String, Vec<f64>)> = Vec::new();
    for rows in runs {
        let mut by: RowsBy = BTreeMap::new();
        for r in rows {
            by.entry((r.op.as_str(), r.size.as_str()))
                .or_default()
                .insert(r.imp.as_str(), (r.ms, r.peak_mb));
        }
        for r in rows.iter().filter(|r| r.imp == ours) {
            if let Some(t) = torch_cell(&by, &r.op, &r.size) {
                let key = (r.op.clone(), r.size.clone());
                match ratios.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(t.0 / r.ms),
                    None => ratios.push((key, vec![t.0 / r.ms])),
                }
            }
        }
        // Our threaded steps against our best one-thread step of the same batch (the
        // size before the first `; `).
        let base = |size: &str| size.split("; ").next().unwrap_or(size).to_string();
        for r in rows
            .iter()
            .filter(|r| r.imp == ours && r.op.contains("step") && !r.size.ends_with("; 1 thread"))
        {
            let one = rows
                .iter()
                .filter(|o| {
                    o.imp == ours
                        && o.op == r.op
                        && o.size.ends_with("; 1 thread")
                        && base(&o.size) == base(&r.size)
                })
                .map(|o| o.ms)
                .reduce(f64::min);
            if let Some(one) = one {
                match scaling.iter_mut().find(|(k, _)| *k == r.size) {
                    Some((_, v)) => v.push(r.ms / one),
                    None => scaling.push((r.size.clone(), vec![r.ms / one])),
                }
            }
        }
    }
    let spread = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("{:.2}× [{:.2}–{:.2}]", v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut s = format!(
        "\nOver {} runs of `{command}` (the table above is the last), PyTorch's (or scikit-learn's) time over ours, median [min–max]; a row whose range crosses 1.0× is not a win:\n\n| op | size | vs torch |\n|---|---|---|\n",
        runs.len(),
    );
    for ((op, size), mut v) in ratios {
        s.push_str(&format!("| {op} | {size} | {} |\n", spread(&mut v)));
    }
    if !scaling.is_empty() {
        s.push_str("\nOur training steps' time over our fastest one-thread step of the same batch (below 1× = the threads help), median [min–max]:\n\n| step | time / 1 thread |\n|---|---|\n");
        for (size, mut v) in scaling {
            s.push_str(&format!("| {size} | {} |\n", spread(&mut v)));
        }
    }
    s
}

fn render_models(rows: &[Row], threads: usize, torch_note: &str, quick: bool) -> String {
    let mut order: Vec<(&str, &str)> = Vec::new();
    let mut by: RowsBy = BTreeMap::new();
    for r in rows {
        let key = (r.op.as_str(), r.size.as_str());
        if !order.contains(&key) {
            order.push(key);
        }
        by.entry(key)
            .or_default()
            .insert(r.imp.as_str(), (r.ms, r.peak_mb));
    }
    let mut s = String::from("## Models\n\n");
    s.push_str(&format!(
        "Median of {} runs after {} warm-up runs, {threads} thread(s) on both sides (`RAYON_NUM_THREADS`/`CANDLE_NUM_THREADS`; \
         `torch.set_num_threads`), on {}, random weights, f32; against the same models in Hugging Face `transformers` ({torch_note}). \
         In the ViT-B/16 and tiny rows, our towers compute only the pooled token's row (the class token, the EOT token) in their last layer, the only row the embeddings read (decision 93); `transformers` computes every token's. \
         `vit_b16_image_forward`: image embeddings of the ViT-B/16 tower and its projection, no gradients (ours: weights as plain tensors, \
         so no graph is recorded, on a rayon pool's worker as `rankalign eval` runs it; PyTorch: `CLIPVisionModelWithProjection` under `torch.no_grad()`, its default attention). \
         `linear_probe_fit`: one fit of `rankalign eval`'s linear probe (full-batch L-BFGS; f32 features and products, f64 parameters and loss) on 10,000 L2-normalised 512-d features of 10 classes \
         against scikit-learn's `LogisticRegression(C=1, tol=1e-6)` (lbfgs; the same objective) on the same features, BLAS limited to the same threads \
         (its peak is tracemalloc's). `img/s` = images per second of the ViT rows (evaluation throughput). \
         `vit_b16_train_step`: one training step of `ClipConfig::vit_b16()` (OpenAI's ViT-B/16 shape, `CLIPModel` of the same shape) at batch 16, 224 px and 77-token captions, \
         InfoNCE, backward and AdamW on the whole batch (1 warm-up run and 3 runs; `; 2x8 micro`: `train.micro_batch = 8`, the two halves' towers in parallel \
         and the loss once over all 16, against PyTorch's plain step). \
         `rankclip_loss`: RankCLIP's whole loss (InfoNCE plus the four ListMLE terms in the authors' parity form, λ = 1/16, over B) on 1024 × 512 image and text embeddings, forward and backward \
         (PyTorch: the authors' form, allRank's `listMLE` as in the kernel table, `F.cross_entropy` both ways). \
         `tiny_clip_train_step`: one step of `ClipConfig::tiny()` (`CLIPModel` of the same shape) at batch 128 with 32-token captions: \
         both towers, InfoNCE on exp(logit_scale)-scaled cosine logits, backward, AdamW, as `rankalign train` runs it on a pool of the given threads \
         (its two towers as parallel tasks, forward and backward, with candle's elementwise ops inline as the CLI sets them for every step; `; 4x32 micro`: `train.micro_batch = 32`, the towers of every micro-batch as tasks and the loss once over all 128; \
         `recompute`: `train.recompute`, the forward run twice to hold one micro-batch's activations per thread; PyTorch's column is its plain b128 step; \
         `; 1 thread`: ours on one thread, in a process started with one thread, no PyTorch ratio). \
         Ours allocates through mimalloc (as `rankalign` does), PyTorch through glibc's malloc with the settings of the kernel table. \
         Peak memory is measured as for the kernels. `vs torch` = PyTorch's time divided by ours (above 1× = ours is faster).\n\n",
        if quick { 3 } else { 10 },
        if quick { 1 } else { 2 },
        cpu_model(),
    ));
    s.push_str("| model | size | ours ms | torch ms | vs torch | img/s ours | torch | peak MB ours | torch |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for key in &order {
        let m = &by[key];
        let cell = |imp: &str, f: fn(&(f64, f64)) -> f64, digits: usize| {
            m.get(imp)
                .map_or_else(|| "–".to_string(), |v| format!("{:.*}", digits, f(v)))
        };
        let torch = torch_cell(&by, key.0, key.1);
        let ratio = match (torch, m.get("ours")) {
            (Some(t), Some(o)) if o.0 > 0.0 => format!("{:.2}×", t.0 / o.0),
            _ => "–".into(),
        };
        // Images per second where the size is a batch of images (`b8 224px`).
        let batch: Option<f64> = key
            .1
            .strip_prefix('b')
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .filter(|_| key.0.contains("image"));
        let rate = |imp: &str| match (batch, m.get(imp)) {
            (Some(b), Some(v)) if v.0 > 0.0 => format!("{:.1}", b * 1e3 / v.0),
            _ => "–".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {ratio} | {} | {} | {} | {} |\n",
            key.0,
            key.1,
            cell("ours", |v| v.0, 1),
            torch.map_or_else(|| "–".to_string(), |t| format!("{:.1}", t.0)),
            rate("ours"),
            rate("torch"),
            cell("ours", |v| v.1, 1),
            torch.map_or_else(|| "–".to_string(), |t| format!("{:.1}", t.1)),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_programs_lines() {
        let r = parse(
            r#"{"op": "pl_nll", "size": "128x128", "impl": "torch", "ms": 1.25, "peak_mb": 0.5}"#,
        )
        .unwrap();
        assert_eq!(
            (
                r.op.as_str(),
                r.size.as_str(),
                r.imp.as_str(),
                r.ms,
                r.peak_mb
            ),
            ("pl_nll", "128x128", "torch", 1.25, 0.5)
        );
        let r = parse(
            r#"{"op":"layer_norm","size":"2048x512","impl":"fused","ms":0.9000,"peak_mb":4.00}"#,
        )
        .unwrap();
        assert_eq!((r.imp.as_str(), r.ms), ("fused", 0.9));
        let table = render(&[r], 2, "none", true);
        assert!(
            table.contains("| layer_norm | 2048x512 | 0.900 |"),
            "{table}"
        );
    }

    #[test]
    fn model_table_joins_ours_and_torch() {
        let rows: Vec<Row> = [
            r#"{"op":"vit_b16_image_forward","size":"b1 224px","impl":"ours","ms":200.0,"peak_mb":30.00}"#,
            r#"{"op": "vit_b16_image_forward", "size": "b1 224px", "impl": "torch", "ms": 100.0, "peak_mb": 20.0}"#,
            r#"{"op":"tiny_clip_train_step","size":"b128 48px ctx32","impl":"ours","ms":400.0,"peak_mb":1.00}"#,
        ]
        .iter()
        .filter_map(|l| parse(l))
        .collect();
        let table = render_models(&rows, 2, "none", true);
        assert!(
            table.contains(
                "| vit_b16_image_forward | b1 224px | 200.0 | 100.0 | 0.50× | 5.0 | 10.0 | 30.0 | 20.0 |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| tiny_clip_train_step | b128 48px ctx32 | 400.0 | – | – | – | – | 1.0 | – |"
            ),
            "{table}"
        );
    }
}
