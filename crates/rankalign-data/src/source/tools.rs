//! Tools around sources: writing the digit scenes out as real files in each format
//! ([`export_digits`]), and scanning a source for what it holds ([`scan`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::{PairSource, SkipStats};
use crate::scenes::DigitScenes;
use crate::{DataError, Dataset};

/// The file layouts [`export_digits`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// CyCLIP's convention: `images.csv` with `image,caption`, paths relative to it.
    Csv,
    /// open_clip's: `images.tsv` with `filepath<TAB>title`, absolute paths.
    Tsv,
    /// webdataset shards `shard-NNNNN.tar` (`KEY.png`, `KEY.txt`, `KEY.json`) and
    /// open_clip's `sizes.json`.
    Webdataset,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn png_bytes(img: &crate::image::Image) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| DataError::Invalid("a scene image has the wrong buffer size".into()))?;
    image::DynamicImage::ImageRgb8(buf)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| DataError::Invalid(format!("encoding a PNG: {e}")))?;
    Ok(out)
}

fn append_member<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes)
}

/// Write the first `count` scenes of `scenes` under `out` in `format`; returns the file
/// a config names (the CSV/TSV, or the shard pattern).
pub fn export_digits(
    scenes: &DigitScenes,
    count: usize,
    format: ExportFormat,
    out: &Path,
    shard_size: usize,
) -> Result<String, DataError> {
    let count = count.min(scenes.len());
    std::fs::create_dir_all(out).map_err(io(out))?;
    let items: Vec<(Vec<u8>, String)> = (0..count)
        .into_par_iter()
        .map(|i| {
            let s = scenes.get(i);
            Ok((png_bytes(&s.image)?, s.caption))
        })
        .collect::<Result<_, DataError>>()?;
    match format {
        ExportFormat::Csv | ExportFormat::Tsv => {
            let images = out.join("images");
            std::fs::create_dir_all(&images).map_err(io(&images))?;
            let abs = std::fs::canonicalize(&images).map_err(io(&images))?;
            let (name, sep, header) = match format {
                ExportFormat::Csv => ("images.csv", b',', ["image", "caption"]),
                _ => ("images.tsv", b'\t', ["filepath", "title"]),
            };
            let list = out.join(name);
            let mut w = ::csv::WriterBuilder::new()
                .delimiter(sep)
                .from_path(&list)
                .map_err(|e| DataError::Invalid(format!("{}: {e}", list.display())))?;
            let csv_err = |e: ::csv::Error| DataError::Invalid(format!("{}: {e}", list.display()));
            w.write_record(header).map_err(csv_err)?;
            for (i, (png, caption)) in items.iter().enumerate() {
                let file = format!("{i:06}.png");
                let p = images.join(&file);
                std::fs::write(&p, png).map_err(io(&p))?;
                let shown: PathBuf = match format {
                    ExportFormat::Csv => Path::new("images").join(&file),
                    _ => abs.join(&file),
                };
                w.write_record([shown.to_string_lossy().as_ref(), caption.as_str()])
                    .map_err(csv_err)?;
            }
            w.flush().map_err(io(&list))?;
            Ok(list.to_string_lossy().into_owned())
        }
        ExportFormat::Webdataset => {
            let shard_size = shard_size.max(1);
            let shards = count.div_ceil(shard_size).max(1);
            let mut sizes = serde_json::Map::new();
            for (s, chunk) in items.chunks(shard_size).enumerate() {
                let name = format!("shard-{s:05}.tar");
                let path = out.join(&name);
                let file = std::fs::File::create(&path).map_err(io(&path))?;
                let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
                for (j, (png, caption)) in chunk.iter().enumerate() {
                    let key = format!("{:09}", s * shard_size + j);
                    let json = serde_json::json!({ "caption": caption, "key": key }).to_string();
                    for (ext, bytes) in [
                        ("json", json.as_bytes()),
                        ("png", png.as_slice()),
                        ("txt", caption.as_bytes()),
                    ] {
                        append_member(&mut tar, &format!("{key}.{ext}"), bytes)
                            .map_err(io(&path))?;
                    }
                }
                tar.into_inner()
                    .and_then(|mut w| w.flush())
                    .map_err(io(&path))?;
                sizes.insert(name, chunk.len().into());
            }
            let sizes_path = out.join("sizes.json");
            std::fs::write(&sizes_path, serde_json::Value::Object(sizes).to_string())
                .map_err(io(&sizes_path))?;
            let last = shards - 1;
            let width = 5;
            Ok(out
                .join(if shards == 1 {
                    "shard-00000.tar".to_string()
                } else {
                    format!("shard-{{{:0width$}..{last:0width$}}}.tar", 0)
                })
                .to_string_lossy()
                .into_owned())
        }
    }
}

