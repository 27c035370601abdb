//! Evaluation tasks on any dataset, as CLIP_benchmark defines them, run by an
//! [`Evaluator`] that computes each dataset's image features once.
//!
//! | task | dataset | metrics |
//! |---|---|---|
//! | `zeroshot_classification` | labelled images | `acc1`, `acc5`, `mean_per_class_recall`, `alignment`, `uniformity` |
//! | `zeroshot_retrieval` | images with captions | `image_retrieval_recall@k`, `text_retrieval_recall@k` |
//! | `linear_probe` | labelled train and test images | `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`, `lp_lambda`, … |
//! | `geometry` | images with captions | `alignment`, `uniformity`, `modality_gap` (+ a PNG) |
//!
//! A zero-shot class embedding is the re-normalised mean of the normalised embeddings
//! of the class's prompts. Alignment and uniformity of `zeroshot_classification` are
//! RankCLIP's (each image against its class embedding); those of `geometry` pair each
//! image with its first caption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rankalign_data::batch::collate_images;
use rankalign_data::benchmark::meta::{ClassMeta, resolve_lines, resolve_subset};
use rankalign_data::benchmark::{
    ClassificationData, ClassificationSet, ImageRef, RetrievalData, Templates, default_name,
};
use rankalign_data::{Image, Tokenize};
use rankalign_models::ClipModel;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{embed_texts, geometry, metrics, probe};
use crate::{Result, TrainError};

/// One evaluation, as a `[[task]]` table of a suite file (or an `[[eval.task]]` table of
/// an experiment), tagged by `task`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    ZeroshotClassification(ZeroShotTask),
    ZeroshotRetrieval(RetrievalTask),
    LinearProbe(ProbeTask),
    Geometry(GeometryTask),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroShotTask {
    pub dataset: ClassificationData,
    /// The dataset's name in results (default: from its path).
    #[serde(default)]
    pub name: Option<String>,
    /// A built-in list (`imagenet1k`, `cifar10`, `cifar100`, `imagenet-r`,
    /// `imagenet-a`) or a file with one name per line; default: the dataset's own
    /// (ImageFolder's folder names, `classnames.txt`).
    #[serde(default)]
    pub classnames: Option<String>,
    /// A built-in list or a file of templates with `{c}`; default: the dataset's own,
    /// else `a photo of a {c}.`.
    #[serde(default)]
    pub templates: Option<String>,
    /// The classes the labels stand for, as indices into `classnames` (a built-in name
    /// or a file of one index per line).
    #[serde(default)]
    pub subset: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalTask {
    pub dataset: RetrievalData,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_ks")]
    pub recall_k: Vec<usize>,
}

fn default_ks() -> Vec<usize> {
    vec![1, 5, 10]
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeTask {
    pub train: ClassificationData,
    pub test: ClassificationData,
    /// A validation set for choosing λ; default: `val_proportion` of `train`.
    #[serde(default)]
    pub val: Option<ClassificationData>,
    #[serde(default)]
    pub name: Option<String>,
    /// The share of `train` held out for choosing λ when `val` is not given (0: no
    /// sweep; `lambda` is used).
    #[serde(default = "default_val_proportion")]
    pub val_proportion: f64,
    /// A fixed λ: no sweep, the classifier is fit once on all of `train`.
    #[serde(default)]
    pub lambda: Option<f64>,
    /// Seed of the train/validation split.
    #[serde(default)]
    pub seed: u64,
    /// L2-normalise the features first (CLIP_benchmark does).
    #[serde(default = "yes")]
    pub normalize: bool,
    #[serde(default = "default_max_iter")]
    pub max_iter: usize,
}

impl ProbeTask {
    /// A probe of `train` on `test` with the defaults a table gets: λ chosen on a seeded
    /// 20 % of `train`, normalised features, at most 1,000 L-BFGS iterations.
    pub fn new(train: ClassificationData, test: ClassificationData) -> Self {
        ProbeTask {
            train,
            test,
            val: None,
            name: None,
            val_proportion: default_val_proportion(),
            lambda: None,
            seed: 0,
            normalize: yes(),
            max_iter: default_max_iter(),
        }
    }
}

fn default_val_proportion() -> f64 {
    0.2
}
fn yes() -> bool {
    true
}
fn default_max_iter() -> usize {
    1000
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeometryTask {
    pub dataset: RetrievalData,
    #[serde(default)]
    pub name: Option<String>,
    /// Write `<dataset>_geometry.png`.
    #[serde(default = "yes")]
    pub plot: bool,
}

impl Task {
    /// CLIP_benchmark's task name.
    pub fn kind(&self) -> &'static str {
        match self {
            Task::ZeroshotClassification(_) => "zeroshot_classification",
            Task::ZeroshotRetrieval(_) => "zeroshot_retrieval",
            Task::LinearProbe(_) => "linear_probe",
            Task::Geometry(_) => "geometry",
        }
    }

    /// The dataset's name in results.
    pub fn dataset_name(&self) -> String {
        let (name, path) = match self {
            Task::ZeroshotClassification(t) => (&t.name, t.dataset.path()),
            Task::ZeroshotRetrieval(t) => (&t.name, t.dataset.path()),
            Task::LinearProbe(t) => (&t.name, t.test.path()),
            Task::Geometry(t) => (&t.name, t.dataset.path()),
        };
        name.clone().unwrap_or_else(|| default_name(path))
    }

    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        match self {
            Task::ZeroshotRetrieval(t) if t.recall_k.is_empty() || t.recall_k.contains(&0) => {
                errs.push("recall_k must list ks of at least 1".into());
            }
            Task::LinearProbe(t) => {
                if !(0.0..1.0).contains(&t.val_proportion) {
                    errs.push(format!(
                        "val_proportion must be in [0, 1), got {}",
                        t.val_proportion
                    ));
                }
                if t.val.is_none() && t.val_proportion == 0.0 && t.lambda.is_none() {
                    errs.push(
                        "with no validation data (val_proportion = 0 and no val), give lambda"
                            .into(),
                    );
                }
                if let Some(l) = t.lambda
                    && !(l > 0.0 && l.is_finite())
                {
                    errs.push(format!("lambda must be positive, got {l}"));
                }
            }
            _ => {}
        }
        errs
    }
}

/// What one task measured.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub task: &'static str,
    pub dataset: String,
    pub metrics: Vec<(String, f64)>,
    /// A sentence on what was measured (sizes, class and template counts).
    pub details: String,
    /// Files written (plots).
    pub files: Vec<PathBuf>,
}

