//! The images of an ordinal experiment, fold by fold: generated ordinal digits, or a
//! benchmark's lists resolved through its protocol, with the few-shot and
//! distribution-shift subsampling applied to the training part.
//!
//! Digits are rendered once and kept in memory. List images are decoded when a batch
//! needs them (CLIP's eval transform: shorter side to the model's size, centre crop);
//! an unreadable image is an error naming its file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rankalign_data::lists::{self, HciSplitConfig, ListEntry};
use rankalign_data::{
    DataError, Dataset, Digits, Image, OrdinalDigits, SceneConfig, SourceImage, Split,
    collate_images, mix_seed, protocols,
};
use rayon::prelude::*;

use super::config::{ListDataConfig, ListFormat, OrdinalDataConfig, Protocol, Subsample};
use crate::{Result, TrainError};

/// Where a set's images come from.
#[derive(Clone)]
enum Images {
    Memory(Arc<Vec<Image>>),
    Files(Arc<Vec<PathBuf>>),
}

/// Images with their rank indices.
#[derive(Clone)]
pub struct OrdinalSet {
    images: Images,
    /// Which image each item is (a subsample keeps the underlying store).
    index: Arc<Vec<usize>>,
    pub labels: Arc<Vec<u32>>,
    size: usize,
}

impl OrdinalSet {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn image(&self, i: usize) -> std::result::Result<Image, DataError> {
        let j = self.index[i];
        Ok(match &self.images {
            Images::Memory(v) => v[j].clone(),
            Images::Files(paths) => SourceImage::open(&paths[j])?.clip_eval(self.size),
        })
    }

    /// Normalised pixels `(n, 3, size, size)` of items `idx`; with `flip_seed`, each
    /// image is mirrored with probability ½ (a draw keyed by the seed and the item).
    pub fn pixels(
        &self,
        idx: &[usize],
        flip_seed: Option<u64>,
        device: &Device,
    ) -> std::result::Result<Tensor, DataError> {
        let images: Vec<Image> = idx
            .par_iter()
            .map(|&i| {
                let mut img = self.image(i)?;
                if let Some(seed) = flip_seed
                    && mix_seed(&[seed, i as u64]) & 1 == 1
                {
                    img = mirror(&img);
                }
                Ok(img)
            })
            .collect::<std::result::Result<_, DataError>>()?;
        let refs: Vec<&Image> = images.iter().collect();
        collate_images(&refs, self.size, device)
    }

    /// The items `keep` of this set (indices into it).
    fn select(&self, keep: &[usize]) -> Self {
        Self {
            images: self.images.clone(),
            index: Arc::new(keep.iter().map(|&i| self.index[i]).collect()),
            labels: Arc::new(keep.iter().map(|&i| self.labels[i]).collect()),
            size: self.size,
        }
    }

    fn subsample(self, sub: &Subsample, seed: u64) -> Result<Self> {
        let mut set = self;
        if let Some(shift) = sub.shift {
            let keep = protocols::distribution_shift(&set.labels, shift.top_k, shift.keep, seed)?;
            set = set.select(&keep);
        }
        if let Some(shots) = sub.few_shot {
            let keep = protocols::few_shot(&set.labels, shots, seed)?;
            set = set.select(&keep);
        }
        Ok(set)
    }
}

fn mirror(img: &Image) -> Image {
    let mut out = img.clone();
    let w = img.width;
    for y in 0..img.height {
        for x in 0..w {
            let (src, dst) = ((y * w + x) * 3, (y * w + (w - 1 - x)) * 3);
            out.data[dst..dst + 3].copy_from_slice(&img.data[src..src + 3]);
        }
    }
    out
}

/// One train/test split of an experiment.
#[derive(Clone)]
pub struct Fold {
    pub name: String,
    pub train: OrdinalSet,
    pub test: OrdinalSet,
    /// List entries dropped for labels outside the range.
    pub dropped: usize,
}

/// Every fold the data config describes.
pub fn folds(cfg: &OrdinalDataConfig) -> Result<Vec<Fold>> {
    match cfg {
        OrdinalDataConfig::Digits {
            task,
            seed,
            image_size,
            train_size,
            test_size,
            subsample,
        } => {
            let digits = Arc::new(Digits::embedded()?);
            let scenes = SceneConfig {
                seed: *seed,
                image_size: *image_size,
                train_size: *train_size,
                val_size: 1,
                test_size: *test_size,
            };
            let make = |split| -> Result<OrdinalSet> {
                let set = OrdinalDigits::new(digits.clone(), scenes.clone(), split, *task)
                    .map_err(TrainError::Invalid)?;
                let items: Vec<(Image, u32)> =
                    (0..set.len()).into_par_iter().map(|i| set.get(i)).collect();
                let (images, labels): (Vec<_>, Vec<_>) = items.into_iter().unzip();
                Ok(OrdinalSet {
                    images: Images::Memory(Arc::new(images)),
                    index: Arc::new((0..labels.len()).collect()),
                    labels: Arc::new(labels),
                    size: *image_size,
                })
            };
            Ok(vec![Fold {
                name: "digits".into(),
                train: make(Split::Train)?.subsample(subsample, *seed)?,
                test: make(Split::Test)?,
                dropped: 0,
            }])
        }
        OrdinalDataConfig::List(l) => list_folds(l),
    }
}