/// Minimum, median, 95th percentile and maximum of some counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    pub min: u64,
    pub median: u64,
    pub p95: u64,
    pub max: u64,
}

impl Spread {
    fn of(mut v: Vec<u64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Self {
            min: v[0],
            median: at(0.5),
            p95: at(0.95),
            max: v[v.len() - 1],
        }
    }
}

/// What [`scan`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScanReport {
    pub source: String,
    /// Samples the source declares.
    pub declared: usize,
    pub stats: SkipStats,
    pub decodable_share: f64,
    pub caption_chars: Spread,
    pub caption_words: Spread,
    pub width: Spread,
    pub height: Spread,
}

/// Read (up to `limit` samples of) `source` in file order, decoding every sample as
/// training does; `progress` gets the number read so far.
pub fn scan(
    source: &dyn PairSource,
    limit: Option<usize>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ScanReport, DataError> {
    let (shapes, stats) = super::stream::read_in_order(
        source,
        limit.unwrap_or(usize::MAX),
        |_, p| {
            Ok([
                p.caption.chars().count() as u64,
                p.caption.split_whitespace().count() as u64,
                p.image.width as u64,
                p.image.height as u64,
            ])
        },
        progress,
    )?;
    let column = |i: usize| Spread::of(shapes.iter().map(|s| s[i]).collect());
    Ok(ScanReport {
        source: source.describe(),
        declared: source.len(),
        decodable_share: 1.0 - stats.share(),
        stats,
        caption_chars: column(0),
        caption_words: column(1),
        width: column(2),
        height: column(3),
    })
}

/// Layouts of the evaluation sets [`export_eval_digits`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalExportFormat {
    /// Single digits as an ImageFolder (`out/<digit>/<index>.png`), with
    /// `classnames.txt` and `templates.txt` beside the class folders.
    ImageFolder,
    /// Single digits in CLIP_benchmark's classification layout:
    /// `out/<split>/{0..}.tar` (`KEY.png`, `KEY.cls`), `nshards.txt`, `classnames.txt`,
    /// `zeroshot_classification_templates.txt`.
    ClipBenchmark,
    /// Scenes with all four phrasings: `out/captions.csv`, `image,caption`, four lines
    /// per image, images in `out/images/`.
    CaptionsCsv,
    /// Scenes in CLIP_benchmark's retrieval layout: `KEY.png` and `KEY.txt` (the four
    /// captions, one per line), `dataset_type.txt` = `retrieval`.
    ClipBenchmarkRetrieval,
}

/// The digit classes' names (`0`…`9`: an ImageFolder's folders sort in label order).
pub fn digit_classnames() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

/// Zero-shot templates for the digit classes in CLIP_benchmark's form: the two
/// phrasings of a single digit the scene captions use that need no article.
pub const DIGIT_CLASS_TEMPLATES: [&str; 2] = ["the digit {c}.", "a handwritten {c}."];

