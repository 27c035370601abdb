//! A BERT WordPiece tokenizer from a Hugging Face `tokenizer.json` (e.g. the one of
//! all-MiniLM-L6-v2, for the MiniLM text tower), and [`Tokenize`], what collation needs
//! from any tokenizer.
//!
//! The file defines the whole pipeline (BERT normaliser: clean-up, CJK spacing,
//! lower-casing, accent stripping; BERT pre-tokeniser; WordPiece with `##`
//! continuations; `[CLS] $A [SEP]`); we only replace its truncation and padding:
//! sequences are cut to `max_tokens` with `[SEP]` kept last (as `transformers`'
//! `truncation=True, max_length=…`) and never padded here (collation pads a batch to
//! its longest row).

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::DataError;
use crate::tokenize::ClipTokenizer;

/// Text to token ids, `[start] … [end]`, the last id being the one a text tower pools
/// at or masks up to.
pub trait Tokenize: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError>;
}

impl Tokenize for ClipTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        ClipTokenizer::encode(self, text)
    }
}

/// A WordPiece tokenizer read from `tokenizer.json`.
#[derive(Clone)]
pub struct WordPieceTokenizer {
    inner: Tokenizer,
    max_tokens: usize,
}

impl std::fmt::Debug for WordPieceTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordPieceTokenizer")
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl WordPieceTokenizer {
    /// Read `path` (a `tokenizer.json`); at most `max_tokens` ids per text (≥ 2).
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self, DataError> {
        let bad = |msg: String| DataError::Format {
            path: path.to_path_buf(),
            line: None,
            msg,
        };
        if max_tokens < 2 {
            return Err(DataError::Invalid(format!(
                "tokenizer: max_tokens {max_tokens} leaves no room for [CLS] and [SEP]"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut inner: Tokenizer = text
            .parse()
            .map_err(|e| bad(format!("not a Hugging Face tokenizer.json: {e}")))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| bad(format!("cannot truncate to {max_tokens} tokens: {e}")))?;
        inner.with_padding(None);
        Ok(Self { inner, max_tokens })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// `[CLS] … [SEP]`, at most `max_tokens` ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Invalid(format!("tokenizer: cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
}

impl Tokenize for WordPieceTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        WordPieceTokenizer::encode(self, text)
    }
}

/// The tokenizer of a text tower: CLIP's BPE or a WordPiece vocabulary.
#[derive(Clone, Debug)]
pub enum TextTokenizer {
    Clip(ClipTokenizer),
    WordPiece(WordPieceTokenizer),
}

impl Tokenize for TextTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            TextTokenizer::Clip(t) => t.encode(text),
            TextTokenizer::WordPiece(t) => t.encode(text),
        }
    }
}

/// Where `cargo xtask fetch minilm` puts all-MiniLM-L6-v2, if that directory exists:
/// `$RANKALIGN_MINILM_DIR`, else `$XDG_CACHE_HOME/rankalign/minilm/model`, else
/// `~/.cache/rankalign/minilm/model`.
pub fn minilm_cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let dir = match std::env::var_os("RANKALIGN_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
            .join("rankalign/minilm/model"),
    };
    dir.is_dir().then_some(dir)
}
