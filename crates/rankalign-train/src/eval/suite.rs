//! Suites of tasks and their results in CLIP_benchmark's schema.
//!
//! A suite file is TOML: optional `model`, `output` and `batch_size`, and one
//! `[[task]]` table per task ([`Task`]). Each result is one JSON file,
//! `{"dataset", "model", "pretrained", "task", "metrics": {…}, "language": "en"}`
//! (CLIP_benchmark's keys; a metric that does not apply, such as `acc5` with fewer than
//! five classes, is `null`), named `{dataset}_{pretrained}_{model}_en_{task}.json` as
//! CLIP_benchmark names its outputs. [`markdown`] tables any set of them;
//! [`collect`] reads a folder of them (ours or CLIP_benchmark's).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::tasks::{Task, TaskResult, slug};
use crate::{Result, TrainError, io_err};

/// A suite file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteConfig {
    /// The model (a `rankalign export` directory, an HF / open_clip directory, a
    /// checkpoint file or a hub name in the local cache); the command line's `--model`
    /// overrides it.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Where result files go (default `eval-results`).
    #[serde(default)]
    pub output: Option<PathBuf>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub task: Vec<Task>,
}

impl SuiteConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let cfg: SuiteConfig = toml::from_str(&text).map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if cfg.task.is_empty() {
            return Err(TrainError::Config {
                path: path.to_path_buf(),
                msg: "the suite has no [[task]] table".into(),
            });
        }
        let errs: Vec<String> = cfg
            .task
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                t.validate()
                    .into_iter()
                    .map(move |e| format!("task {} ({}): {e}", i + 1, t.kind()))
            })
            .collect();
        if !errs.is_empty() {
            return Err(TrainError::Config {
                path: path.to_path_buf(),
                msg: errs.join("; "),
            });
        }
        Ok(cfg)
    }
}

/// One result file in CLIP_benchmark's schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultFile {
    pub dataset: String,
    pub model: String,
    pub pretrained: String,
    pub task: String,
    #[serde(with = "super::ordered")]
    pub metrics: Vec<(String, f64)>,
    #[serde(default = "english")]
    pub language: String,
}

fn english() -> String {
    "en".into()
}

impl ResultFile {
    pub fn new(r: &TaskResult, model: &str, pretrained: &str) -> Self {
        Self::of(r.task, &r.dataset, &r.metrics, model, pretrained)
    }

    /// The file of a task's results (`task` on `dataset`).
    pub fn of(
        task: &str,
        dataset: &str,
        metrics: &[(String, f64)],
        model: &str,
        pretrained: &str,
    ) -> Self {
        ResultFile {
            dataset: dataset.into(),
            model: model.into(),
            pretrained: pretrained.into(),
            task: task.into(),
            metrics: metrics.to_vec(),
            language: english(),
        }
    }

    /// CLIP_benchmark's file name for this result.
    pub fn file_name(&self) -> String {
        format!(
            "{}_{}_{}_{}_{}.json",
            slug(&self.dataset),
            slug(&self.pretrained),
            slug(&self.model),
            self.language,
            self.task
        )
    }

    /// Write it under `dir` (atomically); returns the path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(self.file_name());
        let tmp = dir.join(format!(".{}.tmp", self.file_name()));
        let text =
            serde_json::to_string_pretty(self).map_err(|e| TrainError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, text + "\n").map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(path)
    }
}

/// The `model` of a result: the preset a shape matches (`tiny`, `vit-b16`, …), else
/// a short description of the towers.
pub fn model_name(cfg: &rankalign_models::ClipConfig) -> String {
    rankalign_models::ClipConfig::PRESETS
        .iter()
        .find(|p| rankalign_models::ClipConfig::preset(p).as_ref() == Some(cfg))
        .map(|p| p.to_string())
        .unwrap_or_else(|| {
            let vision = match &cfg.vision {
                rankalign_models::VisionConfig::Vit(v) => format!("vit{}x{}", v.layers, v.width),
                rankalign_models::VisionConfig::ResNet(r) => format!("rn{}", r.width),
            };
            format!(
                "{vision}-text{}x{}-e{}",
                cfg.text.layers, cfg.text.width, cfg.embed_dim
            )
        })
}

