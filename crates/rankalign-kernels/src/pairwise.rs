//! L2RCLIP's ordinal diversity term: the weighted mean of a function of pairwise
//! distances between two feature sets (spec `l2rclip.md` §2.1–2.3).
//!
//! For `a` `(n, d)`, `b` `(m, d)` and label-distance weights `w` `(n, m)`, with
//! `s_ij = max(‖a_i‖² + ‖b_j‖² − 2 a_i·b_j, 1e-12)`:
//!
//! - [`PairwiseForm::Euclidean`], the authors' code (`euclidean_dist` with its 1e-12
//!   clamp): `mean_ij w_ij · √s_ij`;
//! - [`PairwiseForm::LogSquared`], the paper's meanNN estimator (Eq. 4) without its
//!   constant `D/(N(M−1))`: `mean_ij w_ij · log s_ij`.
//!
//! Neither form materialises `n × m × d`: the cross term is one matmul, and the fused
//! op turns the `(n, m)` matrix of squared distances and the weights into per-row sums
//! in one pass, with a backward that produces `∂/∂s` in one pass too. Gradients below
//! the clamp are zero (as PyTorch's `clamp`). The weights are constants: no gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f64_data, storage_of};

/// The clamp on squared distances.
pub const MIN_SQUARED_DISTANCE: f64 = 1e-12;

/// Which function of the distance is averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairwiseForm {
    /// `√s`, the released code.
    Euclidean,
    /// `log s`, the paper's meanNN entropy estimator.
    LogSquared,
}

impl PairwiseForm {
    fn value(self, s: f64) -> f64 {
        match self {
            PairwiseForm::Euclidean => s.sqrt(),
            PairwiseForm::LogSquared => s.ln(),
        }
    }

    /// Derivative with respect to `s`.
    fn slope(self, s: f64) -> f64 {
        match self {
            PairwiseForm::Euclidean => 0.5 / s.sqrt(),
            PairwiseForm::LogSquared => 1.0 / s,
        }
    }
}

fn check(a: &Tensor, b: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let (n, d) = a.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "weighted_pairwise: a must be (n, d), got {:?}",
            a.dims()
        ))
    })?;
    let (m, d2) = b.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "weighted_pairwise: b must be (m, d), got {:?}",
            b.dims()
        ))
    })?;
    if d != d2 || w.dims() != [n, m] {
        candle_core::bail!(
            "weighted_pairwise: a {:?} and b {:?} need the same width and weights [{n}, {m}], got {:?}",
            a.dims(),
            b.dims(),
            w.dims()
        )
    }
    Ok((n, m))
}

/// Squared distances `(n, m)` from one matmul and the row norms.
fn squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let na = a.sqr()?.sum_keepdim(D::Minus1)?;
    let nb = b.sqr()?.sum(D::Minus1)?.unsqueeze(0)?;
    na.broadcast_add(&nb)?.sub(&(a.matmul(&b.t()?)? * 2.0)?)
}

/// The weighted mean, composed from candle ops (the reference).
pub fn weighted_pairwise_reference(
    a: &Tensor,
    b: &Tensor,
    w: &Tensor,
    form: PairwiseForm,
) -> Result<Tensor> {
    check(a, b, w)?;
    let s = squared_distances(a, b)?.clamp(MIN_SQUARED_DISTANCE, f64::INFINITY)?;
    let f = match form {
        PairwiseForm::Euclidean => s.sqrt()?,
        PairwiseForm::LogSquared => s.log()?,
    };
    (f * w.detach())?.mean_all()
}

/// The weighted mean with the fused reduction (f32 and f64; other dtypes use the
/// reference).
pub fn weighted_pairwise(a: &Tensor, b: &Tensor, w: &Tensor, form: PairwiseForm) -> Result<Tensor> {
    let (n, m) = check(a, b, w)?;
    if !matches!(a.dtype(), DType::F32 | DType::F64) || n * m == 0 {
        return weighted_pairwise_reference(a, b, w, form);
    }
    let s = squared_distances(a, b)?.contiguous()?;
    let rows = s.apply_op2(
        &w.to_dtype(a.dtype())?.contiguous()?.detach(),
        PairwiseReduce { form },
    )?;
    rows.sum_all()? / (n * m) as f64
}

/// `(s (n, m), w (n, m)) → Σ_j w_ij f(max(s_ij, clamp))`, per row `(n)`.
#[derive(Clone, Copy, Debug)]
struct PairwiseReduce {
    form: PairwiseForm,
}

impl CustomOp2 for PairwiseReduce {
    fn name(&self) -> &'static str {
        "weighted_pairwise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, m) = l1.shape().dims2()?;
        let (s, w) = (
            f64_data(s1, l1, "weighted_pairwise", "distances")?,
            f64_data(s2, l2, "weighted_pairwise", "weights")?,
        );
        let rows: Vec<f64> = (0..n)
            .into_par_iter()
            .map(|i| {
                (0..m)
                    .map(|j| w[i * m + j] * self.form.value(s[i * m + j].max(MIN_SQUARED_DISTANCE)))
                    .sum()
            })
            .collect();
        Ok((storage_of(rows, s1.dtype()), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::pairwise_fwd(self.form, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        s: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // ∂/∂s_ij = grad_i · w_ij · f'(s_ij), zero below the clamp.
        let scaled = w.broadcast_mul(&grad.unsqueeze(1)?)?.contiguous()?;
        let ds = s.apply_op2_no_bwd(&scaled, &PairwiseSlope { form: self.form })?;
        Ok((Some(ds), None))
    }
}

/// `(s, c) → c · f'(s)` where `s` is above the clamp, else 0.
struct PairwiseSlope {
    form: PairwiseForm,
}

impl CustomOp2 for PairwiseSlope {
    fn name(&self) -> &'static str {
        "weighted_pairwise_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, c) = (
            f64_data(s1, l1, "weighted_pairwise", "distances")?,
            f64_data(s2, l2, "weighted_pairwise", "weights")?,
        );
        let out: Vec<f64> = s
            .par_iter()
            .zip(c.par_iter())
            .map(|(&s, &c)| {
                if s >= MIN_SQUARED_DISTANCE {
                    c * self.form.slope(s)
                } else {
                    0.0
                }
            })
            .collect();
        Ok((storage_of(out, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::pairwise_bwd(self.form, s1, l1, s2, l2)
    }
}
