//! QuickGELU and the last-dimension softmax as single ops with hand-written backward
//! passes, and their references composed from differentiable candle ops.
//!
//! - QuickGELU, `y = x·σ(1.702x)`: composed it is four nodes (scale, sigmoid, multiply)
//!   and about fifteen passes over the activation in the backward; fused, one pass each
//!   way, with `∂x = ∂y·(s + 1.702·x·s·(1 − s))`, `s = σ(1.702x)`.
//! - Softmax over the last dimension: composed it is five nodes (max, subtract, exp,
//!   sum, divide; candle's fused softmax has no backward); fused, one pass per row
//!   forward, and `∂x = y ∘ (∂y − Σ ∂y∘y)` per row from the saved output.
//!
//! Both run on CPU f32 / f64 in parallel blocks of rows (elementwise results, so the
//! block split does not change a bit); other devices and dtypes use the reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};

use crate::cpu::{Float, filled, float_dispatch, map_blocks, slice, softmax_in_place, sum_map};

/// Elements per parallel task.
const BLOCK: usize = 1 << 14;

/// QuickGELU's sigmoid slope.
const SLOPE: f64 = 1.702;

/// `x·σ(1.702x)` composed from candle ops.
pub fn quick_gelu_reference(xs: &Tensor) -> Result<Tensor> {
    xs.mul(&(xs.affine(-SLOPE, 0.0)?.exp()? + 1.0)?.recip()?)
}

/// Softmax over the last dimension composed from candle ops (max-shifted).
pub fn softmax_last_dim_reference(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?;
    let e = xs.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn fused(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) && xs.elem_count() > 0
}

/// QuickGELU, `x·σ(1.702x)` (OpenAI CLIP's activation): fused on CPU f32 / f64.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    if !fused(xs) {
        return quick_gelu_reference(xs);
    }
    xs.contiguous()?.apply_op1(QuickGelu)
}

/// Softmax over the last dimension: fused on CPU f32 / f64.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !fused(xs) || xs.dim(D::Minus1)? == 0 {
        return softmax_last_dim_reference(xs);
    }
    xs.contiguous()?.apply_op1(Softmax)
}

/// Elements per parallel block for rows of `width`: about [`BLOCK`], whole rows.
fn block_of(width: usize) -> usize {
    BLOCK.div_ceil(width.max(1)) * width.max(1)
}

/// A backward's input and its upstream gradient must have one shape.
fn same_shape(input: &Layout, grad: &Layout, op: &str) -> Result<()> {
    if input.shape() != grad.shape() {
        candle_core::bail!(
            "{op} backward: input {:?} and gradient {:?} differ in shape",
            input.shape(),
            grad.shape()
        )
    }
    Ok(())
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_v())
}

/// `y ← q(y + b)` in place over rows of `b.len()` (or `q(y)` without a bias),
/// `q(x) = x·σ(1.702x)`, in parallel blocks of whole rows: the no-graph epilogue of
/// `linear_quick_gelu`.
pub(crate) fn quick_gelu_in_place<T: Float>(ys: &mut [T], bias: Option<&[T]>, width: usize) {
    use rayon::prelude::*;
    let k = T::from(SLOPE).unwrap_or_else(T::one);
    ys.par_chunks_mut(block_of(width)).for_each(|block| {
        crate::cpu::vectorised(
            #[inline(always)]
            || match bias {
                Some(b) => {
                    for row in block.chunks_exact_mut(width) {
                        for (y, &b) in row.iter_mut().zip(b) {
                            let x = *y + b;
                            *y = x * sigmoid(k * x);
                        }
                    }
                }
                None => {
                    for y in block.iter_mut() {
                        *y = *y * sigmoid(k * *y);
                    }
                }
            },
        )
    });
}

struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick_gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        #[allow(unsafe_code)] // `map_blocks`
        fn run<T: Float>(x: &[T]) -> Vec<T> {
            let k = T::from(SLOPE).unwrap_or_else(T::one);
            // SAFETY: the loop writes every output element.
            unsafe {
                map_blocks(
                    [x],
                    block_of(1),
                    #[inline(always)]
                    |[x], o| {
                        for (o, &x) in o.iter_mut().zip(x) {
                            o.write(x * sigmoid(k * x));
                        }
                    },
                )
            }
        }
        let out = float_dispatch!(s.dtype(), "quick_gelu", |T| T::storage(run(slice::<T>(
            s,
            l,
            "quick_gelu",
            "x"
        )?)));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &QuickGeluGrad)?,
        ))
    }
}

/// `(x, ∂y) → ∂x` of QuickGELU.
struct QuickGeluGrad;

impl CustomOp2 for QuickGeluGrad {
    fn name(&self) -> &'static str {
        "quick_gelu_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[allow(unsafe_code)] // `map_blocks`
        fn run<T: Float>(x: &[T], dy: &[T]) -> Vec<T> {
            let k = T::from(SLOPE).unwrap_or_else(T::one);
            // SAFETY: the loop writes every output element.
            unsafe {
                map_blocks(
                    [x, dy],
                    block_of(1),
                    #[inline(always)]
                    |[x, dy], o| {
                        for ((o, &x), &g) in o.iter_mut().zip(x).zip(dy) {
                            let s = sigmoid(k * x);
                            o.write(g * (s + k * x * s * (T::one() - s)));
                        }
                    },
                )
            }
        }
        same_shape(l1, l2, "quick_gelu")?;
        let out = float_dispatch!(s1.dtype(), "quick_gelu", |T| T::storage(run(
            slice::<T>(s1, l1, "quick_gelu", "x")?,
            slice(s2, l2, "quick_gelu", "gradient")?,
        )));
        Ok((out, l1.shape().clone()))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax_last_dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        #[allow(unsafe_code)] // `map_blocks`
        fn run<T: Float>(x: &[T], d: usize) -> Vec<T> {
            // SAFETY: `filled` writes the whole block first.
            unsafe {
                map_blocks(
                    [x],
                    block_of(d),
                    #[inline(always)]
                    |[x], o| {
                        let o = filled(o, T::zero());
                        for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                            o.copy_from_slice(x);
                            softmax_in_place(o);
                        }
                    },
                )
            }
        }
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let out = float_dispatch!(s.dtype(), "softmax", |T| T::storage(run(
            slice::<T>(s, l, "softmax", "x")?,
            d
        )));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.detach()
                .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `(y, ∂y) → ∂x` of the last-dimension softmax.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax_last_dim_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[allow(unsafe_code)] // `map_blocks`
        fn run<T: Float>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
            // SAFETY: the loops write every output element (whole rows of `d`).
            unsafe {
                map_blocks(
                    [y, dy],
                    block_of(d),
                    #[inline(always)]
                    |[y, dy], o| {
                        for ((o, y), dy) in o.chunks_mut(d).zip(y.chunks(d)).zip(dy.chunks(d)) {
                            let dot = sum_map(y, dy, |y, g| y * g);
                            for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                                o.write(y * (g - dot));
                            }
                        }
                    },
                )
            }
        }
        same_shape(l1, l2, "softmax")?;
        let d = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = float_dispatch!(s1.dtype(), "softmax", |T| T::storage(run(
            slice::<T>(s1, l1, "softmax", "y")?,
            slice(s2, l2, "softmax", "gradient")?,
            d,
        )));
        Ok((out, l1.shape().clone()))
    }
}
