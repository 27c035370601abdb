//! Pretrained weights in: every place a model is named (`[model] init_from`,
//! `rankalign embed --model`) goes through [`load`].
//!
//! A model is named by
//! - a directory in the Hugging Face `CLIPModel` layout (`config.json` +
//!   `model.safetensors` or `pytorch_model.bin`; ViT only, HF has no ResNet CLIP), e.g.
//!   one written by `rankalign export`;
//! - a directory in open_clip's layout (`open_clip_config.json` +
//!   `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`; ViT or ResNet), as
//!   open_clip's `save_for_hf` and `rankalign export` of a ResNet write it;
//! - one checkpoint file, `.safetensors` or PyTorch's `.bin` / `.pt` / `.pth` (a
//!   `torch.save`d state dict, or an open_clip training checkpoint with a `state_dict`
//!   entry), with OpenAI / open_clip keys or ours; its shape is the configured model's,
//!   or, without one, read off the tensors (see `convert::clip_config_from_openai`);
//! - a Hugging Face hub name, `owner/name` or `owner/name@revision`, when no such local
//!   path exists: it is looked up in the local hub cache (`HF_HUB_CACHE`, else
//!   `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) through `hf-hub`, and never
//!   downloaded; a missing file is an error that names it and says how to fetch it.
//!
//! Whatever the layout, the tensors come back under our names (OpenAI keys converted), so
//! a `ClipModel` of the returned shape loads them by name; a missing or mis-shaped tensor
//! is then an error that names it (and both shapes).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rankalign_models::ClipConfig;
use rankalign_models::convert::{clip_config_from_openai, openai_to_hf};
use serde_json::Value;

use crate::export::{OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS};
use crate::{Result, TrainError, io_err};

/// HF `CLIPModel` files, weights in order of preference.
const HF_CONFIG: &str = "config.json";
const HF_WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// The local Hugging Face hub cache (the `hub` directory that holds `models--*`).
#[derive(Clone, Debug)]
pub struct HubCache {
    root: Option<PathBuf>,
}

impl HubCache {
    /// A cache at `root`, e.g. `$HF_HOME/hub`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: Some(root.into()),
        }
    }

    /// Where `huggingface_hub` looks: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let root = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")));
        Self { root }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The cached copy of `file` in `repo` at `revision` (a branch, tag or commit), if
    /// present. Branches and tags resolve through `refs/<revision>` as `huggingface_hub`
    /// writes them.
    pub fn get(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let root = self.root.as_ref()?;
        let cache = hf_hub::Cache::new(root.clone());
        let found = cache
            .repo(hf_hub::Repo::with_revision(
                repo.to_string(),
                hf_hub::RepoType::Model,
                revision.to_string(),
            ))
            .get(file);
        // hf-hub reads `refs/<revision>` verbatim; also accept a commit hash and a ref
        // file that ends in a newline (both are what a person writing a cache by hand does).
        found.or_else(|| {
            let path = self.snapshot_dir(repo, revision)?.join(file);
            path.exists().then_some(path)
        })
    }

    /// `<root>/models--owner--name`.
    fn repo_dir(&self, repo: &str) -> Option<PathBuf> {
        let folder = hf_hub::Repo::model(repo.to_string()).folder_name();
        Some(self.root.as_ref()?.join(folder))
    }

    /// `…/snapshots/<commit>` for a revision, if the revision resolves.
    fn snapshot_dir(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo)?;
        let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
            Ok(text) => text.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        let snap = dir.join("snapshots").join(commit);
        snap.is_dir().then_some(snap)
    }

    /// Why `file` of `repo` is not found, naming the exact path that was looked for.
    fn explain_missing(&self, repo: &str, revision: &str, file: &str) -> String {
        let Some(dir) = self.repo_dir(repo) else {
            return "no Hugging Face cache directory: none of HF_HUB_CACHE, HF_HOME, HOME is set"
                .into();
        };
        let refs = dir.join("refs").join(revision);
        match self.snapshot_dir(repo, revision) {
            Some(snap) => format!("{} does not exist", snap.join(file).display()),
            None if refs.exists() => format!(
                "{} names a snapshot that is not in {}",
                refs.display(),
                dir.join("snapshots").display()
            ),
            None => format!(
                "{} does not exist (no snapshot of revision {revision:?} in the cache)",
                refs.display()
            ),
        }
    }
}

