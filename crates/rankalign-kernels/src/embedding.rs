//! Embedding lookup `table[ids]` as one op whose backward writes the table's gradient
//! row by row, and the reference composed from candle's `index_select`.
//!
//! Composed, the backward of the lookup is candle's `index_select` rule: a zero tensor
//! the size of the whole table (CLIP's text tower: 49,408 × width, 19 MB at width 96),
//! then `index_add`, which copies that tensor once more before adding the rows. Fused,
//! the gradient is one buffer, zeroed in parallel blocks, with each looked-up row's
//! gradient added to its id's row in the order the ids come (the reference's order, so
//! the same bits). Ids are checked against the table in the forward (and again in the
//! backward, which reads them on its own): one outside it is an error naming its
//! position. CPU f32 / f64 tables with u8, u32 or i64 ids; other
//! devices and dtypes use the reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{Float, filled, float_dispatch, slice, written_vec};

/// Outputs of at least this many elements are copied by the pool's threads; also the
/// block size of the gradient's parallel zero fill.
const PARALLEL: usize = 1 << 16;

/// `table[ids]` `(.., d)` for `ids` of any shape, composed from candle ops.
pub fn embedding_reference(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, d) = table.dims2()?;
    let mut dims = ids.dims().to_vec();
    dims.push(d);
    table
        .index_select(&ids.flatten_all()?.contiguous()?, 0)?
        .reshape(dims)
}

/// The rows of `table` `(vocab, d)` at `ids` (any shape of integer ids), shaped
/// `(.., d)`: fused on CPU f32 / f64 (see the module notes), the reference elsewhere.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    table.dims2()?;
    let fused = table.device().is_cpu()
        && matches!(table.dtype(), DType::F32 | DType::F64)
        && matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64)
        && ids.elem_count() > 0;
    if !fused {
        return embedding_reference(table, ids);
    }
    table
        .contiguous()?
        .apply_op2(&ids.contiguous()?, EmbeddingOp)
}

/// The ids of a contiguous integer storage as table rows, each checked against `vocab`.
fn rows(s: &CpuStorage, l: &Layout, vocab: usize) -> Result<Vec<usize>> {
    fn check<T: Copy + TryInto<usize> + std::fmt::Display>(
        ids: &[T],
        vocab: usize,
    ) -> Result<Vec<usize>> {
        ids.iter()
            .enumerate()
            .map(|(at, &id)| match id.try_into() {
                Ok(row) if row < vocab => Ok(row),
                _ => candle_core::bail!(
                    "embedding: id {id} at flat position {at} is outside the table of {vocab} rows"
                ),
            })
            .collect()
    }
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("embedding: the ids must be contiguous".into()))?;
    match s {
        CpuStorage::U8(v) => check(&v[a..b], vocab),
        CpuStorage::U32(v) => check(&v[a..b], vocab),
        CpuStorage::I64(v) => check(&v[a..b], vocab),
        _ => candle_core::bail!("embedding: ids must be u8, u32 or i64, got {:?}", s.dtype()),
    }
}

struct EmbeddingOp;

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (vocab, d) = l1.shape().dims2()?;
        let ids = rows(s2, l2, vocab)?;
        #[allow(unsafe_code)] // `written_vec`
        fn gather<T: Float>(table: &[T], ids: &[usize], d: usize) -> Vec<T> {
            let copy = |(row, &id): (&mut [std::mem::MaybeUninit<T>], &usize)| {
                for (o, &v) in row.iter_mut().zip(&table[id * d..(id + 1) * d]) {
                    o.write(v);
                }
            };
            // SAFETY: each of the `ids.len()` output rows of `d` is copied whole.
            let (out, ()) = unsafe {
                written_vec(ids.len() * d, 0, |out| {
                    if ids.len() * d >= PARALLEL {
                        out.par_chunks_mut(d.max(1))
                            .zip(ids.par_iter())
                            .for_each(copy);
                    } else {
                        out.chunks_mut(d.max(1)).zip(ids).for_each(copy);
                    }
                })
            };
            out
        }
        let out = float_dispatch!(s1.dtype(), "embedding", |T| T::storage(gather(
            slice::<T>(s1, l1, "embedding", "the table")?,
            &ids,
            d
        )));
        let mut dims = l2.shape().dims().to_vec();
        dims.push(d);
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let vocab = table.dim(0)?;
        let grad = grad.contiguous()?;
        let dtable = ids.apply_op2_no_bwd(&grad, &EmbeddingGrad { vocab })?;
        Ok((Some(dtable), None))
    }
}

