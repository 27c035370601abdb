//! CLIP's byte-level BPE tokenizer, built for the `tokenizers` crate from OpenAI's
//! vocabulary file (`bpe_simple_vocab_16e6.txt.gz`, embedded from `data/clip/`).
//!
//! The vocabulary is 49,408 entries: the 256 byte symbols, the same with the end-of-word
//! marker `</w>`, the first 48,894 merges of the file, then `<start_of_text>` (49406) and
//! `<end_of_text>` (49407). Text is NFC-normalised, runs of white space collapse to one
//! space, it is stripped and lower-cased (open_clip's `whitespace_clean` + `lower`), split
//! with CLIP's regex, and each piece is byte-encoded and merged. Before that,
//! [`clean_text`] does the parts of open_clip's `ftfy.fix_text` + `html.unescape` that
//! matter for ordinary captions: straight quotes, Latin ligatures, fullwidth forms, ANSI
//! escapes and control characters removed, and HTML entities (the common named ones and
//! all numeric ones) decoded twice. Not reproduced: ftfy's mojibake repair.
//!
//! Sequences are `[SOT] tokens [EOT]`, truncated to the context length with EOT kept as
//! the last token (OpenAI's `tokenize(truncate=True)`, open_clip's default).

use std::io::Read;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq, Strip};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::DataError;

/// OpenAI's BPE merges, gzip-compressed, as shipped by open_clip (MIT).
pub const EMBEDDED_VOCAB: &[u8] = include_bytes!("../../../data/clip/bpe_simple_vocab_16e6.txt.gz");

/// open_clip's names for the two special tokens (OpenAI's are `<|startoftext|>` and
/// `<|endoftext|>`); typed into a text, they become the special ids.
pub const SOT_TOKEN: &str = "<start_of_text>";
pub const EOT_TOKEN: &str = "<end_of_text>";
pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;
pub const VOCAB_SIZE: usize = 49408;
/// Merges CLIP uses: 49,408 − 256 − 256 − 2.
const MERGES: usize = 48_894;
const PATTERN: &str =
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's reversible map from bytes to printable characters, in vocabulary order:
/// the printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ` map to themselves and come first;
/// the other 68 bytes follow, in byte order, as the code points 256, 257, ….
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut symbols: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    symbols.extend(
        (0..256u32)
            .filter(|&b| !printable(b))
            .enumerate()
            .filter_map(|(k, _)| char::from_u32(256 + k as u32)),
    );
    symbols
}

/// CLIP's tokenizer with a fixed context length.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    context_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("context_length", &self.context_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// From the embedded vocabulary.
    pub fn new(context_length: usize) -> Result<Self, DataError> {
        Self::from_gz_bytes(
            EMBEDDED_VOCAB,
            "embedded bpe_simple_vocab_16e6.txt.gz",
            context_length,
        )
    }

    /// From a `bpe_simple_vocab_16e6.txt.gz` file.
    pub fn from_file(path: &std::path::Path, context_length: usize) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_gz_bytes(&bytes, &path.display().to_string(), context_length)
    }

    fn from_gz_bytes(bytes: &[u8], name: &str, context_length: usize) -> Result<Self, DataError> {
        if context_length < 2 {
            return Err(DataError::Invalid(format!(
                "tokenizer: context length {context_length} leaves no room for SOT and EOT"
            )));
        }
        let format = |line: usize, msg: String| DataError::Format {
            path: name.into(),
            line: Some(line),
            msg,
        };
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| format(0, format!("not a gzip-compressed UTF-8 text file: {e}")))?;
        let byte_chars = byte_symbols();
        let mut vocab: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(byte_chars.iter().map(|c| format!("{c}</w>")));
        let mut merges = Vec::with_capacity(MERGES);
        // Line 1 is a version header; merges follow, one "left right" pair a line.
        for (i, line) in text.lines().enumerate().skip(1).take(MERGES) {
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                format(
                    i + 1,
                    format!("expected a merge `left right`, got {line:?}"),
                )
            })?;
            vocab.push(format!("{a}{b}"));
            merges.push((a.to_string(), b.to_string()));
        }
        if merges.len() != MERGES {
            return Err(format(
                text.lines().count(),
                format!("expected {MERGES} merges, found {}", merges.len()),
            ));
        }
        vocab.push(SOT_TOKEN.into());
        vocab.push(EOT_TOKEN.into());
        let vocab: ahash_free::Vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOT_TOKEN.into())
            .build()
            .map_err(|e| DataError::Invalid(format!("tokenizer: {e}")))?;
        let tk = |e: tokenizers::Error| DataError::Invalid(format!("tokenizer: {e}"));
        let normalizer = NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tk)?
            .into(),
            Strip::new(true, true).into(),
            Lowercase.into(),
        ]);
        let pre = PreSeq::new(vec![
            Split::new(
                SplitPattern::Regex(PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(tk)?
            .into(),
            ByteLevel::new(false, false, false).into(),
        ]);
        let post = TemplateProcessing::builder()
            .try_single(format!("{SOT_TOKEN} $A {EOT_TOKEN}").as_str())
            .map_err(|e| DataError::Invalid(format!("tokenizer: {e}")))?
            .special_tokens(vec![(SOT_TOKEN, SOT), (EOT_TOKEN, EOT)])
            .build()
            .map_err(|e| DataError::Invalid(format!("tokenizer: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(Some(normalizer)).map_err(tk)?;
        inner.with_pre_tokenizer(Some(pre));
        inner.with_post_processor(Some(post));
        inner
            .add_special_tokens([
                AddedToken::from(SOT_TOKEN, true).normalized(true),
                AddedToken::from(EOT_TOKEN, true).normalized(true),
            ])
            .map_err(tk)?;
        Ok(Self {
            inner,
            context_length,
        })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// `[SOT] … [EOT]`, at most `context_length` ids, EOT always last.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let enc = self
            .inner
            .encode(clean_text(text), true)
            .map_err(|e| DataError::Invalid(format!("tokenizer: cannot encode {text:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = EOT;
        }
        Ok(ids)
    }
}

/// The `tokenizers` vocabulary map type, named without depending on `ahash` directly.
mod ahash_free {
    pub type Vocab = tokenizers::models::bpe::Vocab;
}

/// Undo HTML entities once: `&amp; &lt; &gt; &quot; &apos; &nbsp;` and `&#N;` / `&#xH;`.
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let end = rest[1..].find(';').map(|e| e + 1).filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The subset of open_clip's text cleaning (ftfy + `html.unescape`) described in the
/// module docs; white space and case are left to the normaliser.
pub fn clean_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // ANSI escape sequences: ESC [ params letter.
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}' => {}
            '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}' => {}
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' => out.push('\''),
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' => out.push('"'),
            '\u{fb00}' => out.push_str("ff"),
            '\u{fb01}' => out.push_str("fi"),
            '\u{fb02}' => out.push_str("fl"),
            '\u{fb03}' => out.push_str("ffi"),
            '\u{fb04}' => out.push_str("ffl"),
            '\u{fb06}' => out.push_str("st"),
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xfee0).unwrap_or(c)),
            _ => out.push(c),
        }
    }
    unescape_html(&unescape_html(&out))
}