/// `owner/name` or `owner/name@revision` as the hub spells repository names.
pub fn parse_hub_name(spec: &str) -> Option<(&str, &str)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) if !rev.is_empty() && !rev.contains(['/', '\\']) => (r, rev),
        Some(_) => return None,
        None => (spec, "main"),
    };
    let (owner, name) = repo.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(owner) && ok(name)).then_some((repo, revision))
}

/// Read a model named by `spec` (see the module docs), with `HubCache::from_env` for hub
/// names. `expected` is the configured shape, if any: a source with its own config must
/// agree with it, and a bare checkpoint file takes it.
pub fn load(
    spec: &Path,
    expected: Option<&ClipConfig>,
    device: &Device,
) -> Result<(ClipConfig, HashMap<String, Tensor>)> {
    load_with_cache(spec, expected, device, &HubCache::from_env())
}

/// [`load`] with an explicit hub cache.
pub fn load_with_cache(
    spec: &Path,
    expected: Option<&ClipConfig>,
    device: &Device,
    cache: &HubCache,
) -> Result<(ClipConfig, HashMap<String, Tensor>)> {
    let (cfg, tensors, origin) = if spec.is_dir() {
        let (cfg, tensors) = load_dir(spec, device, None)?;
        (cfg, tensors, spec.to_path_buf())
    } else if spec.is_file() {
        let (cfg, tensors) = load_file(spec, expected, device)?;
        (cfg, tensors, spec.to_path_buf())
    } else if let Some((repo, revision)) = spec.to_str().and_then(parse_hub_name) {
        let hint = download_hint(repo, revision, cache);
        let snapshot = [HF_CONFIG, OPEN_CLIP_CONFIG]
            .iter()
            .find_map(|f| cache.get(repo, revision, f))
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or_else(|| TrainError::Checkpoint {
                path: spec.to_path_buf(),
                msg: format!(
                    "not a local path, and not in the Hugging Face cache as a hub model: {}; {hint}",
                    cache.explain_missing(repo, revision, HF_CONFIG)
                ),
            })?;
        let (cfg, tensors) = load_dir(&snapshot, device, Some(&hint))?;
        (cfg, tensors, snapshot)
    } else {
        return Err(TrainError::Checkpoint {
            path: spec.to_path_buf(),
            msg: "no such file or directory (nor a hub name `owner/name`)".into(),
        });
    };
    if let Some(want) = expected
        && &cfg != want
    {
        return Err(TrainError::Checkpoint {
            path: origin,
            msg: format!("its shape {cfg:?} is not the configured model's {want:?}"),
        });
    }
    Ok((cfg, tensors))
}

/// A CLIP model ready to use, loaded in one call from anything [`load`] reads: the
/// model, CLIP's tokenizer at its context length, and CLIP's evaluation transform at its
/// image size (the counterpart of transformers' `CLIPModel.from_pretrained` with its
/// processor, or open_clip's `create_model_and_transforms`).
pub struct Clip {
    pub model: rankalign_models::ClipModel,
    pub tokenizer: rankalign_data::ClipTokenizer,
    /// Where the weights came from.
    pub source: PathBuf,
    pub device: Device,
}

