//! Parsers for the data lists of the ordinal benchmarks in L2RCLIP
//! (`raywang335/L2RCLIP` @ `168fd4b`, `datalist/**`) and OrdinalCLIP's generic list format
//! (`xk-huang/OrdinalCLIP` @ `ca10a20`, `ordinalclip/runner/data.py` L62-104), the mapping
//! from raw labels to rank indices, and number words for rank prompts.
//!
//! | parser | file | line format | label |
//! |---|---|---|---|
//! | [`parse_morph_ab`] | `morph/settingA/Setting_A_fold*_{train,test}.txt`, `settingB/Setting_B_fold*.txt` | header `race gender age filename database` (space-separated, CRLF) or, in setting A folds 1–4, CSV with a pandas index column, header `,race,gender,age,filename,database` | age |
//! | [`parse_morph_cd`] | `morph/setting{C,D}/morph_{C,D}_0*.txt` | `<path> <age>`; only the basename is kept | age |
//! | [`parse_clap2015`] | `clap2015/total_2015.csv` | CSV, header `filename,age,stdv,database`, database ∈ train/val/test | age |
//! | [`parse_adience`] | `adience/simplified_adience_*.txt` | `<relpath> <group 0–7>` | group |
//! | [`parse_hci`] | `hci/19{3..7}0s.txt` | `<relpath> 19x0s` (the label is the decade *string*) | decade index 0–4 |
//! | [`parse_crowdbeauty`] | `crowdbeauty/*_{datasets,train,test}.txt` | `<id>.png<TAB><rating 1.0–5.0>` | rounded rating 1–5 |
//! | [`parse_multi_label`] | OrdinalCLIP lists, e.g. `ET_proto_train.txt` | `<relpath> <label> [<label> …]` | all labels |
//!
//! All parsers accept `\n` and `\r\n` line ends, a UTF-8 byte-order mark, a missing final
//! newline, and skip blank lines; line numbers in errors are 1-based and count every line.
//! Fields must not contain the separator (no CSV quoting; the real lists have none).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocols::{self, PerClassCounts, SplitIndices};
use crate::{DataError, Split};

/// One image of a list: its path as listed (relative, or a bare file name), the dataset's
/// raw integer label, and the split when the list names one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub path: PathBuf,
    pub label: i64,
    pub split: Option<Split>,
}

// ---------------------------------------------------------------------------------------
// Reading lines.

fn bad(path: &Path, line: usize, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        line: Some(line),
        msg: msg.into(),
    }
}

/// A line or field for an error message, shortened if long.
fn shown(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("`{}…`", &s[..cut]),
        None => format!("`{s}`"),
    }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => text,
        }),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            Err(bad(path, line, "not valid UTF-8"))
        }
    }
}

/// Non-blank lines, trimmed, with their 1-based line numbers.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
}

/// Exactly `N` fields of `line` split by `sep` (whitespace runs when `None`).
fn fields<'a, const N: usize>(
    path: &Path,
    no: usize,
    line: &'a str,
    sep: Option<char>,
    expected: &str,
) -> Result<[&'a str; N], DataError> {
    let parts: Vec<&str> = match sep {
        Some(c) => line.split(c).map(str::trim).collect(),
        None => line.split_whitespace().collect(),
    };
    <[&str; N]>::try_from(parts.as_slice()).map_err(|_| {
        bad(
            path,
            no,
            format!(
                "expected {N} fields `{expected}`, found {} in {}",
                parts.len(),
                shown(line)
            ),
        )
    })
}

fn int(path: &Path, no: usize, what: &str, s: &str) -> Result<i64, DataError> {
    s.parse().map_err(|_| {
        bad(
            path,
            no,
            format!("expected an integer {what}, found {}", shown(s)),
        )
    })
}

fn nonempty(path: &Path, no: usize, what: &str, s: &str) -> Result<PathBuf, DataError> {
    if s.is_empty() {
        Err(bad(
            path,
            no,
            format!("expected a {what}, found an empty field"),
        ))
    } else {
        Ok(PathBuf::from(s))
    }
}

