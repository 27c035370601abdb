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
        T::storage(product(xs, ws, w.1.stride(), bias, (rows, inp, out)))
    });
    Ok((ys, out_shape(x.1.shape(), out)))
}

/// `xs (rows × inp) · Wᵀ + b` with `W` `(out, inp)` at strides `w_strides` from `ws`,
/// split by blocks of output columns over the pool ([`products::split`]); each
/// block's task first writes its columns of the bias rows.
#[allow(unsafe_code)] // the product and `written_vec`
fn product<T: Float>(
    xs: &[T],
    ws: &[T],
    w_strides: &[usize],
    bias: Option<&[T]>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<T> {
    let len = rows * out;
    if len == 0 {
        return Vec::new();
    }
    // SAFETY: every element is written: with a bias, each block's columns by its fill
    // before the product reads them; without, by the product itself (`read_dst = false`
    // writes the whole destination). `xs` holds `rows × inp` values and `ws` addresses
    // `W` through its own strides (checked against the shapes by `check`), so the
    // product stays inside both; the blocks' columns are disjoint.
    let (ys, ()) = unsafe {
        written_vec(len, 0, |dst| {
            let dst = Shared(dst.as_mut_ptr().cast::<T>());
            // Each block's columns of every row: right for blocks of columns only (the
            // split below), where no two tasks share an element.
            let fill = |cols: Range<usize>| {
                if let Some(b) = bias {
                    for r in 0..rows {
                        // SAFETY: row `r`'s columns `cols` lie inside the output.
                        std::ptr::copy_nonoverlapping(
                            b[cols.clone()].as_ptr(),
                            dst.at(r * out + cols.start),
                            cols.len(),
                        );
                    }
                }
            };
            products::split(
                (rows, out, inp),
                (dst, out),
                bias.is_some(),
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
