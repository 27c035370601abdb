//! `y = x Wᵀ + b` over the last dimension as one op with a hand-written backward, and
//! the reference composed from differentiable candle ops.
//!
//! Composed, a linear layer on `(b, s, in)` input is five graph nodes (a reshape, the
//! transposed weight view, the matmul, the broadcast bias add, a reshape back). candle's
//! backward gives every node a zero tensor plus an add, and sums the bias gradient over
//! the broadcast rows with its strided reduction (one element at a time with two integer
//! divisions; the profile of the tiny CLIP step put that reduction at 9% of the step).
//! Fused, it is one node: the forward is a product that gemm adds onto output rows
//! written as copies of the bias (so the bias costs no read-modify-write pass of its own
//! after the product), one single-threaded gemm per block of output columns
//! (`products::split`), and the backward is three products,
//! `∂x = ∂y·W`, `∂W = ∂yᵀ·x` and `∂b = 1ᵀ·∂y` (the column sums as a product with a row
//! of ones, so that they run in gemm's vector kernels, in a fixed order).
//!
//! The fused op runs on CPU f32 and f64; other devices and dtypes use the reference.
//!
//! Two inference forms fold the layer's neighbours in where no input records a graph:
//! [`linear_add`] starts the output rows as `residual + b` (the residual connection
//! costs no pass of its own), [`linear_quick_gelu`] adds the bias and applies QuickGELU
//! in one pass after the product. With a graph they are the composed ops, bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};
use std::ops::Range;

use crate::cpu::{Float, float_dispatch, slice, written_vec};
use crate::products::{self, Along, Shared};

fn check(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize)> {
    let (out, inp) = weight.dims2()?;
    let d = xs.dim(D::Minus1)?;
    if d != inp {
        candle_core::bail!(
            "linear: input {:?} has {d} features, the weight {:?} takes {inp}",
            xs.dims(),
            weight.dims()
        )
    }
    if let Some(b) = bias
        && b.dims() != [out]
    {
        candle_core::bail!(
            "linear: bias {:?} does not match the weight's {out} outputs",
            b.dims()
        )
    }
    Ok((out, inp))
}

/// The rows of a linear layer's input: the product of all dimensions but the last (also
/// when the last is 0).
fn leading(xs: &Shape) -> usize {
    let dims = xs.dims();
    dims[..dims.len().saturating_sub(1)].iter().product()
}

/// The shape of `xs` with its last dimension replaced by `out`.
fn out_shape(xs: &Shape, out: usize) -> Shape {
    let mut dims = xs.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Shape::from(dims)
}

/// `xs Wᵀ + b` composed from candle ops (flattened to one matmul), `W` `(out, in)`.
pub fn linear_reference(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out, inp) = check(xs, weight, bias)?;
    let rows = leading(xs.shape());
    let ys = xs.reshape((rows, inp))?.matmul(&weight.t()?)?;
    let ys = match bias {
        Some(b) => ys.broadcast_add(b)?,
        None => ys,
    };
    ys.reshape(out_shape(xs.shape(), out))
}

/// `xs Wᵀ + b` over the last dimension of `xs` `(.., in)`, `W` `(out, in)`, `b` `(out)`:
/// one fused op on CPU f32 / f64, the reference elsewhere.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check(xs, weight, bias)?;
    let dtype = xs.dtype();
    let fused = xs.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && weight.dtype() == dtype
        && bias.is_none_or(|b| b.dtype() == dtype)
        && xs.elem_count() > 0;
    if !fused {
        return linear_reference(xs, weight, bias);
    }
    let xs = xs.contiguous()?;
    match bias {
        Some(b) => xs.apply_op3(weight, &b.contiguous()?, LinearOp),
        None => xs.apply_op2(weight, LinearOp),
    }
}

