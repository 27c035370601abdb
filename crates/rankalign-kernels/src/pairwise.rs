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
//! Neither form materialises `n × m × d`. On the CPU the fused op is one node from the
//! features to the loss: the cross term `a bᵀ` is one gemm, and one pass over it turns
//! it into the loss and, in place, into `Q_ij = w_ij f'(s_ij) / (n m)` with its row and
//! column sums, kept for the backward, which is then two gemms and one pass per side:
//! `∂a = 2g (diag(Q 1) a − Q b)`, `∂b = 2g (diag(Qᵀ 1) b − Qᵀ a)` (three gemms in all,
//! as PyTorch's `cdist`). Elsewhere (CUDA) the squared distances are composed and a
//! fused reduction turns them and the weights into per-row sums, with a one-pass
//! backward to `∂/∂s`. Gradients below the clamp are zero (as PyTorch's `clamp`). The
//! weights are constants: no gradient.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::cpu::{
    Float, f64_data, float_dispatch, slice, storage_of, sum, sum_map, vectorised, written_vec,
};

/// Rows per parallel task of the CPU op.
const BLOCK: usize = 16;

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
    if a.device().is_cpu() && b.dtype() == a.dtype() {
        let w = w.to_dtype(a.dtype())?.contiguous()?.detach();
        return a.contiguous()?.apply_op3(
            &b.contiguous()?,
            &w,
            PairwiseLoss {
                form,
                kept: OnceLock::new(),
            },
        );
    }
    let s = squared_distances(a, b)?.contiguous()?;
    let rows = s.apply_op2(
        &w.to_dtype(a.dtype())?.contiguous()?.detach(),
        PairwiseReduce { form },
    )?;
    rows.sum_all()? / (n * m) as f64
}

/// The three storages and layouts of a [`CustomOp3`]'s CPU forward.
type Args<'a> = (
    &'a CpuStorage,
    &'a Layout,
    &'a CpuStorage,
    &'a Layout,
    &'a CpuStorage,
    &'a Layout,
);

/// `(a (n, d), b (m, d), w (n, m)) →` the weighted mean, on the CPU.
struct PairwiseLoss {
    form: PairwiseForm,
    /// `Q` `(n, m)` and its row sums `(n, 1)` and column sums `(m, 1)`, from the forward.
    kept: OnceLock<Arc<[Tensor; 3]>>,
}

/// The loss of a block of rows of `ab` (`a bᵀ`, overwritten with `Q`), their row sums of
/// `Q` into `rows`, and the block's column sums of `Q` into `cols`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pairwise_rows<T: Float>(
    form: PairwiseForm,
    ab: &mut [T],
    w: &[T],
    na: &[T],
    nb: &[T],
    scale: T,
    rows: &mut [T],
    cols: &mut [T],
    values: &mut [T],
) -> f64 {
    let m = nb.len();
    let clamp = T::from(MIN_SQUARED_DISTANCE).unwrap_or_else(T::zero);
    let (two, half) = (T::of_usize(2), T::from(0.5).unwrap_or_else(T::zero));
    let mut total = 0.0;
    for (((q, w), &na), r) in ab
        .chunks_mut(m)
        .zip(w.chunks(m))
        .zip(na)
        .zip(rows.iter_mut())
    {
        match form {
            PairwiseForm::Euclidean => {
                for ((((q, &w), &nb), v), c) in q
                    .iter_mut()
                    .zip(w)
                    .zip(nb)
                    .zip(values.iter_mut())
                    .zip(cols.iter_mut())
                {
                    let s = na + nb - two * *q;
                    let root = if s > clamp { s } else { clamp }.sqrt();
                    *v = w * root;
                    *q = if s >= clamp {
                        w * half / root * scale
                    } else {
                        T::zero()
                    };
                    *c += *q;
                }
            }
            PairwiseForm::LogSquared => {
                for ((((q, &w), &nb), v), c) in q
                    .iter_mut()
                    .zip(w)
                    .zip(nb)
                    .zip(values.iter_mut())
                    .zip(cols.iter_mut())
                {
                    let s = na + nb - two * *q;
                    let sc = if s > clamp { s } else { clamp };
                    *v = w * sc.ln();
                    *q = if s >= clamp {
                        w / sc * scale
                    } else {
                        T::zero()
                    };
                    *c += *q;
                }
            }
        }
        *r = sum(q);
        total += sum(&values[..m]).to_f64();
    }
    total
}

