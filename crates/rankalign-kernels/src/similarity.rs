//! The ops of a contrastive loss over a batch's similarity matrices, each one node with
//! a hand-written backward, and their references composed from candle ops:
//!
//! - [`l2_normalize`]: rows divided by their L2 norm; one pass each way,
//!   `∂x = (∂y − y·⟨∂y, y⟩) / ‖x‖` per row (composed: four nodes, each a pass and a
//!   zero-plus-add in the backward);
//! - [`gram`]: `X Xᵀ`, the lower triangle by gemm and the rest mirrored (about half a
//!   product's work), whose gradient `(G + Gᵀ) X` is one product where autograd of
//!   `x.matmul(x.t())` runs two, plus a strided copy of the transposed one;
//! - [`scale`]: a tensor times a one-element (learned) scale, one pass each way with the
//!   scale's gradient `Σ ∂y ⊙ x` (composed: a broadcast product, two passes and a
//!   reduction backward, on candle's elementwise pool);
//! - [`transpose`]: a 2-D transpose into contiguous memory in tiles (candle's strided
//!   copy moves one element at a time with index arithmetic);
//! - [`info_nce`]: CLIP's symmetric InfoNCE over square logits,
//!   `½ [mean_i (lse_j S_ij − S_ii) + mean_j (lse_i S_ij − S_jj)]`; forward, the row and
//!   column log-sum-exps in one read each, backward one pass,
//!   `∂S_ij = u/2b · (e^{S_ij − r_i} + e^{S_ij − c_j}) − u/b · δ_ij`. Composed, the
//!   column direction runs softmax over a transposed view (strided copies) and the
//!   backward passes a dozen matrices.
//!
//! All run on CPU f32 / f64 (f32 computed in f32, as PyTorch does); other devices and
//! dtypes use the reference.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape};
use candle_core::{Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{
    Float, float_dispatch, map_blocks, slice, span, sum, sum_map, vectorised, written_vec,
};
use crate::products::{self, Shared};

/// Elements per parallel task of the row-wise kernels (rounded up to whole rows).
const ROW_BLOCK: usize = 1 << 13;
/// Side of the square tiles of a transpose.
const TILE: usize = 32;

fn fused(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) && xs.elem_count() > 0
}

fn matrix(xs: &Tensor, op: &str) -> Result<(usize, usize)> {
    xs.dims2().map_err(|_| {
        candle_core::Error::Msg(format!("{op}: expected a matrix, got {:?}", xs.dims()))
    })
}

// ---------------------------------------------------------------------------------------
// L2 normalisation

/// Rows of `xs` `(.., d)` divided by their L2 norm, composed from candle ops.
pub fn l2_normalize_reference(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// Rows of `xs` `(.., d)` divided by their L2 norm (no ε: a zero row gives NaN, as the
/// composed form does); fused on CPU f32 / f64.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    if !fused(xs) || xs.dim(D::Minus1)? == 0 {
        return l2_normalize_reference(xs);
    }
    xs.contiguous()?.apply_op1(L2Normalize)
}

/// `out` row by row from `a` (and `b`, `c` of the same shape, or empty), `d` wide, in
/// parallel blocks of rows; `f` gets one row of each and writes every element of its
/// output row.
fn map_rows<T: Float>(
    inputs: [&[T]; 3],
    d: usize,
    f: impl Fn([&[T]; 3], &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let d = d.max(1);
    // SAFETY: the rows tile each block, and `f` writes every element of each row.
    #[allow(unsafe_code)]
    unsafe {
        map_blocks(
            inputs,
            ROW_BLOCK.div_ceil(d) * d,
            #[inline(always)]
            |parts, o| {
                for (r, o) in o.chunks_mut(d).enumerate() {
                    f(parts.map(|x| span(x, r * d, (r + 1) * d)), o);
                }
            },
        )
    }
}

struct L2Normalize;

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        "l2_normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], d: usize) -> Vec<T> {
            map_rows(
                [x, &[], &[]],
                d,
                #[inline(always)]
                |[x, _, _], o| {
                    let inv = sum_map(x, x, |a, b| a * b).sqrt().recip();
                    for (o, &x) in o.iter_mut().zip(x) {
                        o.write(x * inv);
                    }
                },
            )
        }
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let out = float_dispatch!(s.dtype(), "l2_normalize", |T| T::storage(run(
            slice::<T>(s, l, "l2_normalize", "x")?,
            d
        )));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            &res.detach(),
            &grad.contiguous()?,
            &L2NormalizeGrad,
        )?))
    }
}

