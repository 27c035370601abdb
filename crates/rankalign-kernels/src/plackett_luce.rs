//! Plackett–Luce negative log-likelihood of a given order (ListMLE), composed from
//! candle ops.
//!
//! For one row with scores `x` already gathered in the order to be scored
//! (`x_1` is the item placed first), the loss is
//! `Σ_k μ_k · (log Σ_{j ≥ k} exp(x_j) − x_k)`, the negative log-probability that a
//! Plackett–Luce model with utilities `x` draws exactly this order (RankCLIP Eq. 3–5,
//! spec `rankclip.md` §1.2). Two forms are provided:
//!
//! - [`PlMode::Parity`]: the authors' code (allRank's `listMLE`): subtract the row max
//!   (not detached), `log(Σ_{j≥k} exp(x_j − max) + 1e-10) − (x_k − max)`, in the input
//!   dtype. The ε is not negligible once a suffix falls ~23 logits below the row max.
//! - [`PlMode::Exact`]: the same with ε = 0, evaluated in f64 so that suffix sums do not
//!   underflow at logit scale 100 (a range of 200), then cast back.
//!
//! The reverse cumulative sum is a product with a lower-triangular ones matrix, which
//! costs O(m²) per row; the fused kernel replaces it with a linear pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use crate::cpu::{f64_data, filled, storage_of, vectorised, written_vec};

/// The ε that allRank's (and so RankCLIP's) ListMLE adds inside the log.
pub const PARITY_EPS: f64 = 1e-10;

/// Which form of the Plackett–Luce NLL to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlMode {
    /// Max shift and ε = 1e-10 inside the log, in the input dtype, as the authors' code.
    Parity,
    /// The mathematically stated NLL: no ε, evaluated in f64.
    Exact,
}

fn check(scores: &Tensor, order: &Tensor, weights: Option<&Tensor>) -> Result<(usize, usize)> {
    let (n, m) = scores.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "pl_nll: scores must be (n, m), got {:?}",
            scores.dims()
        ))
    })?;
    if order.dims() != [n, m] || order.dtype() != DType::U32 {
        candle_core::bail!(
            "pl_nll: order must be u32 {:?} like scores, got {:?} {:?}",
            [n, m],
            order.dtype(),
            order.dims()
        )
    }
    if let Some(w) = weights
        && w.dims() != [m]
    {
        candle_core::bail!("pl_nll: weights must be [{m}], got {:?}", w.dims())
    }
    Ok((n, m))
}

/// Per-row Plackett–Luce NLL, shape `(n)`, composed from candle ops (the reference).
///
/// - `scores`: `(n, m)` float utilities;
/// - `order`: `(n, m)` u32, `order[i][k]` is the column placed at position `k` in row `i`
///   (each row a permutation of `0..m`; not checked, a repeated index is a different loss);
/// - `weights`: optional per-position weights `(m)` (RankCLIP's μ), applied before the sum.
pub fn pl_nll_reference(
    scores: &Tensor,
    order: &Tensor,
    mode: PlMode,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, m) = check(scores, order, weights)?;
    let dtype = scores.dtype();
    let x = scores.contiguous()?.gather(&order.contiguous()?, 1)?;
    let (x, eps) = match mode {
        PlMode::Parity => (x, PARITY_EPS),
        PlMode::Exact => (x.to_dtype(DType::F64)?, 0.0),
    };
    // −inf scores are absent items: their terms are 0 and they add nothing to suffix sums.
    let absent =
        x.broadcast_eq(&Tensor::new(f64::NEG_INFINITY, x.device())?.to_dtype(x.dtype())?)?;
    let absent_f = absent.to_dtype(x.dtype())?;
    // The row max as one gathered element, so that with tied maxima its gradient goes to
    // a single entry (as PyTorch's `max(dim)` does), not to every tied entry. A row with
    // no item left shifts by 0 instead of −inf.
    let argmax = x.argmax_keepdim(D::Minus1)?;
    let max = x.gather(&argmax, D::Minus1)?;
    let max_absent =
        max.broadcast_eq(&Tensor::new(f64::NEG_INFINITY, x.device())?.to_dtype(x.dtype())?)?;
    let max = max_absent.where_cond(&max.zeros_like()?, &max)?;
    let shifted = x.broadcast_sub(&max)?;
    // suffix[k] = Σ_{j ≥ k} e_j = Σ_j e_j · tril[j][k]. Absent positions add 1 inside the
    // log so that no 0/0 reaches the backward pass; their terms are zeroed below.
    let tril = Tensor::tril2(m, x.dtype(), x.device())?;
    let suffix = (shifted.exp()?.matmul(&tril)? + &absent_f)?;
    let terms = ((suffix + eps)?.log()? - &shifted)?;
    let terms = absent
        .where_cond(&terms.zeros_like()?, &terms)?
        .to_dtype(dtype)?;
    let terms = match weights {
        Some(w) => terms.broadcast_mul(&w.to_dtype(dtype)?)?,
        None => terms,
    };
    terms.sum(D::Minus1)
}

