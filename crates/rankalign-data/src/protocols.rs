//! Index sampling for the evaluation protocols of the ordinal benchmarks: k-fold and
//! leave-one-group-out folds, fixed per-class train/val/test splits (HCI), few-shot
//! subsets and label-distribution shift (OrdinalCLIP `ordinalclip/runner/data.py`
//! L141-213 @ `ca10a20`).
//!
//! Every function is pure: it takes labels or sizes and a seed and returns indices into
//! the caller's list, sorted ascending. Randomness comes from `ChaCha8Rng` seeded with
//! [`mix_seed`] of the seed, a per-protocol tag and (where it helps) the label or split
//! index, so results are the same on every call and platform for a given `rand` version.
//! Bad arguments give [`DataError::Invalid`]; nothing here panics on input.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::{DataError, mix_seed};

const TAG_K_FOLD: u64 = 0x6b5f_666f_6c64; // "k_fold"
const TAG_FEW_SHOT: u64 = 0x6665_775f_7368; // "few_sh"
const TAG_SHIFT: u64 = 0x0073_6869_6674; // "shift"
const TAG_SPLITS: u64 = 0x7370_6c69_7473; // "splits"

/// One cross-validation fold: indices to train on and to test on, each sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fold {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// One train/val/test split of a list, each part sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitIndices {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// How many items of each class go to train, val and test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerClassCounts {
    pub train: usize,
    pub val: usize,
    pub test: usize,
}

impl PerClassCounts {
    /// Items a class needs to fill all three parts.
    pub fn total(&self) -> usize {
        self.train + self.val + self.test
    }
}

fn invalid(msg: String) -> DataError {
    DataError::Invalid(msg)
}

fn rng(words: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix_seed(words))
}

/// Indices grouped by label, labels ascending, indices ascending within a label.
fn by_label(labels: &[u32]) -> BTreeMap<u32, Vec<usize>> {
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &label) in labels.iter().enumerate() {
        groups.entry(label).or_default().push(i);
    }
    groups
}

/// `k` folds of `0..n`: a seeded permutation of `0..n` cut into `k` contiguous parts whose
/// sizes differ by at most one (the first `n % k` parts get the extra item). Fold `i`
/// tests on part `i` and trains on the rest, so the test parts are disjoint and cover
/// `0..n`. Errors when `k < 2` or `k > n`.
pub fn k_fold(n: usize, k: usize, seed: u64) -> Result<Vec<Fold>, DataError> {
    if k < 2 {
        return Err(invalid(format!("k_fold: k must be at least 2, got {k}")));
    }
    if k > n {
        return Err(invalid(format!(
            "k_fold: k = {k} folds need at least {k} items, got {n}"
        )));
    }
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng(&[seed, TAG_K_FOLD]));
    let mut fold_of = vec![0usize; n];
    let (base, extra) = (n / k, n % k);
    let mut start = 0;
    for fold in 0..k {
        let len = base + usize::from(fold < extra);
        for &i in &perm[start..start + len] {
            fold_of[i] = fold;
        }
        start += len;
    }
    Ok(folds_from_assignment(&fold_of, k))
}

/// Leave-one-group-out folds over lists that are concatenated in order, e.g. Adience's
/// five `simplified_adience_{0..4}.txt` files (group sizes 4377, 3093, …): item indices
/// run through group 0 first, then group 1, and so on. Fold `i` tests on group `i` and
/// trains on all others. Errors with fewer than two groups or an empty group.
pub fn group_folds(group_sizes: &[usize]) -> Result<Vec<Fold>, DataError> {
    if group_sizes.len() < 2 {
        return Err(invalid(format!(
            "group_folds: need at least 2 groups, got {}",
            group_sizes.len()
        )));
    }
    if let Some(g) = group_sizes.iter().position(|&s| s == 0) {
        return Err(invalid(format!("group_folds: group {g} is empty")));
    }
    let fold_of: Vec<usize> = group_sizes
        .iter()
        .enumerate()
        .flat_map(|(g, &size)| std::iter::repeat_n(g, size))
        .collect();
    Ok(folds_from_assignment(&fold_of, group_sizes.len()))
}

fn folds_from_assignment(fold_of: &[usize], k: usize) -> Vec<Fold> {
    (0..k)
        .map(|fold| {
            let (test, train): (Vec<usize>, Vec<usize>) =
                (0..fold_of.len()).partition(|&i| fold_of[i] == fold);
            Fold { train, test }
        })
        .collect()
}