fn pairwise_forward<T: Float>(
    form: PairwiseForm,
    n: usize,
    mut ab: Vec<T>,
    a: &[T],
    b: &[T],
    w: &[T],
) -> Result<(T, [Tensor; 3])> {
    let (m, d) = (ab.len() / n, a.len() / n);
    let norms = |x: &[T]| -> Vec<T> { x.chunks(d).map(|r| sum_map(r, r, |u, _| u * u)).collect() };
    let (na, nb) = (norms(a), norms(b));
    let scale = T::of_usize(n * m).recip();
    let mut rows = vec![T::zero(); n];
    let parts: Vec<(f64, Vec<T>)> = ab
        .par_chunks_mut(m * BLOCK)
        .zip(w.par_chunks(m * BLOCK))
        .zip(na.par_chunks(BLOCK).zip(rows.par_chunks_mut(BLOCK)))
        .map(|((q, w), (na, r))| {
            let mut cols = vec![T::zero(); m];
            let mut values = vec![T::zero(); m];
            let total = vectorised(
                #[inline(always)]
                || pairwise_rows(form, q, w, na, &nb, scale, r, &mut cols, &mut values),
            );
            (total, cols)
        })
        .collect();
    // Block partials in block order: the same sums on every run.
    let mut cols = vec![T::zero(); m];
    let mut total = 0.0;
    for (t, part) in &parts {
        total += t;
        for (c, &p) in cols.iter_mut().zip(part) {
            *c += p;
        }
    }
    let loss = T::from(total / (n * m) as f64).unwrap_or_else(T::nan);
    let dev = Device::Cpu;
    let kept = [
        Tensor::from_vec(ab, (n, m), &dev)?,
        Tensor::from_vec(rows, (n, 1), &dev)?,
        Tensor::from_vec(cols, (m, 1), &dev)?,
    ];
    Ok((loss, kept))
}

impl CustomOp3 for PairwiseLoss {
    fn name(&self) -> &'static str {
        "weighted_pairwise"
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
        let (n, d) = l1.shape().dims2()?;
        let (m, _) = l2.shape().dims2()?;
        let bt = Layout::contiguous_with_offset((m, d), l2.start_offset()).transpose(0, 1)?;
        let a_l = Layout::contiguous_with_offset((n, d), l1.start_offset());
        let ab = s1.matmul(s2, (1, n, m, d), &a_l, &bt)?;
        fn run<T: Float>(
            form: PairwiseForm,
            n: usize,
            ab: Vec<T>,
            (s1, l1, s2, l2, s3, l3): Args,
        ) -> Result<(CpuStorage, [Tensor; 3])> {
            let (loss, kept) = pairwise_forward(
                form,
                n,
                ab,
                slice::<T>(s1, l1, "weighted_pairwise", "a")?,
                slice(s2, l2, "weighted_pairwise", "b")?,
                slice(s3, l3, "weighted_pairwise", "weights")?,
            )?;
            Ok((T::storage(vec![loss]), kept))
        }
        let args = (s1, l1, s2, l2, s3, l3);
        let (out, kept) = match ab {
            CpuStorage::F32(ab) => run(self.form, n, ab, args)?,
            CpuStorage::F64(ab) => run(self.form, n, ab, args)?,
            other => candle_core::bail!(
                "weighted_pairwise: fused kernel runs on f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        let _ = self.kept.set(Arc::new(kept));
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(kept) = self.kept.get() else {
            candle_core::bail!("weighted_pairwise: backward without a CPU forward")
        };
        let [q, rows, cols] = kept.as_ref();
        let (a, b) = (a.detach(), b.detach());
        let g2 = 2.0 * grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // Each side in one pass after its product: `2g (r_i x_i − (Q y)_i)`.
        let side = |x: &Tensor, sums: &Tensor, product: Tensor| {
            x.apply_op3_no_bwd(sums, &product, &SideGrad { g2 })
        };
        let da = side(&a, rows, q.matmul(&b)?)?;
        let db = side(&b, cols, q.t()?.matmul(&a)?)?;
        Ok((Some(da), Some(db), None))
    }
}

/// `(x (n, d), r (n, 1), p (n, d)) → 2g (r_i x_ij − p_ij)`: one side of the CPU op's
/// backward from its product `p` with `Q` (or `Qᵀ`) and `Q`'s row (or column) sums `r`.
struct SideGrad {
    g2: f64,
}

impl CustomOp3 for SideGrad {
    fn name(&self) -> &'static str {
        "weighted_pairwise_grad"
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
        #[allow(unsafe_code)] // `written_vec`
        fn run<T: Float>(x: &[T], r: &[T], p: &[T], g2: f64) -> Vec<T> {
            let d = x.len() / r.len().max(1);
            let g2 = T::from(g2).unwrap_or_else(T::nan);
            // SAFETY: the blocks tile the output, and every element of a block is written.
            let (out, ()) = unsafe {
                written_vec(x.len(), 0, |out| {
                    out.par_chunks_mut(d.max(1) * BLOCK)
                        .zip(x.par_chunks(d.max(1) * BLOCK))
                        .zip(p.par_chunks(d.max(1) * BLOCK).zip(r.par_chunks(BLOCK)))
                        .for_each(|((o, x), (p, r))| {
                            for (((o, x), p), &r) in o
                                .chunks_mut(d.max(1))
                                .zip(x.chunks(d.max(1)))
                                .zip(p.chunks(d.max(1)))
                                .zip(r)
                            {
                                for ((o, &x), &p) in o.iter_mut().zip(x).zip(p) {
                                    o.write(g2 * (r * x - p));
                                }
                            }
                        })
                })
            };
            out
        }
        let what = "weighted_pairwise";
        let (n, d) = l1.shape().dims2()?;
        if l2.shape().elem_count() != n || l3.shape().dims() != [n, d] {
            candle_core::bail!(
                "{what} backward: x {:?}, sums {:?} and product {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let out = float_dispatch!(s1.dtype(), what, |T| T::storage(run(
            slice::<T>(s1, l1, what, "x")?,
            slice(s2, l2, what, "sums")?,
            slice(s3, l3, what, "product")?,
            self.g2,
        )));
        Ok((out, l1.shape().clone()))
    }
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