impl Clip {
    /// Load the model `spec` names (a directory, a checkpoint file, or a hub name in
    /// the local cache). Its text tower must use CLIP's vocabulary.
    pub fn load(spec: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let spec = spec.as_ref();
        let (cfg, tensors) = load(spec, None, device)?;
        if cfg.text.vocab_size != rankalign_data::tokenize::VOCAB_SIZE {
            return Err(TrainError::Checkpoint {
                path: spec.to_path_buf(),
                msg: format!(
                    "text vocab_size is {}; rankalign's tokenizer is CLIP's ({})",
                    cfg.text.vocab_size,
                    rankalign_data::tokenize::VOCAB_SIZE
                ),
            });
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let model =
            rankalign_models::ClipModel::new(&cfg, vb).map_err(|e| TrainError::Checkpoint {
                path: spec.to_path_buf(),
                msg: e.to_string(),
            })?;
        Ok(Clip {
            tokenizer: rankalign_data::ClipTokenizer::new(cfg.text.context_length)?,
            model,
            source: spec.to_path_buf(),
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        self.model.config()
    }

    /// Token ids `(n, s)` of `texts`, zero-padded (CLIP's BPE with start and end
    /// tokens, truncated to the context length).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Tensor> {
        Ok(rankalign_data::collate_texts(texts, &self.tokenizer, &self.device)?.0)
    }

    /// One image file through the evaluation transform: `(1, 3, size, size)`.
    pub fn preprocess(&self, path: impl AsRef<Path>) -> Result<Tensor> {
        let size = self.config().vision.image_size();
        Ok(rankalign_data::preprocess_image(
            path.as_ref(),
            size,
            &self.device,
        )?)
    }

    /// L2-normalised embeddings `(n, e)` of image files.
    pub fn encode_images<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Tensor> {
        let pixels = paths
            .iter()
            .map(|p| self.preprocess(p))
            .collect::<Result<Vec<_>>>()?;
        let pixels = Tensor::cat(&pixels, 0)?;
        Ok(rankalign_kernels::l2_normalize(
            &self.model.encode_image(&pixels)?,
        )?)
    }

    /// L2-normalised embeddings `(n, e)` of texts.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let (ids, eot) = rankalign_data::collate_texts(texts, &self.tokenizer, &self.device)?;
        Ok(rankalign_kernels::l2_normalize(
            &self.model.encode_text(&ids, &eot)?,
        )?)
    }
}

/// How to put a hub model into the cache.
fn download_hint(repo: &str, revision: &str, cache: &HubCache) -> String {
    let rev = if revision == "main" {
        String::new()
    } else {
        format!(" --revision {revision}")
    };
    format!(
        "rankalign reads the hub cache only (offline); fetch the files first, e.g. \
         `huggingface-cli download {repo}{rev} {HF_CONFIG} {}` (a CLIPModel) or \
         `huggingface-cli download {repo}{rev} {OPEN_CLIP_CONFIG} {}` (an open_clip model); \
         the cache is HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub{}",
        HF_WEIGHTS[0],
        OPEN_CLIP_WEIGHTS[0],
        cache
            .root()
            .map(|r| format!(" (here {})", r.display()))
            .unwrap_or_default()
    )
}

/// A model directory in the HF or the open_clip layout.
fn load_dir(
    dir: &Path,
    device: &Device,
    hint: Option<&str>,
) -> Result<(ClipConfig, HashMap<String, Tensor>)> {
    let missing = |path: PathBuf, what: &str| TrainError::Checkpoint {
        path,
        msg: format!(
            "missing: {what}{}",
            hint.map(|h| format!("; {h}")).unwrap_or_default()
        ),
    };
    let weights = |names: &[&str]| -> Result<PathBuf> {
        names
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| {
                missing(
                    dir.join(names[0]),
                    &format!("the directory holds neither {}", names.join(" nor ")),
                )
            })
    };
    if dir.join(HF_CONFIG).exists() {
        let cfg_path = dir.join(HF_CONFIG);
        let cfg = crate::export::clip_config_from_hf(&read_json(&cfg_path)?, &cfg_path)?;
        let tensors = read_state_dict(&weights(&HF_WEIGHTS)?, device)?;
        Ok((cfg, tensors))
    } else if dir.join(OPEN_CLIP_CONFIG).exists() {
        let cfg_path = dir.join(OPEN_CLIP_CONFIG);
        let cfg = crate::export::clip_config_from_open_clip(&read_json(&cfg_path)?, &cfg_path)?;
        let path = weights(&OPEN_CLIP_WEIGHTS)?;
        let tensors = to_ours(read_state_dict(&path, device)?, &path)?;
        Ok((cfg, tensors))
    } else {
        Err(missing(
            dir.join(HF_CONFIG),
            &format!(
                "a model directory holds {HF_CONFIG} (Hugging Face CLIPModel) or {OPEN_CLIP_CONFIG} (open_clip)"
            ),
        ))
    }
}