// ---------------------------------------------------------------------------------------
// MORPH II.

/// The two file styles of the MORPH II setting A/B lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MorphListStyle {
    /// `race gender age filename database`, space-separated (setting A fold 0, setting B).
    Spaces,
    /// `,race,gender,age,filename,database`, CSV with a leading pandas index (setting A folds 1–4).
    IndexedCsv,
}

/// One row of a MORPH II setting A/B list.
///
/// The `gender` code is **not** consistent across the lists: against the `M`/`F` letter in
/// the file names, setting A uses 1 = male and setting B 0 = male. Use
/// [`MorphRecord::filename_sex`] when sex matters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MorphRecord {
    /// The pandas index column ([`MorphListStyle::IndexedCsv`] only).
    pub index: Option<u64>,
    pub race: u8,
    pub gender: u8,
    pub age: i64,
    pub filename: PathBuf,
    /// Always `morph` in the released lists.
    pub database: String,
}

impl MorphRecord {
    pub fn entry(&self) -> ListEntry {
        ListEntry {
            path: self.filename.clone(),
            label: self.age,
            split: None,
        }
    }

    /// `'M'` or `'F'` from a MORPH file name such as `231783_01F31.JPG` (the letter before
    /// the trailing age digits of the stem), if there is one.
    pub fn filename_sex(&self) -> Option<char> {
        let stem = self.filename.file_stem()?.to_str()?;
        match stem
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .chars()
            .last()?
        {
            c @ ('M' | 'F') => Some(c),
            _ => None,
        }
    }
}

/// A parsed setting A/B list and which of the two styles it was written in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MorphList {
    pub style: MorphListStyle,
    pub records: Vec<MorphRecord>,
}

const MORPH_COLUMNS: [&str; 5] = ["race", "gender", "age", "filename", "database"];

/// Reads a MORPH II setting A or B list, detecting its style from the header line.
pub fn parse_morph_ab_records(path: &Path) -> Result<MorphList, DataError> {
    let text = read_text(path)?;
    let mut lines = content_lines(&text);
    let Some((head_no, head)) = lines.next() else {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            line: None,
            msg: "empty file, expected a header `race gender age filename database`".into(),
        });
    };
    let style = if head.split_whitespace().eq(MORPH_COLUMNS) {
        MorphListStyle::Spaces
    } else if head
        .split(',')
        .map(str::trim)
        .eq(std::iter::once("").chain(MORPH_COLUMNS))
    {
        MorphListStyle::IndexedCsv
    } else {
        return Err(bad(
            path,
            head_no,
            format!(
                "expected header `race gender age filename database` or `,race,gender,age,filename,database`, found {}",
                shown(head)
            ),
        ));
    };
    let small = |no: usize, what: &str, s: &str| -> Result<u8, DataError> {
        s.parse().map_err(|_| {
            bad(
                path,
                no,
                format!("expected a small integer {what}, found {}", shown(s)),
            )
        })
    };
    let mut records = Vec::new();
    for (no, line) in lines {
        let (index, [race, gender, age, filename, database]) = match style {
            MorphListStyle::Spaces => (
                None,
                fields::<5>(path, no, line, None, "race gender age filename database")?,
            ),
            MorphListStyle::IndexedCsv => {
                let [i, r, g, a, f, d] = fields::<6>(
                    path,
                    no,
                    line,
                    Some(','),
                    "index,race,gender,age,filename,database",
                )?;
                let i = i.parse::<u64>().map_err(|_| {
                    bad(
                        path,
                        no,
                        format!("expected a non-negative integer index, found {}", shown(i)),
                    )
                })?;
                (Some(i), [r, g, a, f, d])
            }
        };
        records.push(MorphRecord {
            index,
            race: small(no, "race", race)?,
            gender: small(no, "gender", gender)?,
            age: int(path, no, "age", age)?,
            filename: nonempty(path, no, "file name", filename)?,
            database: database.to_string(),
        });
    }
    Ok(MorphList { style, records })
}

