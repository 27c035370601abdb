//! Evaluation datasets, read the way the field's tools read them.
//!
//! - [`ClassificationSet`]: labelled images for zero-shot classification and the linear
//!   probe, from an ImageFolder directory (torchvision's rules), CLIP_benchmark's
//!   webdataset layout (`KEY.cls`, `classnames.txt`,
//!   `zeroshot_classification_templates.txt`) or a CSV of image and label;
//! - [`RetrievalSet`]: images with one or more captions each, from a CSV of
//!   `image,caption` lines (Flickr30K/COCO Karpathy test files), COCO's caption JSON (or
//!   the list-of-records form) or CLIP_benchmark's retrieval shards (`KEY.txt` with one
//!   caption per line);
//! - [`meta`]: class names and prompt templates, from files or built in (OpenAI's
//!   ImageNet names and 80 templates, CIFAR-10/100 and their 18).
//!
//! Images are referenced, not held: [`ImageRef::load`] reads one when it is embedded.
//! An evaluation set is expected to be clean, so a file that cannot be read is an error
//! naming it, never a silent skip.

pub mod classification;
pub mod meta;
pub mod retrieval;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use classification::{ClassificationData, ClassificationSet};
pub use meta::{ClassMeta, Templates, builtin_classnames, builtin_templates};
pub use retrieval::{RetrievalData, RetrievalSet};

use crate::source::Member;
use crate::{DataError, SourceImage};

/// Where an evaluation image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    File(PathBuf),
    /// A member of a tar shard.
    Tar {
        shard: Arc<PathBuf>,
        key: String,
        member: Member,
    },
}

impl ImageRef {
    /// The image's name in messages: its path, or `shard:key`.
    pub fn name(&self) -> String {
        match self {
            ImageRef::File(p) => p.display().to_string(),
            ImageRef::Tar { shard, key, .. } => format!("{}:{key}", shard.display()),
        }
    }

    /// Read and decode the image (PNG, JPEG, WebP), refusing headers above
    /// `max_pixels` pixels.
    pub fn load(&self, max_pixels: u64) -> Result<SourceImage, DataError> {
        let bytes = match self {
            ImageRef::File(p) => std::fs::read(p).map_err(io(p))?,
            ImageRef::Tar { shard, member, .. } => {
                crate::source::wds::read_member(shard, member).map_err(io(shard.as_path()))?
            }
        };
        SourceImage::decode(&bytes, Some(max_pixels)).map_err(|msg| self.error(msg))
    }

