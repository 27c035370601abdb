//! Checkpoints: the model's variables, the optimiser's moments and step count, and the
//! run position, written atomically.
//!
//! Layout: `checkpoints/step-00000120/{model.safetensors, optim.safetensors, state.json}`
//! and a `checkpoints/latest` file naming the newest. A checkpoint is written into a
//! hidden temporary directory, its files are synced, and the directory is renamed into
//! place; `latest` is replaced the same way. A crash leaves either the old or the new
//! checkpoint, never a torn one. The oldest are pruned to `keep`.
//!
//! Every random choice of a run (tie-breaking permutations, crops) is a function of
//! `(seed, step)` or of the data position, which `state.json` records
//! ([`rankalign_data::DataPosition`]: pass, references consumed, skip counts); there is
//! no generator state to save.
//!
//! `state.json` also holds the CRC-32 of each tensor file. [`resume_point`] checks
//! them, newest first: a damaged checkpoint (truncated, bit-flipped, half-deleted) is
//! reported and the previous intact one is used.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::AdamW;
use crate::{Result, TrainError, io_err};

/// What besides tensors a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Steps completed; training resumes at this step.
    pub step: usize,
    pub optimizer_steps: usize,
    pub seed: u64,
    /// Digest of the experiment config and variant, to refuse resuming another run.
    pub config_digest: String,
    /// The RNG is counter-based: every draw is keyed by `(seed, step)`.
    pub rng: String,
    /// Where the training data stream stands after `step` (absent in checkpoints of
    /// runs before streaming sources: then the step alone is the position).
    #[serde(default)]
    pub data: Option<rankalign_data::DataPosition>,
    /// In a run with `train.shard_by_rank`: every rank's data position, in rank order
    /// (each rank reads its own shards); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_ranks: Option<Vec<rankalign_data::DataPosition>>,
    /// CRC-32 (hex) of each tensor file, and of this state itself (`state.json`: the
    /// JSON of the state without that entry).
    #[serde(default)]
    pub checksums: BTreeMap<String, String>,
}

/// CRC-32 of a file's bytes, as 8 hex digits.
fn crc_of(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:08x}", h.finalize()))
}

const FILES: [&str; 2] = ["model.safetensors", "optim.safetensors"];
const STATE: &str = "state.json";

/// CRC-32 of the state as JSON without its own entry in `checksums`: what `state.json`
/// records for itself, so a flipped step or data position is caught too.
fn state_crc(state: &CheckpointState) -> Result<String> {
    let mut s = state.clone();
    s.checksums.remove(STATE);
    let json = serde_json::to_string_pretty(&s).map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(format!("{:08x}", crc32fast::hash(json.as_bytes())))
}

const LATEST: &str = "latest";

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Write a checkpoint for `state.step` under `dir` and return its path.
pub fn save(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &AdamW,
    state: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = format!("step-{:08}", state.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let model: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let model_path = tmp.join("model.safetensors");
    candle_core::safetensors::save(&model, &model_path)?;
    let optim_path = tmp.join("optim.safetensors");
    candle_core::safetensors::save(&opt.state_tensors()?, &optim_path)?;
    let state_path = tmp.join("state.json");
    let mut state = state.clone();
    state.checksums.clear();
    for f in FILES {
        state.checksums.insert(f.to_string(), crc_of(&tmp.join(f))?);
    }
    let own = state_crc(&state)?;
    state.checksums.insert(STATE.to_string(), own);
    let json =
        serde_json::to_string_pretty(&state).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(&state_path, json).map_err(io_err(&state_path))?;
    for p in [&model_path, &optim_path, &state_path] {
        sync_file(p)?;
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
    let latest_tmp = dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    std::fs::write(&latest_tmp, &name).map_err(io_err(&latest_tmp))?;
    sync_file(&latest_tmp)?;
    std::fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io_err(dir.join(LATEST)))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    prune(dir, keep)?;
    Ok(final_dir)
}

/// The `step-*` checkpoint directories under `dir`, oldest first.
fn step_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let steps = step_dirs(dir)?;
    let excess = steps.len().saturating_sub(keep);
    for old in &steps[..excess] {
        std::fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(())
}

/// The newest complete checkpoint under `dir`, if any (as `latest` names it).
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join(LATEST);
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(io_err(&pointer))?;
    let path = dir.join(name.trim());
    if !path.join("state.json").exists() {
        return Err(TrainError::Checkpoint {
            path,
            msg: format!("named by {} but incomplete or missing", pointer.display()),
        });
    }
    Ok(Some(path))
}

/// Why the checkpoint at `path` cannot be trusted, if it cannot: a missing or
/// unreadable file, a `state.json` that does not parse, or a checksum that differs.
pub fn damage(path: &Path) -> Option<String> {
    let state_path = path.join("state.json");
    let text = match std::fs::read_to_string(&state_path) {
        Ok(t) => t,
        Err(e) => return Some(format!("state.json: {e}")),
    };
    let state: CheckpointState = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => return Some(format!("state.json does not parse: {e}")),
    };
    if let Some(want) = state.checksums.get(STATE) {
        match state_crc(&state) {
            Ok(got) if got == *want => {}
            Ok(got) => return Some(format!("state.json has CRC-32 {got}, it records {want}")),
            Err(e) => return Some(format!("state.json: {e}")),
        }
    }
    for f in FILES {
        let p = path.join(f);
        if !p.is_file() {
            return Some(format!("{f} is missing"));
        }
        match (state.checksums.get(f), crc_of(&p)) {
            (_, Err(e)) => return Some(format!("{f}: {e}")),
            (Some(want), Ok(got)) if *want != got => {
                return Some(format!("{f} has CRC-32 {got}, state.json records {want}"));
            }
            _ => {}
        }
    }
    None
}

/// The checkpoint to resume from: the newest intact one under `dir`, and a line for each
/// damaged checkpoint passed over on the way (newest first).
pub fn resume_point(dir: &Path) -> Result<(Option<PathBuf>, Vec<String>)> {
    if !dir.exists() {
        return Ok((None, Vec::new()));
    }
    let steps = step_dirs(dir)?;
    let mut damaged = Vec::new();
    for p in steps.iter().rev() {
        match damage(p) {
            None => return Ok((Some(p.clone()), damaged)),
            Some(why) => damaged.push(format!(
                "checkpoint {} is damaged ({why}); falling back to an older one",
                p.display()
            )),
        }
    }
    Ok((None, damaged))
}

/// Load a checkpoint into `vars` and `opt`; every variable must be present with its shape.
pub fn load(path: &Path, vars: &[(String, Var)], opt: &mut AdamW) -> Result<CheckpointState> {
    let err = |msg: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| err(format!("state.json: {e}")))?;
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let model = candle_core::safetensors::load(path.join("model.safetensors"), &device)
        .map_err(|e| err(format!("model.safetensors: {e}")))?;
    for (name, var) in vars {
        let t = model
            .get(name)
            .ok_or_else(|| err(format!("model.safetensors has no tensor {name}")))?;
        if t.shape() != var.shape() {
            return Err(err(format!(
                "{name} has shape {:?} in the checkpoint, the model expects {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    let optim = candle_core::safetensors::load(path.join("optim.safetensors"), &device)
        .map_err(|e| err(format!("optim.safetensors: {e}")))?;
    opt.load_state(&optim, state.optimizer_steps, path)?;
    Ok(state)
}
