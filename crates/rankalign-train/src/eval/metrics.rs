//! Ranking metrics over score matrices, with one tie rule everywhere.
//!
//! **Ties are broken as a stable descending argsort does:** among equal scores the
//! candidate listed first ranks higher, whichever is the positive. The positive's rank
//! is therefore `#(scores above it) + #(equal scores listed before it)`. The earlier
//! rule here (count only scores strictly above) ranked a positive first among identical
//! captions and inflated image→text recall on repeated captions; CLIP_benchmark's
//! `topk` also gives a tie to one candidate, not to all of them.

use rayon::prelude::*;

/// Position of candidate `pos` in a stable descending sort of `row`.
pub fn argsort_rank(row: &[f32], pos: usize) -> usize {
    let s = row[pos];
    row.iter()
        .enumerate()
        .filter(|&(j, &v)| v > s || (v == s && j < pos))
        .count()
}

/// Percentage of `ranks` below `k`.
pub fn recall_at(ranks: &[usize], k: usize) -> f64 {
    100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len().max(1) as f64
}

/// Classification metrics of `logits` (a row of class scores per image) against
/// `labels`: `acc1`, `acc5` and `mean_per_class_recall` (balanced accuracy: the mean,
/// over the classes that occur in `labels`, of the share of their images predicted
/// right), in percent. `acc5` is NaN (JSON `null`) with fewer than 5 classes, as in
/// CLIP_benchmark. `prefix` names them (`""`, or `"lp_"` for the linear probe).
pub fn classification(
    logits: &[Vec<f32>],
    labels: &[usize],
    prefix: &str,
) -> crate::Result<Vec<(String, f64)>> {
    let classes = logits.first().map_or(0, Vec::len);
    if logits.len() != labels.len() {
        return Err(crate::TrainError::Invalid(format!(
            "{} score rows for {} labels",
            logits.len(),
            labels.len()
        )));
    }
    if let Some(&y) = labels.iter().find(|&&y| y >= classes) {
        return Err(crate::TrainError::Invalid(format!(
            "label {y} is outside the {classes} classes scored"
        )));
    }
    let ranks: Vec<usize> = logits
        .par_iter()
        .zip(labels)
        .map(|(row, &y)| argsort_rank(row, y))
        .collect();
    let mut hits = vec![0usize; classes];
    let mut count = vec![0usize; classes];
    for (&r, &y) in ranks.iter().zip(labels) {
        count[y] += 1;
        if r == 0 {
            hits[y] += 1;
        }
    }
    let present: Vec<f64> = (0..classes)
        .filter(|&c| count[c] > 0)
        .map(|c| hits[c] as f64 / count[c] as f64)
        .collect();
    let balanced = 100.0 * present.iter().sum::<f64>() / present.len().max(1) as f64;
    Ok(vec![
        (format!("{prefix}acc1"), recall_at(&ranks, 1)),
        (
            format!("{prefix}acc5"),
            if classes < 5 {
                f64::NAN
            } else {
                recall_at(&ranks, 5)
            },
        ),
        (format!("{prefix}mean_per_class_recall"), balanced),
    ])
}

/// CLIP_benchmark's retrieval recalls from `scores` (a row of image scores per text)
/// and each text's image `owner`:
///
/// - `image_retrieval_recall@k`: per text, its image among the top `k` images;
/// - `text_retrieval_recall@k`: per image, at least one of its captions among the top
///   `k` texts.
pub fn retrieval(
    scores: &[Vec<f32>],
    owner: &[usize],
    images: usize,
    ks: &[usize],
) -> Vec<(String, f64)> {
    let t2i: Vec<usize> = scores
        .par_iter()
        .zip(owner)
        .map(|(row, &i)| argsort_rank(row, i))
        .collect();
    let mut captions_of: Vec<Vec<usize>> = vec![Vec::new(); images];
    for (t, &i) in owner.iter().enumerate() {
        captions_of[i].push(t);
    }
    let i2t: Vec<usize> = (0..images)
        .into_par_iter()
        .map(|i| {
            let column: Vec<f32> = scores.iter().map(|row| row[i]).collect();
            captions_of[i]
                .iter()
                .map(|&t| argsort_rank(&column, t))
                .min()
                .unwrap_or(usize::MAX)
        })
        .collect();
    let mut out = Vec::new();
    for &k in ks {
        out.push((format!("image_retrieval_recall@{k}"), recall_at(&t2i, k)));
    }
    for &k in ks {
        out.push((format!("text_retrieval_recall@{k}"), recall_at(&i2t, k)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_earlier_candidate() {
        assert_eq!(argsort_rank(&[0.1, 0.5, 0.5, 0.2], 1), 0);
        assert_eq!(argsort_rank(&[0.1, 0.5, 0.5, 0.2], 2), 1);
        assert_eq!(argsort_rank(&[0.1, 0.5, 0.5, 0.2], 3), 2);
        assert_eq!(recall_at(&[0, 1, 5, 12], 5), 50.0);
    }

    #[test]
    fn repeated_captions_do_not_all_rank_first() {
        // Two images with the same caption text (identical embeddings): the second
        // image's caption ties with the first's and loses the tie.
        let scores = vec![vec![0.9, 0.9], vec![0.9, 0.9]];
        let m = retrieval(&scores, &[0, 1], 2, &[1]);
        assert_eq!(m[0].1, 50.0, "text→image: each text finds image 0 first");
        assert_eq!(m[1].1, 50.0, "image→text: image 1's caption ranks second");
    }

    #[test]
    fn any_caption_in_the_top_k_is_a_hit() {
        // Image 0 owns texts 0 and 1; image 1 owns text 2.
        let scores = vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.3, 0.7]];
        let m = retrieval(&scores, &[0, 0, 1], 2, &[1]);
        let get = |n: &str| m.iter().find(|(k, _)| k == n).unwrap().1;
        // Texts: 0 → image 1 first (miss), 1 → image 0 (hit), 2 → image 1 (hit).
        assert!((get("image_retrieval_recall@1") - 200.0 / 3.0).abs() < 1e-9);
        // Image 0's column [0.1, 0.8, 0.3]: text 1 first, its own: hit. Image 1's
        // column [0.9, 0.2, 0.7]: text 0 first, not its own: miss.
        assert_eq!(get("text_retrieval_recall@1"), 50.0);
    }

    #[test]
    fn balanced_accuracy_averages_the_classes_present() {
        let logits = vec![
            vec![1.0, 0.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![1.0, 0.0, 0.0],
        ];
        let m = classification(&logits, &[0, 0, 1, 1], "").unwrap();
        assert_eq!(m[0].1, 75.0);
        assert!(m[1].1.is_nan(), "acc5 with 3 classes");
        assert_eq!(m[2].1, 75.0, "(2/2 + 1/2) / 2; class 2 has no image");
    }
}
