//! CSV/TSV lists of image paths and captions, in both conventions users bring:
//! open_clip's (tab-separated, columns `filepath` and `title`, paths as given) and
//! CyCLIP/RankCLIP's (comma-separated, `image` and `caption`, paths relative to the
//! list's folder). Quoting follows the `csv` crate (RFC 4180: `"…"` fields with `""`
//! for a quote, separators and newlines inside). Every row is read when the source
//! opens; a row with the wrong number of fields is an error naming its line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    CorruptPolicy, ImageTransform, Loaded, Pair, PairSource, RefIter, SampleRef, Sharding,
    TransformConfig,
};
use crate::DataError;
use crate::image::SourceImage;

/// Whose defaults the separator, column names and path base take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CsvConvention {
    /// Tab, `filepath`, `title`, paths as given.
    #[default]
    OpenClip,
    /// Comma, `image`, `caption`, paths relative to the CSV's folder.
    Cyclip,
}

/// What relative image paths are relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathBase {
    /// The working directory (open_clip: `Image.open(path)`).
    AsGiven,
    /// The folder holding the CSV (CyCLIP).
    CsvDir,
}

/// `[data] source = "csv"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvSourceConfig {
    pub image_size: usize,
    /// The training list.
    pub path: PathBuf,
    /// A held-out list in the same format, evaluated at the end (retrieval).
    #[serde(default)]
    pub test_path: Option<PathBuf>,
    #[serde(default)]
    pub convention: CsvConvention,
    /// One character; default: the convention's.
    #[serde(default)]
    pub separator: Option<char>,
    #[serde(default)]
    pub image_column: Option<String>,
    #[serde(default)]
    pub caption_column: Option<String>,
    #[serde(default)]
    pub paths_relative_to: Option<PathBase>,
    #[serde(default)]
    pub transform: TransformConfig,
    #[serde(default)]
    pub corrupt: CorruptPolicy,
}

impl CsvSourceConfig {
    pub fn separator(&self) -> char {
        self.separator.unwrap_or(match self.convention {
            CsvConvention::OpenClip => '\t',
            CsvConvention::Cyclip => ',',
        })
    }

    pub fn columns(&self) -> (String, String) {
        let (i, c) = match self.convention {
            CsvConvention::OpenClip => ("filepath", "title"),
            CsvConvention::Cyclip => ("image", "caption"),
        };
        (
            self.image_column.clone().unwrap_or_else(|| i.into()),
            self.caption_column.clone().unwrap_or_else(|| c.into()),
        )
    }

    pub fn path_base(&self) -> PathBase {
        self.paths_relative_to.unwrap_or(match self.convention {
            CsvConvention::OpenClip => PathBase::AsGiven,
            CsvConvention::Cyclip => PathBase::CsvDir,
        })
    }
}

#[derive(Clone, Debug)]
struct Row {
    image: PathBuf,
    caption: String,
    line: u64,
}

/// A parsed CSV/TSV list.
#[derive(Clone, Debug)]
pub struct CsvSource {
    path: PathBuf,
    rows: Vec<Row>,
    transform: ImageTransform,
    max_pixels: u64,
}

impl CsvSource {
    /// Read the list at `path` with the settings of `cfg`.
    pub fn open(cfg: &CsvSourceConfig, path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(cfg, path, &bytes)
    }