/// Every result file directly under `dir`, in name order. Files that are not results
/// (another JSON shape) are skipped and named in the second list.
pub fn collect(dir: &Path) -> Result<(Vec<ResultFile>, Vec<PathBuf>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    let mut other = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        match serde_json::from_str::<ResultFile>(&text) {
            Ok(r) => out.push(r),
            Err(_) => other.push(p),
        }
    }
    Ok((out, other))
}

fn cell(v: f64, metric: &str) -> String {
    if !v.is_finite() {
        "–".into()
    } else if metric.contains("lambda") || metric.ends_with("_c") {
        format!("{v:.2e}")
    } else if metric.contains("recall") || metric.contains("acc") {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// A markdown table per task: a row per (model, pretrained, dataset), a column per
/// metric in first-seen order.
pub fn markdown(results: &[ResultFile]) -> String {
    let mut tasks: Vec<&str> = Vec::new();
    for r in results {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
    }
    let mut md = String::new();
    for task in tasks {
        let rows: Vec<&ResultFile> = results.iter().filter(|r| r.task == task).collect();
        let mut cols: Vec<&str> = Vec::new();
        for r in &rows {
            for (k, _) in &r.metrics {
                if !cols.contains(&k.as_str()) {
                    cols.push(k);
                }
            }
        }
        let _ = writeln!(md, "### {task}\n");
        let _ = writeln!(
            md,
            "| model | pretrained | dataset | {} |",
            cols.join(" | ")
        );
        let _ = writeln!(md, "|---|---|---|{}", "---:|".repeat(cols.len()));
        for r in rows {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    r.metrics
                        .iter()
                        .find(|(k, _)| k == c)
                        .map_or_else(String::new, |(_, v)| cell(*v, c))
                })
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                r.model,
                r.pretrained,
                r.dataset,
                vals.join(" | ")
            );
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_with_null_for_nan() {
        let r = ResultFile {
            dataset: "digits".into(),
            model: "tiny".into(),
            pretrained: "runs/x/clip/hf".into(),
            task: "zeroshot_classification".into(),
            metrics: vec![("acc1".into(), 50.0), ("acc5".into(), f64::NAN)],
            language: "en".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"acc5\":null"), "{text}");
        let back: ResultFile = serde_json::from_str(&text).unwrap();
        assert_eq!(back.metrics[0], ("acc1".into(), 50.0));
        assert!(back.metrics[1].1.is_nan());
        assert_eq!(
            r.file_name(),
            "digits_runs_x_clip_hf_tiny_en_zeroshot_classification.json"
        );
        let md = markdown(&[r]);
        assert!(
            md.contains("| tiny | runs/x/clip/hf | digits | 50.00 | – |"),
            "{md}"
        );
    }

    #[test]
    fn clip_benchmark_files_read_as_results() {
        // The shape CLIP_benchmark writes, with a list-valued metric it may add.
        let text = r#"{"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "openai",
            "task": "zeroshot_classification",
            "metrics": {"acc1": 0.8983, "acc5": 0.9968, "mean_per_class_recall": 0.8982,
                        "per_class_recall": [0.9, 0.8]}, "language": "en"}"#;
        let r: ResultFile = serde_json::from_str(text).unwrap();
        assert_eq!(r.metrics.len(), 3);
    }

    #[test]
    fn a_suite_reads_every_task_kind() {
        let text = r#"
            model = "runs/x/clip/hf"
            [[task]]
            task = "zeroshot_classification"
            dataset = { format = "imagefolder", path = "d/test" }
            classnames = "cifar10"
            [[task]]
            task = "zeroshot_retrieval"
            dataset = { format = "csv", path = "d/captions.csv" }
            recall_k = [1, 5]
            [[task]]
            task = "linear_probe"
            train = { format = "wds", path = "d/wds", split = "train" }
            test = { format = "wds", path = "d/wds" }
            [[task]]
            task = "geometry"
            dataset = { format = "coco", path = "d/captions.json" }
        "#;
        let s: SuiteConfig = toml::from_str(text).unwrap();
        assert_eq!(s.task.len(), 4);
        assert_eq!(s.task[2].kind(), "linear_probe");
        let bad = "[[task]]\ntask = \"zeroshot_retrieval\"\ndataset = { format = \"csv\", path = \"x\" }\nrecal_k = [1]\n";
        let err = toml::from_str::<SuiteConfig>(bad).unwrap_err().to_string();
        assert!(err.contains("recal_k"), "{err}");
    }
}