/// The fused Plackett–Luce NLL: `(scores (n, m), order (n, m) u32) → (n)`.
///
/// Forward, per row, from the last position to the first: a running log-sum-exp
/// (exact) or a running sum of `exp(x − max)` (parity), accumulated in f64. Backward, per
/// row, from the first position to the last, with `L_k` the log-sum-exp of the suffix
/// starting at `k`:
///
/// - exact: `∂/∂x_j = −μ_j + exp(x_j − L_j)·A_j`, `A_j = A_{j−1}·exp(L_j − L_{j−1}) + μ_j`;
///   every factor is at most 1, so nothing overflows at any logit scale;
/// - parity: `∂/∂x_j = −μ_j + exp(x_j − M)·B_j`, `B_j = Σ_{k≤j} μ_k/(c_k + ε)`, plus
///   `Σ_k μ_k·ε/(c_k + ε)` on the row's first maximum (the max is not detached).
///
/// Both passes are O(m) per row with O(m) scratch; rows run in parallel.
///
/// When the scores are part of a graph (parity form, CPU f32), the forward also writes
/// each row's gradient, from the same gather and exponentials, and keeps it for the
/// backward, which then only scales it by the upstream gradient (a recomputed backward
/// would gather, exponentiate and sum every row again).
#[derive(Clone, Debug)]
struct PlNll {
    mode: PlMode,
    weights: Option<Vec<f64>>,
    /// The gradients `∂loss_i/∂scores` `(n, m)` written by the forward, until the
    /// backward takes them; `None`: the backward recomputes.
    kept: Option<Arc<Mutex<Option<Vec<f32>>>>>,
}

impl PlNll {
    fn mu(&self, k: usize) -> f64 {
        self.weights.as_ref().map_or(1.0, |w| w[k])
    }

    /// The position weights in f32 (`None`: all 1).
    fn mu_f32(&self, m: usize) -> Option<Vec<f32>> {
        self.weights
            .as_ref()
            .map(|w| w.iter().take(m).map(|&v| v as f32).collect())
    }

    /// Suffix statistics of the present items into `out`, position by position: exact,
    /// `L_k` = log-sum-exp of the items at `k..` (−inf if none), by a running max; parity,
    /// `c_k = Σ_{j ≥ k} exp(x_j − max)`, with each `exp(x_k − max)` also left in `exps`.
    fn suffix(&self, x: &[f64], max: f64, out: &mut Vec<f64>, exps: &mut [f64]) {
        let m = x.len();
        out.clear();
        out.resize(m, f64::NEG_INFINITY);
        let (mut run_max, mut run_sum) = (f64::NEG_INFINITY, 0.0);
        for k in (0..m).rev() {
            let present = x[k] != f64::NEG_INFINITY;
            match self.mode {
                PlMode::Exact => {
                    if present {
                        if x[k] > run_max {
                            run_sum = run_sum * (run_max - x[k]).exp() + 1.0;
                            run_max = x[k];
                        } else {
                            run_sum += (x[k] - run_max).exp();
                        }
                    }
                    out[k] = if run_sum > 0.0 {
                        run_max + run_sum.ln()
                    } else {
                        f64::NEG_INFINITY
                    };
                }
                PlMode::Parity => {
                    exps[k] = if present { (x[k] - max).exp() } else { 0.0 };
                    run_sum += exps[k];
                    out[k] = run_sum;
                }
            }
        }
    }

    /// Loss of one row; `x` is the row gathered in order.
    fn row_loss(&self, x: &[f64], sc: &mut RowScratch) -> f64 {
        let max = first_max(x).map_or(0.0, |a| x[a]);
        sc.g.clear();
        sc.g.resize(x.len(), 0.0);
        self.suffix(x, max, &mut sc.stats, &mut sc.g);
        let term = |k: usize| match self.mode {
            PlMode::Exact => sc.stats[k] - x[k],
            PlMode::Parity => (sc.stats[k] + PARITY_EPS).ln() - (x[k] - max),
        };
        (0..x.len())
            .filter(|&k| x[k] != f64::NEG_INFINITY)
            .map(|k| self.mu(k) * term(k))
            .sum()
    }