    /// Parse list bytes; `path` names the file in errors and anchors `csv-dir` paths.
    pub fn parse(cfg: &CsvSourceConfig, path: &Path, bytes: &[u8]) -> Result<Self, DataError> {
        let fmt = |line: Option<u64>, msg: String| DataError::Format {
            path: path.to_path_buf(),
            line: line.map(|l| l as usize),
            msg,
        };
        let sep = cfg.separator();
        if !sep.is_ascii() {
            return Err(fmt(
                None,
                format!("the separator must be one ASCII character, got {sep:?}"),
            ));
        }
        let mut reader = ::csv::ReaderBuilder::new()
            .delimiter(sep as u8)
            .has_headers(true)
            .flexible(false)
            .from_reader(bytes);
        let headers = reader
            .byte_headers()
            .map_err(|e| fmt(Some(1), format!("cannot read the header: {e}")))?
            .clone();
        let names: Vec<String> = headers
            .iter()
            .map(|h| {
                String::from_utf8_lossy(h)
                    .trim_start_matches('\u{feff}')
                    .to_string()
            })
            .collect();
        let (image_col, caption_col) = cfg.columns();
        let find = |want: &str| {
            names.iter().position(|n| n == want).ok_or_else(|| {
                fmt(
                    Some(1),
                    format!(
                        "no column {want:?} (separator {sep:?}); the columns found are {names:?}"
                    ),
                )
            })
        };
        let (ii, ci) = (find(&image_col)?, find(&caption_col)?);
        let base = match cfg.path_base() {
            PathBase::AsGiven => PathBuf::new(),
            PathBase::CsvDir => path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let mut rows = Vec::new();
        let mut record = ::csv::ByteRecord::new();
        loop {
            let more = reader.read_byte_record(&mut record).map_err(|e| {
                let line = e.position().map(|p| p.line());
                let msg = match e.kind() {
                    ::csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("expected {expected_len} fields separated by {sep:?}, found {len}")
                    }
                    _ => e.to_string(),
                };
                fmt(line, msg)
            })?;
            if !more {
                break;
            }
            let line = record.position().map_or(0, |p| p.line());
            let field = |i: usize, what: &str| {
                std::str::from_utf8(&record[i])
                    .map(str::to_string)
                    .map_err(|_| fmt(Some(line), format!("the {what} is not UTF-8")))
            };
            let image = field(ii, "image path")?;
            if image.is_empty() {
                return Err(fmt(Some(line), format!("empty {image_col:?}")));
            }
            rows.push(Row {
                image: base.join(image),
                caption: field(ci, "caption")?,
                line,
            });
        }
        if rows.is_empty() {
            return Err(fmt(None, "the list has a header but no rows".into()));
        }
        // A listed image that does not exist is a mistake in the list: say so now,
        // with how many, rather than at the step that reaches it.
        let missing: Vec<&Row> = {
            use rayon::prelude::*;
            let mut m: Vec<&Row> = rows.par_iter().filter(|r| !r.image.is_file()).collect();
            m.sort_by_key(|r| r.line);
            m
        };
        if let Some(first) = missing.first() {
            return Err(fmt(
                Some(first.line),
                format!(
                    "the image {} does not exist ({} of the {} listed images are missing{})",
                    first.image.display(),
                    missing.len(),
                    rows.len(),
                    match cfg.path_base() {
                        PathBase::AsGiven =>
                            "; paths are taken as given, relative to the working directory",
                        PathBase::CsvDir => "; paths are relative to the list's folder",
                    }
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            rows,
            transform: cfg.transform.at_size(cfg.image_size),
            max_pixels: cfg.corrupt.max_image_pixels,
        })
    }

    /// The image path and caption of row `i` (0-based, header excluded).
    pub fn row(&self, i: usize) -> Option<(&Path, &str)> {
        self.rows
            .get(i)
            .map(|r| (r.image.as_path(), r.caption.as_str()))
    }
}

impl PairSource for CsvSource {
    fn describe(&self) -> String {
        format!("CSV list {}: {} rows", self.path.display(), self.rows.len())
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn pass(&self, seed: u64, pass: u64, sharding: Sharding) -> Result<RefIter, DataError> {
        Ok(super::digits::permuted(
            self.rows.len(),
            seed,
            pass,
            sharding,
        ))
    }

    fn in_order(&self) -> Result<RefIter, DataError> {
        Ok(super::digits::in_order(self.rows.len()))
    }

    fn load(&self, r: &SampleRef) -> Result<Loaded, DataError> {
        let SampleRef::Index(i) = r else {
            return Err(DataError::Invalid(format!(
                "a CSV list has no sample {r:?}"
            )));
        };
        let row = self
            .rows
            .get(*i)
            .ok_or_else(|| DataError::Invalid(format!("{} has no row {i}", self.path.display())))?;
        let key = format!("{}:{}", self.path.display(), row.line);
        let bytes = match std::fs::read(&row.image) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::Format {
                    path: self.path.clone(),
                    line: Some(row.line as usize),
                    msg: format!("the image {} does not exist", row.image.display()),
                });
            }
            Err(e) => {
                return Ok(Loaded::Skip {
                    key,
                    reason: format!("cannot read {}: {e}", row.image.display()),
                });
            }
        };
        if let Err(reason) = super::caption_from_bytes(row.caption.as_bytes()) {
            return Ok(Loaded::Skip { key, reason });
        }
        Ok(match SourceImage::decode(&bytes, Some(self.max_pixels)) {
            Ok(image) => Loaded::Pair(Pair {
                key,
                image,
                caption: row.caption.clone(),
            }),
            Err(msg) => Loaded::Skip {
                key,
                reason: format!("{}: {msg}", row.image.display()),
            },
        })
    }

    fn transform(&self) -> Option<&ImageTransform> {
        Some(&self.transform)
    }
}
