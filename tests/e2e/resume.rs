//! Stopping after N steps and resuming to 2N gives bit-identical weights, optimiser
//! moments and metrics to an uninterrupted 2N-step run.

use std::path::Path;

use candle_core::Device;
use rankalign_train::{ExperimentConfig, RunOptions, run_experiment};

use crate::{scratch, tiny_config, train_tiny};

const VARIANT: &str = "[[variant]]\nname = \"rankclip\"\nloss = { kind = \"rankclip\" }\n";

fn load(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn assert_same(a: &Path, b: &Path) {
    let (ta, tb) = (load(a), load(b));
    assert_eq!(ta.len(), tb.len());
    for (k, x) in &ta {
        let y = &tb[k];
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            x == y,
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn stop_and_resume_equals_uninterrupted() {
    let dir = scratch("resume");
    let parse = |name: &str| {
        ExperimentConfig::parse(&tiny_config(name, &dir, VARIANT), Path::new("tiny.toml")).unwrap()
    };
    let straight = parse("straight");
    let split = parse("split");
    let dev = Device::Cpu;
    let total = straight.schedule().unwrap().total_steps;
    assert_eq!(total, 8);

    run_experiment(&straight, &dev, &RunOptions::default()).unwrap();
    let first = run_experiment(
        &split,
        &dev,
        &RunOptions {
            stop_after: Some(total / 2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(first.variants[0].steps, total / 2);
    let second = run_experiment(&split, &dev, &RunOptions::default()).unwrap();
    assert_eq!(second.variants[0].resumed_from, Some(total / 2));

    let ckpt = |name: &str| dir.join(name).join("rankclip/checkpoints/step-00000008");
    assert_same(
        &ckpt("straight").join("model.safetensors"),
        &ckpt("split").join("model.safetensors"),
    );
    assert_same(
        &ckpt("straight").join("optim.safetensors"),
        &ckpt("split").join("optim.safetensors"),
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt("split").join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["optimizer_steps"], 8);

    // The metrics of the resumed run continue where the checkpoint ended, with the same losses.
    let losses = |name: &str| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join(name).join("rankclip/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    let (a, b) = (losses("straight"), losses("split"));
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(a, b);

    // Outputs a person reads are there.
    for f in ["report.md", "loss.png", "config.toml", "summary.json"] {
        assert!(dir.join("split").join(f).exists(), "{f} missing");
    }
    // Checkpoints are pruned to keep_checkpoints and `latest` names the newest.
    let latest = std::fs::read_to_string(dir.join("split/rankclip/checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000008");
}

#[test]
fn a_changed_config_is_not_resumed_silently() {
    let dir = scratch("changed");
    let (cfg, _) = train_tiny(&dir, "run", VARIANT, 4);
    let mut other = cfg.clone();
    other.optim.lr = 5e-4;
    let err = run_experiment(&other, &Device::Cpu, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another configuration") && err.contains("step-00000004"),
        "{err}"
    );
    // --overwrite starts over.
    let out = run_experiment(
        &other,
        &Device::Cpu,
        &RunOptions {
            overwrite: true,
            stop_after: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(out.variants[0].resumed_from, None);
}

#[test]
fn a_nan_loss_stops_with_the_step_and_keeps_the_checkpoint() {
    let dir = scratch("nan");
    let (cfg, _) = train_tiny(&dir, "run", VARIANT, 4);
    // Poison the saved logit_scale: the resumed step 4 computes a NaN loss.
    let ckpt = dir.join("run/rankclip/checkpoints/step-00000004/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&ckpt, &Device::Cpu).unwrap();
    tensors.insert(
        "logit_scale".into(),
        candle_core::Tensor::new(f32::NAN, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &ckpt).unwrap();
    // A checkpoint whose weights are NaN but intact: drop the recorded checksum (as in
    // checkpoints written before checksums), so the damage check lets it through.
    let state_path = ckpt.with_file_name("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let sums = state["checksums"].as_object_mut().unwrap();
    sums.remove("model.safetensors");
    sums.remove("state.json");
    std::fs::write(&state_path, state.to_string()).unwrap();
    let err = run_experiment(&cfg, &Device::Cpu, &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diverged at step 4") && err.contains("step-00000004"),
        "{err}"
    );
    assert!(ckpt.exists());
    assert!(!dir.join("run/rankclip/checkpoints/step-00000008").exists());
}

/// A flipped field of `state.json` (here the data position) is caught by its own
/// checksum: the run falls back to the previous checkpoint and says why.
#[test]
fn a_tampered_state_json_is_caught() {
    let dir = scratch("state-flip");
    let (cfg, _) = train_tiny(&dir, "run", VARIANT, 8);
    let state = dir.join("run/rankclip/checkpoints/step-00000008/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let flipped = text.replacen("\"consumed\": 64", "\"consumed\": 48", 1);
    assert_ne!(text, flipped, "{text}");
    std::fs::write(&state, flipped).unwrap();
    let out = run_experiment(
        &cfg,
        &Device::Cpu,
        &RunOptions {
            stop_after: Some(8),
            ..Default::default()
        },
    )
    .unwrap();
    let v = &out.variants[0];
    assert_eq!(v.resumed_from, Some(4));
    assert!(
        v.warnings
            .iter()
            .any(|w| w.contains("state.json has CRC-32")),
        "{:?}",
        v.warnings
    );
}

/// Random, truncated and bit-flipped bytes in any file of a checkpoint are reported as
/// damage (never a panic, never a silent load), and the previous checkpoint is chosen.
#[test]
fn checkpoint_files_survive_random_truncated_and_flipped_bytes() {
    use rand::{Rng, SeedableRng};
    let dir = scratch("ckpt-fuzz");
    train_tiny(&dir, "run", VARIANT, 8);
    let ckpts = dir.join("run/rankclip/checkpoints");
    let newest = ckpts.join("step-00000008");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for i in 0..60 {
        let name = ["model.safetensors", "optim.safetensors", "state.json"][i % 3];
        let path = newest.join(name);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        match (i / 3) % 3 {
            0 => bytes.truncate(rng.random_range(0..bytes.len())),
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            _ => {
                bytes = (0..rng.random_range(0..2048))
                    .map(|_| rng.random())
                    .collect()
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let (chosen, warnings) = rankalign_train::checkpoint::resume_point(&ckpts).unwrap();
        if bytes != original {
            assert_eq!(
                chosen,
                Some(ckpts.join("step-00000004")),
                "mutation {i} of {name}"
            );
            assert!(warnings[0].contains("step-00000008"), "{warnings:?}");
        }
        std::fs::write(&path, &original).unwrap();
    }
    let (chosen, warnings) = rankalign_train::checkpoint::resume_point(&ckpts).unwrap();
    assert_eq!((chosen, warnings.len()), (Some(newest), 0));
}
