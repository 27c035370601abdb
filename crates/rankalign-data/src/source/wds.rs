//! webdataset shards: tar files whose adjacent members sharing a key form a sample.
//!
//! As the `webdataset` package groups them: a member's key is its path up to the first
//! dot of its file name (directory included), the rest is its extension, lower-cased;
//! members without a dot or named `__…` are ignored. The image is the first of
//! `image_keys` (default `jpg;png;jpeg;webp`) present, the caption the `txt` member or a
//! field of the `json` member. Shard lists use brace notation, `a-{000..099}.tar`, and
//! `::` joins several. The sample count comes from `num_samples`, else a `sizes.json`
//! beside the shards (open_clip's), else img2dataset's `<shard>_stats.json` files.
//!
//! A pass lists shards in a seeded order, one shard's headers at a time (contents are
//! skipped by seeking), so memory stays flat whatever the shard count. Shards are
//! split between the ranks of a data-parallel group after that shuffle.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    CorruptPolicy, ImageTransform, Loaded, Member, Pair, PairSource, RefIter, SampleRef, Sharding,
    TransformConfig,
};
use crate::image::SourceImage;
use crate::{DataError, mix_seed};

/// `[data] source = "webdataset"` (img2dataset's `--output_format webdataset` too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WdsSourceConfig {
    pub image_size: usize,
    /// Brace-expanded shard paths, `::`-joined: `data/cc3m/{00000..00331}.tar`.
    pub shards: String,
    /// Held-out shards in the same layout, evaluated at the end (retrieval).
    #[serde(default)]
    pub test_shards: Option<String>,
    /// Samples in one pass; default: `sizes.json`, else img2dataset's stats.
    #[serde(default)]
    pub num_samples: Option<usize>,
    #[serde(default = "default_image_keys")]
    pub image_keys: String,
    #[serde(default = "default_text_key")]
    pub text_key: String,
    /// Take the caption from this field of the `json` member instead of `text_key`.
    #[serde(default)]
    pub json_text_key: Option<String>,
    /// Samples held in the seeded shuffle buffer (open_clip: 5,000).
    #[serde(default = "default_buffer")]
    pub shuffle_buffer: usize,
    #[serde(default)]
    pub transform: TransformConfig,
    #[serde(default)]
    pub corrupt: CorruptPolicy,
}

fn default_image_keys() -> String {
    "jpg;png;jpeg;webp".into()
}
fn default_text_key() -> String {
    "txt".into()
}
fn default_buffer() -> usize {
    2000
}

/// Members larger than this are skipped rather than read into memory.
const MAX_MEMBER_BYTES: u64 = 256 << 20;

impl WdsSourceConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (key, spec) in [
            ("shards", Some(&self.shards)),
            ("test_shards", self.test_shards.as_ref()),
        ] {
            if let Some(spec) = spec
                && let Err(e) = expand_shards(spec)
            {
                errs.push(format!("data.{key}: {e}"));
            }
        }
        if self.image_keys.split(';').all(|k| k.trim().is_empty()) {
            errs.push("data.image_keys must name at least one extension".into());
        }
        if self.text_key.trim().is_empty() {
            errs.push("data.text_key must not be empty".into());
        }
        if self.num_samples == Some(0) {
            errs.push("data.num_samples must be at least 1".into());
        }
        errs
    }
}

/// Expand brace notation (`{000..012}` numeric ranges, zero-padded to the width of the
/// first bound, and `{a,b}` lists) in each `::`-separated part.
pub fn expand_shards(spec: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in spec.split("::").map(str::trim).filter(|p| !p.is_empty()) {
        expand_one(part, &mut out)?;
    }
    if out.is_empty() {
        return Err(format!("no shard in {spec:?}"));
    }
    Ok(out)
}

