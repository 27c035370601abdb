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

/// The most shards a list may expand to.
const MAX_SHARDS: usize = 10_000_000;

/// The largest shuffle buffer accepted.
pub const MAX_SHUFFLE_BUFFER: usize = 1_000_000;

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
        if self.shuffle_buffer > MAX_SHUFFLE_BUFFER {
            errs.push(format!(
                "data.shuffle_buffer must be at most {MAX_SHUFFLE_BUFFER}, got {}",
                self.shuffle_buffer
            ));
        }
        errs
    }
}

/// Expand brace notation (`{000..012}` numeric ranges, zero-padded as `braceexpand`
/// pads them, and `{a,b}` lists) in each `::`-separated part.
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
        if hi - lo > MAX_SHARDS as u64 {
            return Err(format!(
                "{{{body}}} in {pattern:?}: more than {MAX_SHARDS} shards"
            ));
        }
        // As `braceexpand`: with a leading zero on either bound, pad to the longer.
        let padded = |s: &str| s.len() > 1 && s.starts_with('0');
        let width = if padded(a) || padded(b) {
            a.len().max(b.len())
        } else {
            0
        };
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    for alt in alternatives {
        expand_one(&format!("{head}{alt}{tail}"), out)?;
        if out.len() > MAX_SHARDS {
            return Err(format!(
                "{pattern:?} expands to more than {MAX_SHARDS} shards"
            ));
        }
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

/// webdataset's metadata members: a first path component `__…__` (`__index__`,
/// `__meta__/x`), which its tar reader drops.
fn is_metadata(path: &str) -> bool {
    let first = path.split('/').next().unwrap_or(path);
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// One regular member of a tar: its path and where its bytes are.
#[derive(Clone, Debug)]
struct TarMember {
    path: String,
    offset: u64,
    size: u64,
}

/// The regular members of a tar stream, in order, and the error that ended the listing
/// early, if any. Contents are skipped by seeking. A member whose contents run past the
/// end of the stream (a shard cut mid-member, which `tar` reads as a normal end) ends
/// the listing with that error.
fn list_members<R: Read + Seek>(mut reader: R) -> (Vec<TarMember>, Option<String>) {
    let len = match reader
        .seek(SeekFrom::End(0))
        .and_then(|l| reader.seek(SeekFrom::Start(0)).map(|_| l))
    {
        Ok(l) => l,
        Err(e) => return (Vec::new(), Some(format!("cannot seek: {e}"))),
    };
    let (mut out, err) = list_entries(reader);
    if let Some(cut) = out
        .iter()
        .position(|m| m.offset.saturating_add(m.size) > len)
    {
        let m = &out[cut];
        let reason = format!(
            "the shard is truncated: member {} needs {} bytes at offset {}, the file has {len}",
            m.path, m.size, m.offset
        );
        out.truncate(cut);
        return (out, Some(reason));
    }
    (out, err)
}

fn list_entries<R: Read + Seek>(reader: R) -> (Vec<TarMember>, Option<String>) {
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
        if is_metadata(&m.path) {
            continue;
        }
        let Some((key, ext)) = key_and_ext(&m.path) else {
            continue;
        };
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

/// The bytes of member `m` of the shard at `path`.
pub fn read_member(path: &Path, m: &Member) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(m.offset))?;
    let mut buf = Vec::new();
    f.take(m.size).read_to_end(&mut buf)?;
    if buf.len() as u64 != m.size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("only {} bytes are there", buf.len()),
        ));
    }
    Ok(buf)
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
    /// Held-out shards: as [`Self::open`], but the count comes from `sizes.json` or the
    /// stats when they are there and from listing the shards otherwise (`num_samples` is
    /// the training shards').
    pub fn open_held_out(cfg: &WdsSourceConfig, spec: &str) -> Result<Self, DataError> {
        let mut src = Self::open(
            &WdsSourceConfig {
                num_samples: Some(1),
                ..cfg.clone()
            },
            spec,
        )?;
        src.len = match declared_count(&src.shards)? {
            Some(n) => n,
            None => {
                let mut n = 0;
                for (i, s) in src.shards.iter().enumerate() {
                    n += list_shard(s, i)?
                        .iter()
                        .filter(|r| matches!(r, SampleRef::Tar { .. }))
                        .count();
                }
                n
            }
        };
        Ok(src)
    }

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

    /// The samples of `shards`, in that order, one shard listed at a time.
    fn listed(&self, shards: Vec<usize>) -> RefIter {
        let paths = self.shards.clone();
        Box::new(shards.into_iter().flat_map(move |i| {
            let items: Vec<Result<SampleRef, DataError>> = match list_shard(&paths[i], i) {
                Ok(refs) => refs.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            items
        }))
    }

    fn read_member(&self, shard: usize, m: &Member) -> std::io::Result<Vec<u8>> {
        read_member(&self.shards[shard], m)
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
        let mut seen = std::collections::HashSet::new();
        for m in members {
            if !seen.insert(m.ext.as_str()) {
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

/// A sample count in JSON: a number, or a string of one (open_clip reads both).
fn json_count(v: Option<&serde_json::Value>) -> Option<u64> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn read_json(p: &Path) -> Result<serde_json::Value, DataError> {
    let text = std::fs::read(p).map_err(|source| DataError::Io {
        path: p.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| DataError::Format {
        path: p.to_path_buf(),
        line: Some(e.line()),
        msg: format!("not JSON: {e}"),
    })
}

/// Samples in `shards`: from `sizes.json` beside the first (open_clip), else every
/// shard's `<stem>_stats.json` `successes` (img2dataset); `None` when neither is there.
fn declared_count(shards: &[PathBuf]) -> Result<Option<usize>, DataError> {
    let dir = shards[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let name = |s: &Path| {
        s.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let stats = |s: &Path| {
        let stem = s
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        s.with_file_name(format!("{stem}_stats.json"))
    };
    let sizes = dir.join("sizes.json");
    // (file, how to find one shard's count in it, what is missing when it is not there)
    let per_shard: Vec<(PathBuf, String, String)> = if sizes.is_file() {
        let v = read_json(&sizes)?;
        shards
            .iter()
            .map(|s| {
                let n = json_count(v.get(name(s))).map(|n| n.to_string());
                (
                    sizes.clone(),
                    n.unwrap_or_default(),
                    format!("no sample count for {:?}", name(s)),
                )
            })
            .collect()
    } else if shards.iter().all(|s| stats(s).is_file()) {
        shards
            .iter()
            .map(|s| {
                let p = stats(s);
                let n = read_json(&p).map(|v| json_count(v.get("successes")));
                Ok((
                    p,
                    n?.map(|n| n.to_string()).unwrap_or_default(),
                    "no \"successes\" count (img2dataset's stats)".to_string(),
                ))
            })
            .collect::<Result<_, DataError>>()?
    } else {
        return Ok(None);
    };
    let mut total = 0usize;
    for (file, n, missing) in per_shard {
        let n: usize = n.parse().map_err(|_| DataError::Format {
            path: file.clone(),
            line: None,
            msg: missing,
        })?;
        total = total.checked_add(n).ok_or_else(|| DataError::Format {
            path: file,
            line: None,
            msg: "the sample counts add up to more than fits in a usize".into(),
        })?;
    }
    Ok(Some(total))
}

/// Samples in `shards` by [`declared_count`], or an error saying how to declare it.
fn count_samples(shards: &[PathBuf]) -> Result<usize, DataError> {
    declared_count(shards)?.ok_or_else(|| {
        let dir = shards[0].parent().map(Path::to_path_buf).unwrap_or_default();
        DataError::Invalid(format!(
            "cannot tell how many samples the {} shard(s) in {} hold: set data.num_samples, or put open_clip's sizes.json or img2dataset's <shard>_stats.json beside them",
            shards.len(),
            dir.display()
        ))
    })
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
        let mine: Vec<usize> = sharding.share(order.into_iter()).collect();
        if mine.is_empty() {
            return Err(DataError::Invalid(format!(
                "{} shard(s) cannot be split over {} ranks",
                self.shards.len(),
                sharding.world
            )));
        }
        Ok(self.listed(mine))
    }

    fn in_order(&self) -> Result<RefIter, DataError> {
        Ok(self.listed((0..self.shards.len()).collect()))
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