/// [`parse_morph_ab_records`] as plain entries: path = file name, label = age.
pub fn parse_morph_ab(path: &Path) -> Result<Vec<ListEntry>, DataError> {
    Ok(parse_morph_ab_records(path)?
        .records
        .iter()
        .map(MorphRecord::entry)
        .collect())
}

/// Reads a MORPH II setting C/D list of `<path> <age>` lines. The path is reduced to its
/// basename (`../../datasets/Morph/image/070081_2F36.JPG` → `070081_2F36.JPG`), as the
/// official parser joins the basename to `<root>/image/` (`datasets/morph.py` L162-190).
pub fn parse_morph_cd(path: &Path) -> Result<Vec<ListEntry>, DataError> {
    let text = read_text(path)?;
    content_lines(&text)
        .map(|(no, line)| {
            let [p, age] = fields::<2>(path, no, line, None, "<path> <age>")?;
            let name = Path::new(p).file_name().ok_or_else(|| {
                bad(
                    path,
                    no,
                    format!("expected an image path, found {}", shown(p)),
                )
            })?;
            Ok(ListEntry {
                path: PathBuf::from(name),
                label: int(path, no, "age", age)?,
                split: None,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// CLAP2015 (ChaLearn LAP apparent age).

/// One row of `clap2015/total_2015.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClapRecord {
    pub filename: PathBuf,
    /// Mean apparent age, an integer in the list.
    pub age: i64,
    /// Standard deviation of the apparent-age votes.
    pub stdv: f64,
    pub split: Split,
}

/// Reads `clap2015/total_2015.csv` (header `filename,age,stdv,database`).
pub fn parse_clap2015_records(path: &Path) -> Result<Vec<ClapRecord>, DataError> {
    const HEADER: [&str; 4] = ["filename", "age", "stdv", "database"];
    let text = read_text(path)?;
    let mut lines = content_lines(&text);
    match lines.next() {
        Some((_, head)) if head.split(',').map(str::trim).eq(HEADER) => {}
        Some((no, head)) => {
            return Err(bad(
                path,
                no,
                format!(
                    "expected header `filename,age,stdv,database`, found {}",
                    shown(head)
                ),
            ));
        }
        None => {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                line: None,
                msg: "empty file, expected a header `filename,age,stdv,database`".into(),
            });
        }
    }
    lines
        .map(|(no, line)| {
            let [f, age, stdv, db] =
                fields::<4>(path, no, line, Some(','), "filename,age,stdv,database")?;
            let stdv_value: f64 = stdv
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    bad(
                        path,
                        no,
                        format!("expected a non-negative stdv, found {}", shown(stdv)),
                    )
                })?;
            let split = match db {
                "train" => Split::Train,
                "val" => Split::Val,
                "test" => Split::Test,
                _ => {
                    return Err(bad(
                        path,
                        no,
                        format!(
                            "expected database `train`, `val` or `test`, found {}",
                            shown(db)
                        ),
                    ));
                }
            };
            Ok(ClapRecord {
                filename: nonempty(path, no, "file name", f)?,
                age: int(path, no, "age", age)?,
                stdv: stdv_value,
                split,
            })
        })
        .collect()
}