fn expand_one(pattern: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(format!("unmatched '}}' in {pattern:?}"));
        }
        out.push(pattern.to_string());
        return Ok(());
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| format!("unmatched '{{' in {pattern:?}"))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    if body.contains('{') {
        return Err(format!("nested braces are not supported in {pattern:?}"));
    }
    let alternatives: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("{{{body}}} in {pattern:?}: {s:?} is not a number"))
        };
        let (lo, hi) = (parse(a)?, parse(b)?);
        if lo > hi {
            return Err(format!("{{{body}}} in {pattern:?}: the range is empty"));
        }
        if hi - lo > 10_000_000 {
            return Err(format!(
                "{{{body}}} in {pattern:?}: more than 10 million shards"
            ));
        }
        let width = a.len();
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    for alt in alternatives {
        expand_one(&format!("{head}{alt}{tail}"), out)?;
    }
    Ok(())
}

/// webdataset's split of a member path into key and extension: the key runs to the
/// first dot of the file name (directory included). `None` for names without a dot.
pub fn key_and_ext(path: &str) -> Option<(&str, &str)> {
    let name_at = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[name_at..].find('.')? + name_at;
    if dot == name_at {
        return None;
    }
    Some((&path[..dot], &path[dot + 1..]))
}

/// One regular member of a tar: its path and where its bytes are.
#[derive(Clone, Debug)]
struct TarMember {
    path: String,
    offset: u64,
    size: u64,
}

/// The regular members of a tar stream, in order, and the error that ended the listing
/// early, if any. Contents are skipped by seeking.
fn list_members<R: Read + Seek>(reader: R) -> (Vec<TarMember>, Option<String>) {
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    let entries = match archive.entries_with_seek() {
        Ok(e) => e,
        Err(e) => return (out, Some(format!("not a tar file: {e}"))),
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return (out, Some(format!("the tar ends badly: {e}"))),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => return (out, Some(format!("a member name is unreadable: {e}"))),
        };
        out.push(TarMember {
            path,
            offset: entry.raw_file_position(),
            size: entry.size(),
        });
    }
    (out, None)
}

/// Group members into samples by adjacent keys.
fn group(members: Vec<TarMember>, shard: usize) -> Vec<SampleRef> {
    let mut out: Vec<SampleRef> = Vec::new();
    for m in members {
        let Some((key, ext)) = key_and_ext(&m.path) else {
            continue;
        };
        let name = key.rsplit('/').next().unwrap_or(key);
        if name.starts_with("__") {
            continue;
        }
        let member = Member {
            ext: ext.to_ascii_lowercase(),
            offset: m.offset,
            size: m.size,
        };
        match out.last_mut() {
            Some(SampleRef::Tar {
                key: k, members, ..
            }) if k == key => members.push(member),
            _ => out.push(SampleRef::Tar {
                shard,
                key: key.to_string(),
                members: vec![member],
            }),
        }
    }
    out
}

/// List the samples of one shard file: the groups, then a [`SampleRef::Broken`] if the
/// tar ended badly.
pub fn list_shard(path: &Path, shard: usize) -> Result<Vec<SampleRef>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(list_reader(std::io::BufReader::new(file), shard))
}

/// [`list_shard`] over any seekable bytes.
pub fn list_reader<R: Read + Seek>(reader: R, shard: usize) -> Vec<SampleRef> {
    let (members, err) = list_members(reader);
    let mut refs = group(members, shard);
    if let Some(reason) = err {
        refs.push(SampleRef::Broken { shard, reason });
    }
    refs
}

/// A set of webdataset shards.
#[derive(Clone, Debug)]
pub struct WdsSource {
    shards: Arc<Vec<PathBuf>>,
    len: usize,
    image_keys: Vec<String>,
    text_key: String,
    json_text_key: Option<String>,
    buffer: usize,
    transform: ImageTransform,
    max_pixels: u64,
}