/// `(x, y, ∂y) → ∂x = (∂y − y·⟨∂y, y⟩) / ‖x‖` per row.
struct L2NormalizeGrad;

impl CustomOp3 for L2NormalizeGrad {
    fn name(&self) -> &'static str {
        "l2_normalize_grad"
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
        fn run<T: Float>(x: &[T], y: &[T], dy: &[T], d: usize) -> Vec<T> {
            map_rows(
                [x, y, dy],
                d,
                #[inline(always)]
                |[x, y, dy], o| {
                    let inv = sum_map(x, x, |a, b| a * b).sqrt().recip();
                    let dot = sum_map(y, dy, |a, b| a * b);
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                        o.write((g - y * dot) * inv);
                    }
                },
            )
        }
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let what = "l2_normalize";
        let out = float_dispatch!(s1.dtype(), "l2_normalize", |T| T::storage(run(
            slice::<T>(s1, l1, what, "x")?,
            slice(s2, l2, what, "y")?,
            slice(s3, l3, what, "gradient")?,
            d,
        )));
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Scaling by a scalar tensor

/// `xs` times the one-element tensor `s` (a learned scale), composed.
pub fn scale_reference(xs: &Tensor, s: &Tensor) -> Result<Tensor> {
    xs.broadcast_mul(s)
}

/// `xs` times the one-element tensor `s`: one pass each way, with `∂s = Σ ∂y ⊙ x` summed
/// in fixed blocks (candle's broadcast product runs two elementwise passes and a
/// reduction backward); fused on CPU f32 / f64.
pub fn scale(xs: &Tensor, s: &Tensor) -> Result<Tensor> {
    if s.elem_count() != 1 {
        candle_core::bail!("scale: the scale must have one element, got {:?}", s.dims())
    }
    if !fused(xs) || s.dtype() != xs.dtype() || !s.device().is_cpu() {
        return scale_reference(xs, s);
    }
    xs.contiguous()?.apply_op2(&s.contiguous()?, Scale)
}

struct Scale;

impl CustomOp2 for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], s: T) -> Vec<T> {
            map_rows(
                [x, &[], &[]],
                ROW_BLOCK,
                #[inline(always)]
                |[x, _, _], o| {
                    for (o, &x) in o.iter_mut().zip(x) {
                        o.write(x * s);
                    }
                },
            )
        }
        // `s2` has one element (`scale` checks it).
        let out = float_dispatch!(s1.dtype(), "scale", |T| T::storage(run(
            slice::<T>(s1, l1, "scale", "x")?,
            slice::<T>(s2, l2, "scale", "s")?[0],
        )));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(&s.detach(), &Scale)?;
        let ds = x.apply_op2_no_bwd(&grad, &Dot)?.reshape(s.shape())?;
        Ok((Some(dx), Some(ds)))
    }
}

/// `Σ a ⊙ b` over two equally long storages, as one element: per-block sums (in lanes)
/// added in block order, so the same bits on every run.
struct Dot;

impl CustomOp2 for Dot {
    fn name(&self) -> &'static str {
        "dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(a: &[T], b: &[T]) -> Vec<T> {
            let parts: Vec<T> = a
                .par_chunks(ROW_BLOCK)
                .zip(b.par_chunks(ROW_BLOCK))
                .map(|(a, b)| {
                    vectorised(
                        #[inline(always)]
                        || sum_map(a, b, |x, y| x * y),
                    )
                })
                .collect();
            vec![parts.into_iter().fold(T::zero(), |acc, p| acc + p)]
        }
        if l1.shape() != l2.shape() {
            candle_core::bail!("dot: shapes {:?} and {:?} differ", l1.shape(), l2.shape())
        }
        let out = float_dispatch!(s1.dtype(), "dot", |T| T::storage(run(
            slice::<T>(s1, l1, "dot", "a")?,
            slice(s2, l2, "dot", "b")?,
        )));
        Ok((out, Shape::from(())))
    }
}

