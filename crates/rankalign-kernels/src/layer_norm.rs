//! LayerNorm over the last dimension: a fused kernel with a hand-written backward, and
//! the reference composed from differentiable candle ops.
//!
//! `candle_nn::LayerNorm` dispatches contiguous input to a fused op that has no
//! backward, so gradients stop there without an error (with the stock CLIP only 29 of
//! 78 variables got gradients). Forward, per row: mean and biased variance (two passes,
//! in the element type), `y = (x − μ)·r·w + b` with `r = 1/√(σ² + ε)`. Backward, per row, with
//! `x̂ = (x − μ)·r` and `g = ∂y·w`: `∂x = r·(g − mean(g) − x̂·mean(g·x̂))`; `∂w = Σ ∂y·x̂`
//! and `∂b = Σ ∂y` over rows, summed in fixed blocks in a fixed order so that results do
//! not depend on thread scheduling (resume is bit-exact).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use crate::cpu::{
    Float, LANES, float_dispatch, lanes_total, slice, sum, sum_map, vectorised, written_vec,
};

/// Rows per parallel task (and per partial sum of `∂w`, `∂b`).
const BLOCK: usize = 64;

fn check(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<usize> {
    let d = xs.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "layer_norm: input {:?} needs weight and bias of shape [{d}], got {:?} and {:?}",
            xs.dims(),
            weight.dims(),
            bias.dims()
        )
    }
    Ok(d)
}

/// `y = (x − mean) / √(var + eps) · weight + bias` over the last dimension, composed
/// from candle ops. Half-precision input is normalised in f32 and cast back.
pub fn layer_norm_reference(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    check(xs, weight, bias)?;
    let dtype = xs.dtype();
    let xs = match dtype {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32)?,
        _ => xs.clone(),
    };
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centred = xs.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// LayerNorm over the last dimension, fused for f32 and f64 (other dtypes use the
/// reference). `xs` is `(.., d)`; `weight` and `bias` are `(d)`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check(xs, weight, bias)?;
    let fused = matches!(xs.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == xs.dtype()
        && bias.dtype() == xs.dtype();
    if !fused || xs.elem_count() == 0 {
        return layer_norm_reference(xs, weight, bias, eps);
    }
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp {
            eps,
            stats: OnceLock::new(),
        },
    )
}

struct LayerNormOp {
    eps: f64,
    /// Each row's mean and `1/√(var + eps)` (as f64, which holds f32 and f64 exactly),
    /// kept by the CPU forward for the backward: one op instance is one forward.
    stats: OnceLock<Arc<Vec<f64>>>,
}

/// Mean and `1/√(var + eps)` of a row (two passes: the centred variance does not cancel).
#[inline(always)]
fn moments<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let d = T::of_usize(row.len());
    let mean = sum(row) / d;
    let var = sum_map(row, row, |v, _| (v - mean) * (v - mean)) / d;
    let eps = T::from(eps).unwrap_or_else(T::zero);
    (mean, (var + eps).sqrt().recip())
}

/// `y` and the rows' `[mean, rstd]` pairs.
#[allow(unsafe_code)] // `written_vec`
fn forward<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64) -> (Vec<T>, Vec<f64>) {
    let d = w.len();
    // The whole rows that `written_vec`'s promise rests on (`check` guarantees them).
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer_norm: {} values in rows of {d}",
        x.len()
    );
    let mut stats = vec![0f64; 2 * (x.len() / d)];
    // SAFETY: the blocks cover `out`, and `forward_rows` writes every element of a block.
    let (out, ()) = unsafe {
        written_vec(x.len(), 0, |out| {
            out.par_chunks_mut(d * BLOCK)
                .zip(x.par_chunks(d * BLOCK))
                .zip(stats.par_chunks_mut(2 * BLOCK))
                .for_each(|((o, xb), st)| {
                    vectorised(
                        #[inline(always)]
                        || forward_rows(xb, w, b, eps, o, st),
                    )
                })
        })
    };
    (out, stats)
}

