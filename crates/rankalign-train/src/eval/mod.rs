//! Evaluation: CLIP_benchmark's tasks on any dataset ([`tasks`], [`suite`]), the
//! ranking metrics they share ([`metrics`]), the linear probe ([`probe`]) and the
//! embedding geometry ([`geometry`]); and the evaluation of a pre-training run built
//! on them ([`evaluate`]):
//!
//! - on the digit scenes, the test data is written out as files under
//!   `runs/<experiment>/eval-data/` and read back like any user's data: zero-shot
//!   classification of single digits (an ImageFolder), a linear probe (train and test
//!   ImageFolders), multi-caption retrieval over test scenes with their four phrasings
//!   (a captions CSV) and the geometry of the same scenes;
//! - on a CSV or webdataset source, 1:1 retrieval over the first pairs of the held-out
//!   list or shards that `data.test_path` / `data.test_shards` name;
//! - then every `[[eval.task]]` of the experiment.

use candle_core::{Device, Tensor};
use rankalign_data::batch::{collate_images, collate_texts};
use std::path::Path;
use std::sync::Arc;

use rankalign_data::source::eval_pairs;
use rankalign_data::{Image, PairSource, Tokenize};
use rankalign_models::ClipModel;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::config::EvalConfig;

pub mod digits;
pub mod geometry;
pub mod metrics;
pub mod probe;
pub mod suite;
pub mod tasks;

pub use suite::{ResultFile, SuiteConfig};
pub use tasks::{Evaluator, Task, TaskResult};

/// Final metrics of one model: named values in a fixed order (`dataset/metric`), a
/// sentence saying what they were measured on, and the same values task by task.
/// `eval.json` holds `{"description", "metrics": {…}, "sections": […]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub description: String,
    #[serde(with = "ordered")]
    pub metrics: Vec<(String, f64)>,
    #[serde(default)]
    pub sections: Vec<EvalSection>,
}

/// One task's results in a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalSection {
    pub task: String,
    pub dataset: String,
    pub details: String,
    #[serde(with = "ordered")]
    pub metrics: Vec<(String, f64)>,
}

impl EvalSection {
    fn from_result(r: &TaskResult) -> Self {
        EvalSection {
            task: r.task.into(),
            dataset: r.dataset.clone(),
            details: r.details.clone(),
            metrics: r.metrics.clone(),
        }
    }
}