// ---------------------------------------------------------------------------------------
// Transpose, and a matrix plus its transpose

/// `xᵀ` of `x` `(n, m)` into a contiguous `(m, n)`, plus `x` itself where `add_self`
/// (`x + xᵀ`, for a square `x`), reading `x` in `TILE`-square tiles so that both sides
/// stay in cache; parallel over output row tiles.
fn tiled_transpose<T: WithDType>(x: &[T], n: usize, m: usize, add_self: bool) -> Vec<T> {
    // SAFETY: every output row tile covers all `n` columns of its `TILE` rows.
    #[allow(unsafe_code)]
    let (out, ()) = unsafe {
        written_vec(n * m, 0, |out| {
            out.par_chunks_mut(TILE * n.max(1))
                .enumerate()
                .for_each(|(t, o)| {
                    let j0 = t * TILE;
                    let rows = o.len() / n.max(1);
                    for i0 in (0..n).step_by(TILE) {
                        for dj in 0..rows {
                            let j = j0 + dj;
                            for i in i0..(i0 + TILE).min(n) {
                                let v = x[i * m + j];
                                o[dj * n + i].write(if add_self { v + x[j * n + i] } else { v });
                            }
                        }
                    }
                })
        })
    };
    out
}

/// The f32 / f64 dispatch of [`tiled_transpose`] for the ops below.
fn tiled_storage(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    add_self: bool,
) -> Result<(CpuStorage, Shape)> {
    let (n, m) = l.shape().dims2()?;
    if add_self && n != m {
        candle_core::bail!("{op}: expected a square matrix, got {:?}", l.dims())
    }
    let out = float_dispatch!(s.dtype(), op, |T| T::storage(tiled_transpose(
        slice::<T>(s, l, op, "x")?,
        n,
        m,
        add_self
    )));
    Ok((out, Shape::from((m, n))))
}

/// `op` on the matrix `xs` where it runs fused (CPU f32 / f64), else `reference`.
fn matrix_op(
    xs: &Tensor,
    name: &str,
    op: impl CustomOp1 + Send + Sync + 'static,
    reference: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    matrix(xs, name)?;
    if !fused(xs) {
        return reference(xs);
    }
    xs.contiguous()?.apply_op1(op)
}

/// `xs` `(n, m)` transposed into contiguous memory, composed (a strided copy).
pub fn transpose_reference(xs: &Tensor) -> Result<Tensor> {
    xs.t()?.contiguous()
}

/// `xs` `(n, m)` transposed into a contiguous `(m, n)`; fused on CPU f32 / f64.
pub fn transpose(xs: &Tensor) -> Result<Tensor> {
    matrix_op(xs, "transpose", Transpose, transpose_reference)
}

struct Transpose;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        tiled_storage(s, l, "transpose", false)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Transpose)?))
    }
}

/// `G + Gᵀ` of a square `G`.
struct Symmetrise;

impl CustomOp1 for Symmetrise {
    fn name(&self) -> &'static str {
        "symmetrise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        tiled_storage(s, l, "symmetrise", true)
    }
}

// ---------------------------------------------------------------------------------------
// Gram matrix

/// `X Xᵀ` for `xs` `(n, d)`, composed (autograd of a product with the transposed view).
pub fn gram_reference(xs: &Tensor) -> Result<Tensor> {
    xs.matmul(&xs.t()?)
}

/// `X Xᵀ` for `xs` `(n, d)`: forward the lower triangle by blocked gemms, mirrored
/// (about half a product), backward one gemm (`(G + Gᵀ) X`); fused on CPU f32 / f64.
pub fn gram(xs: &Tensor) -> Result<Tensor> {
    matrix_op(xs, "gram", Gram, gram_reference)
}

struct Gram;

