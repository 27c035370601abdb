//! Multi-head scaled dot-product attention as one op with a hand-written backward, and
//! its reference composed from differentiable candle ops.
//!
//! Composed, a block's attention is about ten nodes: the query scale, three
//! reshape-transpose copies into `(b, heads, s, d)`, two batched matmuls (candle runs
//! the batch one small product after another), the mask add, the softmax and the copy
//! back to `(b, s, width)`; each costs a pass over its tensor forward and a zero tensor
//! plus an add backward. Fused, the queries, keys and values stay in their projections'
//! `(b, s, width)` layout and gemm reads each head through strides; the `b · heads`
//! products run in parallel, each single-threaded inside, and write disjoint columns of
//! the output. The probabilities are kept for the backward when an input is tracked
//! (without a gradient each rayon job reuses one `s × s` scratch, which stays in cache,
//! and no output is zero-filled first). The backward per head is four products and one pass
//! over the `s × s` matrix:
//!
//! `∂P = ∂O Vᵀ`, `∂S = P ∘ (∂P − Σ_j P ∘ ∂P)`, `∂Q = c ∂S K`, `∂K = c ∂Sᵀ Q`, `∂V = Pᵀ ∂O`
//!
//! with `S = c Q Kᵀ + M`, `c = d^-½`, `P = softmax(S)` by rows. Each head's arithmetic is
//! the same whatever the thread count, so results do not depend on it. CPU f32 / f64;
//! other devices and dtypes run the reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use crate::cpu::{
    Float, float_dispatch, slice, softmax_in_place, sum_map, vectorised, written_vec,
};
use crate::products::{self, Shared};

fn check(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<()> {
    let (_, _, w) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "attention: queries {:?}, keys {:?} and values {:?} must have one shape (b, s, width)",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if heads == 0 || !w.is_multiple_of(heads) {
        candle_core::bail!("attention: width {w} is not divisible by {heads} heads")
    }
    Ok(())
}

/// `softmax(c Q Kᵀ + M) V` per head over `(b, s, width)` queries, keys and values, the
/// heads' outputs concatenated back to `(b, s, width)`; `c = (width / heads)^-½`, `M` an
/// optional additive mask that broadcasts to `(b, heads, s, s)`. Plain candle ops: the reference of [`attention`].
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check(q, k, v, heads)?;
    composed(q, k, v, heads, mask, crate::softmax_last_dim_reference)
}

/// The composed attention with a given softmax (the reference's, or the fused one where
/// the fused attention does not run).
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, s, w) = q.dims3()?;
    let d = w / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let qh = split(&(q * (d as f64).powf(-0.5))?)?;
    let mut att = qh.matmul(&split(k)?.t()?)?;
    if let Some(mask) = mask {
        att = att.broadcast_add(&mask.to_dtype(att.dtype())?)?;
    }
    let p = softmax(&att)?;
    p.matmul(&split(v)?)?.transpose(1, 2)?.reshape((b, s, w))
}

