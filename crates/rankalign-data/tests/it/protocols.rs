//! Evaluation-protocol sampling: folds are disjoint and cover the set, few-shot and
//! distribution-shift subsets have hand-computed per-label counts, and every draw is
//! deterministic per seed and changes with the seed.

use std::collections::BTreeMap;

use rankalign_data::protocols::{
    self, Fold, distribution_shift, few_shot, k_fold, most_frequent_labels, shifted_count,
};

fn counts(labels: &[u32], picked: &[usize]) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    for &i in picked {
        *out.entry(labels[i]).or_insert(0) += 1;
    }
    out
}

fn assert_partition(folds: &[Fold], n: usize) {
    let mut seen = vec![0usize; n];
    for f in folds {
        assert!(f.train.is_sorted() && f.test.is_sorted());
        assert_eq!(f.train.len() + f.test.len(), n);
        assert!(f.test.iter().all(|i| f.train.binary_search(i).is_err()));
        for &i in &f.test {
            seen[i] += 1;
        }
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "test parts must cover once: {seen:?}"
    );
}

#[test]
fn k_fold_parts_are_disjoint_covering_and_near_equal() {
    let folds = k_fold(10, 3, 7).unwrap();
    assert_partition(&folds, 10);
    let sizes: Vec<usize> = folds.iter().map(|f| f.test.len()).collect();
    assert_eq!(sizes, [4, 3, 3]);
    assert_eq!(k_fold(10, 3, 7).unwrap(), folds);
    assert_ne!(k_fold(10, 3, 8).unwrap(), folds);

    let loo = k_fold(4, 4, 0).unwrap();
    assert_partition(&loo, 4);
    assert!(loo.iter().all(|f| f.test.len() == 1));

    let folds = k_fold(3294, 5, 1).unwrap();
    assert_partition(&folds, 3294);
    let sizes: Vec<usize> = folds.iter().map(|f| f.test.len()).collect();
    assert_eq!(sizes, [659, 659, 659, 659, 658]);

    for (n, k) in [(10, 0), (10, 1), (3, 4), (0, 2)] {
        let err = k_fold(n, k, 0).unwrap_err().to_string();
        assert!(err.starts_with("k_fold: "), "{err}");
    }
}

#[test]
fn group_folds_leave_one_file_out() {
    let folds = protocols::group_folds(&[3, 2, 4]).unwrap();
    assert_partition(&folds, 9);
    assert_eq!(
        folds[1],
        Fold {
            train: vec![0, 1, 2, 5, 6, 7, 8],
            test: vec![3, 4],
        }
    );
    assert_eq!(folds[0].test, [0, 1, 2]);
    assert_eq!(folds[2].test, [5, 6, 7, 8]);
    for sizes in [&[][..], &[5], &[3, 0, 2]] {
        assert!(protocols::group_folds(sizes).is_err(), "{sizes:?}");
    }
}

#[test]
fn few_shot_takes_shots_per_label_and_keeps_small_labels() {
    // Label 0: 5 items, label 1: 2, label 2: 4, interleaved.
    let labels = [0, 2, 0, 1, 0, 2, 0, 1, 2, 0, 2];
    let picked = few_shot(&labels, 3, 11).unwrap();
    assert!(picked.is_sorted());
    assert_eq!(
        counts(&labels, &picked),
        BTreeMap::from([(0, 3), (1, 2), (2, 3)])
    );
    assert!(
        picked.contains(&3) && picked.contains(&7),
        "label 1 keeps both"
    );
    assert_eq!(few_shot(&labels, 3, 11).unwrap(), picked);
    // Everything when shots cover every label.
    assert_eq!(
        few_shot(&labels, 5, 11).unwrap(),
        (0..11).collect::<Vec<_>>()
    );
    assert_eq!(few_shot(&[], 4, 0).unwrap(), Vec::<usize>::new());
    assert!(few_shot(&labels, 0, 0).is_err());
}

#[test]
fn few_shot_is_nested_per_label_independent_and_seeded() {
    let labels: Vec<u32> = (0..200).map(|i| (i % 4) as u32).collect();
    let one = few_shot(&labels, 1, 5).unwrap();
    let two = few_shot(&labels, 2, 5).unwrap();
    let eight = few_shot(&labels, 8, 5).unwrap();
    assert_eq!((one.len(), two.len(), eight.len()), (4, 8, 32));
    assert!(one.iter().all(|i| two.contains(i)) && two.iter().all(|i| eight.contains(i)));
    assert_ne!(few_shot(&labels, 8, 6).unwrap(), eight);

    // Adding a label does not change the draw of the others.
    let only_zero: Vec<u32> = vec![0; 40];
    let mut with_one = only_zero.clone();
    with_one.extend([1; 40]);
    let a = few_shot(&only_zero, 5, 9).unwrap();
    let b: Vec<usize> = few_shot(&with_one, 5, 9)
        .unwrap()
        .into_iter()
        .filter(|&i| i < 40)
        .collect();
    assert_eq!(a, b);
}