/// `residual + xs Wᵀ + b`: a projection and the residual connection around it. Where
/// no input records a graph (inference) on CPU f32 / f64, one product whose output rows
/// start as `residual + b`, a pass fewer over the output than the two ops; else
/// `residual + linear(xs, W, b)`, the same bits as those two. The two forms agree to
/// rounding.
pub fn linear_add(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    let (out, _) = check(xs, weight, bias)?;
    let shape = out_shape(xs.shape(), out);
    if residual.shape() != &shape {
        candle_core::bail!(
            "linear_add: residual {:?} does not match the output {:?}",
            residual.dims(),
            shape.dims()
        )
    }
    if !no_graph(xs, weight, bias, Some(residual)) {
        return residual + linear(xs, weight, bias)?;
    }
    let (xs, residual) = (xs.contiguous()?, residual.contiguous()?);
    let bias = bias.map(Tensor::contiguous).transpose()?;
    inference(&xs, weight, bias.as_ref(), Some(&residual), false)
}

/// `quick_gelu(xs Wᵀ + b)`: where no input records a graph, on CPU f32 / f64, gemm
/// writes the product and one in-place pass adds the bias and applies QuickGELU (no
/// bias rows written first, no second output); else the two ops. The two forms agree
/// to rounding.
pub fn linear_quick_gelu(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check(xs, weight, bias)?;
    if !no_graph(xs, weight, bias, None) {
        return crate::quick_gelu(&linear(xs, weight, bias)?);
    }
    let xs = xs.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    inference(&xs, weight, bias.as_ref(), None, true)
}

/// Whether the no-graph forms of [`linear_add`] and [`linear_quick_gelu`] apply: CPU,
/// f32 or f64 throughout, some input, and no input that records a graph.
fn no_graph(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> bool {
    let dtype = xs.dtype();
    let all = [Some(xs), Some(weight), bias, residual];
    let tensors = all.iter().flatten();
    xs.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && xs.elem_count() > 0
        && tensors
            .clone()
            .all(|t| t.dtype() == dtype && t.device().is_cpu())
        && !tensors.clone().any(|t| t.track_op())
}

/// The no-graph product of [`linear_add`] (`residual` given) or [`linear_quick_gelu`]
/// (`gelu`) on contiguous `xs`, `bias` and `residual`.
fn inference(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    fn cpu(s: &Storage) -> Result<&CpuStorage> {
        match s {
            Storage::Cpu(s) => Ok(s),
            _ => candle_core::bail!("linear: the inference form runs on the CPU"),
        }
    }
    // The residual's start holds the bias already; GELU would add it again.
    debug_assert!(
        !(gelu && residual.is_some()),
        "linear: GELU after a residual"
    );
    let (out, inp) = weight.dims2()?;
    let rows = leading(xs.shape());
    let shape = out_shape(xs.shape(), out);
    // Read guards only (two may share a storage, as in candle's own ops); no candle op
    // runs while they are held.
    let (xs_g, xs_l) = xs.storage_and_layout();
    let (w_g, w_l) = weight.storage_and_layout();
    let bias_g = bias.map(Tensor::storage_and_layout);
    let residual_g = residual.map(Tensor::storage_and_layout);
    let ys = float_dispatch!(xs.dtype(), "linear", |T| {
        let x = slice::<T>(cpu(&xs_g)?, xs_l, "linear", "the input")?;
        let ws = &cpu(&w_g)?.as_slice::<T>()?[w_l.start_offset()..];
        let b = match &bias_g {
            Some((g, l)) => Some(slice::<T>(cpu(g)?, l, "linear", "the bias")?),
            None => None,
        };
        let start = match &residual_g {
            Some((g, l)) => Start::Onto {
                residual: slice::<T>(cpu(g)?, l, "linear_add", "the residual")?,
                bias: b,
            },
            None if gelu => Start::Zero,
            None => Start::of(b),
        };
        let mut ys = product(x, ws, w_l.stride(), start, (rows, inp, out));
        if gelu {
            crate::activation::quick_gelu_in_place(&mut ys, b, out);
        }
        T::storage(ys)
    });
    drop((xs_g, w_g, bias_g, residual_g));
    let ys = match ys {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, xs.device())?,
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, xs.device())?,
        _ => candle_core::bail!("linear: the inference form runs on f32 or f64"),
    };
    Ok(ys)
}