/// `n_splits` independent train/val/test splits with fixed counts per class (HCI's 10 splits
/// of 210/5/50 per decade). Split `s` shuffles each class (labels ascending) with one rng
/// seeded by `(seed, s)` and takes its first `train`, next `val` and next `test` items;
/// surplus items are left out. Errors when `n_splits == 0`, `labels` is empty or some
/// class has fewer than `counts.total()` items.
pub fn per_class_splits(
    labels: &[u32],
    counts: PerClassCounts,
    n_splits: usize,
    seed: u64,
) -> Result<Vec<SplitIndices>, DataError> {
    if n_splits == 0 {
        return Err(invalid(
            "per_class_splits: n_splits must be positive".into(),
        ));
    }
    if labels.is_empty() {
        return Err(invalid("per_class_splits: no items".into()));
    }
    let groups = by_label(labels);
    let need = counts.total();
    if let Some((label, items)) = groups.iter().find(|(_, items)| items.len() < need) {
        return Err(invalid(format!(
            "per_class_splits: class {label} has {} items, needs {need} ({} train + {} val + {} test)",
            items.len(),
            counts.train,
            counts.val,
            counts.test
        )));
    }
    let splits = (0..n_splits)
        .map(|s| {
            let mut rng = rng(&[seed, TAG_SPLITS, s as u64]);
            let mut out = SplitIndices {
                train: Vec::new(),
                val: Vec::new(),
                test: Vec::new(),
            };
            for items in groups.values() {
                let mut items = items.clone();
                items.shuffle(&mut rng);
                let (train, rest) = items.split_at(counts.train);
                let (val, rest) = rest.split_at(counts.val);
                out.train.extend_from_slice(train);
                out.val.extend_from_slice(val);
                out.test.extend_from_slice(&rest[..counts.test]);
            }
            out.train.sort_unstable();
            out.val.sort_unstable();
            out.test.sort_unstable();
            out
        })
        .collect();
    Ok(splits)
}

/// A few-shot subset: for each label, `shots` of its indices drawn without replacement;
/// a label with at most `shots` items keeps all of them (OrdinalCLIP `generate_fewshot_dataset`
/// with `repeat=False`). Returns sorted indices into `labels`.
///
/// Each label is shuffled by its own rng seeded with `(seed, label)` and its first `shots`
/// are kept, so a label's draw does not depend on the other labels, and for one seed the
/// k-shot set is contained in the 2k-shot set. For OrdinalCLIP's multi-label lines pass
/// the middle label, as its `split_dataset_by_label` does. Errors when `shots == 0`
/// (OrdinalCLIP treats `num_shots <= 0` as "use the full set"; do that by not calling this).
pub fn few_shot(labels: &[u32], shots: usize, seed: u64) -> Result<Vec<usize>, DataError> {
    if shots == 0 {
        return Err(invalid("few_shot: shots must be positive".into()));
    }
    let mut out = Vec::new();
    for (label, mut items) in by_label(labels) {
        if items.len() > shots {
            items.shuffle(&mut rng(&[seed, TAG_FEW_SHOT, u64::from(label)]));
            items.truncate(shots);
        }
        out.extend(items);
    }
    out.sort_unstable();
    Ok(out)
}

/// The labels that [`distribution_shift`] subsamples: the `top_k` most frequent labels,
/// ordered by count descending and, among equal counts, **smaller label first**.
///
/// OrdinalCLIP sorts with Python's stable sort over a dict in first-appearance order, so
/// its ties go to the label seen first in the list; ours do not depend on list order.
pub fn most_frequent_labels(labels: &[u32], top_k: usize) -> Vec<u32> {
    let mut counts: Vec<(u32, usize)> = by_label(labels)
        .into_iter()
        .map(|(label, items)| (label, items.len()))
        .collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts.into_iter().take(top_k).map(|(l, _)| l).collect()
}

/// How many of `n` items a subsampled label keeps: `max(floor(n·keep_fraction), 1)`, with
/// the product taken in `f64` exactly as Python's `int(len(imgs) * scale_factor)`.
pub fn shifted_count(n: usize, keep_fraction: f64) -> usize {
    ((n as f64 * keep_fraction).floor() as usize).max(1)
}

/// A label-distribution-shifted subset (OrdinalCLIP `generate_distribution_shifted_dataset`):
/// each of the [`most_frequent_labels`]`(labels, top_k)` keeps [`shifted_count`] of its
/// items, drawn without replacement; all other labels are kept whole. `keep_fraction` is
/// OrdinalCLIP's `scale_factor` (0.2 or 0.1 for "80%/90% removed"). `top_k == 0` or
/// `keep_fraction == 1.0` returns every index, and `top_k` above the number of labels
/// subsamples them all, as in OrdinalCLIP. Draws are seeded per label by `(seed, label)`.
/// Returns sorted indices into `labels`. Errors when `keep_fraction` is outside (0, 1].
pub fn distribution_shift(
    labels: &[u32],
    top_k: usize,
    keep_fraction: f64,
    seed: u64,
) -> Result<Vec<usize>, DataError> {
    if !(keep_fraction > 0.0 && keep_fraction <= 1.0) {
        return Err(invalid(format!(
            "distribution_shift: keep_fraction must be in (0, 1], got {keep_fraction}"
        )));
    }
    let shifted = most_frequent_labels(labels, top_k);
    let mut out = Vec::with_capacity(labels.len());
    for (label, mut items) in by_label(labels) {
        if shifted.contains(&label) {
            let keep = shifted_count(items.len(), keep_fraction);
            items.shuffle(&mut rng(&[seed, TAG_SHIFT, u64::from(label)]));
            items.truncate(keep);
        }
        out.extend(items);
    }
    out.sort_unstable();
    Ok(out)
}
