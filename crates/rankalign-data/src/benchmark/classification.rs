//! Labelled image sets: ImageFolder, CLIP_benchmark's webdataset layout, a CSV.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    ImageRef, Templates, format_err, io, parse_lines, wds_image, wds_samples, wds_split_shards,
    wds_text,
};
use crate::DataError;

/// The file extensions torchvision's `ImageFolder` takes (compared lower-cased).
/// PNG, JPEG and WebP decode here; a `.bmp`, `.ppm`, `.pgm` or `.tif` is listed as
/// torchvision lists it and is an error naming the file when it is read.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// Where a labelled set is, tagged by `format`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum ClassificationData {
    /// `path/<class>/**/<image>`: classes are the sorted folder names.
    ImageFolder(FolderConfig),
    /// CLIP_benchmark's `wds_*` layout: `path/<split>/{0..N-1}.tar` with `KEY.cls`.
    Wds(WdsConfig),
    /// A CSV with an image column (paths relative to the file) and a label column
    /// (a class index, or a class name from the class list).
    Csv(LabelCsvConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WdsConfig {
    /// The dataset root (holding `classnames.txt` and the split folders).
    pub path: PathBuf,
    #[serde(default = "default_split")]
    pub split: String,
}

fn default_split() -> String {
    "test".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelCsvConfig {
    pub path: PathBuf,
    #[serde(default = "default_image_column")]
    pub image_column: String,
    #[serde(default = "default_label_column")]
    pub label_column: String,
    #[serde(default = "default_separator")]
    pub separator: char,
}

pub(crate) fn default_image_column() -> String {
    "image".into()
}
fn default_label_column() -> String {
    "label".into()
}
pub(crate) fn default_separator() -> char {
    ','
}

impl ClassificationData {
    /// The file or folder read.
    pub fn path(&self) -> &Path {
        match self {
            ClassificationData::ImageFolder(c) => &c.path,
            ClassificationData::Wds(c) => &c.path,
            ClassificationData::Csv(c) => &c.path,
        }
    }

    /// A short form for messages and cache keys (`imagefolder:data/x/test`).
    pub fn describe(&self) -> String {
        match self {
            ClassificationData::ImageFolder(c) => format!("imagefolder:{}", c.path.display()),
            ClassificationData::Wds(c) => format!("wds:{}:{}", c.path.display(), c.split),
            ClassificationData::Csv(c) => format!("csv:{}", c.path.display()),
        }
    }

    /// Parse `FORMAT:PATH` (`imagefolder:DIR`, `wds:ROOT[@split]`, `csv:FILE`), the
    /// command line's form.
    pub fn parse_spec(spec: &str, split: &str) -> Result<Self, String> {
        let (format, path) = spec.split_once(':').ok_or_else(|| {
            format!("{spec:?}: expected FORMAT:PATH with FORMAT imagefolder, wds or csv")
        })?;
        let path = PathBuf::from(path);
        Ok(match format {
            "imagefolder" => ClassificationData::ImageFolder(FolderConfig { path }),
            "wds" => ClassificationData::Wds(WdsConfig {
                path,
                split: split.to_string(),
            }),
            "csv" => ClassificationData::Csv(LabelCsvConfig {
                path,
                image_column: default_image_column(),
                label_column: default_label_column(),
                separator: default_separator(),
            }),
            other => {
                return Err(format!(
                    "{spec:?}: unknown format {other:?} (imagefolder, wds or csv)"
                ));
            }
        })
    }

    /// Read the listing. `classnames` is the class list a CSV's names resolve against.
    pub fn open(&self, classnames: Option<&[String]>) -> Result<ClassificationSet, DataError> {
        match self {
            ClassificationData::ImageFolder(c) => image_folder(&c.path),
            ClassificationData::Wds(c) => clip_benchmark_wds(&c.path, &c.split),
            ClassificationData::Csv(c) => label_csv(c, classnames),
        }
    }
}

/// Labelled images, with whatever class names and templates the files carry.
#[derive(Clone, Debug)]
pub struct ClassificationSet {
    pub images: Vec<ImageRef>,
    pub labels: Vec<usize>,
    /// Names the files give (ImageFolder's folders, `classnames.txt`).
    pub classnames: Option<Vec<String>>,
    /// Templates the files give (`zeroshot_classification_templates.txt`).
    pub templates: Option<Templates>,
    /// Classes the labels index (the largest label + 1 when the files name none).
    pub num_classes: usize,
}

impl ClassificationSet {
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

fn lower_ext_ok(name: &str) -> bool {
    let lower = name.to_lowercase();
    IMG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// torchvision's `ImageFolder`: the class folders are the sorted names of the root's
/// sub-folders; each is walked recursively (folders sorted by path, files by name, links
/// followed) keeping files with an [`IMG_EXTENSIONS`] extension. A class folder with no
/// such file is an error, as in torchvision.
pub fn image_folder(root: &Path) -> Result<ClassificationSet, DataError> {
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(format_err(
            root,
            None,
            "an ImageFolder holds one sub-folder per class; this folder has none",
        ));
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut empty = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut roots = Vec::new();
        walk_dirs(&dir, &mut roots, 0)?;
        // os.walk's tuples sorted: by the folder's path string.
        roots.sort_by(|a, b| a.0.cmp(&b.0));
        let before = images.len();
        for (_, folder, files) in roots {
            for f in files {
                if lower_ext_ok(&f) {
                    images.push(ImageRef::File(folder.join(&f)));
                    labels.push(label);
                }
            }
        }
        if images.len() == before {
            empty.push(class.clone());
        }
    }
    if !empty.is_empty() {
        return Err(format_err(
            root,
            None,
            format!(
                "no image file in the class folder(s) {} (extensions {}); remove the folder or add images",
                empty.join(", "),
                IMG_EXTENSIONS.join(" ")
            ),
        ));
    }
    Ok(ClassificationSet {
        images,
        labels,
        num_classes: classes.len(),
        classnames: Some(classes),
        templates: None,
    })
}

/// Every folder under (and including) `dir`: its path string, path and sorted files.
fn walk_dirs(
    dir: &Path,
    out: &mut Vec<(String, PathBuf, Vec<String>)>,
    depth: usize,
) -> Result<(), DataError> {
    if depth > 64 {
        return Err(format_err(
            dir,
            None,
            "folders nest more than 64 deep (a link loop?)",
        ));
    }
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let p = e.path();
        if p.is_dir() {
            subdirs.push(p);
        } else {
            files.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    files.sort();
    out.push((dir.to_string_lossy().into_owned(), dir.to_path_buf(), files));
    for s in subdirs {
        walk_dirs(&s, out, depth + 1)?;
    }
    Ok(())
}

/// CLIP_benchmark's webdataset classification layout.
pub fn clip_benchmark_wds(root: &Path, split: &str) -> Result<ClassificationSet, DataError> {
    let shards = wds_split_shards(root, split)?;
    let names_path = root.join("classnames.txt");
    let classnames = if names_path.exists() {
        Some(super::read_lines(&names_path)?)
    } else {
        None
    };
    let tpl_path = root.join("zeroshot_classification_templates.txt");
    let templates = if tpl_path.exists() {
        Some(Templates(super::read_lines(&tpl_path)?))
    } else {
        None
    };
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (shard, key, members) in wds_samples(&shards)? {
        let text = wds_text(&shard, &key, &members, "cls")?;
        let label: usize = text.trim().parse().map_err(|_| {
            format_err(
                &shard,
                None,
                format!("{key}.cls: expected a class index, found {:?}", text.trim()),
            )
        })?;
        images.push(wds_image(&shard, &key, &members)?);
        labels.push(label);
    }
    if images.is_empty() {
        return Err(format_err(
            &root.join(split),
            None,
            "the shards hold no sample",
        ));
    }
    let num_classes = match &classnames {
        Some(c) => {
            if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| **l >= c.len()) {
                return Err(format_err(
                    &names_path,
                    None,
                    format!(
                        "sample {} has class {l}, outside the {} classes listed here",
                        images[i].name(),
                        c.len()
                    ),
                ));
            }
            c.len()
        }
        None => labels.iter().max().map_or(0, |m| m + 1),
    };
    Ok(ClassificationSet {
        images,
        labels,
        classnames,
        templates,
        num_classes,
    })
}

/// A CSV of image and label. An image listed twice is an error naming both lines; a
/// label that is neither an index below the class count nor a listed name is an error
/// naming its line.
pub fn label_csv(
    cfg: &LabelCsvConfig,
    classnames: Option<&[String]>,
) -> Result<ClassificationSet, DataError> {
    let path = &cfg.path;
    let rows = read_two_columns(path, cfg.separator, &cfg.image_column, &cfg.label_column)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let by_name: Option<HashMap<&str, usize>> =
        classnames.map(|c| c.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect());
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (line, image, label) in rows {
        let file = base.join(&image);
        if let Some(first) = seen.insert(file.clone(), line) {
            return Err(format_err(
                path,
                Some(line),
                format!("image {image:?} is listed twice (first on line {first})"),
            ));
        }
        let idx = match (label.trim().parse::<usize>(), &by_name) {
            (Ok(i), _) => i,
            (Err(_), Some(m)) => *m.get(label.as_str()).ok_or_else(|| {
                format_err(
                    path,
                    Some(line),
                    format!("label {label:?} is not one of the {} class names", m.len()),
                )
            })?,
            (Err(_), None) => {
                return Err(format_err(
                    path,
                    Some(line),
                    format!(
                        "label {label:?} is not a class index, and no class names were given to match it"
                    ),
                ));
            }
        };
        if let Some(c) = classnames
            && idx >= c.len()
        {
            return Err(format_err(
                path,
                Some(line),
                format!("label {idx} is outside the {} classes", c.len()),
            ));
        }
        if !file.is_file() {
            return Err(format_err(
                path,
                Some(line),
                format!("the image {} does not exist", file.display()),
            ));
        }
        images.push(ImageRef::File(file));
        labels.push(idx);
    }
    if images.is_empty() {
        return Err(format_err(path, None, "the list has no rows"));
    }
    let num_classes =
        classnames.map_or_else(|| labels.iter().max().map_or(0, |m| m + 1), <[_]>::len);
    Ok(ClassificationSet {
        images,
        labels,
        classnames: None,
        templates: None,
        num_classes,
    })
}

/// The `(line, a, b)` values of two named columns of a CSV with a header.
pub(crate) fn read_two_columns(
    path: &Path,
    separator: char,
    a: &str,
    b: &str,
) -> Result<Vec<(usize, String, String)>, DataError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    if !separator.is_ascii() {
        return Err(format_err(
            path,
            None,
            format!("the separator must be one ASCII character, got {separator:?}"),
        ));
    }
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(separator as u8)
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes.as_slice());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format_err(path, Some(1), format!("cannot read the header: {e}")))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    let col = |want: &str| {
        headers.iter().position(|h| h == want).ok_or_else(|| {
            format_err(
                path,
                Some(1),
                format!("no column {want:?} (separator {separator:?}); the columns found are {headers:?}"),
            )
        })
    };
    let (ia, ib) = (col(a)?, col(b)?);
    let mut out = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            format_err(path, line, format!("{e}"))
        })?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        out.push((line, rec[ia].to_string(), rec[ib].to_string()));
    }
    Ok(out)
}

/// Read a class-name list given inline as text (for tests and tools).
pub fn classnames_from_text(text: &str) -> Result<Vec<String>, DataError> {
    parse_lines(text, Path::new("<classnames>"))
}
