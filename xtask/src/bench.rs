//! `cargo xtask bench`: the kernel benchmarks (`rankalign-kernels/examples/bench.rs`)
//! and the PyTorch eager references (`rankalign-kernels/benches/torch_reference.py`) in
//! one run, with the same thread count, as a table of times, ratios and peak memory in
//! `docs/BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
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

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let venv = torch_venv();
    let python = venv.join("bin/python");
    if args.iter().any(|a| a == "--setup-torch") && !python.exists() {
        eprintln!(
            "xtask: creating {} with torch (a large download)",
            venv.display()
        );
        let mut mk = Command::new("python3");
        mk.args(["-m", "venv"]).arg(&venv);
        run_cmd(mk)?;
        let mut pip = Command::new(venv.join("bin/pip"));
        pip.args(["install", "--quiet", "torch", "numpy"]);
        run_cmd(pip)?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The same glibc malloc settings for both programs: keep freed memory instead of
    // returning it to the kernel, so that neither pays page faults on every large
    // temporary (measured: 247k faults and 1.25 s of system time in a 1.2 s quick run).
    let malloc = [
        ("MALLOC_MMAP_THRESHOLD_", "1073741824"),
        ("MALLOC_TRIM_THRESHOLD_", "4294967296"),
    ];
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "rankalign-kernels",
        "--example",
        "bench",
    ]);
    run_cmd(build)?;
    let exe = project_root().join("target/release/examples/bench");
    let mut rust = Command::new(&exe);
    rust.env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .envs(malloc);
    if quick {
        rust.arg("--quick");
    }
    eprintln!("xtask: running {} with {threads} thread(s)", exe.display());
    let mut rows: Vec<Row> = capture(rust)?.lines().filter_map(parse).collect();
    let script = project_root().join("crates/rankalign-kernels/benches/torch_reference.py");
    let torch_note = if python.exists() {
        let mut py = Command::new(&python);
        py.arg(&script)
            .args(["--threads", &threads.to_string()])
            .envs(malloc);
        if quick {
            py.arg("--quick");
        }
        eprintln!(
            "xtask: running {} with {threads} thread(s)",
            script.display()
        );
        match capture(py) {
            Ok(out) => {
                rows.extend(out.lines().filter_map(parse));
                let mut v = Command::new(&python);
                v.args(["-c", "import torch; print(torch.__version__)"]);
                format!(
                    "PyTorch {} eager (`{}`)",
                    capture(v).unwrap_or_default().trim(),
                    script
                        .strip_prefix(project_root())
                        .unwrap_or(&script)
                        .display()
                )
            }
            Err(e) => format!("PyTorch column missing: the torch script failed ({e})"),
        }
    } else {
        format!(
            "PyTorch column missing: no venv at {}; run `cargo xtask bench --setup-torch`",
            venv.display()
        )
    };
    let table = render(&rows, threads, &torch_note, quick);
    eprintln!("{table}");
    let path = project_root().join("docs/BENCHMARKS.md");
    std::fs::write(&path, table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(|| "unknown CPU".into(), |s| s.trim().to_string())
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
    s.push_str("# Kernel benchmarks\n\n");
    s.push_str(&format!(
        "Forward + backward, median of {} runs after {} warm-up runs, {threads} thread(s) for every column, on {} ({}). \
Peak memory is the growth of live heap bytes during one run over those live before it: \
         exact on the Rust side (a counting allocator), from the profiler's per-op allocation events on the PyTorch side \
         (`profile_memory=True`). Both programs run with `MALLOC_MMAP_THRESHOLD_=1GiB MALLOC_TRIM_THRESHOLD_=4GiB`, so \
         that neither pays page faults for every large temporary. Ratios are the other column's time divided by the fused time (above 1× = fused is faster).\n\n",
        if quick { 3 } else { 15 },
        if quick { 1 } else { 3 },
        cpu_model(),
        torch_note
    ));
    s.push_str(
        "Reproduce: `cargo xtask bench` (add `--setup-torch` once to create the PyTorch venv).\n\n",
    );
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
}