/// `(ids, ∂y) → ∂table`: zeros, with each id's row gradient added in the ids' order.
struct EmbeddingGrad {
    vocab: usize,
}

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "embedding_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = rows(s1, l1, self.vocab)?;
        let d = l2.shape().dims().last().copied().unwrap_or(0);
        #[allow(unsafe_code)] // `written_vec`
        fn scatter<T: Float>(dy: &[T], ids: &[usize], vocab: usize, d: usize) -> Vec<T> {
            // SAFETY: `filled` writes every block, and the blocks cover the buffer.
            let (mut out, ()) = unsafe {
                written_vec(vocab * d, 0, |out| {
                    out.par_chunks_mut(PARALLEL).for_each(|block| {
                        filled(block, T::zero());
                    });
                })
            };
            for (g, &id) in dy.chunks_exact(d.max(1)).zip(ids) {
                for (o, &v) in out[id * d..(id + 1) * d].iter_mut().zip(g) {
                    *o += v;
                }
            }
            out
        }
        let out = float_dispatch!(s2.dtype(), "embedding", |T| T::storage(scatter(
            slice::<T>(s2, l2, "embedding", "the gradient")?,
            &ids,
            self.vocab,
            d
        )));
        Ok((out, Shape::from((self.vocab, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and the table's gradient (with repeated ids) equal the reference's bit for
    /// bit, for each id dtype and both float dtypes.
    #[test]
    fn matches_the_reference_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let ids: [u32; 8] = [3, 0, 3, 6, 3, 1, 0, 6];
        let up: Vec<f64> = (0..8 * 5)
            .map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.4)
            .collect();
        for dtype in [DType::F32, DType::F64] {
            for id_dtype in [DType::U8, DType::U32, DType::I64] {
                let ids = Tensor::new(&ids, &dev)?
                    .reshape((2, 4))?
                    .to_dtype(id_dtype)?;
                let u = Tensor::from_vec(up.clone(), (2, 4, 5), &dev)?.to_dtype(dtype)?;
                let run =
                    |f: fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<(Vec<f64>, Vec<f64>)> {
                        let table = Var::from_tensor(
                            &Tensor::arange(0f64, 35.0, &dev)?
                                .affine(0.17, -2.0)?
                                .reshape((7, 5))?
                                .to_dtype(dtype)?,
                        )?;
                        let y = f(table.as_tensor(), &ids)?;
                        assert_eq!(y.dims(), [2, 4, 5]);
                        let g = (&y * &u)?.sum_all()?.backward()?;
                        let dt = g.get(&table).expect("the table gets a gradient");
                        let flat =
                            |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
                        Ok((flat(&y)?, flat(dt)?))
                    };
                assert_eq!(
                    run(embedding)?,
                    run(embedding_reference)?,
                    "{dtype:?} {id_dtype:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn an_id_outside_the_table_is_a_clear_error() -> Result<()> {
        let table = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?;
        let ids = Tensor::new(&[[0u32, 2], [4, 1]], &Device::Cpu)?;
        let err = embedding(&table, &ids).unwrap_err().to_string();
        assert!(
            err.contains("id 4 at flat position 2") && err.contains("4 rows"),
            "{err}"
        );
        let neg = Tensor::new(&[1i64, -1], &Device::Cpu)?;
        let err = embedding(&table, &neg).unwrap_err().to_string();
        assert!(err.contains("id -1 at flat position 1"), "{err}");
        Ok(())
    }
}