    /// Gradient of one row's loss with respect to `x` (in order), into `g`.
    fn row_grad(&self, x: &[f64], g: &mut [f64], scratch: &mut Vec<f64>) {
        let m = x.len();
        let argmax = first_max(x);
        let max = argmax.map_or(0.0, |a| x[a]);
        // Parity leaves exp(x_k − max) in g; exact leaves g untouched.
        self.suffix(x, max, scratch, g);
        match self.mode {
            PlMode::Exact => {
                let mut acc = 0.0;
                let mut prev = f64::NEG_INFINITY;
                for j in 0..m {
                    let l = scratch[j];
                    acc = if l == f64::NEG_INFINITY || prev == f64::NEG_INFINITY {
                        0.0
                    } else {
                        acc * (l - prev).exp()
                    };
                    if x[j] == f64::NEG_INFINITY {
                        g[j] = 0.0;
                    } else {
                        acc += self.mu(j);
                        g[j] = -self.mu(j) + (x[j] - l).exp() * acc;
                    }
                    prev = l;
                }
            }
            PlMode::Parity => {
                let (mut b, mut via_max) = (0.0, 0.0);
                for j in 0..m {
                    if x[j] == f64::NEG_INFINITY {
                        g[j] = 0.0;
                        continue;
                    }
                    let denom = scratch[j] + PARITY_EPS;
                    b += self.mu(j) / denom;
                    via_max += self.mu(j) * PARITY_EPS / denom;
                    g[j] = -self.mu(j) + g[j] * b;
                }
                if let Some(a) = argmax {
                    g[a] += via_max;
                }
            }
        }
    }
}

mod parity32;

/// Position of the first maximum among present (finite or +inf) entries.
fn first_max(x: &[f64]) -> Option<usize> {
    first_max_by(x.iter().copied())
}

/// [`first_max`] of a sequence: a scan that takes the first present entry, then any
/// entry greater than the one taken.
fn first_max_by(x: impl Iterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (k, v) in x.enumerate() {
        if v != f64::NEG_INFINITY && best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map(|(k, _)| k)
}

fn order_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("pl_nll: order must be contiguous".into()))?;
    match storage {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("pl_nll: order must be u32, got {:?}", storage.dtype()),
    }
}

/// Row `i` of `scores` gathered in `order`, widened to f64, into `x`.
fn gather_row(scores: &CpuStorage, offset: usize, order: &[u32], x: &mut Vec<f64>) {
    x.clear();
    match scores {
        CpuStorage::F32(v) => x.extend(order.iter().map(|&c| f64::from(v[offset + c as usize]))),
        CpuStorage::F64(v) => x.extend(order.iter().map(|&c| v[offset + c as usize])),
        _ => unreachable!("invariant: checked f32/f64 before gathering"),
    }
}

fn float_offset(s: &CpuStorage, l: &Layout, what: &str) -> Result<usize> {
    let (a, _) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("pl_nll: {what} must be contiguous")))?;
    match s.dtype() {
        DType::F32 | DType::F64 => Ok(a),
        dt => candle_core::bail!("pl_nll: {what} must be f32 or f64, got {dt:?}"),
    }
}

