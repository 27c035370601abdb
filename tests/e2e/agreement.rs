//! `rankalign eval` against the tools the field trusts, on the same files.
//!
//! [`write_inputs`] writes a tiny CLIP in the Hugging Face layout — trained on digit
//! scenes for 300 steps by [`regenerate_agreement_model`] and committed as
//! `model.safetensors.gz` (token-embedding rows of tokens no evaluation text uses are
//! zeroed, which no metric sees, so the file gzips small) — and small evaluation sets
//! in every layout the readers take. `tests/fixtures/eval-agreement/gen_agreement.py` evaluated those
//! very files with transformers' `CLIPModel`, open_clip's tokenizer, torchvision's
//! `ImageFolder`, CLIP_benchmark's metric code and scikit-learn's `LogisticRegression`,
//! and wrote `expected.json`. Set `RANKALIGN_AGREEMENT_INPUTS=DIR` to keep the inputs
//! in `DIR` (for the script).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rankalign_train::data::source::DigitsSourceConfig;
use rankalign_train::data::source::tools::{EvalExportFormat, export_eval_digits};
use rankalign_train::data::{Dataset, Split};
use rankalign_train::eval::{Evaluator, SuiteConfig};

/// The suite the script and this test both run (paths relative to the inputs).
pub const SUITE: &str = r#"
[[task]]
task = "zeroshot_classification"
name = "digits-folder"
dataset = { format = "imagefolder", path = "test" }
classnames = "test/classnames.txt"
templates = "test/templates.txt"

[[task]]
task = "zeroshot_classification"
name = "digits-wds"
dataset = { format = "wds", path = "wds-cls" }

[[task]]
task = "zeroshot_retrieval"
name = "scenes-csv"
dataset = { format = "csv", path = "scenes/captions.csv" }

[[task]]
task = "zeroshot_retrieval"
name = "scenes-coco"
dataset = { format = "coco", path = "scenes/coco.json" }

[[task]]
task = "zeroshot_retrieval"
name = "scenes-wds"
dataset = { format = "wds", path = "wds-ret" }

[[task]]
task = "linear_probe"
name = "digits-probe"
train = { format = "imagefolder", path = "train" }
val = { format = "imagefolder", path = "val" }
test = { format = "imagefolder", path = "test" }

[[task]]
task = "geometry"
name = "scenes-geometry"
dataset = { format = "csv", path = "scenes/captions.csv" }
plot = false
"#;

/// [`SUITE`] with its paths under `dir`.
pub fn suite_in(dir: &Path) -> String {
    SUITE
        .replace("path = \"", &format!("path = \"{}/", dir.display()))
        .replace("= \"test/", &format!("= \"{}/test/", dir.display()))
}

/// Two-layer, 64-wide towers on 32 px images: small enough to commit, trained enough
/// that zero-shot and retrieval are well above chance.
const AGREEMENT_MODEL: &str = r#"
[model.clip]
embed_dim = 32
logit_scale_init = 2.6592600369327779

[model.clip.vision]
image_size = 32
patch_size = 8
channels = 3
width = 64
layers = 2
heads = 4
mlp_dim = 128

[model.clip.text]
vocab_size = 49408
context_length = 32
width = 64
layers = 2
heads = 4
mlp_dim = 128
"#;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/eval-agreement");

/// Write the model and the datasets under `dir`.
pub fn write_inputs(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let gz = std::fs::read(Path::new(FIXTURES).join("model.safetensors.gz")).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut bytes)
        .unwrap();
    std::fs::write(model.join("model.safetensors"), bytes).unwrap();
    std::fs::copy(
        Path::new(FIXTURES).join("config.json"),
        model.join("config.json"),
    )
    .unwrap();
    write_datasets(dir);
    model
}

/// The evaluation sets (a pure function of the seeds) under `dir`.
fn write_datasets(dir: &Path) {
    // 40 px files for a 32 px model: the resize is exercised.
    let data = DigitsSourceConfig {
        image_size: 40,
        train_size: 400,
        val_size: Some(100),
        test_size: 200,
        mnist_images: None,
        mnist_labels: None,
    };
    let digits = Arc::new(data.digits().unwrap());
    let split = |s| data.split(digits.clone(), 5, s).unwrap();
    let (train, val, test) = (split(Split::Train), split(Split::Val), split(Split::Test));
    let write = |scenes, n, f, sub: &str| {
        export_eval_digits(scenes, n, f, &dir.join(sub), "test", 64).unwrap();
    };
    write(&test, 150, EvalExportFormat::ImageFolder, "test");
    write(&train, 300, EvalExportFormat::ImageFolder, "train");
    write(&val, 80, EvalExportFormat::ImageFolder, "val");
    write(&test, 150, EvalExportFormat::ClipBenchmark, "wds-cls");
    write(&test, 60, EvalExportFormat::CaptionsCsv, "scenes");
    write(
        &test,
        60,
        EvalExportFormat::ClipBenchmarkRetrieval,
        "wds-ret",
    );
    // The same scenes as COCO caption annotations.
    let images: Vec<serde_json::Value> = (0..60)
        .map(|i| serde_json::json!({ "id": 1000 + i, "file_name": format!("images/{i:06}.png") }))
        .collect();
    let annotations: Vec<serde_json::Value> = (0..60)
        .flat_map(|i| {
            test.get(i)
                .captions
                .into_iter()
                .enumerate()
                .map(move |(k, c)| {
                    serde_json::json!({ "id": 4 * i + k, "image_id": 1000 + i, "caption": c })
                })
        })
        .collect();
    std::fs::write(
        dir.join("scenes/coco.json"),
        serde_json::json!({ "images": images, "annotations": annotations }).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("suite.toml"), suite_in(dir)).unwrap();
}

