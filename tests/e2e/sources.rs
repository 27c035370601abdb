//! Pre-training on files: webdataset shards (with corrupt samples) and CSV lists,
//! exported from the digit scenes by the project's own tools; exact resume mid-pass,
//! damaged checkpoints, and the `[data]` table's errors.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rankalign_train::data::Split;
use rankalign_train::data::source::DigitsSourceConfig;
use rankalign_train::data::source::tools::{ExportFormat, export_digits};
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::scratch;

const VARIANT: &str = "[[variant]]\nname = \"rankclip\"\nloss = { kind = \"rankclip\" }\n";

fn corrupt_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/rankalign-data/tests/fixtures/sources/wds-corrupt/bad-00000.tar")
}

/// Export `count` digit scenes of `split` (24 px) under `dir` in `format`.
pub fn export(dir: &Path, format: ExportFormat, split: Split, count: usize) -> String {
    let cfg = DigitsSourceConfig {
        image_size: 24,
        train_size: count,
        val_size: None,
        test_size: count,
        mnist_images: None,
        mnist_labels: None,
    };
    let digits = std::sync::Arc::new(cfg.digits().unwrap());
    let scenes = cfg.split(digits, 5, split).unwrap();
    export_digits(&scenes, count, format, dir, 20).unwrap()
}

/// A tiny experiment over the `[data]` table `data`.
pub fn file_config(name: &str, out: &Path, data: &str, epochs: usize) -> ExperimentConfig {
    let text = crate::tiny_experiment(
        name,
        out,
        &format!("{data}\n"),
        "retrieval_size = 20\nbatch_size = 32\n",
        epochs,
        VARIANT,
    );
    ExperimentConfig::parse(&text, Path::new("files.toml")).unwrap()
}

