//! Matrix products on the CPU: one single-threaded gemm ([`serial`]), and a product
//! split by blocks of its output's columns or rows over the pool ([`split`]).
//!
//! gemm's own threading meets at a barrier once per block of the inner dimension (about
//! 512 deep on the machine that measured it), twice where it packs its right operand: the second MLP product of a
//! ViT-B/16 block at batch one (197 × 3072 by 3072 × 768) is six fork-joins. Where
//! the pool's workers sleep between ops, each is a wake-up. Split into blocks of the
//! output, every task runs its whole product alone, so a product is one fork-join. The
//! split is along the dimension whose operand gemm packs, so that each block packs only
//! its own part: columns for a row-major left operand (a layer's input or output
//! gradient, which gemm reads unpacked), rows for a transposed one (the output gradient
//! in a weight's gradient, which it packs).
//!
//! The split does not change a single bit: gemm sums each output over the inner
//! dimension in blocks whose size depends only on that dimension, and each output
//! element's products are accumulated in the same order whichever block (and thread) it
//! falls in. [`split`] keeps to the shapes where that holds (the other dimension more
//! than 64, blocks at least 64 wide), and the tests compare it bit for bit with one
//! call.

use gemm::Parallelism;
use rayon::prelude::*;

use std::ops::Range;

use crate::cpu::{Float, written_vec};

/// A row-major-or-strided matrix operand: a pointer, its row stride and column stride
/// (in elements).
pub(crate) type Operand<T> = (*const T, usize, usize);

/// A raw pointer that parallel tasks can share: to write disjoint parts of one buffer,
/// or to read an operand that no task writes.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);

impl<T> Shared<T> {
    /// The pointer `i` elements on (taking `self` whole, so that a closure captures the
    /// `Send` wrapper, not its field).
    pub(crate) fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

// SAFETY: only used by tasks that write disjoint parts of the buffer or read memory no
// task writes (see each caller); the elements themselves must be sendable, since tasks
// on other threads write them.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for `Send`.
#[allow(unsafe_code)]
unsafe impl<T: Send + Sync> Sync for Shared<T> {}

/// `dst = beta · lhs · rhs`, `(m × k)` times `(k × n)`, on the calling thread; every
/// element of `dst` is written. `dst` is `(pointer, row stride, column stride)`.
///
/// # Safety
/// Every operand addresses valid memory at all `(row, column)` of its shape through its
/// strides; `dst` is writable there and overlaps neither input.
#[allow(unsafe_code)]
pub(crate) unsafe fn serial<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    beta: T,
) {
    // SAFETY: the caller's contract.
    unsafe { call((m, n, k), dst, false, lhs, rhs, beta, Parallelism::None) }
}

/// `dst = beta · lhs · rhs` (or `dst + beta · lhs · rhs` when `read_dst`, `dst` then
/// initialised) with gemm's own threading as given; otherwise as [`serial`].
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

/// Blocks are whole multiples of this many rows or columns (for speed: gemm's f32
/// AVX-512 kernel spans 64 outputs; the bits rest on blocks at least this wide and the
/// other dimension above 64, see [`blocks`]).
const BLOCK_ALIGN: usize = 64;

/// Whether an `m × n` product with inner dimension `k` is worth more than one thread:
/// at least gemm's own threshold of multiply-adds.
fn big((m, n, k): (usize, usize, usize)) -> bool {
    m.saturating_mul(n).saturating_mul(k) >= 48 * 48 * 256
}

/// Which of the output's dimensions a product is split along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Along {
    /// Blocks of columns: the tasks share the left operand, each reads its own columns
    /// of the right.
    Columns,
    /// Blocks of rows: the tasks share the right operand, each reads its own rows of
    /// the left.
    Rows,
}

/// The blocks of an `m × n` product with inner dimension `k` on `threads` threads,
/// along `along`'s dimension: one block (all of it) when the product is small, the other
/// dimension is 64 or less, or the split one is shorter than two aligned blocks; else up
/// to `threads` blocks of whole multiples of 64, spread evenly, the last taking the
/// remainder too. Every block is then at least 64 by 65, where gemm takes its blocked
/// path (a thinner block could fall to its small-product kernels, which sum in other
/// orders).
fn blocks((m, n, k): (usize, usize, usize), along: Along, threads: usize) -> Vec<Range<usize>> {
    let (split, other) = match along {
        Along::Columns => (n, m),
        Along::Rows => (m, n),
    };
    let units = split / BLOCK_ALIGN;
    let parts = if other > 64 && big((m, n, k)) {
        units.clamp(1, threads.max(1))
    } else {
        1
    };
    let edge = |p: usize| {
        if p == parts {
            split
        } else {
            units * p / parts * BLOCK_ALIGN
        }
    };
    (0..parts).map(|p| edge(p)..edge(p + 1)).collect()
}