impl CustomOp1 for Gram {
    fn name(&self) -> &'static str {
        "gram"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        let out = float_dispatch!(s.dtype(), "gram", |T| T::storage(gram_lower(
            slice::<T>(s, l, "gram", "x")?,
            n,
            d
        )));
        Ok((out, Shape::from((n, n))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let sym = grad.contiguous()?.apply_op1_no_bwd(&Symmetrise)?;
        Ok(Some(sym.matmul(&x.detach())?))
    }
}

/// Rows per task of [`gram_lower`].
const GRAM_BLOCK: usize = 128;

/// `X Xᵀ` of a contiguous `(n, d)` `x`, computing the lower triangle only: block row `i`
/// (`GRAM_BLOCK` rows, one single-threaded gemm per task, the tasks in parallel) takes
/// the columns up to its own last row, about half the products of a full gemm; then each
/// entry above the diagonal is copied from its mirror. The block rows are fixed, so the
/// result does not depend on the thread count.
#[allow(unsafe_code)]
fn gram_lower<T: Float>(x: &[T], n: usize, d: usize) -> Vec<T> {
    assert_eq!(
        x.len(),
        n * d,
        "gram: {n} rows of {d} in {} values",
        x.len()
    );
    // SAFETY: every gemm writes rows `r0..r0 + rows`, columns
    // `0..r0 + rows` of the output, within its `n·n` elements, and block rows do not
    // overlap; the mirror pass writes each row's entries right of its diagonal block
    // and reads only entries at or left of another row's, which the gemms wrote. Together
    // they write all `n·n` elements.
    let (out, ()) = unsafe {
        written_vec(n * n, 0, |out| {
            let dst = Shared(out.as_mut_ptr() as *mut T);
            let blocks = n.div_ceil(GRAM_BLOCK);
            // Largest first, for balance.
            (0..blocks).into_par_iter().rev().for_each(|b| {
                let r0 = b * GRAM_BLOCK;
                let rows = GRAM_BLOCK.min(n - r0);
                products::serial(
                    (rows, r0 + rows, d),
                    (dst.at(r0 * n), n, 1),
                    (x.as_ptr().add(r0 * d), d, 1),
                    // `Xᵀ`: its (k, j) entry is `x[j·d + k]`.
                    (x.as_ptr(), 1, d),
                    T::one(),
                );
            });
            (0..blocks).into_par_iter().for_each(|b| {
                let r0 = b * GRAM_BLOCK;
                let rows = GRAM_BLOCK.min(n - r0);
                for c0 in (r0 + rows..n).step_by(TILE) {
                    for i in r0..r0 + rows {
                        for j in c0..(c0 + TILE).min(n) {
                            *dst.at(i * n + j) = *dst.at(j * n + i);
                        }
                    }
                }
            });
        })
    };
    out
}

// ---------------------------------------------------------------------------------------
// Symmetric InfoNCE

/// CLIP's symmetric InfoNCE over square logits `(b, b)` (row `i`: image `i` against
/// every text), targets on the diagonal, composed from candle ops.
pub fn info_nce_reference(logits: &Tensor) -> Result<Tensor> {
    let b = square(logits)?;
    let lse = |x: &Tensor| -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        (x.broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + max)?
            .sum_all()
    };
    let eye = Tensor::eye(b, logits.dtype(), logits.device())?;
    let diag = (logits * eye)?.sum_all()?;
    let both = ((lse(logits)? + lse(&logits.t()?)?)? - (diag * 2.0)?)?;
    both / (2.0 * b as f64)
}

/// CLIP's symmetric InfoNCE over square logits `(b, b)`, targets on the diagonal: a
/// scalar; fused on CPU f32 / f64.
pub fn info_nce(logits: &Tensor) -> Result<Tensor> {
    square(logits)?;
    if !fused(logits) {
        return info_nce_reference(logits);
    }
    logits.contiguous()?.apply_op1(InfoNce)
}

fn square(logits: &Tensor) -> Result<usize> {
    match logits.dims2() {
        Ok((b, c)) if b == c => Ok(b),
        _ => candle_core::bail!(
            "info_nce: logits must be a square (b, b) matrix, got {:?}",
            logits.dims()
        ),
    }
}

