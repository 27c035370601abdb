//! Ordinal objectives of L2RCLIP (Wang et al., NeurIPS 2023) and OrdinalCLIP
//! (Li et al., NeurIPS 2022), as the authors' code computes them (spec `l2rclip.md` §2).
//!
//! - [`cop_stage1`]: L_cop, the cross-modal ordinal pairwise loss of stage 1 —
//!   image–text diversity, tightness, and the text–text spread weighted by λ;
//! - [`scop`]: L_scop, stage 2's version against all `M` rank features (no text–text
//!   term: the language side is frozen);
//! - [`sup_con`]: the asymmetric contrastive loss L_i2t / L_t2i, whose positives are
//!   every candidate with the anchor's rank;
//! - [`cross_entropy`] and OrdinalCLIP's [`ordinal_kl`].
//!
//! Label-distance weights are `ŵ = (|Δy| − min) / max` over the pairs used, exactly as
//! in the code (not `(w − min)/(max − min)`). Where the code divides by `max = 0` (a batch
//! whose labels are all equal) we set the weights to zero instead of producing NaN.
//! [`OrdinalForm`] switches the distance term between the code's Euclidean distance and
//! the paper's meanNN form, `log ‖·‖²`. Features are used as given; callers normalise.
//! Labels are rank indices `0..M` on the host: the weights are constants.

use candle_core::{D, Result, Tensor};
use rankalign_kernels::{PairwiseForm, weighted_pairwise};
use serde::{Deserialize, Serialize};

/// The distance term of the diversity losses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrdinalForm {
    /// `‖a − b‖₂` with the `1e-12` clamp on the square, as the released code.
    #[default]
    Code,
    /// `log ‖a − b‖²`, the paper's meanNN entropy estimator (Eq. 4, without its
    /// constant `D/(N(M−1))`).
    Paper,
}

impl OrdinalForm {
    fn pairwise(self) -> PairwiseForm {
        match self {
            OrdinalForm::Code => PairwiseForm::Euclidean,
            OrdinalForm::Paper => PairwiseForm::LogSquared,
        }
    }
}

/// The coefficients inside L_cop: `L_d + tightness·L_t + text·L_ctr`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopWeights {
    pub tightness: f64,
    /// λ, the strength of the text–text term.
    pub text: f64,
}

impl Default for CopWeights {
    /// The code's 0.5 and 0.5 (`ordinal_ce_stage1.py` L37).
    fn default() -> Self {
        Self {
            tightness: 0.5,
            text: 0.5,
        }
    }
}

/// `(|d| − min) / max` over the entries where `used`, zero elsewhere; all zero if
/// `max = 0` or nothing is used.
fn normalised_distances(
    rows: usize,
    cols: usize,
    dist: impl Fn(usize, usize) -> Option<f64>,
) -> Vec<f64> {
    let mut w = vec![0.0; rows * cols];
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    let mut used = vec![false; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            if let Some(d) = dist(i, j) {
                w[i * cols + j] = d;
                used[i * cols + j] = true;
                lo = lo.min(d);
                hi = hi.max(d);
            }
        }
    }
    for (x, u) in w.iter_mut().zip(&used) {
        *x = if *u && hi > 0.0 { (*x - lo) / hi } else { 0.0 };
    }
    w
}

fn check_rows(name: &str, t: &Tensor, rows: usize, width: usize) -> Result<()> {
    if t.dims() != [rows, width] {
        candle_core::bail!("{name}: expected [{rows}, {width}], got {:?}", t.dims())
    }
    Ok(())
}

/// `mean_i ‖a_i − b_i‖²` (summed over features).
fn tightness(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.sum(D::Minus1)?.mean_all()
}

/// L_cop (stage 1). `v`: image features `(B, D)`; `r`: each sample's rank text feature
/// `(B, D)` (`r_{y_i}`); `g`: the tightness targets `(B, D)`; `labels`: rank indices.
/// Pairs are `i < j` only: `L_d = −mean ŵ_ij‖v_i − r_j‖`, `L_ctr = −mean ŵ_ij‖r_i − r_j‖`,
/// `L_t = mean_i ‖v_i − g_i‖²`.
pub fn cop_stage1(
    v: &Tensor,
    r: &Tensor,
    g: &Tensor,
    labels: &[u32],
    weights: CopWeights,
    form: OrdinalForm,
) -> Result<Tensor> {
    let b = labels.len();
    let d = v.dim(D::Minus1)?;
    for (name, t) in [
        ("cop_stage1: v", v),
        ("cop_stage1: r", r),
        ("cop_stage1: g", g),
    ] {
        check_rows(name, t, b, d)?;
    }
    let l_t = tightness(v, g)?;
    let pairs = b * b.saturating_sub(1) / 2;
    if pairs == 0 {
        return l_t * weights.tightness;
    }
    let w = normalised_distances(b, b, |i, j| {
        (i < j).then(|| (f64::from(labels[i]) - f64::from(labels[j])).abs())
    });
    let w = Tensor::from_vec(w, (b, b), v.device())?.to_dtype(v.dtype())?;
    // The kernel averages over all B² entries; the code averages over the P pairs.
    let to_pairs = (b * b) as f64 / pairs as f64;
    let form = form.pairwise();
    let l_d = (weighted_pairwise(v, r, &w, form)? * -to_pairs)?;
    let l_ctr = (weighted_pairwise(r, r, &w, form)? * -to_pairs)?;
    (l_d + (l_t * weights.tightness)?)? + (l_ctr * weights.text)?
}

