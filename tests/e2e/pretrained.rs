//! Pretrained weights in, every way a model can be named: an open_clip directory (RN CLIP
//! written by open_clip, `crates/rankalign-models/tests/fixtures/gen_open_clip_rn50.py`)
//! computing open_clip's features; its PyTorch `.bin` equal to its safetensors; a single
//! checkpoint file; a hub name resolved offline in a Hugging Face cache that the test
//! writes; a ResNet CLIP trained (BatchNorm statistics checkpointed, not optimised),
//! exported in open_clip's layout and trained from again; and errors that name the missing
//! or mis-shaped tensor, or the missing file and how to get it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rankalign_train::models::{ClipConfig, ClipModel, ResNetConfig, TextConfig};
use rankalign_train::pretrained::{HubCache, load, load_with_cache, read_state_dict};
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::scratch;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/rankalign-models/tests/fixtures"
);

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The shape `gen_open_clip_rn50.py` gives the whole RN CLIP.
fn small_rn() -> ClipConfig {
    ClipConfig {
        embed_dim: 32,
        vision: ResNetConfig {
            layers: [1, 1, 1, 1],
            width: 4,
            image_size: 64,
            heads: 2,
            embed_dim: 32,
        }
        .into(),
        text: TextConfig {
            vocab_size: 512,
            context_length: 16,
            width: 32,
            layers: 2,
            heads: 2,
            mlp_dim: 64,
        },
        logit_scale_init: rankalign_train::models::clip::CLIP_LOGIT_SCALE_INIT,
    }
}

