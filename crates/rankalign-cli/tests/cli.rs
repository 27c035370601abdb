//! The `rankalign` binary on bad input: a clear message naming the file and the problem,
//! a failing exit status, and no panic.

use std::process::Command;

fn rankalign(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankalign"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rankalign-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn missing_config_is_named() {
    let (ok, err) = rankalign(&["train", "--config", "/nonexistent/x.toml"]);
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/x.toml") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn malformed_config_names_the_line() {
    let p = write("broken.toml", "name = \"x\"\nseed = [\n");
    let (ok, err) = rankalign(&["train", "--config", p.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("broken.toml") && err.contains("line 2") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn the_default_config_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/digits-default.toml"
    ))
    .unwrap();
    let broken = write(
        "unknown-key.toml",
        &text.replace("seed = 17", "seed = 17\nsede = 3"),
    );
    let (ok, err) = rankalign(&["train", "--config", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("sede") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_cuda_device_without_cuda_is_explained() {
    let (ok, err) = rankalign(&["train", "--device", "cuda"]);
    assert!(!ok);
    let expected = if cfg!(feature = "cuda") {
        "CUDA"
    } else {
        "built without CUDA"
    };
    assert!(err.contains(expected) && !err.contains("panicked"), "{err}");
    let (ok, err) = rankalign(&["train", "--device", "tpu"]);
    assert!(!ok && err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

/// Every config shipped in `configs/` (and its subdirectories) parses and validates, as
/// a pre-training or an ordinal experiment by its `kind`.
#[test]
fn shipped_configs_are_valid() {
    let root = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"));
    let (mut pretraining, mut ordinal) = (0, 0);
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                if text.lines().any(|l| l.trim() == "kind = \"ordinal\"") {
                    rankalign_train::ordinal::OrdinalConfig::load(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    ordinal += 1;
                } else {
                    rankalign_train::ExperimentConfig::load(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    pretraining += 1;
                }
            }
        }
    }
    assert!(
        pretraining >= 3 && ordinal >= 9,
        "{pretraining} + {ordinal} configs"
    );
}

/// A hub name that is not in the cache (`HF_HOME` pointed at an empty directory): the
/// error names the file looked for and how to download it; nothing goes to the network.
#[test]
fn embed_names_a_missing_hub_model_and_how_to_get_it() {
    let texts = write("hub-texts.txt", "a 3\n");
    let home = texts.with_file_name("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rankalign"))
        .args([
            "embed",
            "--model",
            "openai/clip-vit-base-patch16",
            "--texts",
        ])
        .arg(&texts)
        .arg("--out")
        .arg(home.join("emb.safetensors"))
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let refs = home.join("hub/models--openai--clip-vit-base-patch16/refs/main");
    assert!(
        err.contains(&refs.display().to_string())
            && err.contains("huggingface-cli download openai/clip-vit-base-patch16")
            && !err.contains("panicked"),
        "{err}"
    );
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rankalign-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny pre-training config over `data`, `epochs` long, writing under `out`.
fn tiny_files_config(out: &std::path::Path, data: &str, epochs: usize) -> String {
    format!(
        r#"name = "tiny"
out_dir = "{}"
seed = 3

[data]
{data}

[model.clip]
embed_dim = 16
logit_scale_init = 2.6592600369327779

[model.clip.vision]
image_size = 24
patch_size = 12
channels = 3
width = 32
layers = 1
heads = 2
mlp_dim = 64

[model.clip.text]
vocab_size = 49408
context_length = 24
width = 32
layers = 1
heads = 2
mlp_dim = 64

[optim]
lr = 1e-3
weight_decay = 0.1
warmup_steps = 2

[train]
batch_size = 16
epochs = {epochs}
checkpoint_every = 4
keep_checkpoints = 2
log_every = 1

[eval]
retrieval_size = 16

[[variant]]
name = "clip"
loss = {{ kind = "clip" }}
"#,
        out.display()
    )
}

#[test]
fn data_export_then_check_reports_the_shards() {
    let dir = scratch("export-check");
    let wds = dir.join("wds");
    let (ok, err) = rankalign(&[
        "data",
        "export",
        "--format",
        "webdataset",
        "--out",
        wds.to_str().unwrap(),
        "--count",
        "50",
        "--shard-size",
        "20",
        "--image-size",
        "24",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("shard-{00000..00002}.tar"), "{err}");
    let data = format!(
        "source = \"webdataset\"\nimage_size = 24\nshards = \"{}/shard-{{00000..00002}}.tar\"",
        wds.display()
    );
    let cfg = write("check.toml", &tiny_files_config(&dir, &data, 1));
    let json = dir.join("check.json");
    let (ok, err) = rankalign(&[
        "data",
        "check",
        cfg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("read 50 of 50 declared; decodable 100.00%"),
        "{err}"
    );
    assert!(
        err.contains("image width") && err.contains("min 24"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report[0]["report"]["stats"]["seen"], 50);

    // The corrupt fixture shard is above the default 1 %: a non-zero exit naming keys.
    let bad = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rankalign-data/tests/fixtures/sources/wds-corrupt/bad-00000.tar");
    let data = format!(
        "source = \"webdataset\"\nimage_size = 24\nshards = \"{}\"",
        bad.display()
    );
    let cfg = write("check-bad.toml", &tiny_files_config(&dir, &data, 1));
    let (ok, err) = rankalign(&["data", "check", cfg.to_str().unwrap()]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("37.50% skipped")
            && err.contains("bad-0012")
            && err.contains("decompression bomb"),
        "{err}"
    );
}

/// 64 digit scenes at 24 px as a CSV source under `dir/csv`; the config's `[data]` lines.
fn export_csv(dir: &std::path::Path) -> String {
    let (ok, err) = rankalign(&[
        "data",
        "export",
        "--format",
        "csv",
        "--out",
        dir.join("csv").to_str().unwrap(),
        "--count",
        "64",
        "--image-size",
        "24",
    ]);
    assert!(ok, "{err}");
    format!(
        "source = \"csv\"\nimage_size = 24\npath = \"{}/csv/images.csv\"\nconvention = \"cyclip\"",
        dir.display()
    )
}

/// `kill -9` in the middle of a run loses nothing: the restarted run resumes from the
/// last checkpoint and ends with the weights of a run that was never interrupted.
#[test]
fn a_run_killed_with_sigkill_resumes_to_the_same_weights() {
    let dir = scratch("sigkill");
    let data = export_csv(&dir);
    let epochs = 40; // 4 steps an epoch: 160 steps, several seconds.
    let straight = write(
        "straight.toml",
        &tiny_files_config(&dir.join("straight"), &data, epochs),
    );
    let killed = write(
        "killed.toml",
        &tiny_files_config(&dir.join("killed"), &data, epochs),
    );
    let run = |cfg: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_rankalign"))
            .args(["train", "--config", cfg.to_str().unwrap(), "--threads", "1"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = run(&killed);
    let latest = dir.join("killed/tiny/clip/checkpoints/latest");
    let started = std::time::Instant::now();
    loop {
        let at = std::fs::read_to_string(&latest).unwrap_or_default();
        if at.trim() >= "step-00000012" {
            break;
        }
        assert!(started.elapsed().as_secs() < 300, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let at = std::fs::read_to_string(&latest).unwrap();
    assert!(
        at.trim() < "step-00000160",
        "the run finished before it was killed: {at}"
    );
    assert!(run(&killed).wait().unwrap().success());
    assert!(run(&straight).wait().unwrap().success());
    let weights = |name: &str| {
        let path = dir
            .join(name)
            .join("tiny/clip/checkpoints/step-00000160/model.safetensors");
        let mut t: Vec<(String, Vec<f32>)> =
            candle_core::safetensors::load(path, &candle_core::Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert!(
        weights("straight") == weights("killed"),
        "weights differ after the kill (at {at})"
    );
}

#[test]
fn eval_runs_every_task_from_the_command_line_and_names_bad_data() {
    let d = scratch("eval");
    let s = |p: &std::path::Path| p.display().to_string();
    // A model: a short run on digit scenes, exported in the HF layout.
    let cfg = write(
        "eval-train.toml",
        &tiny_files_config(
            &d,
            "source = \"digits\"\nimage_size = 24\ntrain_size = 32\ntest_size = 16",
            1,
        ),
    );
    let (ok, err) = rankalign(&["train", "--config", &s(&cfg)]);
    assert!(ok, "{err}");
    let model = d.join("hf");
    let (ok, err) = rankalign(&[
        "export",
        "--run",
        &s(&d.join("tiny")),
        "--variant",
        "clip",
        "--out",
        &s(&model),
    ]);
    assert!(ok, "{err}");
    // Evaluation sets in each layout, at 32 px for a 24 px model.
    for (format, split, count, out) in [
        ("imagefolder", "test", "30", "folder-test"),
        ("imagefolder", "train", "40", "folder-train"),
        ("captions-csv", "test", "12", "scenes"),
        ("clip-benchmark-retrieval", "test", "12", "wds-ret"),
    ] {
        let (ok, err) = rankalign(&[
            "data",
            "export",
            "--format",
            format,
            "--split",
            split,
            "--count",
            count,
            "--image-size",
            "32",
            "--out",
            &s(&d.join(out)),
        ]);
        assert!(ok, "{format}: {err}");
    }
    let results = d.join("results");
    let folder = d.join("folder-test");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--output",
            results.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        rankalign(&args)
    };
    let ds = format!("imagefolder:{}", s(&folder));
    let (ok, err) = run(&[
        "--task",
        "zeroshot_classification",
        "--dataset",
        &ds,
        "--classnames",
        &s(&folder.join("classnames.txt")),
        "--templates",
        &s(&folder.join("templates.txt")),
    ]);
    assert!(ok && err.contains("acc1"), "{err}");
    let (ok, err) = run(&[
        "--task",
        "zeroshot_retrieval",
        "--dataset",
        &format!("csv:{}", s(&d.join("scenes/captions.csv"))),
    ]);
    assert!(ok && err.contains("48 captions (4.00 per image)"), "{err}");
    let (ok, err) = run(&[
        "--task",
        "geometry",
        "--dataset",
        &format!("wds:{}", s(&d.join("wds-ret"))),
    ]);
    assert!(ok && err.contains("modality_gap"), "{err}");
    let (ok, err) = run(&[
        "--task",
        "linear_probe",
        "--dataset",
        &ds,
        "--train-dataset",
        &format!("imagefolder:{}", s(&d.join("folder-train"))),
    ]);
    assert!(ok && err.contains("lp_acc1"), "{err}");
    let (ok, err) = rankalign(&["eval", "--collect", &s(&results)]);
    assert!(ok && err.contains("4 result(s)"), "{err}");
    let table = std::fs::read_to_string(results.join("results.md")).unwrap();
    for t in [
        "### zeroshot_classification",
        "### zeroshot_retrieval",
        "### linear_probe",
        "### geometry",
    ] {
        assert!(table.contains(t), "{table}");
    }
    assert!(results.read_dir().unwrap().any(|f| {
        f.unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with("_geometry.png")
    }));

    // Bad data: a clear error naming the file, no panic.
    std::fs::create_dir_all(folder.join("empty")).unwrap();
    let (ok, err) = run(&["--task", "zeroshot_classification", "--dataset", &ds]);
    assert!(
        !ok && err.contains("empty") && err.contains("no image file") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, err) = run(&[
        "--task",
        "zeroshot_classification",
        "--dataset",
        "parquet:x",
    ]);
    assert!(!ok && err.contains("unknown format"), "{err}");
    let (ok, err) = run(&["--task", "linear_probe", "--dataset", &ds]);
    assert!(!ok && err.contains("--train-dataset"), "{err}");
}

/// The CSV data of the data-parallel tests under `dir`, and two tiny configs `epochs`
/// long: one for the ranks (writing under `dir/ranks`), and one for a single process
/// with micro-batches of 8 (under `dir/micro`).
fn data_parallel_setup(dir: &std::path::Path, epochs: usize) -> (String, String) {
    let data = export_csv(dir);
    let ranks = write(
        &format!("{}-ranks.toml", dir.file_name().unwrap().to_str().unwrap()),
        &tiny_files_config(&dir.join("ranks"), &data, epochs),
    );
    let micro = tiny_files_config(&dir.join("micro"), &data, epochs)
        .replace("log_every = 1\n", "log_every = 1\nmicro_batch = 8\n");
    let micro = write(
        &format!("{}-micro.toml", dir.file_name().unwrap().to_str().unwrap()),
        &micro,
    );
    (
        ranks.to_str().unwrap().to_string(),
        micro.to_str().unwrap().to_string(),
    )
}

/// The bytes of the model in `run`'s checkpoint at `step`.
fn checkpoint_bytes(run: &std::path::Path, step: usize) -> Vec<u8> {
    let path = run.join(format!(
        "tiny/clip/checkpoints/step-{step:08}/model.safetensors"
    ));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `rankalign launch --nproc 2` trains the batch of 16 as two ranks of 8 and writes the
/// checkpoints of one process with `micro_batch = 8`, byte for byte; only rank 0 writes.
#[test]
fn two_launched_ranks_write_the_checkpoints_of_one_process() {
    let dir = scratch("launch");
    let (ranks, micro) = data_parallel_setup(&dir, 2);
    let (ok, err) = rankalign(&["launch", "--nproc", "2", "--", "train", "--config", &ranks]);
    assert!(ok, "{err}");
    let (ok, err) = rankalign(&["train", "--config", &micro]);
    assert!(ok, "{err}");
    assert!(
        checkpoint_bytes(&dir.join("ranks"), 8) == checkpoint_bytes(&dir.join("micro"), 8),
        "2 ranks x 8 and micro-batches of 8 differ"
    );
    let metrics = std::fs::read_to_string(dir.join("ranks/tiny/clip/metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        8,
        "one metrics line a step, from rank 0 alone"
    );
}

/// The child processes of `pid` (Linux).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A launcher killed with SIGKILL (no destructor runs) takes its ranks with it.
#[test]
#[cfg(target_os = "linux")]
fn ranks_do_not_outlive_a_killed_launcher() {
    let dir = scratch("launch-orphans");
    // 4,000 steps: minutes of training, were the ranks to go on alone.
    let (ranks, _) = data_parallel_setup(&dir, 1000);
    let mut run = Command::new(env!("CARGO_BIN_EXE_rankalign"))
        .args(["launch", "--nproc", "2", "--", "train", "--config", &ranks])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut kids = Vec::new();
    while kids.len() < 2 {
        assert!(started.elapsed().as_secs() < 60, "the ranks did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
        kids = children(run.id());
    }
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    // A rank is gone when its /proc entry is, or it is a zombie waiting for a reaper.
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().chars().next()))
            .flatten()
            .is_some_and(|state| state != 'Z' && state != 'X')
    };
    let started = std::time::Instant::now();
    while kids.iter().any(|&k| alive(k)) {
        assert!(
            started.elapsed().as_secs() < 10,
            "ranks {kids:?} outlived their launcher"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Killing one rank stops the run with that rank's name; launched again, the run
/// resumes from rank 0's last checkpoint and ends with the weights of a run that was
/// never interrupted.
#[test]
#[cfg(target_os = "linux")]
fn a_killed_rank_stops_the_run_and_it_resumes_exactly() {
    let dir = scratch("launch-kill");
    let (ranks, micro) = data_parallel_setup(&dir, 40); // 4 steps an epoch: 160 steps
    let launch = || {
        Command::new(env!("CARGO_BIN_EXE_rankalign"))
            .args(["launch", "--nproc", "2", "--", "train", "--config", &ranks])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let run = launch();
    let latest = dir.join("ranks/tiny/clip/checkpoints/latest");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&latest).unwrap_or_default().trim() < "step-00000012" {
        assert!(started.elapsed().as_secs() < 300, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let rank1 = children(run.id())
        .into_iter()
        .find(|&c| {
            std::fs::read(format!("/proc/{c}/environ"))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .any(|kv| kv == b"RANK=1")
        })
        .expect("rank 1's process");
    let killed = Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 1 was killed by signal 9"), "{err}");
    let at = std::fs::read_to_string(&latest).unwrap();
    assert!(
        at.trim() < "step-00000160",
        "the run finished before the kill: {at}"
    );
    assert!(launch().wait().unwrap().success(), "the resumed run failed");
    let (ok, err) = rankalign(&["train", "--config", &micro, "--threads", "1"]);
    assert!(ok, "{err}");
    assert!(
        checkpoint_bytes(&dir.join("ranks"), 160) == checkpoint_bytes(&dir.join("micro"), 160),
        "weights differ after the kill (at {at})"
    );
}
