//! The digit scenes' evaluation data, written as files and evaluated like a user's:
//!
//! - `eval-data/digits-test/`: `eval.zero_shot_size` single test digits as an
//!   ImageFolder (`0/` … `9/`, with `classnames.txt` and `templates.txt`): zero-shot
//!   classification, and the linear probe's test set;
//! - `eval-data/digits-train/`: `eval.probe_train_size` single training digits, the
//!   probe's training set (20 % held out to choose λ);
//! - `eval-data/digit-scenes/captions.csv`: `eval.retrieval_size` test scenes, each
//!   with its four phrasings: multi-caption retrieval and the geometry.
//!
//! The files are a pure function of the experiment's seed and sizes, rewritten when
//! an experiment starts.

use std::path::Path;

use rankalign_data::DigitScenes;
use rankalign_data::benchmark::classification::FolderConfig;
use rankalign_data::benchmark::retrieval::CaptionCsvConfig;
use rankalign_data::benchmark::{ClassificationData, RetrievalData};
use rankalign_data::source::tools::{EvalExportFormat, export_eval_digits};

use super::tasks::{GeometryTask, ProbeTask, RetrievalTask, Task, ZeroShotTask};
use crate::Result;
use crate::config::EvalConfig;

/// Write the files under `dir` and return the tasks on them.
pub fn write_eval_data(
    train: &DigitScenes,
    test: &DigitScenes,
    cfg: &EvalConfig,
    dir: &Path,
) -> Result<Vec<Task>> {
    let write = |scenes: &DigitScenes, n: usize, format: EvalExportFormat, sub: &str| {
        export_eval_digits(scenes, n, format, &dir.join(sub), "test", 256)
    };
    let mut tasks = Vec::new();
    if cfg.zero_shot_size > 0 {
        let folder = write(
            test,
            cfg.zero_shot_size,
            EvalExportFormat::ImageFolder,
            "digits-test",
        )?;
        let data = ClassificationData::ImageFolder(FolderConfig {
            path: folder.clone(),
        });
        tasks.push(Task::ZeroshotClassification(ZeroShotTask {
            dataset: data.clone(),
            name: Some("digits".into()),
            classnames: Some(folder.join("classnames.txt").to_string_lossy().into_owned()),
            templates: Some(folder.join("templates.txt").to_string_lossy().into_owned()),
            subset: None,
        }));
        if cfg.probe_train_size > 0 {
            let train_folder = write(
                train,
                cfg.probe_train_size,
                EvalExportFormat::ImageFolder,
                "digits-train",
            )?;
            tasks.push(Task::LinearProbe(ProbeTask {
                name: Some("digits".into()),
                ..ProbeTask::new(
                    ClassificationData::ImageFolder(FolderConfig { path: train_folder }),
                    data,
                )
            }));
        }
    }
    if cfg.retrieval_size > 0 {
        let csv = write(
            test,
            cfg.retrieval_size,
            EvalExportFormat::CaptionsCsv,
            "digit-scenes",
        )?;
        let data = RetrievalData::Csv(CaptionCsvConfig {
            path: csv,
            image_column: "image".into(),
            caption_column: "caption".into(),
            separator: ',',
        });
        tasks.push(Task::ZeroshotRetrieval(RetrievalTask {
            dataset: data.clone(),
            name: Some("digit-scenes".into()),
            recall_k: vec![1, 5, 10],
        }));
        tasks.push(Task::Geometry(GeometryTask {
            dataset: data,
            name: Some("digit-scenes".into()),
            plot: true,
        }));
    }
    Ok(tasks)
}