impl CustomOp2 for PlNll {
    fn name(&self) -> &'static str {
        "pl_nll"
    }

    #[allow(unsafe_code)] // `written_vec`
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m) = l1.shape().dims2()?;
        let offset = float_offset(s1, l1, "scores")?;
        let order = order_slice(s2, l2)?;
        if let (PlMode::Parity, CpuStorage::F32(v)) = (self.mode, s1) {
            let mu = self.mu_f32(m);
            if let Some(kept) = &self.kept {
                // SAFETY: the rows cover `grads`, and each is filled before it is used.
                let (grads, losses) = unsafe {
                    written_vec(n * m, 0, |grads| {
                        grads
                            .par_chunks_mut(m)
                            .enumerate()
                            .map_init(parity32::Scratch::default, |sc, (i, g)| {
                                let g = filled(g, 0.0);
                                let row = &v[offset + i * m..offset + (i + 1) * m];
                                let ord = &order[i * m..(i + 1) * m];
                                vectorised(
                                    #[inline(always)]
                                    || parity32::row_loss_grad(row, ord, mu.as_deref(), sc, g),
                                )
                            })
                            .collect::<Vec<f32>>()
                    })
                };
                *kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
                return Ok((CpuStorage::F32(losses), Shape::from(n)));
            }
            let losses: Vec<f32> = (0..n)
                .into_par_iter()
                .map_init(parity32::Scratch::default, |sc, i| {
                    let row = &v[offset + i * m..offset + (i + 1) * m];
                    vectorised(
                        #[inline(always)]
                        || parity32::row_loss(row, &order[i * m..(i + 1) * m], mu.as_deref(), sc),
                    )
                })
                .collect();
            return Ok((CpuStorage::F32(losses), Shape::from(n)));
        }
        let losses: Vec<f64> = (0..n)
            .into_par_iter()
            .map_init(RowScratch::default, |sc, i| {
                let mut x = std::mem::take(&mut sc.x);
                gather_row(s1, offset + i * m, &order[i * m..(i + 1) * m], &mut x);
                let loss = self.row_loss(&x, sc);
                sc.x = x;
                loss
            })
            .collect();
        Ok((storage_of(losses, s1.dtype()), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::pl_nll_fwd(self.mode, self.weights.as_deref(), s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        scores: &Tensor,
        order: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let kept = self
            .kept
            .as_ref()
            .and_then(|k| k.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(mut g) = kept {
            let (n, m) = scores.dims2()?;
            let up = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            g.par_chunks_mut(m.max(1)).zip(&up).for_each(|(row, &u)| {
                for v in row.iter_mut() {
                    *v *= u;
                }
            });
            return Ok((Some(Tensor::from_vec(g, (n, m), scores.device())?), None));
        }
        let g = scores.apply_op3_no_bwd(order, &grad.contiguous()?, &PlNllGrad(self.clone()))?;
        Ok((Some(g), None))
    }
}

/// `(scores, order, upstream (n)) → ∂loss/∂scores (n, m)`.
struct PlNllGrad(PlNll);

/// Scratch buffers of one worker thread.
#[derive(Default)]
struct RowScratch {
    x: Vec<f64>,
    g: Vec<f64>,
    stats: Vec<f64>,
    acc: Vec<f64>,
}

impl PlNllGrad {
    /// Gradients of all rows; `of` converts to the output element type.
    fn rows<T: Copy + Send + Sync>(
        &self,
        s1: &CpuStorage,
        offset: usize,
        order: &[u32],
        upstream: &[f64],
        m: usize,
        of: fn(f64) -> T,
    ) -> Vec<T> {
        let n = upstream.len();
        let mut out = vec![of(0.0); n * m];
        out.par_chunks_mut(m.max(1)).enumerate().for_each_init(
            RowScratch::default,
            |sc, (i, out_row)| {
                let ord = &order[i * m..(i + 1) * m];
                gather_row(s1, offset + i * m, ord, &mut sc.x);
                sc.g.clear();
                sc.g.resize(m, 0.0);
                self.0.row_grad(&sc.x, &mut sc.g, &mut sc.stats);
                // Scatter back to columns; a column repeated in `order` sums, as a gather's
                // backward does.
                sc.acc.clear();
                sc.acc.resize(m, 0.0);
                for (k, &c) in ord.iter().enumerate() {
                    sc.acc[c as usize] += sc.g[k] * upstream[i];
                }
                for (o, &a) in out_row.iter_mut().zip(&sc.acc) {
                    *o = of(a);
                }
            },
        );
        out
    }
}

impl CustomOp3 for PlNllGrad {
    fn name(&self) -> &'static str {
        "pl_nll_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m) = l1.shape().dims2()?;
        let offset = float_offset(s1, l1, "scores")?;
        let order = order_slice(s2, l2)?;
        let upstream = f64_data(s3, l3, "pl_nll", "gradient")?;
        if let (PlMode::Parity, CpuStorage::F32(v)) = (self.0.mode, s1) {
            let mu = self.0.mu_f32(m);
            let mut out = vec![0f32; n * m];
            out.par_chunks_mut(m).enumerate().for_each_init(
                parity32::Scratch::default,
                |sc, (i, out_row)| {
                    let row = &v[offset + i * m..offset + (i + 1) * m];
                    let ord = &order[i * m..(i + 1) * m];
                    let up = upstream[i] as f32;
                    vectorised(
                        #[inline(always)]
                        || parity32::row_grad(row, ord, mu.as_deref(), up, sc, out_row),
                    );
                },
            );
            return Ok((CpuStorage::F32(out), Shape::from((n, m))));
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.rows(s1, offset, order, &upstream, m, |v| v as f32)),
            _ => CpuStorage::F64(self.rows(s1, offset, order, &upstream, m, |v| v)),
        };
        Ok((out, Shape::from((n, m))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::pl_nll_bwd(
            self.0.mode,
            self.0.weights.as_deref(),
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
        )
    }
}

/// Per-row Plackett–Luce NLL, shape `(n)`: the fused kernel, with the same contract as
/// [`pl_nll_reference`] (including −inf scores as absent items). f32 and f64 run fused;
/// other dtypes fall back to the reference.
pub fn pl_nll(
    scores: &Tensor,
    order: &Tensor,
    mode: PlMode,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, m) = check(scores, order, weights)?;
    if !matches!(scores.dtype(), DType::F32 | DType::F64) {
        return pl_nll_reference(scores, order, mode, weights);
    }
    let weights = weights
        .map(|w| w.to_dtype(DType::F64)?.to_vec1::<f64>())
        .transpose()?;
    if n == 0 || m == 0 {
        return Tensor::zeros(n, scores.dtype(), scores.device());
    }
    // The forward keeps the gradient only where a backward can follow and the kernel
    // writes it (parity, CPU f32).
    let keep = scores.track_op()
        && mode == PlMode::Parity
        && scores.dtype() == DType::F32
        && scores.device().is_cpu();
    let kept = keep.then(|| Arc::new(Mutex::new(None)));
    scores.contiguous()?.apply_op2(
        &order.contiguous()?,
        PlNll {
            mode,
            weights,
            kept,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The f32 lanes' argmax equals the plain scan on rows of ties, −∞, NaN (first
    /// present or later) and +∞, at lengths around its lane width.
    #[test]
    fn vector_first_max_equals_the_scan() {
        let pool = [
            1.0f32,
            2.0,
            2.0,
            -3.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
        ];
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for len in (0..40).chain([255, 256, 257]) {
            for trial in 0..50 {
                // Trials 0..10 leave out NaN and +∞; the rest draw from the whole pool.
                let kinds = if trial < 10 { 5 } else { pool.len() };
                let row: Vec<f32> = (0..len).map(|_| pool[next() % kinds]).collect();
                let scan = first_max_by(row.iter().map(|&v| f64::from(v)));
                assert_eq!(parity32::first_max(&row), scan, "{row:?}");
            }
        }
    }

    fn order_of(rows: &[&[u32]]) -> Tensor {
        let m = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), m), &Device::Cpu).unwrap()
    }

    /// Spec `rankclip.md` §1.8: P = [[2,1,.5],[.1,.3,.2]], R = [[3,2,1],[1,3,2]].
    #[test]
    fn spec_vector() -> Result<()> {
        let p = Tensor::new(&[[2.0f64, 1.0, 0.5], [0.1, 0.3, 0.2]], &Device::Cpu)?;
        // Descending order of R per row.
        let order = order_of(&[&[0, 1, 2], &[1, 2, 0]]);
        let rows = pl_nll_reference(&p, &order, PlMode::Parity, None)?;
        let mean = rows.mean_all()?.to_scalar::<f64>()?;
        assert!((mean - 1.2923926387439832).abs() < 1e-12, "{mean}");
        let ln: Vec<f64> = (1..=3).map(|k| 1.0 / ((k + 1) as f64).ln()).collect();
        let w = Tensor::new(ln.as_slice(), &Device::Cpu)?;
        let rows = pl_nll_reference(&p, &order, PlMode::Parity, Some(&w))?;
        let mean = rows.mean_all()?.to_scalar::<f64>()?;
        assert!((mean - 1.5667595530402483).abs() < 1e-12, "{mean}");
        Ok(())
    }

    /// At logit range 200 the parity form is dominated by ε; the exact form stays the NLL.
    #[test]
    fn exact_mode_is_stable_at_large_range() -> Result<()> {
        let p = Tensor::new(&[[100f32, -100., 0.]], &Device::Cpu)?;
        let order = order_of(&[&[0, 1, 2]]);
        let exact = pl_nll_reference(&p, &order, PlMode::Exact, None)?.to_vec1::<f32>()?[0];
        // Position 1: log(e^100 + e^-100 + 1) - 100 ≈ e^-100; position 2: log(e^-100 + 1) + 100 ≈ 100.
        assert!((exact - 100.0).abs() < 1e-4, "{exact}");
        let parity = pl_nll_reference(&p, &order, PlMode::Parity, None)?.to_vec1::<f32>()?[0];
        // ε floors log(suffix) at about -23 where the exact suffix is e^-100 or e^-200.
        assert!(parity > exact + 100.0, "parity {parity} vs exact {exact}");
        Ok(())
    }

    #[test]
    fn bad_shapes_name_the_op() {
        let p = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let order = order_of(&[&[0, 1]]);
        let err = pl_nll_reference(&p, &order, PlMode::Exact, None).unwrap_err();
        assert!(err.to_string().starts_with("pl_nll"), "{err}");
    }
}