/// Multi-head attention as one node (see the module notes): the values of
/// [`attention_reference`] to rounding, with a hand-written backward on CPU f32 / f64;
/// elsewhere the reference's composition (with the fused softmax).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check(q, k, v, heads)?;
    let dtype = q.dtype();
    let fused = q.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && q.elem_count() > 0;
    if !fused {
        return composed(q, k, v, heads, mask, crate::softmax_last_dim);
    }
    // A mask the same for every batch row and head (`(s, s)`, or e.g. a `(1, 1, 1, s)`
    // padding mask) is read as `(s, s)`; one that varies by batch row runs composed.
    let s = q.dim(1)?;
    let mask = match mask.map(|m| m.broadcast_as((1, 1, s, s))) {
        None => None,
        Some(Ok(m)) => Some(
            m.to_dtype(DType::F64)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f64>()?,
        ),
        Some(Err(_)) => return composed(q, k, v, heads, mask, crate::softmax_last_dim),
    };
    let op = AttentionOp {
        heads,
        mask,
        keep: q.track_op() || k.track_op() || v.track_op(),
        probs: OnceLock::new(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct AttentionOp {
    heads: usize,
    /// The additive `(s, s)` mask, row-major.
    mask: Option<Vec<f64>>,
    /// Whether to keep the probabilities for a backward (an input is tracked).
    keep: bool,
    /// `(b, heads, s, s)` probabilities from the forward.
    probs: OnceLock<CpuStorage>,
}

/// Sizes of one call: positions, width, heads and head width (`task` = batch · heads + head).
#[derive(Clone, Copy)]
struct Dims {
    s: usize,
    w: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    /// Offset of head `h`'s first element in batch `b` of a `(b, s, width)` tensor.
    fn at(&self, task: usize) -> usize {
        let (b, h) = (task / self.heads, task % self.heads);
        b * self.s * self.w + h * self.d
    }
}

/// The output, and the `(b, heads, s, s)` probabilities when `keep` (else empty: each
/// rayon job then reuses one `s × s` scratch, which stays in cache).
#[allow(unsafe_code)]
fn forward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[f64]>,
    b: usize,
    dims: Dims,
    keep: bool,
) -> (Vec<T>, Vec<T>) {
    let Dims { s, w, d, .. } = dims;
    let c = T::from((d as f64).powf(-0.5)).unwrap_or_else(T::one);
    let mask: Option<Vec<T>> = mask.map(|m| {
        m.iter()
            .map(|&x| T::from(x).unwrap_or_else(T::nan))
            .collect()
    });
    // One head of one batch row: the scores into `p` (s × s, written whole by the first
    // product), their softmax in place, and `p V` into the head's output columns.
    let head = |task: usize, p: &mut [MaybeUninit<T>], dst: Shared<T>| {
        let at = dims.at(task);
        // SAFETY: `at` starts head h of batch b in every (b, s, w) tensor, whose s rows
        // of d columns at stride w lie inside it; `p` is this task's own s × s; the
        // output columns [h d, (h + 1) d) of batch b's rows are written by this task
        // alone. `products::serial` writes all of `p` before it is read.
        let p = unsafe {
            products::serial(
                (s, s, d),
                (p.as_mut_ptr().cast::<T>(), s, 1),
                (q[at..].as_ptr(), w, 1),
                (k[at..].as_ptr(), 1, w),
                c,
            );
            &mut *(p as *mut [MaybeUninit<T>] as *mut [T])
        };
        vectorised(
            #[inline(always)]
            || {
                for (i, row) in p.chunks_mut(s).enumerate() {
                    if let Some(m) = &mask {
                        for (x, &mv) in row.iter_mut().zip(&m[i * s..(i + 1) * s]) {
                            *x += mv;
                        }
                    }
                    softmax_in_place(row);
                }
            },
        );
        // SAFETY: as above.
        unsafe {
            products::serial(
                (s, d, s),
                (dst.at(at), w, 1),
                (p.as_ptr(), s, 1),
                (v[at..].as_ptr(), w, 1),
                T::one(),
            );
        }
    };
    let tasks = b * dims.heads;
    // SAFETY: the tasks' products write every output element (each head's columns of
    // each batch row), and with `keep` every task's `s × s` block of the probabilities.
    unsafe {
        let (out, probs) = written_vec(q.len(), 0, |out| {
            let dst = Shared(out.as_mut_ptr().cast::<T>());
            if keep {
                written_vec(tasks * s * s, 0, |probs| {
                    probs
                        .par_chunks_mut(s * s)
                        .enumerate()
                        .for_each(|(task, p)| head(task, p, dst));
                })
                .0
            } else {
                (0..tasks).into_par_iter().for_each_init(
                    || Vec::<T>::with_capacity(s * s),
                    |scratch, task| head(task, &mut scratch.spare_capacity_mut()[..s * s], dst),
                );
                Vec::new()
            }
        });
        (out, probs)
    }
}

/// `(∂Q, ∂K, ∂V)` from the inputs, the kept probabilities and the output gradient.
#[allow(unsafe_code)]
fn backward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dout: &[T],
    dims: Dims,
) -> [Vec<T>; 3] {
    let Dims { s, w, d, .. } = dims;
    let c = T::from((d as f64).powf(-0.5)).unwrap_or_else(T::one);
    // The lengths the tasks' writes and `set_len` below rest on (true by construction:
    // the probabilities are the forward's, the gradient has the output's shape).
    assert!(
        probs.len() == q.len() / w * dims.heads * s && dout.len() == q.len(),
        "attention backward: kept probabilities or gradient of the wrong size"
    );
    // Not zero-filled: the tasks' products write every element (below).
    let mut grads: [Vec<T>; 3] = std::array::from_fn(|_| Vec::with_capacity(q.len()));
    let [dq, dk, dv] = grads
        .each_mut()
        .map(|g| Shared(g.spare_capacity_mut().as_mut_ptr().cast::<T>()));
    probs.par_chunks(s * s).enumerate().for_each_init(
        || vec![T::zero(); s * s],
        |ds, (task, p)| {
            let at = dims.at(task);
            let (dq, dk, dv) = (dq, dk, dv);
            // SAFETY: as in the forward; `ds` is this thread's own scratch, and each
            // gradient's head columns of batch b are written by this task alone.
            unsafe {
                products::serial(
                    (s, s, d),
                    (ds.as_mut_ptr(), s, 1),
                    (dout[at..].as_ptr(), w, 1),
                    (v[at..].as_ptr(), 1, w),
                    T::one(),
                );
            }
            vectorised(
                #[inline(always)]
                || {
                    for (g, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                        let dot = sum_map(p, g, |p, g| p * g);
                        for (g, &p) in g.iter_mut().zip(p) {
                            *g = p * (*g - dot);
                        }
                    }
                },
            );
            // SAFETY: as above.
            unsafe {
                products::serial(
                    (s, d, s),
                    (dq.at(at), w, 1),
                    (ds.as_ptr(), s, 1),
                    (k[at..].as_ptr(), w, 1),
                    c,
                );
                products::serial(
                    (s, d, s),
                    (dk.at(at), w, 1),
                    (ds.as_ptr(), 1, s),
                    (q[at..].as_ptr(), w, 1),
                    c,
                );
                products::serial(
                    (s, d, s),
                    (dv.at(at), w, 1),
                    (p.as_ptr(), 1, s),
                    (dout[at..].as_ptr(), w, 1),
                    T::one(),
                );
            }
        },
    );
    for g in &mut grads {
        // SAFETY: each task wrote its head's columns of its batch row's rows in all three
        // gradients (`products::serial` writes its whole destination), and the tasks
        // cover every head of every batch row; the capacity is `q.len()`.
        unsafe { g.set_len(q.len()) };
    }
    grads
}

