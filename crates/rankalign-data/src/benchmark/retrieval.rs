//! Images with several captions each, for retrieval.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::classification::{default_image_column, default_separator, read_two_columns};
use super::{ImageRef, format_err, io, wds_image, wds_samples, wds_split_shards, wds_text};
use crate::DataError;

/// Where a retrieval set is, tagged by `format`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum RetrievalData {
    /// `image,caption` lines; the lines of one image (in any order) are its captions.
    Csv(CaptionCsvConfig),
    /// COCO's caption JSON (`images` + `annotations`), or a list of
    /// `{"image": …, "caption": "…" | ["…", …]}` records (the Karpathy test files).
    Coco(CocoConfig),
    /// CLIP_benchmark's retrieval shards: `KEY.txt` holds the captions, one per line.
    Wds(super::classification::WdsConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionCsvConfig {
    pub path: PathBuf,
    #[serde(default = "default_image_column")]
    pub image_column: String,
    #[serde(default = "default_caption_column")]
    pub caption_column: String,
    #[serde(default = "default_separator")]
    pub separator: char,
}

fn default_caption_column() -> String {
    "caption".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocoConfig {
    /// The JSON file.
    pub path: PathBuf,
    /// The folder image names are relative to (default: the JSON's folder).
    #[serde(default)]
    pub images: Option<PathBuf>,
}

impl RetrievalData {
    pub fn path(&self) -> &Path {
        match self {
            RetrievalData::Csv(c) => &c.path,
            RetrievalData::Coco(c) => &c.path,
            RetrievalData::Wds(c) => &c.path,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RetrievalData::Csv(c) => format!("csv:{}", c.path.display()),
            RetrievalData::Coco(c) => format!("coco:{}", c.path.display()),
            RetrievalData::Wds(c) => format!("wds:{}:{}", c.path.display(), c.split),
        }
    }

    /// Parse `FORMAT:PATH` (`csv:FILE`, `coco:FILE`, `wds:ROOT`).
    pub fn parse_spec(spec: &str, split: &str) -> Result<Self, String> {
        let (format, path) = spec.split_once(':').ok_or_else(|| {
            format!("{spec:?}: expected FORMAT:PATH with FORMAT csv, coco or wds")
        })?;
        let path = PathBuf::from(path);
        Ok(match format {
            "csv" => RetrievalData::Csv(CaptionCsvConfig {
                path,
                image_column: default_image_column(),
                caption_column: default_caption_column(),
                separator: default_separator(),
            }),
            "coco" => RetrievalData::Coco(CocoConfig { path, images: None }),
            "wds" => RetrievalData::Wds(super::classification::WdsConfig {
                path,
                split: split.to_string(),
            }),
            other => {
                return Err(format!(
                    "{spec:?}: unknown format {other:?} (csv, coco or wds)"
                ));
            }
        })
    }

    pub fn open(&self) -> Result<RetrievalSet, DataError> {
        match self {
            RetrievalData::Csv(c) => caption_csv(c),
            RetrievalData::Coco(c) => coco(c),
            RetrievalData::Wds(c) => clip_benchmark_wds(&c.path, &c.split),
        }
    }
}

/// Images and their captions (at least one each), images in first-listed order.
#[derive(Clone, Debug)]
pub struct RetrievalSet {
    pub images: Vec<ImageRef>,
    pub captions: Vec<Vec<String>>,
}

impl RetrievalSet {
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Every caption, flattened, with the index of its image.
    pub fn flat_captions(&self) -> (Vec<String>, Vec<usize>) {
        let mut texts = Vec::new();
        let mut owner = Vec::new();
        for (i, caps) in self.captions.iter().enumerate() {
            for c in caps {
                texts.push(c.clone());
                owner.push(i);
            }
        }
        (texts, owner)
    }
}

/// Group `(image, caption)` rows by image in first-appearance order.
fn group(rows: impl IntoIterator<Item = (PathBuf, String)>) -> RetrievalSet {
    let mut index: HashMap<PathBuf, usize> = HashMap::new();
    let mut images = Vec::new();
    let mut captions: Vec<Vec<String>> = Vec::new();
    for (img, cap) in rows {
        let i = *index.entry(img.clone()).or_insert_with(|| {
            images.push(ImageRef::File(img));
            captions.push(Vec::new());
            images.len() - 1
        });
        captions[i].push(cap);
    }
    RetrievalSet { images, captions }
}

fn check_images(set: &RetrievalSet, list: &Path) -> Result<(), DataError> {
    let missing: Vec<String> = set
        .images
        .iter()
        .filter(|r| matches!(r, ImageRef::File(p) if !p.is_file()))
        .map(ImageRef::name)
        .collect();
    if let Some(first) = missing.first() {
        return Err(format_err(
            list,
            None,
            format!(
                "{} listed image(s) do not exist, the first {first}",
                missing.len()
            ),
        ));
    }
    if set.is_empty() {
        return Err(format_err(list, None, "the list has no image"));
    }
    Ok(())
}

/// `image,caption` lines, paths relative to the file. An empty caption is an error
/// naming its line.
pub fn caption_csv(cfg: &CaptionCsvConfig) -> Result<RetrievalSet, DataError> {
    let path = &cfg.path;
    let base = path.parent().unwrap_or(Path::new("."));
    let rows = read_two_columns(path, cfg.separator, &cfg.image_column, &cfg.caption_column)?;
    let mut out = Vec::with_capacity(rows.len());
    for (line, image, caption) in rows {
        if caption.trim().is_empty() {
            return Err(format_err(path, Some(line), "the caption is empty"));
        }
        out.push((base.join(image), caption));
    }
    let set = group(out);
    check_images(&set, path)?;
    Ok(set)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CocoFile {
    Coco {
        images: Vec<CocoImage>,
        annotations: Vec<CocoAnnotation>,
    },
    Records(Vec<CocoRecord>),
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: u64,
    caption: String,
}

#[derive(Deserialize)]
struct CocoRecord {
    image: String,
    caption: OneOrMany,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// COCO's caption annotations, or the list-of-records form. Images keep the JSON's
/// order; an image without a caption is an error, as is a caption naming no image.
pub fn coco(cfg: &CocoConfig) -> Result<RetrievalSet, DataError> {
    let path = &cfg.path;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let base = cfg
        .images
        .clone()
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
    let file: CocoFile = serde_json::from_str(&text).map_err(|e| {
        format_err(
            path,
            Some(e.line()),
            format!("expected COCO captions ({{\"images\": […], \"annotations\": […]}}) or a list of {{\"image\", \"caption\"}} records: {e}"),
        )
    })?;
    let set = match file {
        CocoFile::Coco {
            images,
            annotations,
        } => {
            let mut order: HashMap<u64, usize> = HashMap::new();
            let mut refs = Vec::new();
            for img in &images {
                if order.insert(img.id, refs.len()).is_some() {
                    return Err(format_err(
                        path,
                        None,
                        format!("image id {} is listed twice", img.id),
                    ));
                }
                refs.push(ImageRef::File(base.join(&img.file_name)));
            }
            let mut captions = vec![Vec::new(); refs.len()];
            for a in annotations {
                let i = *order.get(&a.image_id).ok_or_else(|| {
                    format_err(
                        path,
                        None,
                        format!(
                            "a caption names image id {}, which `images` does not list",
                            a.image_id
                        ),
                    )
                })?;
                captions[i].push(a.caption);
            }
            if let Some(i) = captions.iter().position(Vec::is_empty) {
                return Err(format_err(
                    path,
                    None,
                    format!(
                        "image id {} ({}) has no caption",
                        images[i].id, images[i].file_name
                    ),
                ));
            }
            RetrievalSet {
                images: refs,
                captions,
            }
        }
        CocoFile::Records(records) => {
            let mut rows = Vec::new();
            for r in records {
                let caps = match r.caption {
                    OneOrMany::One(c) => vec![c],
                    OneOrMany::Many(c) => c,
                };
                if caps.is_empty() {
                    return Err(format_err(
                        path,
                        None,
                        format!("image {} has an empty caption list", r.image),
                    ));
                }
                for c in caps {
                    rows.push((base.join(&r.image), c));
                }
            }
            group(rows)
        }
    };
    check_images(&set, path)?;
    Ok(set)
}

/// CLIP_benchmark's retrieval shards: each sample's `.txt` holds its captions, one per
/// line (`str.splitlines`); a `.txt` with no caption is an error naming the sample.
pub fn clip_benchmark_wds(root: &Path, split: &str) -> Result<RetrievalSet, DataError> {
    let shards = wds_split_shards(root, split)?;
    let mut images = Vec::new();
    let mut captions = Vec::new();
    for (shard, key, members) in wds_samples(&shards)? {
        let text = wds_text(&shard, &key, &members, "txt")?;
        let caps: Vec<String> = text
            .lines()
            .map(str::to_string)
            .filter(|l| !l.trim().is_empty())
            .collect();
        if caps.is_empty() {
            return Err(format_err(
                &shard,
                None,
                format!("{key}.txt holds no caption"),
            ));
        }
        images.push(wds_image(&shard, &key, &members)?);
        captions.push(caps);
    }
    if images.is_empty() {
        return Err(format_err(
            &root.join(split),
            None,
            "the shards hold no sample",
        ));
    }
    Ok(RetrievalSet { images, captions })
}
