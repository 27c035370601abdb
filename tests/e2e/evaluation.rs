//! Evaluation inside a training run: the validation loss each epoch and
//! `[[eval.task]]` on schedule, written to `metrics.jsonl`, the report, a plot and
//! CLIP_benchmark-style result files, and resumed exactly.

use std::path::Path;

use candle_core::Device;
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::{scratch, tiny_experiment};

const VARIANT: &str = "[[variant]]\nname = \"rankclip\"\nloss = { kind = \"rankclip\" }\n";

fn config(name: &str, dir: &Path) -> ExperimentConfig {
    let eval = format!(
        "zero_shot_size = 20\nprobe_train_size = 30\nretrieval_size = 12\nbatch_size = 32\n\
         [[eval.task]]\nevery_steps = 3\ntask = \"zeroshot_classification\"\nname = \"periodic\"\n\
         dataset = {{ format = \"imagefolder\", path = \"{}\" }}\n",
        dir.join(name).join("eval-data/digits-test").display()
    );
    let text = tiny_experiment(
        name,
        dir,
        "source = \"digits\"\nimage_size = 24\ntrain_size = 64\nval_size = 16\ntest_size = 40\n",
        &eval,
        2,
        VARIANT,
    );
    ExperimentConfig::parse(&text, Path::new("eval.toml")).unwrap()
}

/// The evaluation lines of a run's `metrics.jsonl`.
fn eval_lines(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(name).join("rankclip/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect()
}

#[test]
fn validation_loss_and_scheduled_tasks_are_logged_reported_and_resumed_exactly() {
    let dir = scratch("evaluation");
    let dev = Device::Cpu;
    run_experiment(&config("straight", &dir), &dev, &RunOptions::default()).unwrap();
    let split = config("split", &dir);
    run_experiment(
        &split,
        &dev,
        &RunOptions {
            stop_after: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    let out = run_experiment(&split, &dev, &RunOptions::default()).unwrap();

    // 64 scenes in batches of 16: epochs end at steps 4 and 8; the task runs at 3 and 6.
    let a = eval_lines(&dir, "straight");
    let when: Vec<(u64, &str)> = a
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["eval"].as_str().unwrap()))
        .collect();
    assert_eq!(
        when,
        [
            (3, "zeroshot_classification on periodic"),
            (4, "validation"),
            (6, "zeroshot_classification on periodic"),
            (8, "validation")
        ]
    );
    let val = &a[1]["metrics"];
    for k in ["loss", "clip", "cross", "inmodal"] {
        assert!(val[k].as_f64().is_some_and(f64::is_finite), "{k}: {val}");
    }
    assert!(a[0]["metrics"]["acc1"].as_f64().is_some());
    // The run stopped at 5 and resumed gives the same evaluations.
    assert_eq!(a, eval_lines(&dir, "split"));
    assert_eq!(out.variants[0].evals.len(), 4);

    // The final evaluation: every task, each also as a CLIP_benchmark-style file.
    let e = &out.variants[0].eval;
    let kinds: Vec<&str> = e.sections.iter().map(|s| s.task.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "zeroshot_classification",
            "linear_probe",
            "zeroshot_retrieval",
            "geometry",
            "zeroshot_classification"
        ]
    );
    for k in [
        "digits/acc1",
        "digits/lp_acc1",
        "digit-scenes/image_retrieval_recall@10",
        "digit-scenes/modality_gap",
        "periodic/acc1",
    ] {
        assert!(e.get(k).is_some_and(f64::is_finite), "{k} in {e:?}");
    }
    let files: Vec<String> = std::fs::read_dir(dir.join("split/rankclip/eval"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("_geometry.png")),
        "{files:?}"
    );
    let probe = files
        .iter()
        .find(|f| f.ends_with("linear_probe.json"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("split/rankclip/eval").join(probe)).unwrap(),
    )
    .unwrap();
    for k in [
        "dataset",
        "model",
        "pretrained",
        "task",
        "metrics",
        "language",
    ] {
        assert!(v.get(k).is_some(), "{k} missing from {v}");
    }
    let report = std::fs::read_to_string(dir.join("split/report.md")).unwrap();
    assert!(
        report.contains("linear_probe on digits") && report.contains("evals.png"),
        "{report}"
    );
    assert!(dir.join("split/evals.png").exists());
}

#[test]
fn bad_eval_tasks_are_refused_before_training() {
    let dir = scratch("eval-bad");
    let parse = |extra: &str| {
        let text = tiny_experiment(
            "x",
            &dir,
            "source = \"digits\"\nimage_size = 24\ntrain_size = 64\ntest_size = 40\n",
            &format!("retrieval_size = 12\n{extra}"),
            1,
            VARIANT,
        );
        ExperimentConfig::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string()
    };
    let err = parse(
        "[[eval.task]]\nevery_steps = 0\ntask = \"geometry\"\ndataset = { format = \"csv\", path = \"c.csv\" }\n",
    );
    assert!(
        err.contains("eval.task[0]") && err.contains("at least 1"),
        "{err}"
    );
    let err = parse(
        "[[eval.task]]\ntask = \"zeroshot_retrieval\"\ndataset = { format = \"csv\", path = \"c.csv\" }\nrecall_k = []\n",
    );
    assert!(err.contains("recall_k"), "{err}");
    let err = parse(
        "[[eval.task]]\ntask = \"linear_probe\"\ntrain = { format = \"imagefolder\", path = \"a\" }\ntest = { format = \"imagefolder\", path = \"b\" }\nval_proportion = 0.0\n",
    );
    assert!(err.contains("give lambda"), "{err}");
}