/// The fused linear layer (with a bias as a [`CustomOp3`], without as a [`CustomOp2`]).
#[derive(Clone, Copy, Debug)]
struct LinearOp;

/// `x Wᵀ (+ b)` on CPU storages: the output's rows start as copies of the bias and gemm
/// adds the product to them (`read_dst`), so the bias costs no pass of its own over the
/// output; without a bias gemm writes the output from nothing.
fn forward(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (out, inp) = w.1.shape().dims2()?;
    let rows = leading(x.1.shape());
    let ys = float_dispatch!(x.0.dtype(), "linear", |T| {
        let xs = slice::<T>(x.0, x.1, "linear", "the input")?;
        let ws = &w.0.as_slice::<T>()?[w.1.start_offset()..];
        let bias = match b {
            Some((s, l)) => Some(slice::<T>(s, l, "linear", "the bias")?),
            None => None,
        };
        T::storage(product(
            xs,
            ws,
            w.1.stride(),
            Start::of(bias),
            (rows, inp, out),
        ))
    });
    Ok((ys, out_shape(x.1.shape(), out)))
}

/// What a linear product's output rows hold before gemm adds the product to them.
#[derive(Clone, Copy)]
enum Start<'a, T> {
    /// Nothing: gemm writes the product.
    Zero,
    /// Copies of the bias.
    Bias(&'a [T]),
    /// `residual + b` (a residual connection around the layer), `residual` `(rows, out)`.
    Onto {
        residual: &'a [T],
        bias: Option<&'a [T]>,
    },
}

impl<'a, T> Start<'a, T> {
    fn of(bias: Option<&'a [T]>) -> Self {
        bias.map_or(Start::Zero, Start::Bias)
    }
}

/// `start + xs (rows × inp) · Wᵀ` with `W` `(out, inp)` at strides `w_strides` from
/// `ws`, split by blocks of output columns over the pool ([`products::split`]); each
/// block's task first writes its columns of `start`.
#[allow(unsafe_code)] // the product and `written_vec`
fn product<T: Float>(
    xs: &[T],
    ws: &[T],
    w_strides: &[usize],
    start: Start<'_, T>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<T> {
    let len = rows * out;
    if len == 0 {
        return Vec::new();
    }
    // SAFETY: every element is written: with a start, each block's columns by its fill
    // before the product reads them; without, by the product itself (`read_dst = false`
    // writes the whole destination). `xs` holds `rows × inp` values and `ws` addresses
    // `W` through its own strides (checked against the shapes by `check`), so the
    // product stays inside both; a residual holds `rows × out` (checked by
    // `linear_add`); the blocks' columns are disjoint.
    let (ys, ()) = unsafe {
        written_vec(len, 0, |dst| {
            let dst = Shared(dst.as_mut_ptr().cast::<T>());
            // Each block's columns of every row: right for blocks of columns only (the
            // split below), where no two tasks share an element.
            let fill = |cols: Range<usize>| {
                for r in 0..rows {
                    let at = r * out + cols.start;
                    match start {
                        Start::Zero => {}
                        // SAFETY: row `r`'s columns `cols` lie inside the output.
                        Start::Bias(b) => std::ptr::copy_nonoverlapping(
                            b[cols.clone()].as_ptr(),
                            dst.at(at),
                            cols.len(),
                        ),
                        Start::Onto { residual, bias } => {
                            let res = &residual[at..at + cols.len()];
                            // SAFETY: as above; this task alone writes these elements,
                            // through the pointer (no reference to them while unwritten).
                            match bias {
                                Some(b) => {
                                    for (j, (&r, &b)) in
                                        res.iter().zip(&b[cols.clone()]).enumerate()
                                    {
                                        dst.at(at + j).write(r + b);
                                    }
                                }
                                None => std::ptr::copy_nonoverlapping(
                                    res.as_ptr(),
                                    dst.at(at),
                                    cols.len(),
                                ),
                            }
                        }
                    }
                }
            };
            products::split(
                (rows, out, inp),
                (dst, out),
                !matches!(start, Start::Zero),
                (xs.as_ptr(), inp, 1),
                // `Wᵀ`: its (k, j) entry is `W[j, k]`.
                (ws.as_ptr(), w_strides[1], w_strides[0]),
                Along::Columns,
                fill,
            );
        })
    };
    ys
}