/// Columns per parallel task of the column log-sum-exp.
const COL_BLOCK: usize = 128;

/// The log-sum-exp of every row and of every column of the square `x` `(b, b)`.
fn log_sum_exps<T: Float>(x: &[T], b: usize) -> (Vec<T>, Vec<T>) {
    let rows: Vec<T> = x
        .par_chunks(b)
        .map(|row| {
            vectorised(
                #[inline(always)]
                || {
                    let max = row
                        .iter()
                        .copied()
                        .fold(T::neg_infinity(), num_traits::Float::max);
                    let s = sum_map(row, row, |v, _| (v - max).exp_v());
                    max + s.ln()
                },
            )
        })
        .collect();
    let cols: Vec<T> = (0..b.div_ceil(COL_BLOCK))
        .into_par_iter()
        .flat_map_iter(|k| {
            let (c0, c1) = (k * COL_BLOCK, ((k + 1) * COL_BLOCK).min(b));
            vectorised(
                #[inline(always)]
                || {
                    let mut max = vec![T::neg_infinity(); c1 - c0];
                    for row in x.chunks(b) {
                        for (m, &v) in max.iter_mut().zip(&row[c0..c1]) {
                            *m = num_traits::Float::max(*m, v);
                        }
                    }
                    let mut acc = vec![T::zero(); c1 - c0];
                    for row in x.chunks(b) {
                        for ((a, &m), &v) in acc.iter_mut().zip(&max).zip(&row[c0..c1]) {
                            *a += (v - m).exp_v();
                        }
                    }
                    max.iter()
                        .zip(&acc)
                        .map(|(&m, &a)| m + a.ln())
                        .collect::<Vec<T>>()
                },
            )
        })
        .collect();
    (rows, cols)
}

struct InfoNce;

impl CustomOp1 for InfoNce {
    fn name(&self) -> &'static str {
        "info_nce"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], b: usize) -> T {
            let (rows, cols) = log_sum_exps(x, b);
            let diag: T = (0..b).map(|i| x[i * b + i]).sum();
            (sum(&rows) + sum(&cols) - (diag + diag)) / T::of_usize(2 * b)
        }
        let b = l.shape().dims2()?.0;
        let out = float_dispatch!(s.dtype(), "info_nce", |T| T::storage(vec![run(
            slice::<T>(s, l, "info_nce", "logits")?,
            b
        )]));
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.to_dtype(x.dtype())?.reshape(())?,
            &InfoNceGrad,
        )?))
    }
}

/// `(logits, u) → ∂(u·info_nce)/∂logits`.
struct InfoNceGrad;

impl CustomOp2 for InfoNceGrad {
    fn name(&self) -> &'static str {
        "info_nce_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(x: &[T], up: T, b: usize) -> Vec<T> {
            let (rows, cols) = log_sum_exps(x, b);
            let half = up / T::of_usize(2 * b);
            let diag = up / T::of_usize(b);
            // SAFETY: each task writes its whole row.
            #[allow(unsafe_code)]
            let (out, ()) = unsafe {
                written_vec(b * b, 0, |out| {
                    out.par_chunks_mut(b).enumerate().for_each(|(i, o)| {
                        let (row, r) = (&x[i * b..(i + 1) * b], rows[i]);
                        vectorised(
                            #[inline(always)]
                            || {
                                for ((o, &v), &c) in o.iter_mut().zip(row).zip(&cols) {
                                    o.write(half * ((v - r).exp_v() + (v - c).exp_v()));
                                }
                            },
                        );
                        let v = row[i];
                        o[i].write(half * ((v - r).exp_v() + (v - cols[i]).exp_v()) - diag);
                    })
                })
            };
            out
        }
        let b = l1.shape().dims2()?.0;
        let what = "info_nce";
        let out = float_dispatch!(s1.dtype(), "info_nce", |T| {
            let up = slice::<T>(s2, l2, what, "gradient")?[0];
            T::storage(run(slice::<T>(s1, l1, what, "logits")?, up, b))
        });
        Ok((out, l1.shape().clone()))
    }
}
