//! Matrix products on the CPU: one single-threaded gemm ([`serial`]), and a product
//! split by blocks of its output's columns over the pool ([`by_columns`]).
//!
//! gemm's own threading meets at a barrier once per block of the inner dimension (at
//! most 512 deep), twice where it packs its right operand: the second MLP product of a
//! ViT-B/16 block at batch one (197 × 3072 by 3072 × 768) is six fork-joins. Where
//! the pool's workers sleep between ops, each is a wake-up. Split by columns, every task
//! runs its whole product alone, so a product is one fork-join. The blocks share the
//! left operand's rows: that suits a product whose left operand gemm reads unpacked
//! (row-major, as a layer's input or output gradient is); one that gemm packs (a
//! transposed gradient, as in a weight's gradient) would be packed once per block.
//!
//! The split does not change a single bit: gemm sums each output over the inner
//! dimension in blocks whose size depends only on that dimension, and each output
//! element's products are accumulated in the same order whichever block of columns (and
//! thread) it falls in. `by_columns` keeps to the shapes where that holds (more than 64
//! rows, blocks at least 64 columns wide), and the tests compare it bit for bit with one
//! call.

use gemm::Parallelism;
use rayon::prelude::*;

use std::ops::Range;

use crate::cpu::{Float, written_vec};

/// A row-major-or-strided matrix operand: a pointer, its row stride and column stride
/// (in elements).
pub(crate) type Operand<T> = (*const T, usize, usize);

/// A raw pointer that parallel tasks writing disjoint parts of one buffer can share.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);

impl<T> Shared<T> {
    /// The pointer `i` elements on (taking `self` whole, so that a closure captures the
    /// `Send` wrapper, not its field).
    pub(crate) fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

// SAFETY: only used by tasks that write disjoint parts of the buffer (see each caller);
// the elements themselves must be sendable.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for `Send`.
#[allow(unsafe_code)]
unsafe impl<T: Sync> Sync for Shared<T> {}

/// `dst = beta · lhs · rhs` (or `dst + beta · lhs · rhs` when `read_dst`), `(m × k)` times
/// `(k × n)`, on the calling thread. `dst` is `(pointer, row stride, column stride)`.
///
/// # Safety
/// Every operand addresses valid memory at all `(row, column)` of its shape through its
/// strides; `dst` is writable there (and initialised, when `read_dst`) and overlaps
/// neither input.
#[allow(unsafe_code)]
pub(crate) unsafe fn serial<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    read_dst: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    beta: T,
) {
    // SAFETY: the caller's contract.
    unsafe { call((m, n, k), dst, read_dst, lhs, rhs, beta, Parallelism::None) }
}