/// `(∂x, ∂W, ∂b)` of `y = x Wᵀ + b` for the upstream gradient `grad`, as products on
/// detached copies (no graph is recorded inside the backward).
fn backward(x: &Tensor, w: &Tensor, grad: &Tensor, bias: bool) -> Result<[Option<Tensor>; 3]> {
    let (out, inp) = w.dims2()?;
    let rows = leading(x.shape());
    let dy = grad.detach().contiguous()?.reshape((rows, out))?;
    let x2 = x.detach().reshape((rows, inp))?;
    // The products are independent: as two tasks, a thread that finishes its share of
    // one takes work from the other instead of waiting. `∂y` is row-major in `∂x` and
    // transposed (so packed by gemm) in `∂W`: split by columns and by rows.
    let (dx, dw_db) = rayon::join(
        || split_matmul(&dy, &w.detach(), Along::Columns)?.reshape(x.shape()),
        || -> Result<(Tensor, Option<Tensor>)> {
            let dw = split_matmul(&dy.t()?, &x2, Along::Rows)?;
            let db = if bias {
                let ones = Tensor::ones((1, rows), dy.dtype(), dy.device())?;
                Some(ones.matmul(&dy)?.reshape(out)?)
            } else {
                None
            };
            Ok((dw, db))
        },
    );
    let (dw, db) = dw_db?;
    Ok([Some(dx?), Some(dw), db])
}