impl EvalReport {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// A `Vec<(String, f64)>` as a JSON object in its own order; NaN is written (and read)
/// as `null`.
pub(crate) mod ordered {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (k, x) in v {
            m.serialize_entry(k, &x.is_finite().then_some(*x))?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, f64)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of metric names to numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, serde_json::Value>()? {
                    // `null` is NaN; other values (CLIP_benchmark's per-class lists,
                    // strings) are not metrics and are skipped.
                    match v {
                        serde_json::Value::Number(n) => {
                            out.push((k, n.as_f64().unwrap_or(f64::NAN)))
                        }
                        serde_json::Value::Null => out.push((k, f64::NAN)),
                        _ => {}
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether `metric` is a count that the report's description states in words (kept out
/// of tables and summary lines).
pub fn is_count(metric: &str) -> bool {
    let m = metric.rsplit('/').next().unwrap_or(metric);
    matches!(
        m,
        "retrieval_pairs" | "eval_skipped" | "lp_iterations" | "lp_lambda" | "lp_c"
    )
}

/// What the final evaluation runs on.
#[derive(Clone, Default)]
pub struct Evaluation {
    /// Held-out pairs of a CSV or webdataset source: 1:1 retrieval on the first
    /// `eval.retrieval_size` good ones.
    pub held_out: Option<Arc<dyn PairSource>>,
    /// Tasks on files: the digit scenes' evaluation data, then `[[eval.task]]`.
    pub tasks: Vec<Task>,
}

impl Evaluation {
    pub fn is_empty(&self) -> bool {
        self.held_out.is_none() && self.tasks.is_empty()
    }
}

/// Normalised image embeddings `(n, e)`, computed in batches.
pub fn embed_images(
    model: &ClipModel,
    images: &[Image],
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let size = model.config().vision.image_size();
    let mut parts = Vec::new();
    for chunk in images.chunks(batch.max(1)) {
        let refs: Vec<&Image> = chunk.iter().collect();
        let pixels = collate_images(&refs, size, device)?;
        parts.push(rankalign_kernels::l2_normalize(&model.encode_image(&pixels)?)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Normalised text embeddings `(n, e)`, computed in batches.
pub fn embed_texts(
    model: &ClipModel,
    texts: &[String],
    tokenizer: &(impl Tokenize + ?Sized),
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, eot) = collate_texts(&refs, tokenizer, device)?;
        parts.push(rankalign_kernels::l2_normalize(&model.encode_text(&ids, &eot)?)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Run the final evaluation; task plots go under `out_dir`.
pub fn evaluate(
    model: &ClipModel,
    tokenizer: &(dyn Tokenize + '_),
    what: &Evaluation,
    cfg: &EvalConfig,
    device: &Device,
    out_dir: Option<&Path>,
) -> Result<EvalReport> {
    let mut sections = Vec::new();
    let mut described = Vec::new();
    if let Some(source) = &what.held_out {
        let size = model.config().vision.image_size();
        let (pairs, skipped) = eval_pairs(source.as_ref(), cfg.retrieval_size, size)?;
        if pairs.is_empty() {
            return Err(crate::TrainError::Invalid(format!(
                "the held-out data has no good pair to evaluate on ({}; {} of {} read were corrupt)",
                source.describe(),
                skipped.skipped,
                skipped.seen
            )));
        }
        let (images, captions): (Vec<Image>, Vec<String>) =
            pairs.into_iter().map(|p| (p.image, p.caption)).unzip();
        let si = embed_images(model, &images, cfg.batch_size, device)?;
        let st = embed_texts(model, &captions, tokenizer, cfg.batch_size, device)?;
        let scores = st.matmul(&si.t()?)?.to_vec2::<f32>()?;
        let owner: Vec<usize> = (0..images.len()).collect();
        let mut m = metrics::retrieval(&scores, &owner, images.len(), &[1, 5, 10]);
        m.push(("retrieval_pairs".into(), images.len() as f64));
        m.push(("eval_skipped".into(), skipped.skipped as f64));
        described.push(format!(
            "retrieval on the first {} good pairs of {} (one caption each; {} corrupt skipped)",
            images.len(),
            source.describe(),
            skipped.skipped
        ));
        sections.push(EvalSection {
            task: "zeroshot_retrieval".into(),
            dataset: "held-out".into(),
            details: described.last().cloned().unwrap_or_default(),
            metrics: m,
        });
    }
    let mut ev = Evaluator::new(model, tokenizer, device);
    ev.batch_size = cfg.batch_size.max(1);
    for task in &what.tasks {
        let r = ev.run(task, out_dir)?;
        described.push(format!("{} on {}: {}", r.task, r.dataset, r.details));
        sections.push(EvalSection::from_result(&r));
    }
    let mut metrics = Vec::new();
    for s in &sections {
        for (k, v) in &s.metrics {
            let mut name = format!("{}/{k}", s.dataset);
            if metrics.iter().any(|(n, _): &(String, f64)| *n == name) {
                name = format!("{}/{}/{k}", s.dataset, s.task);
            }
            metrics.push((name, *v));
        }
    }
    let description = if described.is_empty() {
        "No held-out data: set data.test_path (CSV) or data.test_shards (webdataset), or add [[eval.task]] tables.".into()
    } else {
        let mut d = described.join("; ");
        d.push('.');
        d
    };
    Ok(EvalReport {
        description,
        metrics,
        sections,
    })
}