/// The forward of a block of rows into `out` (every element written), their
/// `[mean, rstd]` into `stats`.
#[inline(always)]
fn forward_rows<T: Float>(
    x: &[T],
    w: &[T],
    b: &[T],
    eps: f64,
    out: &mut [MaybeUninit<T>],
    stats: &mut [f64],
) {
    let d = w.len();
    for ((orow, row), st) in out.chunks_mut(d).zip(x.chunks(d)).zip(stats.chunks_mut(2)) {
        let (mean, r) = moments(row, eps);
        st[0] = mean.to_f64();
        st[1] = r.to_f64();
        for (((o, &xv), &wv), &bv) in orow.iter_mut().zip(row).zip(w).zip(b) {
            o.write((xv - mean) * r * wv + bv);
        }
    }
}

/// `(∂x, ∂w, ∂b)` packed as one vector of `rows·d + 2d`; `stats` are the forward's
/// `[mean, rstd]` pairs (recomputed from `x` when absent).
#[allow(unsafe_code)] // `written_vec`
fn backward<T: Float>(x: &[T], w: &[T], dy: &[T], stats: Option<&[f64]>, eps: f64) -> Vec<T> {
    let d = w.len();
    // The whole rows that `written_vec`'s promise rests on (`LayerNormGrad` checks them).
    assert!(
        d > 0 && x.len().is_multiple_of(d) && dy.len() == x.len(),
        "layer_norm: shapes of x and ∂y"
    );
    // SAFETY: the blocks cover `dx`, and `backward_rows` writes every element of a block.
    let (mut dx, partials): (Vec<T>, Vec<Vec<T>>) = unsafe {
        written_vec(x.len(), 2 * d, |dx| {
            dx.par_chunks_mut(d * BLOCK)
                .zip(x.par_chunks(d * BLOCK).zip(dy.par_chunks(d * BLOCK)))
                .enumerate()
                .map(|(blk, (dxb, (xb, dyb)))| {
                    let stats =
                        stats.map(|st| &st[2 * blk * BLOCK..(2 * (blk + 1) * BLOCK).min(st.len())]);
                    vectorised(
                        #[inline(always)]
                        || backward_rows(xb, w, dyb, stats, eps, dxb),
                    )
                })
                .collect()
        })
    };

    // Block partials added in block order, in f64.
    let mut sums = vec![0f64; 2 * d];
    for part in &partials {
        for (s, p) in sums.iter_mut().zip(part) {
            *s += p.to_f64().unwrap_or(f64::NAN);
        }
    }
    dx.extend(sums.into_iter().map(|v| T::from(v).unwrap_or_else(T::nan)));
    dx
}

