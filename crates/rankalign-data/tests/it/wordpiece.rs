//! The WordPiece tokenizer against `transformers`' fast tokenizer for all-MiniLM-L6-v2
//! (`crates/rankalign-models/tests/fixtures/gen_minilm.py` → `minilm_tokens.json`). The
//! model's `tokenizer.json` is not committed: these tests run when `cargo xtask fetch
//! minilm` has put it in place (or `RANKALIGN_MINILM_DIR` names a directory with it)
//! and say so when they skip.

use std::path::PathBuf;

use candle_core::Device;
use rankalign_data::batch::collate_texts;
use rankalign_data::{TextTokenizer, Tokenize, WordPieceTokenizer};
use serde_json::Value;

/// The MiniLM model directory, if present.
fn minilm_dir() -> Option<PathBuf> {
    let dir = rankalign_data::wordpiece::minilm_cache_dir()?;
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: no all-MiniLM-L6-v2 tokenizer.json in {} (run `cargo xtask fetch minilm`)",
            dir.display()
        );
        None
    }
}

fn cases() -> Vec<Value> {
    let text = include_str!("../fixtures/minilm_tokens.json");
    let json: Value = serde_json::from_str(text).expect("fixture is valid JSON");
    json["cases"].as_array().expect("cases").clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ids_match_transformers_with_and_without_truncation() {
    let Some(dir) = minilm_dir() else { return };
    let full = WordPieceTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    let short = WordPieceTokenizer::from_file(&dir.join("tokenizer.json"), 12).unwrap();
    let cases = cases();
    assert!(cases.len() >= 5);
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(full.encode(text).unwrap(), ids(&case["ids"]), "{text:?}");
        assert_eq!(
            short.encode(text).unwrap(),
            ids(&case["ids_max12"]),
            "{text:?} (12)"
        );
    }
    // Collation pads with [PAD] = 0 and points each row's EOT index at its [SEP].
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let tok = TextTokenizer::WordPiece(full);
    let (batch, eot) = collate_texts(&texts, &tok, &Device::Cpu).unwrap();
    let s = batch.dim(1).unwrap();
    let flat = batch.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    for (r, e) in eot.to_vec1::<u32>().unwrap().into_iter().enumerate() {
        assert_eq!(flat[e as usize], 102, "row {r}: [SEP]");
        assert_eq!(e as usize - r * s + 1, tok.encode(texts[r]).unwrap().len());
    }
}

#[test]
fn bad_tokenizer_files_name_the_file() {
    let dir = std::env::temp_dir().join(format!("rankalign-wp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, "{ not json").unwrap();
    let err = WordPieceTokenizer::from_file(&path, 16)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("tokenizer"),
        "{err}"
    );
    let missing = WordPieceTokenizer::from_file(&dir.join("nope.json"), 16)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.json"), "{missing}");
}