fn parse(format: ListFormat, path: &Path) -> Result<Vec<ListEntry>> {
    Ok(match format {
        ListFormat::MorphAb => lists::parse_morph_ab(path)?,
        ListFormat::MorphCd => lists::parse_morph_cd(path)?,
        ListFormat::Clap2015 => lists::parse_clap2015(path)?,
        ListFormat::Adience => lists::parse_adience(path)?,
        ListFormat::Hci => lists::parse_hci(path)?,
        ListFormat::Crowdbeauty => lists::parse_crowdbeauty(path)?,
        // OrdinalCLIP's val/test label; training lines use it too (see decisions.md).
        ListFormat::Oc => lists::parse_multi_label(path)?
            .into_iter()
            .map(|e| ListEntry {
                label: e.middle_label(),
                split: lists::split_from_file_name(path),
                path: e.path,
            })
            .collect(),
    })
}

fn parse_all(l: &ListDataConfig, files: &[PathBuf]) -> Result<Vec<Vec<ListEntry>>> {
    files.iter().map(|f| parse(l.format, f)).collect()
}

fn set_of(l: &ListDataConfig, entries: Vec<ListEntry>) -> (OrdinalSet, usize) {
    let ranked = l.labels.apply(entries);
    let paths: Vec<PathBuf> = ranked
        .entries
        .iter()
        .map(|e| l.image_root.join(&e.path))
        .collect();
    let n = paths.len();
    (
        OrdinalSet {
            images: Images::Files(Arc::new(paths)),
            index: Arc::new((0..n).collect()),
            labels: Arc::new(ranked.ranks),
            size: l.image_size,
        },
        ranked.dropped,
    )
}

fn pick<T: Clone>(all: Vec<T>, which: &Option<Vec<usize>>, what: &str) -> Result<Vec<(usize, T)>> {
    match which {
        None => Ok(all.into_iter().enumerate().collect()),
        Some(ix) => ix
            .iter()
            .map(|&i| {
                all.get(i).cloned().map(|f| (i, f)).ok_or_else(|| {
                    TrainError::Invalid(format!(
                        "data.protocol: {what} {i} does not exist (there are {})",
                        all.len()
                    ))
                })
            })
            .collect(),
    }
}

fn list_folds(l: &ListDataConfig) -> Result<Vec<Fold>> {
    let mut out = Vec::new();
    let mut push = |name: String, train: Vec<ListEntry>, test: Vec<ListEntry>| -> Result<()> {
        let (train, d1) = set_of(l, train);
        let (test, d2) = set_of(l, test);
        if train.is_empty() || test.is_empty() {
            return Err(TrainError::Invalid(format!(
                "data: fold {name} has {} training and {} test images in the label range {}–{}",
                train.len(),
                test.len(),
                l.labels.min,
                l.labels.max
            )));
        }
        out.push(Fold {
            name,
            train: train.subsample(&l.subsample, l.seed)?,
            test,
            dropped: d1 + d2,
        });
        Ok(())
    };
    match &l.protocol {
        Protocol::Files { folds } => {
            for (i, f) in folds.iter().enumerate() {
                let train = parse_all(l, &f.train)?.concat();
                let test = parse_all(l, &f.test)?.concat();
                push(format!("fold{i}"), train, test)?;
            }
        }
        Protocol::LeaveOneOut { files, folds } => {
            let parts = parse_all(l, files)?;
            for (i, _) in pick(files.clone(), folds, "fold")? {
                let train: Vec<ListEntry> = parts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, p)| p.iter().cloned())
                    .collect();
                push(format!("fold{i}"), train, parts[i].clone())?;
            }
        }
        Protocol::Column { files } => {
            let all = parse_all(l, files)?.concat();
            let part = |s: Split| all.iter().filter(|e| e.split == Some(s)).cloned().collect();
            push("official".into(), part(Split::Train), part(Split::Test))?;
        }
        Protocol::KFold { files, k, folds } => {
            let all = parse_all(l, files)?.concat();
            let splits = protocols::k_fold(all.len(), *k, l.seed)?;
            for (i, f) in pick(splits, folds, "fold")? {
                let take = |ix: &[usize]| ix.iter().map(|&j| all[j].clone()).collect();
                push(format!("fold{i}"), take(&f.train), take(&f.test))?;
            }
        }
        Protocol::Hci { files, splits } => {
            let all = parse_all(l, files)?.concat();
            let made = lists::hci_splits(&all, l.seed, &HciSplitConfig::standard())?;
            for (i, s) in pick(made, splits, "split")? {
                let take = |ix: &[usize]| ix.iter().map(|&j| all[j].clone()).collect();
                push(format!("split{i}"), take(&s.train), take(&s.test))?;
            }
        }
    }
    Ok(out)
}