/// `lhs · rhs` of two matrices, each in any strided layout: on CPU f32 / f64 split into
/// blocks `along` the output's columns or rows over the pool ([`products::split`]: one
/// fork-join, where gemm's own threads meet once or twice per 512 of the inner
/// dimension, and the same bits); elsewhere candle's product.
fn split_matmul(lhs: &Tensor, rhs: &Tensor, along: Along) -> Result<Tensor> {
    let (m, k) = lhs.dims2()?;
    let (k2, n) = rhs.dims2()?;
    if k2 == k {
        // The storages' read guards end with this block, before any fallback reads them.
        let (ls, ll) = lhs.storage_and_layout();
        let (rs, rl) = rhs.storage_and_layout();
        if let (Storage::Cpu(ls), Storage::Cpu(rs)) = (&*ls, &*rs)
            && ls.dtype() == rs.dtype()
            && matches!(ls.dtype(), DType::F32 | DType::F64)
        {
            return float_dispatch!(ls.dtype(), "linear", |T| {
                let operand = |s: &CpuStorage, l: &Layout| -> Result<products::Operand<T>> {
                    let v = &s.as_slice::<T>()?[l.start_offset()..];
                    Ok((v.as_ptr(), l.stride()[0], l.stride()[1]))
                };
                // SAFETY: each operand is a candle view of a 2-D matrix of the given
                // shape, whose strides address elements inside its storage.
                #[allow(unsafe_code)]
                let v = unsafe {
                    products::matmul((m, n, k), operand(ls, ll)?, operand(rs, rl)?, along)
                };
                Tensor::from_vec(v, (m, n), lhs.device())
            });
        }
    }
    lhs.matmul(rhs)
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = backward(x, w, grad, true)?;
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = backward(x, w, grad, false)?;
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_hand_values_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[[1f32, 2.], [0., -1.]]], &dev)?; // (1, 2, 2)
        let w = Var::new(&[[1f32, 0.], [2., 1.], [0., 3.]], &dev)?; // (3, 2)
        let b = Var::new(&[0.5f32, 0., -1.], &dev)?;
        let y = linear(&x, &w, Some(&b))?;
        assert_eq!(y.dims(), &[1, 2, 3]);
        let got = y.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, [1.5, 4., 5., 0.5, -1., -4.]);
        let grads = y.sum_all()?.backward()?;
        assert_eq!(grads.get(&b).unwrap().to_vec1::<f32>()?, [2., 2., 2.]);
        assert_eq!(grads.get(&w).unwrap().to_vec2::<f32>()?, [[1., 1.]; 3]);
        assert_eq!(
            grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?,
            [3., 4., 3., 4.]
        );
        Ok(())
    }

    /// The no-graph forms of `linear_add` and `linear_quick_gelu` give the composed
    /// ops' values to rounding (f32 and f64, with and without a bias, in a shape whose
    /// product splits into blocks, with a transposed weight and an offset residual);
    /// with a graph on any one input they are the composed ops, bit for bit, and that
    /// input gets its gradient.
    #[test]
    fn inference_forms_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (inp, out) = (256, 192);
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let x = Tensor::randn(0f32, 1.0, (2, 100, inp), &dev)?.to_dtype(dtype)?;
            let w = Tensor::randn(0f32, 0.1, (out, inp), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, out, &dev)?.to_dtype(dtype)?;
            let r = Tensor::randn(0f32, 1.0, (2, 100, out), &dev)?.to_dtype(dtype)?;
            let close = |a: &Tensor, c: &Tensor, what: &str| -> Result<()> {
                let scale = c
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                let diff = (a - c)?.abs()?.max_all()?.to_dtype(DType::F64)?;
                let diff = diff.to_scalar::<f64>()?;
                assert!(
                    diff <= tol * scale,
                    "{what} {dtype:?}: |Δ| {diff} at {scale}"
                );
                Ok(())
            };
            // The weight as a frozen layer holds it (a transposed view) and a residual
            // that starts at an offset, besides the plain layouts.
            let wt = w.t()?.contiguous()?.t()?;
            let wide = Tensor::randn(0f32, 1.0, (2, 100, out + 3), &dev)?.to_dtype(dtype)?;
            let r_off = wide.narrow(2, 3, out)?;
            for (w, r) in [(&w, &r), (&wt, &r_off)] {
                for bias in [Some(&b), None] {
                    let composed = (r + linear(&x, w, bias)?)?;
                    let fused = linear_add(&x, w, bias, r)?;
                    assert!(!fused.track_op());
                    close(&fused, &composed, "linear_add")?;
                    let composed = crate::quick_gelu(&linear(&x, w, bias)?)?;
                    close(
                        &linear_quick_gelu(&x, w, bias)?,
                        &composed,
                        "linear_quick_gelu",
                    )?;
                }
            }
            // With a graph on any one input: the composed ops themselves, and that
            // input's gradient.
            let bits = |t: &Tensor| -> Result<Vec<f64>> {
                t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
            };
            let same = bits(&(&r + linear(&x, &w, Some(&b))?)?)?;
            let same_gelu = bits(&crate::quick_gelu(&linear(&x, &w, Some(&b))?)?)?;
            for (i, which) in ["x", "w", "b", "r"].into_iter().enumerate() {
                let mut inputs = [&x, &w, &b, &r].map(Tensor::clone);
                let var = Var::from_tensor(&inputs[i])?;
                inputs[i] = var.as_tensor().clone();
                let [xi, wi, bi, ri] = &inputs;
                let y = linear_add(xi, wi, Some(bi), ri)?;
                assert!(y.track_op(), "linear_add with a graph on {which}");
                assert_eq!(bits(&y)?, same, "linear_add with a graph on {which}");
                let g = y.sum_all()?.backward()?;
                let grad = g.get(&var);
                assert!(grad.is_some(), "linear_add: no gradient for {which}");
                if which == "r" {
                    // The residual has no part in `linear_quick_gelu`.
                    let ones = bits(grad.expect("residual gradient"))?;
                    assert!(ones.iter().all(|&v| v == 1.0));
                    continue;
                }
                let y = linear_quick_gelu(xi, wi, Some(bi))?;
                assert!(y.track_op(), "linear_quick_gelu with a graph on {which}");
                assert_eq!(
                    bits(&y)?,
                    same_gelu,
                    "linear_quick_gelu with a graph on {which}"
                );
                let g = y.sum_all()?.backward()?;
                assert!(
                    g.get(&var).is_some(),
                    "linear_quick_gelu: no gradient for {which}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn linear_add_rejects_a_residual_of_another_shape() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let r = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let err = linear_add(&x, &w, None, &r).unwrap_err().to_string();
        assert!(err.contains("residual") && err.contains("[2, 4]"), "{err}");
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let err = linear(&x, &w, None).unwrap_err().to_string();
        assert!(err.contains("linear") && err.contains("5"), "{err}");
        let w = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let err = linear(&x, &w, Some(&b)).unwrap_err().to_string();
        assert!(err.contains("bias"), "{err}");
    }

    /// Split into blocks over a pool, the forward gives the bits of one direct gemm call
    /// onto the bias rows, and `∂x` and `∂W` (split by columns and by rows) those of
    /// candle's products (the same gemm path, each output summed in the same order).
    #[test]
    fn split_products_keep_candles_bits() -> Result<()> {
        let dev = Device::Cpu;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 99, 200), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (300, 200), &dev)?)?;
        let b = Tensor::randn(0f32, 1., 300, &dev)?;
        let g = Tensor::randn(0f32, 1., (2, 99, 300), &dev)?;
        let (y, dx, dw) = pool.install(|| -> Result<_> {
            let y = linear(&x, &w, Some(&b))?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let (dx, dw) = (
                grads.get(&x).unwrap().clone(),
                grads.get(&w).unwrap().clone(),
            );
            Ok((y, dx, dw))
        })?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        let x2 = x.reshape((198, 200))?;
        let want_y = x2.matmul(&w.t()?)?.broadcast_add(&b)?;
        // Not bit for bit: the bias is added first here, last in candle's composition.
        let diff = (y.reshape((198, 300))? - want_y)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        // gemm adding the product onto bias rows on one thread, as the fused op asks it to.
        let mut want_y = b
            .broadcast_as((198, 300))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (xs, ws) = (
            x2.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
        );
        #[allow(unsafe_code)]
        // SAFETY: the shapes are those of the buffers.
        unsafe {
            gemm::gemm(
                198,
                300,
                200,
                want_y.as_mut_ptr(),
                1,
                300,
                true,
                xs.as_ptr(),
                1,
                200,
                ws.as_ptr(),
                200,
                1,
                1f32,
                1f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        let want_y = Tensor::from_vec(want_y, (2, 99, 300), &dev)?;
        assert_eq!(bits(&y)?, bits(&want_y)?);
        let g2 = g.reshape((198, 300))?;
        let want_dx = g2.matmul(w.as_tensor())?.reshape((2, 99, 200))?;
        assert_eq!(bits(&dx)?, bits(&want_dx)?);
        assert_eq!(bits(&dw)?, bits(&g2.t()?.matmul(&x2)?)?);
        Ok(())
    }

    /// No outputs, or no inputs, are empty or bias-only results, not a panic.
    #[test]
    fn empty_dimensions_are_not_a_panic() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 4), DType::F32, &dev)?;
        let y = linear(
            &x,
            &Tensor::zeros((0, 4), DType::F32, &dev)?,
            Some(&Tensor::zeros(0, DType::F32, &dev)?),
        )?;
        assert_eq!(y.dims(), [2, 0]);
        let x = Tensor::ones((2, 0), DType::F32, &dev)?;
        let b = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let y = linear(&x, &Tensor::zeros((3, 0), DType::F32, &dev)?, Some(&b))?;
        assert_eq!(y.to_vec2::<f32>()?, [[1., 2., 3.], [1., 2., 3.]]);
        Ok(())
    }
}
