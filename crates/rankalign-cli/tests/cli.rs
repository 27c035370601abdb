//! The `rankalign` binary on bad input: a clear message naming the file and the problem,
//! a failing exit status, and no panic.

use std::process::Command;

fn rankalign(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankalign"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rankalign-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn missing_config_is_named() {
    let (ok, err) = rankalign(&["train", "--config", "/nonexistent/x.toml"]);
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/x.toml") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn malformed_config_names_the_line() {
    let p = write("broken.toml", "name = \"x\"\nseed = [\n");
    let (ok, err) = rankalign(&["train", "--config", p.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("broken.toml") && err.contains("line 2") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn the_default_config_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/digits-default.toml"
    ))
    .unwrap();
    let broken = write(
        "unknown-key.toml",
        &text.replace("seed = 17", "seed = 17\nsede = 3"),
    );
    let (ok, err) = rankalign(&["train", "--config", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("sede") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_cuda_device_without_cuda_is_explained() {
    let (ok, err) = rankalign(&["train", "--device", "cuda"]);
    assert!(!ok);
    let expected = if cfg!(feature = "cuda") {
        "CUDA"
    } else {
        "built without CUDA"
    };
    assert!(err.contains(expected) && !err.contains("panicked"), "{err}");
    let (ok, err) = rankalign(&["train", "--device", "tpu"]);
    assert!(!ok && err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

/// Every config shipped in `configs/` (and its subdirectories) parses and validates, as
/// a pre-training or an ordinal experiment by its `kind`.
#[test]
fn shipped_configs_are_valid() {
    let root = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"));
    let (mut pretraining, mut ordinal) = (0, 0);
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                if text.lines().any(|l| l.trim() == "kind = \"ordinal\"") {
                    rankalign_train::ordinal::OrdinalConfig::load(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    ordinal += 1;
                } else {
                    rankalign_train::ExperimentConfig::load(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    pretraining += 1;
                }
            }
        }
    }
    assert!(
        pretraining >= 3 && ordinal >= 9,
        "{pretraining} + {ordinal} configs"
    );
}

/// A hub name that is not in the cache (`HF_HOME` pointed at an empty directory): the
/// error names the file looked for and how to download it; nothing goes to the network.
#[test]
fn embed_names_a_missing_hub_model_and_how_to_get_it() {
    let texts = write("hub-texts.txt", "a 3\n");
    let home = texts.with_file_name("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rankalign"))
        .args([
            "embed",
            "--model",
            "openai/clip-vit-base-patch16",
            "--texts",
        ])
        .arg(&texts)
        .arg("--out")
        .arg(home.join("emb.safetensors"))
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let refs = home.join("hub/models--openai--clip-vit-base-patch16/refs/main");
    assert!(
        err.contains(&refs.display().to_string())
            && err.contains("huggingface-cli download openai/clip-vit-base-patch16")
            && !err.contains("panicked"),
        "{err}"
    );
}