/// `dst = lhs · rhs` (or `dst + lhs · rhs` when `read_dst`) for a row-major `dst`
/// `(m × n)` with rows `dst_rs` apart, as one single-threaded gemm per block of columns
/// or rows (`along`), the blocks as parallel tasks of the current rayon pool.
/// `prepare(block)` runs on a block's task just before its product (e.g. writing the
/// block's bias, which the product then adds to). The same bits on any number of
/// threads.
///
/// Split the dimension whose operand gemm packs: each block then packs only its own
/// part. Along columns the left operand is shared, which suits a row-major one (gemm
/// reads it unpacked); along rows the right is shared, which suits a transposed left
/// operand (gemm packs that one).
///
/// # Safety
/// As for [`serial`], for the whole `m × n` product; `prepare(block)` writes only that
/// block of `dst` (its columns of every row, or its rows).
#[allow(unsafe_code)]
pub(crate) unsafe fn split<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (Shared<T>, usize),
    read_dst: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    along: Along,
    prepare: impl Fn(Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    let blocks = blocks((m, n, k), along, threads);
    let lhs = (Shared(lhs.0.cast_mut()), lhs.1, lhs.2);
    let rhs = (Shared(rhs.0.cast_mut()), rhs.1, rhs.2);
    let block = |range: Range<usize>, parallelism| {
        let (start, len) = (range.start, range.len());
        prepare(range);
        // The block's shape and where it starts in `dst`, `lhs` and `rhs`.
        let (dims, at) = match along {
            Along::Columns => ((m, len, k), (start, 0, start * rhs.2)),
            Along::Rows => ((len, n, k), (start * dst_rs, start * lhs.1, 0)),
        };
        // SAFETY: the caller's contract; the block lies within `dst`'s shape and the
        // operands' matching rows or columns, and no two tasks write one element.
        unsafe {
            call(
                dims,
                (dst.at(at.0), dst_rs, 1),
                read_dst,
                (lhs.0.at(at.1).cast_const(), lhs.1, lhs.2),
                (rhs.0.at(at.2).cast_const(), rhs.1, rhs.2),
                T::one(),
                parallelism,
            )
        }
    };
    match blocks.as_slice() {
        // A product too small or too thin to split: gemm's own threads, if it is big.
        [whole] => block(
            whole.clone(),
            if threads > 1 && big((m, n, k)) {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            },
        ),
        _ => blocks
            .into_par_iter()
            .for_each(|range| block(range, Parallelism::None)),
    }
}