#[test]
fn most_frequent_labels_break_ties_by_smaller_label() {
    // Counts: 5 → 10, 3 → 10, 7 → 6, 1 → 2, 9 → 1.
    let mut labels = Vec::new();
    for (label, n) in [(5u32, 10), (7, 6), (1, 2), (3, 10), (9, 1)] {
        labels.extend(std::iter::repeat_n(label, n));
    }
    assert_eq!(most_frequent_labels(&labels, 1), [3]);
    assert_eq!(most_frequent_labels(&labels, 3), [3, 5, 7]);
    assert_eq!(most_frequent_labels(&labels, 9), [3, 5, 7, 1, 9]);
    assert_eq!(most_frequent_labels(&labels, 0), Vec::<u32>::new());
}

#[test]
fn shifted_count_is_python_int_of_the_f64_product() {
    // Values of `max(int(n * s), 1)` in CPython.
    let cases = [
        ((10, 0.2), 2),
        ((10, 0.1), 1),
        ((6, 0.1), 1),
        ((3, 0.2), 1),
        ((29, 0.1), 2),
        ((30, 0.1), 3),
        ((100, 0.29), 28),
        ((7, 1.0), 7),
    ];
    for ((n, s), want) in cases {
        assert_eq!(shifted_count(n, s), want, "{n} * {s}");
    }
}

#[test]
fn distribution_shift_subsamples_only_the_top_k() {
    let mut labels = Vec::new();
    for (label, n) in [(5u32, 10), (7, 6), (1, 2), (3, 10), (9, 1)] {
        labels.extend(std::iter::repeat_n(label, n));
    }
    let picked = distribution_shift(&labels, 2, 0.2, 4).unwrap();
    assert!(picked.is_sorted());
    assert_eq!(
        counts(&labels, &picked),
        BTreeMap::from([(1, 2), (3, 2), (5, 2), (7, 6), (9, 1)])
    );
    let picked = distribution_shift(&labels, 3, 0.1, 4).unwrap();
    assert_eq!(
        counts(&labels, &picked),
        BTreeMap::from([(1, 2), (3, 1), (5, 1), (7, 1), (9, 1)])
    );
    // top_k beyond the label count subsamples all; 0 or keep_fraction 1 keeps everything.
    let all = distribution_shift(&labels, 50, 0.5, 4).unwrap();
    assert_eq!(
        counts(&labels, &all),
        BTreeMap::from([(1, 1), (3, 5), (5, 5), (7, 3), (9, 1)])
    );
    let everything: Vec<usize> = (0..labels.len()).collect();
    assert_eq!(distribution_shift(&labels, 0, 0.2, 4).unwrap(), everything);
    assert_eq!(distribution_shift(&labels, 3, 1.0, 4).unwrap(), everything);

    assert_eq!(
        distribution_shift(&labels, 2, 0.2, 4).unwrap(),
        distribution_shift(&labels, 2, 0.2, 4).unwrap()
    );
    let big: Vec<u32> = (0..1000).map(|i| (i % 5) as u32).collect();
    assert_ne!(
        distribution_shift(&big, 2, 0.2, 1).unwrap(),
        distribution_shift(&big, 2, 0.2, 2).unwrap()
    );
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        let err = distribution_shift(&labels, 2, bad, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep_fraction"), "{err}");
    }
}

#[test]
fn per_class_splits_reject_bad_arguments() {
    let counts = protocols::PerClassCounts {
        train: 2,
        val: 1,
        test: 1,
    };
    let labels = [0u32, 0, 0, 0, 1, 1, 1, 1, 1];
    let splits = protocols::per_class_splits(&labels, counts, 3, 0).unwrap();
    assert_eq!(splits.len(), 3);
    assert!(
        splits
            .iter()
            .all(|s| (s.train.len(), s.val.len(), s.test.len()) == (4, 2, 2))
    );
    assert!(protocols::per_class_splits(&labels, counts, 0, 0).is_err());
    assert!(protocols::per_class_splits(&[], counts, 1, 0).is_err());
    assert!(protocols::per_class_splits(&labels[..7], counts, 1, 0).is_err());
}