/// Every text the suite embeds: the class prompts and the scene captions.
fn suite_texts(dir: &Path) -> Vec<String> {
    let mut texts = Vec::new();
    for c in 0..10 {
        for t in rankalign_train::data::source::tools::DIGIT_CLASS_TEMPLATES {
            texts.push(t.replace("{c}", &c.to_string()));
        }
    }
    let csv = std::fs::read_to_string(dir.join("scenes/captions.csv")).unwrap();
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    for rec in r.records() {
        texts.push(rec.unwrap()[1].to_string());
    }
    texts
}

/// Train the fixture model and write `model.safetensors.gz` and `config.json` (run
/// with `--ignored` to regenerate; `gen_agreement.py` must then be run again).
#[test]
#[ignore = "regenerates a fixture"]
fn regenerate_agreement_model() {
    let dir = crate::scratch("agreement-model");
    let variant = "[[variant]]\nname = \"clip\"\nloss = { kind = \"clip\" }\n";
    let text = crate::tiny_experiment(
        "agreement",
        &dir,
        "source = \"digits\"\nimage_size = 32\ntrain_size = 6400\ntest_size = 40\n",
        "retrieval_size = 0\nbatch_size = 32\n",
        8,
        variant,
    )
    .replace(crate::TINY_MODEL, AGREEMENT_MODEL)
    .replace("batch_size = 16", "batch_size = 64")
    .replace("checkpoint_every = 4", "checkpoint_every = 200")
    .replace("log_every = 1", "log_every = 50");
    let cfg = rankalign_train::ExperimentConfig::parse(&text, Path::new("agreement.toml")).unwrap();
    rankalign_train::run_experiment(&cfg, &Device::Cpu, &Default::default()).unwrap();
    let out = dir.join("hf");
    rankalign_train::export::export_run(&dir.join("agreement"), "clip", &out).unwrap();
    // Zero the token rows no evaluation text uses.
    write_datasets(&dir.join("inputs"));
    let tok = rankalign_train::data::ClipTokenizer::new(32).unwrap();
    let mut used = std::collections::HashSet::new();
    for t in suite_texts(&dir.join("inputs")) {
        used.extend(tok.encode(&t).unwrap());
    }
    let weights = out.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let key = "text_model.embeddings.token_embedding.weight";
    let emb = tensors[key].to_vec2::<f32>().unwrap();
    let width = emb[0].len();
    let rows: Vec<f32> = emb
        .into_iter()
        .enumerate()
        .flat_map(|(i, r)| {
            if used.contains(&(i as u32)) {
                r
            } else {
                vec![0.0; width]
            }
        })
        .collect();
    let n = rows.len() / width;
    tensors.insert(
        key.into(),
        Tensor::from_vec(rows, (n, width), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &bytes).unwrap();
    std::fs::write(
        Path::new(FIXTURES).join("model.safetensors.gz"),
        gz.finish().unwrap(),
    )
    .unwrap();
    std::fs::copy(
        out.join("config.json"),
        Path::new(FIXTURES).join("config.json"),
    )
    .unwrap();
}

#[test]
fn eval_agrees_with_transformers_clip_benchmark_and_sklearn() {
    let dir = match std::env::var_os("RANKALIGN_AGREEMENT_INPUTS") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        None => crate::scratch("agreement"),
    };
    let model = write_inputs(&dir);
    let expected: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/eval-agreement/expected.json")).unwrap();
    let clip = rankalign_train::Clip::load(&model, &Device::Cpu).unwrap();
    let suite = SuiteConfig::load(&dir.join("suite.toml")).unwrap();
    let ev = Evaluator::new(&clip.model, &clip.tokenizer, &Device::Cpu);
    let results: Vec<_> = suite.task.iter().map(|t| ev.run(t, None)).collect();
    let mut checked = 0;
    for r in results {
        let r = r.unwrap();
        let want = &expected["results"][&r.dataset];
        assert!(want.is_object(), "no reference for {}", r.dataset);
        for (k, v) in &r.metrics {
            let Some(w) = want["metrics"].get(k) else {
                continue;
            };
            let w = w.as_f64().unwrap_or(f64::NAN);
            let tol = match k.as_str() {
                k if k.starts_with("lp_acc") || k.starts_with("lp_mean") => 0.5,
                k if k.contains("acc") || k.contains("recall") => 1e-9,
                "alignment" | "uniformity" | "modality_gap" => 1e-4,
                _ => continue,
            };
            let ok = (v.is_nan() && w.is_nan()) || (v - w).abs() <= tol;
            assert!(
                ok,
                "{} {k}: rankalign {v}, reference {w} (tolerance {tol})",
                r.dataset
            );
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} metrics compared");
}