    fn error(&self, msg: String) -> DataError {
        match self {
            ImageRef::File(p) => DataError::Format {
                path: p.clone(),
                line: None,
                msg,
            },
            ImageRef::Tar { shard, key, member } => DataError::Format {
                path: shard.to_path_buf(),
                line: None,
                msg: format!("{key}.{}: {msg}", member.ext),
            },
        }
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn format_err(path: &Path, line: Option<usize>, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// The name a dataset gets in results when none is given: the last path component that
/// is not a split name (`data/digits/test` → `digits`).
pub fn default_name(path: &Path) -> String {
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
    };
    let is_split = |s: &str| matches!(s, "test" | "train" | "val" | "validation");
    match stem(path) {
        Some(s) if is_split(&s) => path
            .parent()
            .and_then(stem)
            .unwrap_or_else(|| "dataset".into()),
        Some(s) => s,
        None => "dataset".into(),
    }
}

/// A CLIP_benchmark webdataset split: `root/split/nshards.txt` (N) and
/// `root/split/{0..N-1}.tar`; without `nshards.txt`, every `*.tar` of the folder in name
/// order.
pub(crate) fn wds_split_shards(root: &Path, split: &str) -> Result<Vec<PathBuf>, DataError> {
    let dir = root.join(split);
    if !dir.is_dir() {
        return Err(format_err(
            &dir,
            None,
            format!(
                "no such folder: CLIP_benchmark's webdataset layout has {split}/nshards.txt and {split}/0.tar … under the dataset root"
            ),
        ));
    }
    let n_file = dir.join("nshards.txt");
    let shards: Vec<PathBuf> = if n_file.exists() {
        let text = std::fs::read_to_string(&n_file).map_err(io(&n_file))?;
        let n: usize = text.trim().parse().map_err(|_| {
            format_err(
                &n_file,
                Some(1),
                format!("expected a shard count, found {:?}", text.trim()),
            )
        })?;
        (0..n).map(|i| dir.join(format!("{i}.tar"))).collect()
    } else {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .collect();
        found.sort();
        found
    };
    if shards.is_empty() {
        return Err(format_err(&dir, None, "no .tar shards in this folder"));
    }
    if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
        return Err(format_err(
            missing,
            None,
            "missing: nshards.txt lists this shard",
        ));
    }
    Ok(shards)
}

/// A sample of a shard: the shard, the key, the members.
pub(crate) type ShardSample = (Arc<PathBuf>, String, Vec<Member>);

/// The samples of CLIP_benchmark shards, each with its members' bytes ranges; a shard
/// that ends badly is an error naming it.
pub(crate) fn wds_samples(shards: &[PathBuf]) -> Result<Vec<ShardSample>, DataError> {
    let mut out = Vec::new();
    for (i, path) in shards.iter().enumerate() {
        let shared = Arc::new(path.clone());
        for r in crate::source::wds::list_shard(path, i)? {
            match r {
                crate::source::SampleRef::Tar { key, members, .. } => {
                    out.push((shared.clone(), key, members));
                }
                crate::source::SampleRef::Broken { reason, .. } => {
                    return Err(format_err(path, None, reason));
                }
                crate::source::SampleRef::Index(_) => {}
            }
        }
    }
    Ok(out)
}

/// Image members CLIP_benchmark's loader takes, in its order of preference.
pub(crate) const WDS_IMAGE_EXTS: [&str; 4] = ["webp", "png", "jpg", "jpeg"];

/// The image member of a CLIP_benchmark sample, or an error naming it.
pub(crate) fn wds_image(
    shard: &Arc<PathBuf>,
    key: &str,
    members: &[Member],
) -> Result<ImageRef, DataError> {
    let member = WDS_IMAGE_EXTS
        .iter()
        .find_map(|e| members.iter().find(|m| m.ext == *e))
        .ok_or_else(|| {
            format_err(
                shard,
                None,
                format!(
                    "sample {key} has no image member (looked for .{})",
                    WDS_IMAGE_EXTS.join(", .")
                ),
            )
        })?;
    Ok(ImageRef::Tar {
        shard: shard.clone(),
        key: key.to_string(),
        member: member.clone(),
    })
}

/// The bytes of member `ext` of a sample, as UTF-8 text.
pub(crate) fn wds_text(
    shard: &Arc<PathBuf>,
    key: &str,
    members: &[Member],
    ext: &str,
) -> Result<String, DataError> {
    let m = members
        .iter()
        .find(|m| m.ext == ext)
        .ok_or_else(|| format_err(shard, None, format!("sample {key} has no .{ext} member")))?;
    let bytes = crate::source::wds::read_member(shard, m).map_err(io(shard.as_path()))?;
    String::from_utf8(bytes)
        .map_err(|_| format_err(shard, None, format!("{key}.{ext} is not UTF-8 text")))
}

/// One-column text lines of a file (`classnames.txt`, templates): trailing whitespace
/// and a final empty line removed; an empty line inside is an error.
pub fn read_lines(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_lines(&text, path)
}

pub(crate) fn parse_lines(text: &str, path: &Path) -> Result<Vec<String>, DataError> {
    let text = text.trim_start_matches('\u{feff}');
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            if text.lines().skip(i).all(|l| l.trim().is_empty()) {
                break;
            }
            return Err(format_err(
                path,
                Some(i + 1),
                "empty line (one entry per line is expected)",
            ));
        }
        out.push(line.to_string());
    }
    if out.is_empty() {
        return Err(format_err(path, None, "the file lists nothing"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_skip_split_folders() {
        assert_eq!(default_name(Path::new("data/digits/test")), "digits");
        assert_eq!(default_name(Path::new("data/flickr.csv")), "flickr");
        assert_eq!(default_name(Path::new("test")), "dataset");
    }

    #[test]
    fn lines_refuse_holes_but_not_a_trailing_newline() {
        let p = Path::new("c.txt");
        assert_eq!(parse_lines("a\nb  \n\n", p).unwrap(), ["a", "b"]);
        assert!(
            parse_lines("a\n\nb\n", p)
                .unwrap_err()
                .to_string()
                .contains("c.txt:2")
        );
        assert!(parse_lines("\n", p).is_err());
    }
}