impl WdsSource {
    /// Expand `spec`, check that every shard exists, and find the sample count.
    pub fn open(cfg: &WdsSourceConfig, spec: &str) -> Result<Self, DataError> {
        let names = expand_shards(spec).map_err(DataError::Invalid)?;
        let shards: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
        for s in &shards {
            if !s.is_file() {
                return Err(DataError::Io {
                    path: s.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("shard listed by {spec:?} does not exist"),
                    ),
                });
            }
        }
        let len = match cfg.num_samples {
            Some(n) => n,
            None => count_samples(&shards)?,
        };
        Ok(Self {
            shards: Arc::new(shards),
            len,
            image_keys: cfg
                .image_keys
                .split(';')
                .map(|k| k.trim().to_ascii_lowercase())
                .filter(|k| !k.is_empty())
                .collect(),
            text_key: cfg.text_key.to_ascii_lowercase(),
            json_text_key: cfg.json_text_key.clone(),
            buffer: cfg.shuffle_buffer,
            transform: cfg.transform.at_size(cfg.image_size),
            max_pixels: cfg.corrupt.max_image_pixels,
        })
    }

    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    fn read_member(&self, shard: usize, m: &Member) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&self.shards[shard])?;
        f.seek(SeekFrom::Start(m.offset))?;
        let mut buf = vec![0u8; m.size as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn sample(&self, shard: usize, key: &str, members: &[Member]) -> Result<Loaded, DataError> {
        let shard_path = &self.shards[shard];
        let name = format!("{}:{key}", shard_path.display());
        let skip = |reason: String| {
            Ok(Loaded::Skip {
                key: name.clone(),
                reason,
            })
        };
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|o| o.ext == m.ext) {
                return skip(format!("two members end in .{}", m.ext));
            }
        }
        let find = |ext: &str| members.iter().find(|m| m.ext == ext);
        let Some(img) = self.image_keys.iter().find_map(|k| find(k)) else {
            return skip(format!(
                "no image member (looked for .{})",
                self.image_keys.join(", .")
            ));
        };
        let (cap_ext, field) = match &self.json_text_key {
            Some(f) => ("json", Some(f.as_str())),
            None => (self.text_key.as_str(), None),
        };
        let Some(cap) = find(cap_ext) else {
            return skip(format!("no caption member .{cap_ext}"));
        };
        for m in [img, cap] {
            if m.size > MAX_MEMBER_BYTES {
                return skip(format!(
                    ".{} is {} bytes, above {MAX_MEMBER_BYTES}",
                    m.ext, m.size
                ));
            }
        }
        let read = |m: &Member| {
            self.read_member(shard, m).map_err(|e| {
                format!(
                    ".{}: cannot read {} bytes at offset {} ({e}); the shard is truncated?",
                    m.ext, m.size, m.offset
                )
            })
        };
        let cap_bytes = match read(cap) {
            Ok(b) => b,
            Err(r) => return skip(r),
        };
        let caption = match field {
            None => super::caption_from_bytes(&cap_bytes),
            Some(f) => json_caption(&cap_bytes, f),
        };
        let caption = match caption {
            Ok(c) => c,
            Err(r) => return skip(r),
        };
        let bytes = match read(img) {
            Ok(b) => b,
            Err(r) => return skip(r),
        };
        match SourceImage::decode(&bytes, Some(self.max_pixels)) {
            Ok(image) => Ok(Loaded::Pair(Pair {
                key: name,
                image,
                caption,
            })),
            Err(msg) => skip(format!(".{}: {msg}", img.ext)),
        }
    }
}

/// The caption in field `field` of a JSON object.
pub fn json_caption(bytes: &[u8], field: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the .json member is not JSON: {e}"))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) => super::caption_from_bytes(s.as_bytes()),
        Some(other) => Err(format!(
            "the .json field {field:?} is not a string: {other}"
        )),
        None => Err(format!("the .json member has no field {field:?}")),
    }
}