/// `lhs · rhs`, a new row-major `(m × n)`, as [`split`].
///
/// # Safety
/// As for [`serial`]: each operand addresses its whole shape through its strides.
#[allow(unsafe_code)]
pub(crate) unsafe fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    along: Along,
) -> Vec<T> {
    // SAFETY: the product writes the whole `m × n` destination (`read_dst = false`);
    // the operands are the caller's contract.
    let (out, ()) = unsafe {
        written_vec(m * n, 0, |dst| {
            split(
                (m, n, k),
                (Shared(dst.as_mut_ptr().cast::<T>()), n),
                false,
                lhs,
                rhs,
                along,
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

    /// `x Wᵀ` `(m × n)` for `x` `(m × k)` (or, `transposed`, stored as `xᵀ`) and `W`
    /// `(n × k)`: split along `along` on `threads` threads, or, with `None`, one call
    /// with gemm's own threads.
    fn product(
        x: &[f32],
        w: &[f32],
        (m, n, k): (usize, usize, usize),
        transposed: bool,
        split_on: Option<(Along, usize)>,
    ) -> Vec<f32> {
        let lhs = if transposed {
            (x.as_ptr(), 1, m)
        } else {
            (x.as_ptr(), k, 1)
        };
        let rhs = (w.as_ptr(), 1, k);
        let mut out = vec![f32::NAN; m * n];
        let dst = Shared(out.as_mut_ptr());
        // The operands hold `m × k` and `n × k` values; `out` holds `m × n`.
        #[allow(unsafe_code)]
        match split_on {
            Some((along, threads)) => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (x, w) = (Shared(x.as_ptr().cast_mut()), Shared(w.as_ptr().cast_mut()));
                // SAFETY: as above.
                pool.install(|| unsafe {
                    let lhs = (x.at(0).cast_const(), lhs.1, lhs.2);
                    let rhs = (w.at(0).cast_const(), rhs.1, rhs.2);
                    split((m, n, k), (dst, n), false, lhs, rhs, along, |_| {})
                })
            }
            // SAFETY: as above.
            None => unsafe {
                call(
                    (m, n, k),
                    (dst.0, n, 1),
                    false,
                    lhs,
                    rhs,
                    1.0,
                    Parallelism::Rayon(2),
                )
            },
        }
        out
    }

    #[test]
    fn blocks_cover_the_dimension_once() {
        for (dims, threads) in [
            ((197, 3072, 768), 2),
            ((197, 3072, 768), 3),
            ((1576, 768, 3072), 16),
            ((197, 100, 768), 2),
            ((64, 3072, 768), 2),
            ((2000, 130, 4), 2),
        ] {
            for along in [Along::Columns, Along::Rows] {
                let blocks = blocks(dims, along, threads);
                let len = if along == Along::Columns {
                    dims.1
                } else {
                    dims.0
                };
                assert!(blocks.len() <= threads);
                assert_eq!(blocks.first().unwrap().start, 0);
                assert_eq!(blocks.last().unwrap().end, len);
                for pair in blocks.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                    assert_eq!(pair[0].len() % BLOCK_ALIGN, 0);
                }
                if blocks.len() > 1 {
                    assert!(blocks.iter().all(|b| b.len() >= BLOCK_ALIGN), "{blocks:?}");
                }
            }
        }
        let columns = |dims, threads| blocks(dims, Along::Columns, threads);
        assert_eq!(columns((197, 3072, 768), 2), [0..1536, 1536..3072]);
        assert_eq!(columns((64, 3072, 768), 2).len(), 1);
        assert_eq!(columns((65, 130, 3000), 2), [0..64, 64..130]);
        assert_eq!(columns((65, 130, 3000), 3), [0..64, 64..130]);
        assert_eq!(
            blocks((3072, 768, 3152), Along::Rows, 2),
            [0..1536, 1536..3072]
        );
        assert_eq!(blocks((3072, 64, 3152), Along::Rows, 2).len(), 1);
    }

    /// The split gives gemm's bits, on 1 to 3 threads, along either dimension, with the
    /// left operand row-major or transposed, in shapes whose blocks end off the vector
    /// width and whose inner dimension spans several of gemm's blocks; one call with
    /// gemm's own threads (as candle's matmul makes it) gives them too.
    #[test]
    fn same_bits_on_any_thread_count() {
        for (m, n, k) in [
            (197, 3072, 768),
            (100, 200, 1100),
            (65, 130, 3000),
            (300, 70, 64),
            (130, 65, 3000),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            for transposed in [false, true] {
                let one = product(&x, &w, (m, n, k), transposed, Some((Along::Columns, 1)));
                assert!(one.iter().all(|v| v.is_finite()));
                // The operands as `product` hands them over, against a plain f64 loop.
                let at = |i: usize, p: usize| {
                    if transposed {
                        x[p * m + i]
                    } else {
                        x[i * k + p]
                    }
                };
                for (i, j) in [
                    (0, 0),
                    (m - 1, n - 1),
                    (m / 2, n / 3),
                    (m - 1, 0),
                    (1, n - 1),
                ] {
                    let want: f64 = (0..k)
                        .map(|p| f64::from(at(i, p)) * f64::from(w[j * k + p]))
                        .sum();
                    let got = f64::from(one[i * n + j]);
                    assert!(
                        (got - want).abs() < 1e-3,
                        "{m}x{n}x{k} ({i}, {j}): {got} against {want}"
                    );
                }
                let same = |other: &[f32]| {
                    one.iter()
                        .zip(other)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                };
                assert!(same(&product(&x, &w, (m, n, k), transposed, None)));
                for along in [Along::Columns, Along::Rows] {
                    for threads in [2, 3] {
                        let split = product(&x, &w, (m, n, k), transposed, Some((along, threads)));
                        assert!(
                            same(&split),
                            "{m}x{n}x{k} along {along:?} on {threads} threads (transposed: {transposed})"
                        );
                    }
                }
            }
        }
    }
}