/// The backward of a block of rows: `∂x` into `dx` (every element written); returns the
/// block's `[∂w, ∂b]`. Two passes per row: the first adds to `∂w`, `∂b` and the row's
/// sums `Σ g`, `Σ g·x̂` (in [`LANES`] lanes, as `sum_map` would); the second writes `∂x`,
/// recomputing `x̂` and `g` from the row, which is in cache, rather than storing them.
#[inline(always)]
fn backward_rows<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    stats: Option<&[f64]>,
    eps: f64,
    dx: &mut [MaybeUninit<T>],
) -> Vec<T> {
    let d = w.len();
    let dt = T::of_usize(d);
    let split = d - d % LANES;
    let mut part = vec![T::zero(); 2 * d];
    let (dw, db) = part.split_at_mut(d);
    let (w_main, w_rem) = w.split_at(split);
    for (i, ((dxr, xr), dyr)) in dx
        .chunks_mut(d)
        .zip(x.chunks(d))
        .zip(dy.chunks(d))
        .enumerate()
    {
        let (mean, r) = match stats {
            Some(st) => (
                T::from(st[2 * i]).unwrap_or_else(T::nan),
                T::from(st[2 * i + 1]).unwrap_or_else(T::nan),
            ),
            None => moments(xr, eps),
        };
        let (mut sg, mut sgx) = ([T::zero(); LANES], [T::zero(); LANES]);
        let (x_main, x_rem) = xr.split_at(split);
        let (dy_main, dy_rem) = dyr.split_at(split);
        let (dw_main, dw_rem) = dw.split_at_mut(split);
        let (db_main, db_rem) = db.split_at_mut(split);
        for ((((xc, dyc), wc), dwc), dbc) in x_main
            .chunks_exact(LANES)
            .zip(dy_main.chunks_exact(LANES))
            .zip(w_main.chunks_exact(LANES))
            .zip(dw_main.chunks_exact_mut(LANES))
            .zip(db_main.chunks_exact_mut(LANES))
        {
            for k in 0..LANES {
                let xh = (xc[k] - mean) * r;
                let g = dyc[k] * wc[k];
                dwc[k] += dyc[k] * xh;
                dbc[k] += dyc[k];
                sg[k] += g;
                sgx[k] += g * xh;
            }
        }
        for (k, ((((&xv, &gv), &wv), dwv), dbv)) in x_rem
            .iter()
            .zip(dy_rem)
            .zip(w_rem)
            .zip(dw_rem.iter_mut())
            .zip(db_rem.iter_mut())
            .enumerate()
        {
            let xh = (xv - mean) * r;
            let g = gv * wv;
            *dwv += gv * xh;
            *dbv += gv;
            sg[k] += g;
            sgx[k] += g * xh;
        }
        let mg = lanes_total(sg) / dt;
        let mgx = lanes_total(sgx) / dt;
        for (((o, &xv), &gv), &wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            let xh = (xv - mean) * r;
            o.write(r * (gv * wv - mg - xh * mgx));
        }
    }
    part
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer_norm"
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
        let out = float_dispatch!(s1.dtype(), "layer_norm", |T| {
            let (y, stats) = forward(
                slice::<T>(s1, l1, "layer_norm", "x")?,
                slice(s2, l2, "layer_norm", "weight")?,
                slice(s3, l3, "layer_norm", "bias")?,
                self.eps,
            );
            let _ = self.stats.set(Arc::new(stats));
            T::storage(y)
        });
        Ok((out, l1.shape().clone()))
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
        crate::cuda::layer_norm_fwd(self.eps, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(
            w,
            &grad.contiguous()?,
            &LayerNormGrad {
                eps: self.eps,
                stats: self.stats.get().cloned(),
            },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        // Buffers of their own, as candle keeps a gradient as it is given: views would
        // hold the whole `∂x`-sized buffer until the optimiser has run. (`copy` would
        // clone the whole buffer too.)
        let dw = packed.narrow(0, n, d)?.force_contiguous()?;
        let db = packed.narrow(0, n + d, d)?.force_contiguous()?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, ∂y) → [∂x (flattened), ∂w, ∂b]`.
struct LayerNormGrad {
    eps: f64,
    stats: Option<Arc<Vec<f64>>>,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer_norm_grad"
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
        let d = l2.shape().elem_count();
        let n = l1.shape().elem_count();
        if d == 0 || !n.is_multiple_of(d) || l3.shape().elem_count() != n {
            candle_core::bail!(
                "layer_norm backward: x {:?}, weight {:?} and gradient {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let out = float_dispatch!(s1.dtype(), "layer_norm", |T| T::storage(backward(
            slice::<T>(s1, l1, "layer_norm", "x")?,
            slice(s2, l2, "layer_norm", "weight")?,
            slice(s3, l3, "layer_norm", "gradient")?,
            self.stats.as_ref().map(|s| s.as_slice()),
            self.eps,
        )));
        Ok((out, Shape::from(n + 2 * d)))
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
        crate::cuda::layer_norm_bwd(self.eps, s1, l1, s2, l2, s3, l3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_hand_values_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[1f32, 2., 3., 6.]], &dev)?;
        let w = Var::new(&[1f32, 2., 1., 1.], &dev)?;
        let b = Var::new(&[0f32, 0., 1., 0.], &dev)?;
        let y = layer_norm(&x, &w, &b, 0.0)?;
        // mean 3, biased var 3.5
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, 2.0 * (-1.0 / s), 1.0, 3.0 / s];
        let got = y.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        let grads = y.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            assert!(grads.get(v).is_some());
        }
        Ok(())
    }

    #[test]
    fn backward_from_kept_stats_equals_recomputed() {
        let (rows, d) = (130, 37); // more than one block, an odd width
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 7919) % 113) as f32 * 0.37 - 9.0)
            .collect();
        let dy: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 104729) % 97) as f32 * 0.05 - 2.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.01).collect();
        let b = vec![0.1f32; d];
        let (_, stats) = forward(&x, &w, &b, 1e-5);
        let kept = backward(&x, &w, &dy, Some(&stats), 1e-5);
        let recomputed = backward(&x, &w, &dy, None, 1e-5);
        assert_eq!(kept, recomputed);
    }

    #[test]
    fn rejects_mismatched_weight() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let err = layer_norm(&x, &w, &w, 1e-5).unwrap_err().to_string();
        assert!(err.contains("layer_norm") && err.contains("[4]"), "{err}");
    }
}