/// [`parse_clap2015_records`] as entries: label = age, split from the `database` column.
pub fn parse_clap2015(path: &Path) -> Result<Vec<ListEntry>, DataError> {
    Ok(parse_clap2015_records(path)?
        .into_iter()
        .map(|r| ListEntry {
            path: r.filename,
            label: r.age,
            split: Some(r.split),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// Adience, HCI, CrowdBeauty.

/// Reads an Adience fold list of `<user>/landmark_aligned_face.<id>.<name>.jpg <group>`
/// lines; the group must be 0–7.
pub fn parse_adience(path: &Path) -> Result<Vec<ListEntry>, DataError> {
    let text = read_text(path)?;
    content_lines(&text)
        .map(|(no, line)| {
            let [p, group] = fields::<2>(path, no, line, None, "<path> <group>")?;
            let label = int(path, no, "age group", group)?;
            if !(0..=7).contains(&label) {
                return Err(bad(
                    path,
                    no,
                    format!("expected an age group 0–7, found {label}"),
                ));
            }
            Ok(ListEntry {
                path: PathBuf::from(p),
                label,
                split: None,
            })
        })
        .collect()
}

/// The five HCI decades, in label order; also the list file stems (`hci/1930s.txt`, …).
pub const HCI_DECADES: [&str; 5] = ["1930s", "1940s", "1950s", "1960s", "1970s"];

/// Reads one HCI list of `./images/1930s_decade_<md5>.jpg 1930s` lines. The label field
/// is the decade string; the entry's label is its index in [`HCI_DECADES`] (0–4).
pub fn parse_hci(path: &Path) -> Result<Vec<ListEntry>, DataError> {
    let text = read_text(path)?;
    content_lines(&text)
        .map(|(no, line)| {
            let [p, decade] = fields::<2>(path, no, line, None, "<path> <decade>")?;
            let label = HCI_DECADES
                .iter()
                .position(|&d| d == decade)
                .ok_or_else(|| {
                    bad(
                        path,
                        no,
                        format!("expected a decade `1930s`–`1970s`, found {}", shown(decade)),
                    )
                })?;
            Ok(ListEntry {
                path: PathBuf::from(p),
                label: label as i64,
                split: None,
            })
        })
        .collect()
}

/// All five HCI lists `dir/19{3..7}0s.txt`, concatenated in decade order.
pub fn parse_hci_dir(dir: &Path) -> Result<Vec<ListEntry>, DataError> {
    let mut all = Vec::new();
    for decade in HCI_DECADES {
        all.extend(parse_hci(&dir.join(format!("{decade}.txt")))?);
    }
    Ok(all)
}

/// The HCI protocol's split sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HciSplitConfig {
    pub n_splits: usize,
    pub per_class: PerClassCounts,
}

impl HciSplitConfig {
    /// Ten random splits of 210 train / 5 val / 50 test images per decade.
    pub fn standard() -> Self {
        Self {
            n_splits: 10,
            per_class: PerClassCounts {
                train: 210,
                val: 5,
                test: 50,
            },
        }
    }
}

/// `cfg.n_splits` random per-decade splits of HCI entries (indices into `entries`); split
/// `s` is seeded by `(seed, s)`, see [`protocols::per_class_splits`]. Errors when a decade
/// has too few images or a label is negative.
pub fn hci_splits(
    entries: &[ListEntry],
    seed: u64,
    cfg: &HciSplitConfig,
) -> Result<Vec<SplitIndices>, DataError> {
    let labels = entries
        .iter()
        .map(|e| {
            u32::try_from(e.label)
                .map_err(|_| DataError::Invalid(format!("hci_splits: negative label {}", e.label)))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    protocols::per_class_splits(&labels, cfg.per_class, cfg.n_splits, seed)
}

/// The five CrowdBeauty rating words, for ratings 1–5 (index = rating − 1).
pub const CROWDBEAUTY_WORDS: [&str; 5] = [
    "unacceptable",
    "flawed",
    "ordinary",
    "professional",
    "exceptional",
];

/// A CrowdBeauty rating 1.0–5.0 rounded to the nearest integer, halves **up** (3.5 → 4;
/// `f64::round`, not Python's round-half-to-even). `None` outside 1.0–5.0 or not finite.
/// Every rating in the released lists is a whole number (`3.0`), so halves never occur.
pub fn crowdbeauty_label(rating: f64) -> Option<i64> {
    (1.0..=5.0).contains(&rating).then(|| rating.round() as i64)
}

/// Reads a CrowdBeauty list of `<id>.png<TAB><rating>` lines; label = rounded rating 1–5
/// ([`crowdbeauty_label`]).
pub fn parse_crowdbeauty(path: &Path) -> Result<Vec<ListEntry>, DataError> {
    let text = read_text(path)?;
    content_lines(&text)
        .map(|(no, line)| {
            let [p, rating] = fields::<2>(path, no, line, Some('\t'), "<file><TAB><rating>")?;
            let label = rating
                .parse::<f64>()
                .ok()
                .and_then(crowdbeauty_label)
                .ok_or_else(|| {
                    bad(
                        path,
                        no,
                        format!("expected a rating 1.0–5.0, found {}", shown(rating)),
                    )
                })?;
            Ok(ListEntry {
                path: nonempty(path, no, "file name", p)?,
                label,
                split: None,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// OrdinalCLIP's generic format.

/// One line of an OrdinalCLIP list: a path and one or more integer labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiLabelEntry {
    pub path: PathBuf,
    labels: Vec<i64>,
}

impl MultiLabelEntry {
    /// `None` when `labels` is empty.
    pub fn new(path: PathBuf, labels: Vec<i64>) -> Option<Self> {
        (!labels.is_empty()).then_some(Self { path, labels })
    }

    /// All labels, in file order; never empty.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// `labels[len / 2]`, the label OrdinalCLIP uses for val/test and for grouping.
    pub fn middle_label(&self) -> i64 {
        self.labels[self.labels.len() / 2]
    }

    /// The label OrdinalCLIP would use: a uniform draw from `rng` for training, the middle
    /// label (no draw) for val and test.
    pub fn label_for<R: rand::Rng + ?Sized>(&self, split: Split, rng: &mut R) -> i64 {
        match split {
            Split::Train => self.labels[rng.random_range(0..self.labels.len())],
            Split::Val | Split::Test => self.middle_label(),
        }
    }
}

/// Reads an OrdinalCLIP list of `<relpath> <label> [<label> …]` lines (whitespace-separated).
pub fn parse_multi_label(path: &Path) -> Result<Vec<MultiLabelEntry>, DataError> {
    let text = read_text(path)?;
    content_lines(&text)
        .map(|(no, line)| {
            let mut parts = line.split_whitespace();
            let p = parts.next().unwrap_or_default();
            let labels = parts
                .map(|s| int(path, no, "label", s))
                .collect::<Result<Vec<_>, _>>()?;
            MultiLabelEntry::new(PathBuf::from(p), labels).ok_or_else(|| {
                bad(
                    path,
                    no,
                    format!(
                        "expected `<path> <label> [<label> …]`, found {}",
                        shown(line)
                    ),
                )
            })
        })
        .collect()
}

/// The split an OrdinalCLIP list file is for, from its lowercased file stem: `val` or
/// `test` in the name win over `train` (as in `RegressionDataset`), so `ET_proto_val.txt`
/// is val; `None` if the name has none of them (OrdinalCLIP refuses such files).
pub fn split_from_file_name(path: &Path) -> Option<Split> {
    let stem = path.file_stem()?.to_string_lossy().to_lowercase();
    if stem.contains("val") {
        Some(Split::Val)
    } else if stem.contains("test") {
        Some(Split::Test)
    } else if stem.contains("train") {
        Some(Split::Train)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Labels to ranks, and rank words.

/// An inclusive range of raw labels mapped to rank indices `0..=max - min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelRange {
    pub min: i64,
    pub max: i64,
}

/// Entries whose labels fall in a [`LabelRange`], their ranks (parallel to `entries`), and
/// how many were dropped for being out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranked {
    pub entries: Vec<ListEntry>,
    pub ranks: Vec<u32>,
    pub dropped: usize,
}

impl LabelRange {
    /// MORPH II ages 16–77: 62 ranks, L2RCLIP's templates. The official code drops ages
    /// above 77 (`datasets/morph.py`); no released list has ages outside 16–77.
    pub const MORPH: Self = Self { min: 16, max: 77 };
    /// CLAP2015 apparent ages 3–85 (the extremes of `total_2015.csv`): 83 ranks.
    pub const CLAP2015: Self = Self { min: 3, max: 85 };
    /// Adience age groups 0–7.
    pub const ADIENCE: Self = Self { min: 0, max: 7 };
    /// HCI decade indices 0–4.
    pub const HCI: Self = Self { min: 0, max: 4 };
    /// CrowdBeauty ratings 1–5.
    pub const CROWDBEAUTY: Self = Self { min: 1, max: 5 };

    pub fn new(min: i64, max: i64) -> Result<Self, DataError> {
        if min > max {
            return Err(DataError::Invalid(format!(
                "label range: min {min} > max {max}"
            )));
        }
        Ok(Self { min, max })
    }

    /// `max - min + 1` (0 if `min > max`), saturating at `usize::MAX`.
    pub fn num_ranks(&self) -> usize {
        let n = (i128::from(self.max) - i128::from(self.min) + 1).max(0);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// The rank of `label`, or `None` outside the range.
    pub fn rank(&self, label: i64) -> Option<u32> {
        if label < self.min || label > self.max {
            return None;
        }
        u32::try_from(i128::from(label) - i128::from(self.min)).ok()
    }

    /// The raw label of `rank` (no range check).
    pub fn label(&self, rank: u32) -> i64 {
        self.min.saturating_add(i64::from(rank))
    }

    /// Keeps the entries in range, in order, with their ranks; counts the rest.
    pub fn apply(&self, entries: Vec<ListEntry>) -> Ranked {
        let total = entries.len();
        let (entries, ranks): (Vec<ListEntry>, Vec<u32>) = entries
            .into_iter()
            .filter_map(|e| self.rank(e.label).map(|r| (e, r)))
            .unzip();
        Ranked {
            dropped: total - entries.len(),
            entries,
            ranks,
        }
    }

    /// [`number_words`] of every label in the range, in rank order, e.g. for
    /// [`LabelRange::MORPH`] `["sixteen", "seventeen", …, "seventy seven"]`; the official
    /// vocabulary (`datasets/bases.py`) is the same in title case (`"Twenty One"`), which
    /// CLIP's lowercasing tokenizer does not distinguish.
    pub fn words(&self) -> Vec<String> {
        (self.min..=self.max).map(number_words).collect()
    }
}

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];
const SCALES: [(u64, &str); 6] = [
    (1_000_000_000_000_000_000, "quintillion"),
    (1_000_000_000_000_000, "quadrillion"),
    (1_000_000_000_000, "trillion"),
    (1_000_000_000, "billion"),
    (1_000_000, "million"),
    (1_000, "thousand"),
];

fn below_thousand(mut n: u64, words: &mut Vec<&'static str>) {
    if n >= 100 {
        words.push(ONES[(n / 100) as usize]);
        words.push("hundred");
        n %= 100;
    }
    if n >= 20 {
        words.push(TENS[(n / 10) as usize]);
        if !n.is_multiple_of(10) {
            words.push(ONES[(n % 10) as usize]);
        }
    } else if n > 0 {
        words.push(ONES[n as usize]);
    }
}

/// English words for `n`, lowercase, space-separated, without "and" or hyphens:
/// 21 → `"twenty one"`, 101 → `"one hundred one"`, −3 → `"minus three"`.
pub fn number_words(n: i64) -> String {
    if n == 0 {
        return ONES[0].to_string();
    }
    let mut words = Vec::new();
    if n < 0 {
        words.push("minus");
    }
    let mut rest = n.unsigned_abs();
    for (scale, name) in SCALES {
        if rest >= scale {
            below_thousand(rest / scale, &mut words);
            words.push(name);
            rest %= scale;
        }
    }
    below_thousand(rest, &mut words);
    words.join(" ")
}