/// L_scop (stage 2). `v`: image features `(B, D)`; `r`: all rank features `(M, D)`;
/// `labels`: rank indices. `L_t + L_d` with `L_t = mean_i ‖v_i − r_{y_i}‖²` and
/// `L_d = −mean_{i,k} ŵ_ik‖v_i − r_k‖` over every rank `k`. Label distances below 1e-6
/// count as 1e-6, as the code's clamp makes them.
pub fn scop(v: &Tensor, r: &Tensor, labels: &[u32], form: OrdinalForm) -> Result<Tensor> {
    let (b, m) = (labels.len(), r.dim(0)?);
    let d = v.dim(D::Minus1)?;
    check_rows("scop: v", v, b, d)?;
    check_rows("scop: r", r, m, d)?;
    let targets = rank_indices(labels, m, v)?;
    let l_t = tightness(v, &r.index_select(&targets, 0)?)?;
    // The code measures label distances with its clamped `euclidean_dist`, so a zero
    // distance counts as 1e-6 (`ordinal_ce.py` L11-15).
    let w = normalised_distances(b, m, |i, k| {
        Some((f64::from(labels[i]) - k as f64).abs().max(1e-6))
    });
    let w = Tensor::from_vec(w, (b, m), v.device())?.to_dtype(v.dtype())?;
    let l_d = (weighted_pairwise(v, r, &w, form.pairwise())? * -1.0)?;
    l_t + l_d
}

fn rank_indices(labels: &[u32], m: usize, like: &Tensor) -> Result<Tensor> {
    if let Some(&bad) = labels.iter().find(|&&y| y as usize >= m) {
        candle_core::bail!("label {bad} is out of range for {m} ranks")
    }
    Tensor::from_vec(labels.to_vec(), labels.len(), like.device())
}

/// The asymmetric contrastive loss: for each anchor `a`, the mean log-softmax (over all
/// candidates, logits `exp(logit_scale)·anchor·cand`) of the candidates that share its
/// label, averaged over anchors. `logit_scale` is the raw parameter. Anchors without a
/// positive are left out (the code would divide by zero).
pub fn sup_con(
    anchor: &Tensor,
    cand: &Tensor,
    anchor_labels: &[u32],
    cand_labels: &[u32],
    logit_scale: &Tensor,
) -> Result<Tensor> {
    let (b1, b2) = (anchor_labels.len(), cand_labels.len());
    let d = anchor.dim(D::Minus1)?;
    check_rows("sup_con: anchor", anchor, b1, d)?;
    check_rows("sup_con: cand", cand, b2, d)?;
    let mut mask = vec![0.0f64; b1 * b2];
    let mut rows = Vec::new();
    for (i, &a) in anchor_labels.iter().enumerate() {
        let n = cand_labels.iter().filter(|&&c| c == a).count();
        for (j, &c) in cand_labels.iter().enumerate() {
            if c == a {
                mask[i * b2 + j] = 1.0 / n as f64;
            }
        }
        if n > 0 {
            rows.push(i);
        }
    }
    if rows.is_empty() {
        candle_core::bail!("sup_con: no anchor has a positive candidate")
    }
    let mask = Tensor::from_vec(mask, (b1, b2), anchor.device())?.to_dtype(anchor.dtype())?;
    let logits = anchor
        .matmul(&cand.t()?)?
        .broadcast_mul(&logit_scale.exp()?.to_dtype(anchor.dtype())?)?;
    let log_prob = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let per_anchor = (log_prob * mask)?.sum(D::Minus1)?;
    per_anchor.sum_all()? * (-1.0 / rows.len() as f64)
}

/// Mean cross-entropy of `logits` `(B, M)` against rank indices.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (b, m) = logits.dims2()?;
    if labels.len() != b {
        candle_core::bail!("cross_entropy: {} labels for {b} rows", labels.len())
    }
    let targets = rank_indices(labels, m, logits)?;
    candle_nn::loss::cross_entropy(logits, &targets)
}

/// OrdinalCLIP's text-to-image KL term (`runner.py`): for each rank present in the
/// batch, the target over the batch is `softmax(10·[y_b = k])`, compared by KL divergence
/// with `log_softmax` of that rank's logits over the batch; summed and divided by the
/// number of present ranks.
pub fn ordinal_kl(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (b, m) = logits.dims2()?;
    if labels.len() != b {
        candle_core::bail!("ordinal_kl: {} labels for {b} rows", labels.len())
    }
    rank_indices(labels, m, logits)?;
    let mut target = vec![0.0f64; m * b];
    let mut entropy = 0.0;
    let mut present = 0usize;
    for k in 0..m {
        let n = labels.iter().filter(|&&y| y as usize == k).count();
        if n == 0 {
            continue;
        }
        present += 1;
        let hot = 10f64.exp();
        let z = n as f64 * hot + (b - n) as f64;
        for (j, &y) in labels.iter().enumerate() {
            let t = if y as usize == k { hot / z } else { 1.0 / z };
            target[k * b + j] = t;
            entropy += t * t.ln();
        }
    }
    let target = Tensor::from_vec(target, (m, b), logits.device())?.to_dtype(logits.dtype())?;
    let log_p = candle_nn::ops::log_softmax(&logits.t()?.contiguous()?, D::Minus1)?;
    let cross = (log_p * target)?.sum_all()?;
    ((cross * -1.0)? + entropy)? / present as f64
}