/// Write `count` evaluation items of `scenes` under `out` in `format`: single digits
/// (item `i` is digit `i % 10`, as [`DigitScenes::single`] draws them) or whole scenes
/// with their four captions. `split` names the CLIP_benchmark split folder. Returns
/// the path a task names (the root folder, or the CSV).
pub fn export_eval_digits(
    scenes: &DigitScenes,
    count: usize,
    format: EvalExportFormat,
    out: &Path,
    split: &str,
    shard_size: usize,
) -> Result<PathBuf, DataError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let write_lines = |name: &str, lines: &[String]| -> Result<(), DataError> {
        let p = out.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").map_err(io(&p))
    };
    let templates: Vec<String> = DIGIT_CLASS_TEMPLATES
        .iter()
        .map(|t| t.to_string())
        .collect();
    let singles = || -> Result<Vec<(Vec<u8>, u8)>, DataError> {
        (0..count)
            .into_par_iter()
            .map(|i| {
                let (img, label) = scenes.single(i, Some((i % 10) as u8));
                Ok((png_bytes(&img)?, label))
            })
            .collect()
    };
    type Scene = (Vec<u8>, Vec<String>);
    type Members = (Vec<u8>, Vec<(&'static str, Vec<u8>)>);
    let whole = || -> Result<Vec<Scene>, DataError> {
        let count = count.min(scenes.len());
        (0..count)
            .into_par_iter()
            .map(|i| {
                let s = scenes.get(i);
                Ok((png_bytes(&s.image)?, s.captions))
            })
            .collect()
    };
    let shards = |items: Vec<Members>| -> Result<(), DataError> {
        let dir = out.join(split);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let size = shard_size.max(1);
        let n = items.len().div_ceil(size).max(1);
        for (s, chunk) in items.chunks(size).enumerate() {
            let path = dir.join(format!("{s}.tar"));
            let file = std::fs::File::create(&path).map_err(io(&path))?;
            let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
            for (j, (png, extra)) in chunk.iter().enumerate() {
                let key = format!("s{:08}", s * size + j);
                append_member(&mut tar, &format!("{key}.png"), png).map_err(io(&path))?;
                for (ext, bytes) in extra {
                    append_member(&mut tar, &format!("{key}.{ext}"), bytes).map_err(io(&path))?;
                }
            }
            tar.into_inner()
                .and_then(|mut w| w.flush())
                .map_err(io(&path))?;
        }
        let p = dir.join("nshards.txt");
        std::fs::write(&p, format!("{n}\n")).map_err(io(&p))
    };
    match format {
        EvalExportFormat::ImageFolder => {
            for d in 0..10 {
                let dir = out.join(d.to_string());
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            }
            for (i, (png, label)) in singles()?.into_iter().enumerate() {
                let p = out.join(label.to_string()).join(format!("{i:06}.png"));
                std::fs::write(&p, png).map_err(io(&p))?;
            }
            write_lines("classnames.txt", &digit_classnames())?;
            write_lines("templates.txt", &templates)?;
            Ok(out.to_path_buf())
        }
        EvalExportFormat::ClipBenchmark => {
            let items = singles()?
                .into_iter()
                .map(|(png, label)| (png, vec![("cls", label.to_string().into_bytes())]))
                .collect();
            shards(items)?;
            write_lines("classnames.txt", &digit_classnames())?;
            write_lines("zeroshot_classification_templates.txt", &templates)?;
            Ok(out.to_path_buf())
        }
        EvalExportFormat::CaptionsCsv => {
            let images = out.join("images");
            std::fs::create_dir_all(&images).map_err(io(&images))?;
            let list = out.join("captions.csv");
            let csv_err = |e: ::csv::Error| DataError::Invalid(format!("{}: {e}", list.display()));
            let mut w = ::csv::Writer::from_path(&list).map_err(csv_err)?;
            w.write_record(["image", "caption"]).map_err(csv_err)?;
            for (i, (png, captions)) in whole()?.into_iter().enumerate() {
                let file = format!("{i:06}.png");
                let p = images.join(&file);
                std::fs::write(&p, png).map_err(io(&p))?;
                for c in captions {
                    w.write_record([format!("images/{file}"), c])
                        .map_err(csv_err)?;
                }
            }
            w.flush().map_err(io(&list))?;
            Ok(list)
        }
        EvalExportFormat::ClipBenchmarkRetrieval => {
            let items = whole()?
                .into_iter()
                .map(|(png, caps)| (png, vec![("txt", caps.join("\n").into_bytes())]))
                .collect();
            shards(items)?;
            write_lines("dataset_type.txt", &["retrieval".to_string()])?;
            Ok(out.to_path_buf())
        }
    }
}