/// Samples in `shards` from `sizes.json` beside the first, else `<stem>_stats.json`.
fn count_samples(shards: &[PathBuf]) -> Result<usize, DataError> {
    let dir = shards[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let sizes = dir.join("sizes.json");
    let read_json = |p: &Path| -> Result<serde_json::Value, DataError> {
        let text = std::fs::read(p).map_err(|source| DataError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| DataError::Format {
            path: p.to_path_buf(),
            line: Some(e.line()),
            msg: format!("not JSON: {e}"),
        })
    };
    let file_name = |s: &Path| {
        s.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if sizes.is_file() {
        let v = read_json(&sizes)?;
        let mut total = 0usize;
        for s in shards {
            let n = v
                .get(file_name(s))
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| DataError::Format {
                    path: sizes.clone(),
                    line: None,
                    msg: format!("no sample count for {:?}", file_name(s)),
                })?;
            total += n as usize;
        }
        return Ok(total);
    }
    let stats = |s: &Path| {
        let stem = s
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        s.with_file_name(format!("{stem}_stats.json"))
    };
    if shards.iter().all(|s| stats(s).is_file()) {
        let mut total = 0usize;
        for s in shards {
            let p = stats(s);
            let v = read_json(&p)?;
            let n = v
                .get("successes")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| DataError::Format {
                    path: p.clone(),
                    line: None,
                    msg: "no \"successes\" count (img2dataset's stats)".into(),
                })?;
            total += n as usize;
        }
        return Ok(total);
    }
    Err(DataError::Invalid(format!(
        "cannot tell how many samples the {} shard(s) in {} hold: set data.num_samples, or put open_clip's sizes.json or img2dataset's <shard>_stats.json beside them",
        shards.len(),
        dir.display()
    )))
}

impl PairSource for WdsSource {
    fn describe(&self) -> String {
        format!(
            "webdataset: {} shard(s) from {}, {} samples",
            self.shards.len(),
            self.shards[0].display(),
            self.len
        )
    }

    fn len(&self) -> usize {
        self.len
    }

    fn pass(&self, seed: u64, pass: u64, sharding: Sharding) -> Result<RefIter, DataError> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, 0x5A4D, pass]));
        order.shuffle(&mut rng);
        let mine: Vec<usize> = order
            .into_iter()
            .skip(sharding.rank)
            .step_by(sharding.world.max(1))
            .collect();
        if mine.is_empty() {
            return Err(DataError::Invalid(format!(
                "{} shard(s) cannot be split over {} ranks",
                self.shards.len(),
                sharding.world
            )));
        }
        let shards = self.shards.clone();
        Ok(Box::new(mine.into_iter().flat_map(move |i| {
            let items: Vec<Result<SampleRef, DataError>> = match list_shard(&shards[i], i) {
                Ok(refs) => refs.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            items
        })))
    }

    fn load(&self, r: &SampleRef) -> Result<Loaded, DataError> {
        match r {
            SampleRef::Tar {
                shard,
                key,
                members,
            } if *shard < self.shards.len() => self.sample(*shard, key, members),
            SampleRef::Broken { shard, reason } if *shard < self.shards.len() => Ok(Loaded::Skip {
                key: format!("{} (rest of the shard)", self.shards[*shard].display()),
                reason: reason.clone(),
            }),
            other => Err(DataError::Invalid(format!(
                "these shards have no sample {other:?}"
            ))),
        }
    }

    fn shuffle_buffer(&self) -> usize {
        self.buffer
    }

    fn transform(&self) -> Option<&ImageTransform> {
        Some(&self.transform)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_webdataset() {
        assert_eq!(
            expand_shards("a/{008..011}.tar").unwrap(),
            ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
        );
        assert_eq!(
            expand_shards("x-{a,b}.tar :: y.tar").unwrap(),
            ["x-a.tar", "x-b.tar", "y.tar"]
        );
        assert_eq!(
            expand_shards("{0..1}-{0..1}").unwrap(),
            ["0-0", "0-1", "1-0", "1-1"]
        );
        for bad in ["a{1..", "a}", "{2..1}", "{a..3}", "", "::"] {
            assert!(expand_shards(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_run_to_the_first_dot_of_the_file_name() {
        assert_eq!(key_and_ext("d.x/abc.seg.png"), Some(("d.x/abc", "seg.png")));
        assert_eq!(key_and_ext("abc.jpg"), Some(("abc", "jpg")));
        assert_eq!(key_and_ext("dir/noext"), None);
        assert_eq!(key_and_ext(".hidden"), None);
    }
}
