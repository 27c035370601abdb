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

use candle_core::{D, DType, Result, Tensor};

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

/// Per-row Plackett–Luce NLL, shape `(n)`.
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
    let dtype = scores.dtype();
    let x = scores.contiguous()?.gather(&order.contiguous()?, 1)?;
    let (x, eps) = match mode {
        PlMode::Parity => (x, PARITY_EPS),
        PlMode::Exact => (x.to_dtype(DType::F64)?, 0.0),
    };
    // The row max as one gathered element, so that with tied maxima its gradient goes to
    // a single entry (as PyTorch's `max(dim)` does), not to every tied entry.
    let argmax = x.argmax_keepdim(D::Minus1)?;
    let max = x.gather(&argmax, D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    // suffix[k] = Σ_{j ≥ k} e_j = Σ_j e_j · tril[j][k].
    let tril = Tensor::tril2(m, x.dtype(), x.device())?;
    let suffix = shifted.exp()?.matmul(&tril)?;
    let terms = ((suffix + eps)?.log()? - shifted)?.to_dtype(dtype)?;
    let terms = match weights {
        Some(w) => terms.broadcast_mul(&w.to_dtype(dtype)?)?,
        None => terms,
    };
    terms.sum(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