/// Four shards of 20 exported scenes and the 16-sample shard with 6 corrupt samples.
fn shards(dir: &Path) -> String {
    let pattern = export(&dir.join("wds"), ExportFormat::Webdataset, Split::Train, 80);
    format!(
        "source = \"webdataset\"\nimage_size = 24\nshards = \"{pattern}::{}\"\nnum_samples = 96\nshuffle_buffer = 10\ntransform = {{ kind = \"random-resized-crop\", scale = [0.5, 1.0], hflip = 0.5 }}\ncorrupt = {{ max_skipped = 0.1 }}",
        corrupt_fixture().display()
    )
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn losses(dir: &Path) -> Vec<(u64, f64, u64)> {
    std::fs::read_to_string(dir.join("rankclip/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["data_skipped"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn webdataset_with_corrupt_samples_resumes_bit_exact_mid_pass() {
    let dir = scratch("wds-resume");
    let data = shards(&dir);
    let straight = file_config("straight", &dir, &data, 2);
    let split = file_config("split", &dir, &data, 2);
    let total = straight.schedule().unwrap().total_steps;
    // 96 declared samples / 16 = 6 steps an epoch; a pass holds 90 good samples, so 5
    // batches, and step 7 is in the second pass, mid-epoch.
    assert_eq!(total, 12);
    let dev = Device::Cpu;
    let a = run_experiment(&straight, &dev, &RunOptions::default()).unwrap();
    let stop = RunOptions {
        stop_after: Some(7),
        ..Default::default()
    };
    run_experiment(&split, &dev, &stop).unwrap();
    let b = run_experiment(&split, &dev, &RunOptions::default()).unwrap();
    assert_eq!(b.variants[0].resumed_from, Some(7));
    for f in ["model.safetensors", "optim.safetensors"] {
        let ck = |n: &str| {
            dir.join(n)
                .join("rankclip/checkpoints/step-00000012")
                .join(f)
        };
        assert!(
            tensors(&ck("straight")) == tensors(&ck("split")),
            "{f} differs"
        );
    }
    assert_eq!(losses(&dir.join("straight")), losses(&dir.join("split")));
    // Both passes met the six corrupt samples, counted across the resume.
    let skipped = &a.variants[0].skipped;
    assert_eq!(skipped, &b.variants[0].skipped);
    assert!(skipped.skipped >= 12 && skipped.seen >= 192, "{skipped:?}");
    let report = std::fs::read_to_string(dir.join("split/report.md")).unwrap();
    assert!(
        report.contains("Corrupt training samples") && report.contains("bad-0004"),
        "{report}"
    );
    // No held-out shards were named: the report says how to get an evaluation.
    assert!(report.contains("data.test_shards"), "{report}");
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = scratch("wds-damaged");
    let data = shards(&dir);
    let straight = file_config("straight", &dir, &data, 2);
    let run = file_config("run", &dir, &data, 2);
    let dev = Device::Cpu;
    run_experiment(&straight, &dev, &RunOptions::default()).unwrap();
    let stop = RunOptions {
        stop_after: Some(8),
        ..Default::default()
    };
    run_experiment(&run, &dev, &stop).unwrap();
    // Truncate the newest model file, as a full disk or a crash in a copy would.
    let newest = dir.join("run/rankclip/checkpoints/step-00000008/model.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = run_experiment(&run, &dev, &RunOptions::default()).unwrap();
    let v = &out.variants[0];
    assert_eq!(v.resumed_from, Some(4));
    assert!(
        v.warnings.len() == 1
            && v.warnings[0].contains("step-00000008")
            && v.warnings[0].contains("CRC-32"),
        "{:?}",
        v.warnings
    );
    let ck = |n: &str| {
        dir.join(n)
            .join("rankclip/checkpoints/step-00000012/model.safetensors")
    };
    assert!(tensors(&ck("straight")) == tensors(&ck("run")));
    // Every checkpoint damaged: an error, not a silent start from scratch.
    for step in ["00000004", "00000008", "00000012"] {
        let p = dir.join(format!(
            "run/rankclip/checkpoints/step-{step}/optim.safetensors"
        ));
        if p.exists() {
            std::fs::write(&p, b"x").unwrap();
        }
    }
    let err = run_experiment(&run, &dev, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("every checkpoint is damaged") && err.contains("--overwrite"),
        "{err}"
    );
}

#[test]
fn csv_lists_train_and_evaluate_retrieval_on_the_test_list() {
    let dir = scratch("csv");
    let train = export(&dir.join("train"), ExportFormat::Csv, Split::Train, 48);
    let test = export(&dir.join("test"), ExportFormat::Csv, Split::Test, 24);
    let data = format!(
        "source = \"csv\"\nimage_size = 24\npath = \"{train}\"\ntest_path = \"{test}\"\nconvention = \"cyclip\""
    );
    let cfg = file_config("csv", &dir, &data, 2);
    let out = run_experiment(&cfg, &Device::Cpu, &RunOptions::default()).unwrap();
    let e = &out.variants[0].eval;
    assert_eq!(e.get("held-out/retrieval_pairs"), Some(20.0), "{e:?}");
    for k in [
        "held-out/image_retrieval_recall@1",
        "held-out/text_retrieval_recall@10",
    ] {
        let v = e.get(k).unwrap();
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    // open_clip's TSV convention (absolute paths) reads the same scenes.
    let tsv = export(&dir.join("tsv"), ExportFormat::Tsv, Split::Train, 48);
    let data = format!("source = \"csv\"\nimage_size = 24\npath = \"{tsv}\"");
    let cfg = file_config("tsv", &dir, &data, 2);
    assert_eq!(cfg.schedule().unwrap().train_len, 48);
    run_experiment(&cfg, &Device::Cpu, &RunOptions::default()).unwrap();
}

#[test]
fn data_table_errors_name_the_key() {
    let dir = scratch("data-errors");
    let parse = |data: &str| {
        let text = crate::tiny_config("x", &dir, VARIANT).replace(
            "[data]\nsource = \"digits\"\nimage_size = 24\ntrain_size = 64\ntest_size = 40\n",
            data,
        );
        ExperimentConfig::parse(&text, Path::new("bad.toml"))
            .unwrap_err()
            .to_string()
    };
    let err = parse("[data]\nimage_size = 24\n");
    assert!(err.contains("source"), "{err}");
    let err = parse("[data]\nsource = \"parquet\"\nimage_size = 24\n");
    assert!(
        err.contains("parquet") && err.contains("webdataset"),
        "{err}"
    );
    let err = parse("[data]\nsource = \"webdataset\"\nimage_size = 24\nshards = \"a-{1..\"\n");
    assert!(
        err.contains("data.shards") && err.contains("unmatched"),
        "{err}"
    );
    let err =
        parse("[data]\nsource = \"csv\"\nimage_size = 24\npath = \"x.csv\"\ncolumn = \"a\"\n");
    assert!(err.contains("column"), "{err}");
    // A missing shard is named when the run starts, before any step.
    let text = crate::tiny_config("x", &dir, VARIANT).replace(
        "[data]\nsource = \"digits\"\nimage_size = 24\ntrain_size = 64\ntest_size = 40\n",
        "[data]\nsource = \"webdataset\"\nimage_size = 24\nshards = \"/nonexistent/s-{0..1}.tar\"\n",
    ).replace("zero_shot_size = 20\n", "");
    let cfg = ExperimentConfig::parse(&text, Path::new("x.toml")).unwrap();
    let err = run_experiment(&cfg, &Device::Cpu, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/s-0.tar") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn the_config_loader_survives_random_edits() {
    use rand::{Rng, SeedableRng};
    let dir = scratch("cfg-fuzz");
    let base = crate::tiny_config("x", &dir, VARIANT).into_bytes();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for i in 0..400 {
        let mut b = base.clone();
        match i % 3 {
            0 => b.truncate(rng.random_range(0..b.len())),
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..b.len());
                    b[at] ^= 1 << rng.random_range(0..8);
                }
            }
            _ => {
                let at = rng.random_range(0..b.len());
                let junk: Vec<u8> = (0..rng.random_range(1..40)).map(|_| rng.random()).collect();
                b.splice(at..at, junk);
            }
        }
        let text = String::from_utf8_lossy(&b);
        let _ = ExperimentConfig::parse(&text, Path::new("fuzz.toml"));
    }
}

/// `train.shard_by_rank`: two ranks each read their own share of the webdataset shards
/// (with the corrupt one among them). A run stopped at step 7 and resumed ends with the
/// checkpoints and losses of one that never stopped; the checkpoint holds both ranks'
/// positions, which differ; one process may not resume it.
#[test]
fn ranks_reading_their_own_shards_resume_bit_exact() {
    let dir = scratch("wds-sharded");
    // The rank that holds the corrupt shard meets its six bad samples in fewer reads.
    let data = shards(&dir).replace("max_skipped = 0.1", "max_skipped = 0.2");
    let cfg = |name: &str| {
        let mut c = file_config(name, &dir, &data, 2);
        c.train.shard_by_rank = true;
        c
    };
    let two_ranks = |exp: ExperimentConfig, stop_after: Option<usize>| {
        let (root, peer) = crate::data_parallel::pair();
        let exp = std::sync::Arc::new(exp);
        let handles: Vec<_> = [root, peer]
            .into_iter()
            .map(|comm| {
                let exp = exp.clone();
                std::thread::spawn(move || {
                    let opts = RunOptions {
                        stop_after,
                        comm: Some(std::sync::Arc::new(comm)),
                        ..Default::default()
                    };
                    run_experiment(&exp, &Device::Cpu, &opts).map(|_| ())
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    };
    two_ranks(cfg("straight"), None);
    two_ranks(cfg("split"), Some(7));
    two_ranks(cfg("split"), None);
    let ck = |n: &str| dir.join(n).join("rankclip/checkpoints/step-00000012");
    for f in ["model.safetensors", "optim.safetensors"] {
        assert!(
            tensors(&ck("straight").join(f)) == tensors(&ck("split").join(f)),
            "{f} differs"
        );
    }
    assert_eq!(losses(&dir.join("straight")), losses(&dir.join("split")));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck("straight").join("state.json")).unwrap())
            .unwrap();
    let ranks = state["data_ranks"].as_array().expect("per-rank positions");
    assert_eq!(ranks.len(), 2);
    assert_ne!(ranks[0], ranks[1], "the ranks read the same data");
    // One process cannot take up a sharded run stopped midway: its ranks read
    // different data.
    let mid = cfg("mid");
    two_ranks(cfg("mid"), Some(5));
    let Err(err) = run_experiment(&mid, &Device::Cpu, &RunOptions::default()) else {
        panic!("one process must refuse a sharded checkpoint");
    };
    let err = err.to_string();
    assert!(err.contains("sharded over 2 ranks"), "{err}");
}