/// One checkpoint file; its shape is `expected` or read off the tensors.
fn load_file(
    path: &Path,
    expected: Option<&ClipConfig>,
    device: &Device,
) -> Result<(ClipConfig, HashMap<String, Tensor>)> {
    let state = read_state_dict(path, device)?;
    let ours = is_our_layout(&state);
    let cfg = match expected {
        Some(c) => c.clone(),
        None if ours => {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                msg: format!(
                    "a state dict with Hugging Face keys does not say its shape; give its directory with {HF_CONFIG}, or configure the model"
                ),
            });
        }
        None => clip_config_from_openai(&state).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?,
    };
    let tensors = if ours { state } else { to_ours(state, path)? };
    Ok((cfg, tensors))
}

/// Whether a state dict already has our names (HF `CLIPModel`'s, with an OpenAI ResNet).
fn is_our_layout(state: &HashMap<String, Tensor>) -> bool {
    state
        .keys()
        .any(|k| k.starts_with("text_model.") || k.starts_with("vision_model."))
}

fn to_ours(state: HashMap<String, Tensor>, path: &Path) -> Result<HashMap<String, Tensor>> {
    openai_to_hf(state).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Every tensor of a `.safetensors` file, or of a PyTorch `.bin` / `.pt` / `.pth` file
/// written by `torch.save` (the zip format, PyTorch ≥ 1.6) holding a state dict or a dict
/// with a `state_dict` entry; a `module.` prefix (DistributedDataParallel) is removed.
/// Floating-point tensors come back as f32 on `device`.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let err = |msg: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    if !path.is_file() {
        return Err(err("missing: no such file".into()));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let state: HashMap<String, Tensor> = match ext.as_str() {
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| err(format!("not a readable safetensors file: {e}")))?,
        "bin" | "pt" | "pth" => read_pickle(path).map_err(err)?,
        _ => {
            return Err(err(format!(
                "unknown checkpoint format {ext:?}: expected .safetensors, or PyTorch's .bin, .pt or .pth"
            )));
        }
    };
    let strip = !state.is_empty() && state.keys().all(|k| k.starts_with("module."));
    state
        .into_iter()
        .map(|(k, t)| {
            let k = if strip {
                k["module.".len()..].to_string()
            } else {
                k
            };
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((k, t.to_device(device)?))
        })
        .collect()
}

/// A `torch.save` zip archive through candle's pickle reader.
fn read_pickle(path: &Path) -> std::result::Result<HashMap<String, Tensor>, String> {
    let not_readable = |e: candle_core::Error| {
        format!(
            "not a PyTorch checkpoint that can be read without Python ({e}); only the zip format \
             of torch.save (PyTorch >= 1.6) holding a state dict is supported"
        )
    };
    let mut tensors = candle_core::pickle::read_all(path).map_err(not_readable)?;
    if tensors.is_empty() {
        // An open_clip training checkpoint: {"epoch": …, "state_dict": {…}, …}.
        tensors =
            candle_core::pickle::read_all_with_key(path, Some("state_dict")).unwrap_or_default();
    }
    if tensors.is_empty() {
        return Err(
            "no tensors found: a TorchScript archive (OpenAI's original `RN50.pt`) or a pickle \
             without a state dict? Load it in PyTorch and save `model.state_dict()` with \
             torch.save or safetensors"
                .into(),
        );
    }
    Ok(tensors.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_are_recognised() {
        assert_eq!(
            parse_hub_name("openai/clip-vit-base-patch16"),
            Some(("openai/clip-vit-base-patch16", "main"))
        );
        assert_eq!(
            parse_hub_name("timm/resnet50_clip.openai@v1.0"),
            Some(("timm/resnet50_clip.openai", "v1.0"))
        );
        for bad in [
            "runs/x/clip/hf",
            "./a/b",
            "/abs/path",
            "a",
            "a/",
            "../b",
            "a/b@",
            "a/b@x/y",
            "a b/c",
        ] {
            assert_eq!(parse_hub_name(bad), None, "{bad}");
        }
    }
}