/// Image features, text features and logits of `model` against the fixture's.
fn parity(model: &ClipModel) -> (f32, f32, f32) {
    let io = candle_core::safetensors::load(
        fixture("open_clip_rn_clip_small_io.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let (b, s) = ids.dims2().unwrap();
    let eot: Vec<u32> = ids.argmax(1).unwrap().to_vec1().unwrap();
    let eot = Tensor::from_vec(
        eot.iter()
            .enumerate()
            .map(|(i, &p)| i as u32 * s as u32 + p)
            .collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )
    .unwrap();
    let img = model.encode_image(&io["pixel_values"]).unwrap();
    let txt = model.encode_text(&ids, &eot).unwrap();
    let norm = |t: &Tensor| rankalign_train::kernels::l2_normalize(t).unwrap();
    let logits = norm(&img)
        .matmul(&norm(&txt).t().unwrap())
        .unwrap()
        .broadcast_mul(&model.logit_scale().exp().unwrap())
        .unwrap();
    (
        max_abs_diff(&img, &io["image_features"]),
        max_abs_diff(&txt, &io["text_features"]),
        max_abs_diff(&logits, &io["logits_per_image"]),
    )
}

fn build(cfg: &ClipConfig, tensors: HashMap<String, Tensor>) -> ClipModel {
    ClipModel::new(
        cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

#[test]
fn open_clip_directory_bin_and_single_files_load_and_match_open_clip() {
    let dev = Device::Cpu;
    let dir = fixture("open_clip_rn_clip_small");
    let (cfg, tensors) = load(&dir, None, &dev).unwrap();
    assert_eq!(cfg, small_rn(), "shape from open_clip_config.json");
    let (e_img, e_txt, e_logits) = parity(&build(&cfg, tensors.clone()));
    eprintln!(
        "open_clip RN CLIP directory, max |Δ|: image {e_img:e}, text {e_txt:e}, logits {e_logits:e}"
    );
    assert!(e_img < 1e-4 && e_txt < 1e-4 && e_logits < 1e-4);

    // torch.save's zip pickle holds exactly the safetensors' tensors.
    let bin = read_state_dict(&dir.join("open_clip_pytorch_model.bin"), &dev).unwrap();
    let st = read_state_dict(&dir.join("open_clip_model.safetensors"), &dev).unwrap();
    assert_eq!(bin.len(), st.len());
    assert!(bin.keys().any(|k| k.ends_with("num_batches_tracked")));
    for (k, t) in &st {
        assert_eq!(bin[k].dims(), t.dims(), "{k}");
        if t.dtype().is_float() {
            assert_eq!(max_abs_diff(&bin[k], t), 0.0, "{k}");
        }
    }

    // A single file takes the configured shape; both formats give the directory's tensors.
    for file in ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"] {
        let (shape, from_file) = load(&dir.join(file), Some(&small_rn()), &dev).unwrap();
        assert_eq!(shape, small_rn());
        assert_eq!(from_file.len(), tensors.len());
        for (k, t) in &tensors {
            assert_eq!(max_abs_diff(&from_file[k], t), 0.0, "{file}: {k}");
        }
    }
    // Without a configured shape, one is read off the tensors, which needs 64-wide heads.
    let err = load(&dir.join("open_clip_pytorch_model.bin"), None, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("open_clip_pytorch_model.bin") && err.contains("heads"),
        "{err}"
    );
    // A configured shape that differs from the directory's own is refused.
    let mut other = small_rn();
    other.text.layers = 3;
    let err = load(&dir, Some(&other), &dev).unwrap_err().to_string();
    assert!(err.contains("is not the configured model's"), "{err}");
}

#[test]
fn unreadable_files_are_explained() {
    let dev = Device::Cpu;
    let dir = scratch("pretrained-bad-files");
    let bogus = dir.join("weights.bin");
    std::fs::write(&bogus, b"not a zip").unwrap();
    let err = read_state_dict(&bogus, &dev).unwrap_err().to_string();
    assert!(
        err.contains("weights.bin") && err.contains("torch.save"),
        "{err}"
    );
    let odd = dir.join("weights.npz");
    std::fs::write(&odd, b"x").unwrap();
    let err = read_state_dict(&odd, &dev).unwrap_err().to_string();
    assert!(err.contains("npz") && err.contains(".safetensors"), "{err}");
    // `gen_torch_files.py`: a TorchScript archive (as OpenAI's original RN50.pt) is
    // explained; an open_clip training checkpoint gives its state dict, DDP prefix removed.
    let torch_files =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/rankalign-train/tests/fixtures");
    let err = read_state_dict(&torch_files.join("torchscript_small.pt"), &dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("torchscript_small.pt") && err.contains("TorchScript"),
        "{err}"
    );
    let ckpt = read_state_dict(&torch_files.join("train_ckpt_small.pt"), &dev).unwrap();
    let mut keys: Vec<&String> = ckpt.keys().collect();
    keys.sort();
    assert_eq!(keys, ["logit_scale", "token_embedding.weight"]);
    assert_eq!(
        ckpt["token_embedding.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );

    let err = load(&dir.join("nope/x/y"), None, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such file or directory"), "{err}");
    let err = load(&dir, None, &dev).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("open_clip_config.json"),
        "{err}"
    );
}

/// A Hugging Face cache laid out as `huggingface_hub` writes it, holding the HF CLIPModel
/// fixture (written by `transformers`' `save_pretrained`) as `openai/clip-vit-base-patch16`.
fn fake_cache(root: &Path, commit: &str) -> PathBuf {
    let repo = root.join("models--openai--clip-vit-base-patch16");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("hf_clip_small").join(f), snap.join(f)).unwrap();
    }
    snap
}

#[test]
fn hub_names_resolve_offline_in_the_cache() {
    let dev = Device::Cpu;
    let root = scratch("pretrained-hub").join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = fake_cache(&root, commit);
    let cache = HubCache::new(&root);
    let name = Path::new("openai/clip-vit-base-patch16");
    let (cfg, tensors) = load_with_cache(name, None, &dev, &cache).unwrap();
    let (want_cfg, want) =
        rankalign_train::export::load_hf(&fixture("hf_clip_small"), &dev).unwrap();
    assert_eq!(cfg, want_cfg);
    assert_eq!(tensors.len(), want.len());
    // By branch, by commit.
    let at_commit = format!("openai/clip-vit-base-patch16@{commit}");
    assert!(load_with_cache(Path::new(&at_commit), None, &dev, &cache).is_ok());

    // The weights missing: the error names the exact file and how to fetch it.
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let err = load_with_cache(name, None, &dev, &cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&snap.join("model.safetensors").display().to_string())
            && err.contains(
                "huggingface-cli download openai/clip-vit-base-patch16 config.json model.safetensors"
            ),
        "{err}"
    );
    // Not in the cache at all: the ref file that was looked for, and the same advice.
    let err = load_with_cache(
        Path::new("openai/clip-vit-large-patch14"),
        None,
        &dev,
        &cache,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            &root
                .join("models--openai--clip-vit-large-patch14/refs/main")
                .display()
                .to_string()
        ) && err.contains("huggingface-cli download openai/clip-vit-large-patch14")
            && err.contains("offline"),
        "{err}"
    );
}

/// A tiny ResNet CLIP on 32 px digit scenes, trained for `steps`.
fn rn_config(name: &str, dir: &Path, init_from: Option<&Path>) -> ExperimentConfig {
    let init = init_from
        .map(|p| format!("init_from = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let text = format!(
        r#"
name = "{name}"
out_dir = "{out}"
seed = 9

[data]
source = "digits"
image_size = 32
train_size = 64
test_size = 20

[model]
{init}
[model.clip]
embed_dim = 16
logit_scale_init = 2.6592600369327779
vision = {{ image_size = 32, layers = [1, 1, 1, 1], width = 4, heads = 2, embed_dim = 16 }}
text = {{ vocab_size = 49408, context_length = 24, width = 32, layers = 1, heads = 2, mlp_dim = 64 }}

[optim]
lr = 1e-3
weight_decay = 0.1
warmup_steps = 1

[train]
batch_size = 16
epochs = 2
checkpoint_every = 2
keep_checkpoints = 4
log_every = 1

[eval]
zero_shot_size = 10
retrieval_size = 10
batch_size = 16

[[variant]]
name = "clip"
loss = {{ kind = "clip" }}
"#,
        out = dir.display()
    );
    ExperimentConfig::parse(&text, Path::new("rn.toml")).unwrap()
}

fn run(cfg: &ExperimentConfig, steps: usize) -> rankalign_train::Result<()> {
    run_experiment(
        cfg,
        &Device::Cpu,
        &RunOptions {
            stop_after: Some(steps),
            ..Default::default()
        },
    )
    .map(|_| ())
}

#[test]
fn a_resnet_clip_trains_resumes_exports_and_starts_another_run() {
    let dev = Device::Cpu;
    let dir = scratch("pretrained-rn");
    let cfg = rn_config("rn", &dir, None);
    run(&cfg, 2).unwrap();
    run(&cfg, 4).unwrap();
    let straight = rn_config("rn-straight", &dir, None);
    run(&straight, 4).unwrap();
    let ckpt = |name: &str, file: &str| {
        candle_core::safetensors::load(
            dir.join(name)
                .join("clip/checkpoints/step-00000004")
                .join(file),
            &dev,
        )
        .unwrap()
    };
    let (model, optim) = (
        ckpt("rn", "model.safetensors"),
        ckpt("rn", "optim.safetensors"),
    );
    // Running statistics are checkpointed, moved by training, and not optimised.
    let stat = "visual.layer1.0.bn1.running_mean";
    assert!(
        model[stat]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    assert!(
        !optim.keys().any(|k| k.contains("running_")),
        "buffers in the optimiser"
    );
    assert!(optim.contains_key("visual.layer1.0.bn1.weight.m"));
    // Resumed at step 2 = uninterrupted, statistics included.
    let other = ckpt("rn-straight", "model.safetensors");
    for (k, t) in &model {
        assert_eq!(max_abs_diff(t, &other[k]), 0.0, "{k} differs after resume");
    }

    // Exported in open_clip's layout (transformers has no ResNet CLIPModel) …
    let out = dir.join("exported");
    rankalign_train::export::export_run(&dir.join("rn"), "clip", &out).unwrap();
    assert!(!out.join("config.json").exists());
    let theirs = read_state_dict(&out.join("open_clip_model.safetensors"), &dev).unwrap();
    assert!(theirs.contains_key("transformer.resblocks.0.attn.in_proj_weight"));
    assert!(theirs.contains_key(stat));
    let (shape, tensors) = load(&out, None, &dev).unwrap();
    assert_eq!(shape, cfg.model.resolve().unwrap());
    for (k, t) in &tensors {
        assert_eq!(max_abs_diff(t, &model[k]), 0.0, "{k}");
    }

    // … and a new run starts from it, as a directory and as a bare OpenAI-keyed file.
    let weights = out.join("open_clip_model.safetensors");
    for (name, from) in [
        ("from-dir", out.as_path()),
        ("from-file", weights.as_path()),
    ] {
        run(&rn_config(name, &dir, Some(from)), 1).unwrap();
    }

    // A tensor missing, then one mis-shaped: each named (with both shapes).
    let mut broken = theirs.clone();
    broken.remove("visual.attnpool.c_proj.weight");
    let missing = dir.join("missing.safetensors");
    candle_core::safetensors::save(&broken, &missing).unwrap();
    let err = run(&rn_config("missing", &dir, Some(&missing)), 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("visual.attnpool.c_proj.weight") && err.contains("missing.safetensors"),
        "{err}"
    );
    let mut broken = theirs;
    broken.insert(
        "visual.layer3.0.conv2.weight".into(),
        Tensor::zeros((16, 16, 1, 1), DType::F32, &dev).unwrap(),
    );
    let misshaped = dir.join("misshaped.safetensors");
    candle_core::safetensors::save(&broken, &misshaped).unwrap();
    let err = run(&rn_config("misshaped", &dir, Some(&misshaped)), 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("visual.layer3.0.conv2.weight")
            && err.contains("[16, 16, 3, 3]")
            && err.contains("[16, 16, 1, 1]"),
        "{err}"
    );
}