/// [`serial`] with gemm's own threading as given.
#[allow(unsafe_code)]
unsafe fn call<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    read_dst: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    beta: T,
    parallelism: Parallelism,
) {
    // SAFETY: the caller's contract; gemm reads and writes only within the given shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            read_dst,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Column blocks are multiples of this (gemm's f32 vector kernel spans 64 outputs).
const BLOCK_ALIGN: usize = 64;

/// Below this many multiply-adds a product runs on one thread (gemm's own threshold).
const PARALLEL_WORK: usize = 48 * 48 * 256;

/// The column blocks of an `m × n` product with inner dimension `k` on `threads`
/// threads: one block (the whole width) when the product is small, has 64 rows or
/// fewer, or is narrower than two aligned blocks; else up to `threads` blocks of whole
/// multiples of 64 columns, spread evenly, the last taking the remainder too. Every
/// block is then at least 64 columns by 65 rows, where gemm takes its blocked path (a
/// narrower block could fall to its small-product kernels, which sum in other orders).
fn column_blocks((m, n, k): (usize, usize, usize), threads: usize) -> Vec<Range<usize>> {
    let units = n / BLOCK_ALIGN;
    let parts = if m > 64 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_WORK {
        units.clamp(1, threads.max(1))
    } else {
        1
    };
    let edge = |p: usize| {
        if p == parts {
            n
        } else {
            units * p / parts * BLOCK_ALIGN
        }
    };
    (0..parts).map(|p| edge(p)..edge(p + 1)).collect()
}

/// `dst = lhs · rhs` (or `dst + lhs · rhs` when `read_dst`) for a row-major `dst`
/// `(m × n)` with rows `dst_rs` apart, as one single-threaded gemm per block of columns,
/// the blocks as parallel tasks of the current rayon pool. `prepare(columns)` runs on a
/// block's task just before its product (e.g. writing the block's bias, which the
/// product then adds to). The same bits on any number of threads.
///
/// # Safety
/// As for [`serial`], for the whole `m × n` product; `prepare(columns)` writes only
/// those columns of `dst`'s rows.
#[allow(unsafe_code)]
pub(crate) unsafe fn by_columns<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (Shared<T>, usize),
    read_dst: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    prepare: impl Fn(Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    let blocks = column_blocks((m, n, k), threads);
    let lhs = (Shared(lhs.0.cast_mut()), lhs.1, lhs.2);
    let rhs = (Shared(rhs.0.cast_mut()), rhs.1, rhs.2);
    let block = |cols: Range<usize>, parallelism| {
        let c0 = cols.start;
        let width = cols.len();
        prepare(cols);
        // SAFETY: the caller's contract; block `c0..c0 + width` of `dst` and of `rhs`'s
        // columns lies within their shapes, and no two tasks write one element.
        unsafe {
            call(
                (m, width, k),
                (dst.at(c0), dst_rs, 1),
                read_dst,
                (lhs.0.at(0).cast_const(), lhs.1, lhs.2),
                (rhs.0.at(c0 * rhs.2).cast_const(), rhs.1, rhs.2),
                T::one(),
                parallelism,
            )
        }
    };
    match blocks.as_slice() {
        // A product too short or too narrow to split: gemm's own threads, if it is big.
        [whole] => {
            let big = m.saturating_mul(n).saturating_mul(k) >= PARALLEL_WORK;
            block(
                whole.clone(),
                if threads > 1 && big {
                    Parallelism::Rayon(threads)
                } else {
                    Parallelism::None
                },
            )
        }
        _ => blocks
            .into_par_iter()
            .for_each(|cols| block(cols, Parallelism::None)),
    }
}

/// `lhs · rhs`, a new row-major `(m × n)`, as [`by_columns`].
///
/// # Safety
/// As for [`serial`]: each operand addresses its whole shape through its strides.
#[allow(unsafe_code)]
pub(crate) unsafe fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
) -> Vec<T> {
    // SAFETY: the product writes the whole `m × n` destination (`read_dst = false`);
    // the operands are the caller's contract.
    let (out, ()) = unsafe {
        written_vec(m * n, 0, |dst| {
            by_columns(
                (m, n, k),
                (Shared(dst.as_mut_ptr().cast::<T>()), n),
                false,
                lhs,
                rhs,
                |_| {},
            )
        })
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `x Wᵀ` `(m × n)` for `x` `(m × k)` and `W` `(n × k)`, split as `threads` allow.
    fn product(x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize), threads: usize) -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = vec![f32::NAN; m * n];
        let dst = Shared(out.as_mut_ptr());
        // SAFETY: the operands hold `m × k` and `n × k` values; `out` holds `m × n`.
        #[allow(unsafe_code)]
        pool.install(|| unsafe {
            by_columns(
                (m, n, k),
                (dst, n),
                false,
                (x.as_ptr(), k, 1),
                (w.as_ptr(), 1, k),
                |_| {},
            )
        });
        out
    }

    #[test]
    fn blocks_cover_the_columns_once() {
        for (dims, threads) in [
            ((197, 3072, 768), 2),
            ((197, 3072, 768), 3),
            ((1576, 768, 3072), 16),
            ((197, 100, 768), 2),
            ((64, 3072, 768), 2),
            ((2000, 130, 4), 2),
        ] {
            let blocks = column_blocks(dims, threads);
            assert!(blocks.len() <= threads);
            assert_eq!(blocks.first().unwrap().start, 0);
            assert_eq!(blocks.last().unwrap().end, dims.1);
            for pair in blocks.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(pair[0].len() % BLOCK_ALIGN, 0);
            }
            if blocks.len() > 1 {
                assert!(blocks.iter().all(|b| b.len() >= BLOCK_ALIGN), "{blocks:?}");
            }
        }
        assert_eq!(column_blocks((197, 3072, 768), 2), [0..1536, 1536..3072]);
        assert_eq!(column_blocks((64, 3072, 768), 2).len(), 1);
        assert_eq!(column_blocks((65, 130, 3000), 2), [0..64, 64..130]);
        assert_eq!(column_blocks((65, 130, 3000), 3), [0..64, 64..130]);
    }

    /// The split gives gemm's single-call bits, on 1 to 3 threads, in shapes whose
    /// blocks end off the vector width and whose inner dimension spans several blocks.
    #[test]
    fn same_bits_on_any_thread_count() {
        for (m, n, k) in [
            (197, 3072, 768),
            (100, 200, 1100),
            (65, 130, 3000),
            (300, 70, 64),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let one = product(&x, &w, (m, n, k), 1);
            assert!(one.iter().all(|v| v.is_finite()));
            for threads in [2, 3] {
                let split = product(&x, &w, (m, n, k), threads);
                assert!(
                    one.iter()
                        .zip(&split)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{m}x{n}x{k} on {threads} threads"
                );
            }
            // And against gemm's own threading, as candle's matmul calls it.
            let mut threaded = vec![0f32; m * n];
            #[allow(unsafe_code)]
            // SAFETY: as in `product`.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    threaded.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::Rayon(2),
                )
            };
            assert!(
                one.iter()
                    .zip(&threaded)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }
}