/// A task's metrics, its details sentence and the files it wrote.
type Measured = (Vec<(String, f64)>, String, Vec<PathBuf>);

/// Progress of a long feature computation: `(what, done, total)`.
pub type ProgressFn = Arc<dyn Fn(&str, usize, usize) + Send + Sync>;

/// Runs tasks with one model, caching image features per dataset.
pub struct Evaluator<'a> {
    pub model: &'a ClipModel,
    pub tokenizer: &'a dyn Tokenize,
    pub device: Device,
    pub batch_size: usize,
    /// PIL's decompression-bomb limit.
    pub max_pixels: u64,
    pub progress: Option<ProgressFn>,
    cache: Mutex<HashMap<String, Tensor>>,
}

impl<'a> Evaluator<'a> {
    pub fn new(model: &'a ClipModel, tokenizer: &'a dyn Tokenize, device: &Device) -> Self {
        Evaluator {
            model,
            tokenizer,
            device: device.clone(),
            batch_size: 64,
            max_pixels: 89_478_485,
            progress: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Unnormalised image embeddings `(n, e)` of `images` through CLIP's evaluation
    /// transform, computed once per `key` (the dataset) and model.
    pub fn image_features(&self, key: &str, images: &[ImageRef]) -> Result<Tensor> {
        let size = self.model.config().vision.image_size();
        let key = format!("{key}|{size}|clip-eval");
        if let Some(t) = self.cache.lock().map_err(poisoned)?.get(&key) {
            return Ok(t.clone());
        }
        let mut parts = Vec::new();
        let mut done = 0;
        for chunk in images.chunks(self.batch_size.max(1)) {
            let decoded = chunk
                .par_iter()
                .map(|r| r.load(self.max_pixels).map(|img| img.clip_eval(size)))
                .collect::<std::result::Result<Vec<Image>, _>>()?;
            let refs: Vec<&Image> = decoded.iter().collect();
            let pixels = collate_images(&refs, size, &self.device)?;
            parts.push(self.model.encode_image(&pixels)?.detach());
            done += chunk.len();
            if let Some(p) = &self.progress {
                p(&key, done, images.len());
            }
        }
        if parts.is_empty() {
            return Err(TrainError::Invalid(format!("{key}: no images")));
        }
        let t = Tensor::cat(&parts, 0)?;
        self.cache.lock().map_err(poisoned)?.insert(key, t.clone());
        Ok(t)
    }

    /// Normalised text embeddings `(n, e)`.
    pub fn text_features(&self, texts: &[String]) -> Result<Tensor> {
        embed_texts(
            self.model,
            texts,
            self.tokenizer,
            self.batch_size.max(1),
            &self.device,
        )
    }

    /// Zero-shot class embeddings `(k, e)`: per class, the re-normalised mean of its
    /// normalised prompt embeddings.
    pub fn classifier(&self, meta: &ClassMeta) -> Result<Tensor> {
        let t = meta.templates.0.len();
        let prompts: Vec<String> = meta
            .classnames
            .iter()
            .flat_map(|c| meta.templates.prompts(c))
            .collect();
        let emb = self.text_features(&prompts)?;
        let e = emb.dim(1)?;
        let mean = emb.reshape((meta.classnames.len(), t, e))?.mean(1)?;
        Ok(rankalign_kernels::l2_normalize(&mean)?)
    }

    /// Run one task; plots go under `out_dir` when given.
    pub fn run(&self, task: &Task, out_dir: Option<&Path>) -> Result<TaskResult> {
        let errs = task.validate();
        if !errs.is_empty() {
            return Err(TrainError::Invalid(format!(
                "{} on {}: {}",
                task.kind(),
                task.dataset_name(),
                errs.join("; ")
            )));
        }
        let dataset = task.dataset_name();
        let (metrics, details, files) = match task {
            Task::ZeroshotClassification(t) => self.zero_shot(t)?,
            Task::ZeroshotRetrieval(t) => self.retrieval(t)?,
            Task::LinearProbe(t) => self.linear_probe(t)?,
            Task::Geometry(t) => self.geometry(t, &dataset, out_dir)?,
        };
        Ok(TaskResult {
            task: task.kind(),
            dataset,
            metrics,
            details,
            files,
        })
    }

    fn normalised(&self, key: &str, images: &[ImageRef]) -> Result<Tensor> {
        Ok(rankalign_kernels::l2_normalize(
            &self.image_features(key, images)?,
        )?)
    }

    fn zero_shot(&self, t: &ZeroShotTask) -> Result<Measured> {
        let listed = t
            .classnames
            .as_deref()
            .map(|s| resolve_lines(s, "classnames"))
            .transpose()?;
        let subset = match (&t.subset, &listed) {
            (Some(s), Some(names)) => Some(resolve_subset(s, names.len())?),
            (Some(_), None) => {
                return Err(TrainError::Invalid(
                    "a class subset indexes a class list: give classnames too".into(),
                ));
            }
            _ => None,
        };
        let listed = match (listed, &subset) {
            (Some(names), Some(idx)) => Some(idx.iter().map(|&i| names[i].clone()).collect()),
            (names, _) => names,
        };
        let set = t.dataset.open(listed.as_deref())?;
        let origin = t.dataset.describe();
        let meta = class_meta(&set, listed, t.templates.as_deref(), &origin)?;
        let feats = self.normalised(&origin, &set.images)?;
        let classes = self.classifier(&meta)?;
        let logits = feats.matmul(&classes.t()?)?.to_vec2::<f32>()?;
        let mut m = metrics::classification(&logits, &set.labels, "")?;
        let y = Tensor::from_vec(
            set.labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
            set.len(),
            &self.device,
        )?;
        let (a, u) = geometry::alignment_uniformity(&feats, &classes.index_select(&y, 0)?)?;
        m.push(("alignment".into(), a));
        m.push(("uniformity".into(), u));
        let details = format!(
            "{} images, {} classes, {} template(s)",
            set.len(),
            meta.classnames.len(),
            meta.templates.0.len()
        );
        Ok((m, details, Vec::new()))
    }

    fn retrieval(&self, t: &RetrievalTask) -> Result<Measured> {
        let set = t.dataset.open()?;
        let img = self.normalised(&t.dataset.describe(), &set.images)?;
        let (texts, owner) = set.flat_captions();
        let txt = self.text_features(&texts)?;
        let scores = txt.matmul(&img.t()?)?.to_vec2::<f32>()?;
        let m = metrics::retrieval(&scores, &owner, set.len(), &t.recall_k);
        let details = format!(
            "{} images, {} captions ({:.2} per image)",
            set.len(),
            texts.len(),
            texts.len() as f64 / set.len().max(1) as f64
        );
        Ok((m, details, Vec::new()))
    }

    fn linear_probe(&self, t: &ProbeTask) -> Result<Measured> {
        let feats = |data: &ClassificationData| -> Result<(Tensor, ClassificationSet)> {
            let set = data.open(None)?;
            let f = self.image_features(&data.describe(), &set.images)?;
            let f = if t.normalize {
                rankalign_kernels::l2_normalize(&f)?
            } else {
                f
            };
            Ok((f.to_device(&Device::Cpu)?, set))
        };
        let (train_x, train) = feats(&t.train)?;
        let (test_x, test) = feats(&t.test)?;
        let mut k = train.num_classes.max(test.num_classes);
        let (train_x, train_y, val) = match &t.val {
            // A fixed λ needs no validation data: fit on the whole training set.
            _ if t.lambda.is_some() => (train_x, train.labels.clone(), None),
            Some(v) => {
                let (vx, vs) = feats(v)?;
                k = k.max(vs.num_classes);
                (train_x, train.labels.clone(), Some((vx, vs.labels)))
            }
            None if t.val_proportion > 0.0 => {
                let (fit_idx, val_idx) = split_indices(train.len(), t.val_proportion, t.seed);
                if fit_idx.is_empty() || val_idx.is_empty() {
                    return Err(TrainError::Invalid(format!(
                        "{}: {} training images are too few to hold out {} for validation",
                        t.train.describe(),
                        train.len(),
                        t.val_proportion
                    )));
                }
                let pick = |idx: &[usize]| -> Result<(Tensor, Vec<usize>)> {
                    let i = Tensor::from_vec(
                        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                        idx.len(),
                        &Device::Cpu,
                    )?;
                    Ok((
                        train_x.index_select(&i, 0)?,
                        idx.iter().map(|&i| train.labels[i]).collect(),
                    ))
                };
                let (fx, fy) = pick(&fit_idx)?;
                (fx, fy, Some(pick(&val_idx)?))
            }
            None => (train_x, train.labels.clone(), None),
        };
        let opts = probe::FitOptions {
            max_iter: t.max_iter,
            lambda: t.lambda.unwrap_or(probe::FitOptions::default().lambda),
            ..Default::default()
        };
        let out = probe::probe(
            probe::Split {
                x: &train_x,
                labels: &train_y,
            },
            val.as_ref().map(|(x, y)| probe::Split { x, labels: y }),
            probe::Split {
                x: &test_x,
                labels: &test.labels,
            },
            k,
            opts,
        )?;
        let n_fit = train_y.len() + val.as_ref().map_or(0, |v| v.1.len());
        let mut m = out.metrics;
        m.push(("lp_c".into(), 1.0 / (out.lambda * n_fit as f64)));
        let details = format!(
            "{} training and {} test images, {} classes; λ {:.3e} chosen from {} fits on {}",
            n_fit,
            test.len(),
            k,
            out.lambda,
            out.tried.len(),
            match (&t.val, t.val_proportion) {
                _ if t.lambda.is_some() => "nothing (fixed λ)".into(),
                (Some(v), _) => v.describe(),
                (None, p) if p > 0.0 => format!("{:.0}% of train held out", 100.0 * p),
                _ => "nothing (fixed λ)".into(),
            }
        );
        Ok((m, details, Vec::new()))
    }

    fn geometry(
        &self,
        t: &GeometryTask,
        dataset: &str,
        out_dir: Option<&Path>,
    ) -> Result<Measured> {
        let set = t.dataset.open()?;
        let img = self.normalised(&t.dataset.describe(), &set.images)?;
        let first: Vec<String> = set.captions.iter().map(|c| c[0].clone()).collect();
        let txt = self.text_features(&first)?;
        let (a, u) = geometry::alignment_uniformity(&img, &txt)?;
        let gap = geometry::modality_gap(&img, &txt)?;
        let mut files = Vec::new();
        if t.plot
            && let Some(dir) = out_dir
        {
            std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
            let path = dir.join(format!("{}_geometry.png", slug(dataset)));
            geometry::plot_modalities(
                &path,
                &img,
                &txt,
                &format!("{dataset}: images and captions, modality gap {gap:.3}"),
            )?;
            files.push(path);
        }
        let m = vec![
            ("alignment".into(), a),
            ("uniformity".into(), u),
            ("modality_gap".into(), gap),
        ];
        Ok((
            m,
            format!("{} images, each with its first caption", set.len()),
            files,
        ))
    }
}

fn poisoned<T>(_: T) -> TrainError {
    TrainError::Invalid("the feature cache's lock is poisoned".into())
}

/// Class names and templates of a zero-shot task: the task's, else the dataset's.
fn class_meta(
    set: &ClassificationSet,
    listed: Option<Vec<String>>,
    templates: Option<&str>,
    origin: &str,
) -> Result<ClassMeta> {
    let classnames = match (listed, &set.classnames) {
        (Some(names), Some(own)) if names.len() != own.len() => {
            return Err(TrainError::Invalid(format!(
                "{origin}: the dataset has {} classes but the class list (after any subset) has {}",
                own.len(),
                names.len()
            )));
        }
        (Some(names), _) => names,
        (None, Some(own)) => own.clone(),
        (None, None) => {
            return Err(TrainError::Invalid(format!(
                "{origin}: the dataset names no classes; give classnames (a file or a built-in list)"
            )));
        }
    };
    if let Some((i, &l)) = set
        .labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l >= classnames.len())
    {
        return Err(TrainError::Invalid(format!(
            "{origin}: image {} has label {l}, outside the {} classes",
            set.images[i].name(),
            classnames.len()
        )));
    }
    let templates = match (templates, &set.templates) {
        (Some(spec), _) => Templates(resolve_lines(spec, "templates")?),
        (None, Some(own)) => own.clone(),
        (None, None) => Templates::default_photo(),
    };
    templates.validate(origin)?;
    Ok(ClassMeta {
        classnames,
        templates,
    })
}

/// A seeded split of `0..n` into (fit, validation) with `round(n·p)` held out.
pub fn split_indices(n: usize, p: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut keyed: Vec<(u64, usize)> = (0..n)
        .map(|i| (rankalign_data::mix_seed(&[seed, 0x5B117, i as u64]), i))
        .collect();
    keyed.sort_unstable();
    let held = ((n as f64) * p).round() as usize;
    let mut val: Vec<usize> = keyed[..held].iter().map(|k| k.1).collect();
    let mut fit: Vec<usize> = keyed[held..].iter().map(|k| k.1).collect();
    val.sort_unstable();
    fit.sort_unstable();
    (fit, val)
}

/// A file-name-safe form of a name.
pub fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