impl AttentionOp {
    fn dims(&self, l: &Layout) -> Result<(usize, Dims)> {
        let (b, s, w) = l.shape().dims3()?;
        Ok((
            b,
            Dims {
                s,
                w,
                heads: self.heads,
                d: w / self.heads,
            },
        ))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
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
        let (b, dims) = self.dims(l1)?;
        let mask = self.mask.as_deref();
        fn run<T: Float>(
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
            mask: Option<&[f64]>,
            b: usize,
            dims: Dims,
            keep: bool,
        ) -> Result<(CpuStorage, CpuStorage)> {
            let (o, p) = forward(
                slice::<T>(s1, l1, "attention", "queries")?,
                slice(s2, l2, "attention", "keys")?,
                slice(s3, l3, "attention", "values")?,
                mask,
                b,
                dims,
                keep,
            );
            Ok((T::storage(o), T::storage(p)))
        }
        let (out, probs) = float_dispatch!(s1.dtype(), "attention", |T| run::<T>(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            mask,
            b,
            dims,
            self.keep
        )?);
        if self.keep {
            let _ = self.probs.set(probs);
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self.probs.get().ok_or_else(|| {
            candle_core::Error::Msg("attention: backward without kept probabilities".into())
        })?;
        let (_, dims) = self.dims(q.layout())?;
        let grad = grad.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) =
            (&*qs, &*ks, &*vs, &*gs)
        else {
            candle_core::bail!("attention: the fused backward runs on the CPU")
        };
        fn run<T: Float>(
            (qs, ql): (&CpuStorage, &Layout),
            (ks, kl): (&CpuStorage, &Layout),
            (vs, vl): (&CpuStorage, &Layout),
            (gs, gl): (&CpuStorage, &Layout),
            p: &[T],
            dims: Dims,
        ) -> Result<[Vec<T>; 3]> {
            Ok(backward(
                slice::<T>(qs, ql, "attention", "queries")?,
                slice(ks, kl, "attention", "keys")?,
                slice(vs, vl, "attention", "values")?,
                p,
                slice(gs, gl, "attention", "gradient")?,
                dims,
            ))
        }
        let args = ((qs, ql), (ks, kl), (vs, vl), (gs, gl));
        let shape = q.shape();
        let [dq, dk, dv] = match probs {
            CpuStorage::F32(p) => run(args.0, args.1, args.2, args.3, p, dims)?
                .map(|g| Tensor::from_vec(g, shape, q.device())),
            CpuStorage::F64(p) => run(args.0, args.1, args.2, args.3, p, dims)?
                .map(|g| Tensor::from_vec(g, shape, q.device())),
            _ => candle_core::bail!("attention: kept probabilities are f32 or f64"),
        };
        let (dq, dk, dv) = (dq?, dk?, dv?);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
