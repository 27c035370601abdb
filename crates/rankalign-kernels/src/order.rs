//! The order in which a reference ranks each row: the sort that turns reference scores
//! into the `order` input of [`crate::pl_nll`] (a stable LSD radix sort in four
//! interleaved runs, f32 keys finished by an insertion sort on their lowest byte).

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::cpu::written_vec;

/// The order that sorts each row of `reference` `(n, m)` descending, ties broken by
/// `perm` (an item earlier in `perm` comes first): `(n, m)` u32, ready for [`pl_nll`](crate::pl_nll).
///
/// This is the authors' "shuffle the columns with one random permutation, then sort"
/// made reproducible: with the permutation given, the result is a pure function of the
/// input. Rows are sorted in parallel on the host; the reference gets no gradient.
pub fn pl_order(reference: &Tensor, perm: &[u32]) -> Result<Tensor> {
    let (n, m) = reference.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "pl_order: reference must be (n, m), got {:?}",
            reference.dims()
        ))
    })?;
    if perm.len() != m {
        candle_core::bail!(
            "pl_order: permutation of length {} for {m} columns",
            perm.len()
        )
    }
    let mut rank_in_perm = vec![u32::MAX; m];
    for (pos, &c) in perm.iter().enumerate() {
        match rank_in_perm.get_mut(c as usize) {
            Some(slot) if *slot == u32::MAX => *slot = pos as u32,
            _ => candle_core::bail!(
                "pl_order: the permutation is not one of 0..{m} (entry {c} at {pos})"
            ),
        }
    }
    // Stable LSD radix sort on order-preserving integer keys, with the items fed in
    // `perm` order: descending by value, ties in `perm` order. O(m) per row.
    // Sort rows of `values` (the reference's contiguous data) by `key`.
    #[allow(unsafe_code)] // `written_vec`
    fn sort_rows<T: Copy + Sync, K: RadixKey>(
        values: &[T],
        perm: &[u32],
        (n, m): (usize, usize),
        key: impl Fn(T) -> K + Sync,
    ) -> Vec<u32> {
        // SAFETY: the rows cover the output, and `radix_order` writes all of its row.
        let (order, ()) = unsafe {
            written_vec(n * m, 0, |order| {
                order.par_chunks_mut(m.max(1)).enumerate().for_each_init(
                    RadixScratch::default,
                    |sc, (i, row_order)| {
                        let row = &values[i * m..(i + 1) * m];
                        radix_order(perm, |c| key(row[c as usize]), sc, row_order);
                    },
                )
            })
        };
        order
    }
    // CPU f32 / f64 are read in place; anything else is copied to the host as f32.
    let reference = reference.contiguous()?;
    let (storage, layout) = reference.storage_and_layout();
    let span = layout.contiguous_offsets();
    let order = match (&*storage, span) {
        (Storage::Cpu(CpuStorage::F64(v)), Some((a, b))) => {
            sort_rows(&v[a..b], perm, (n, m), |x| !f64_key(x))
        }
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
            sort_rows(&v[a..b], perm, (n, m), |x| !f32_key(x))
        }
        _ => {
            drop(storage);
            let values = reference
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            sort_rows(&values, perm, (n, m), |x| !f32_key(x))
        }
    };
    Tensor::from_vec(order, (n, m), reference.device())
}

/// An unsigned key whose order is the float order (−0 and NaN placed as `total_cmp`).
fn f32_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

fn f64_key(v: f64) -> u64 {
    let b = v.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | 0x8000_0000_0000_0000
    }
}

/// An unsigned sort key: its bytes, least significant first, are the radix digits.
trait RadixKey: Copy + Default + Ord + Into<u64> + Send {
    const BYTES: usize;
    /// Low bytes that an insertion sort may order instead of radix passes (0: none).
    const LOW: usize;
}

impl RadixKey for u32 {
    const BYTES: usize = 4;
    /// An f32's top 24 bits are its sign, exponent and 15 mantissa bits: scores that
    /// share them are within 0.01% of each other, so a row has few such ties, and the
    /// insertion sort is one predictable pass. (Leaving it two bytes moved a quarter of
    /// the items of a similarity row, and its mispredicted branches cost more than the
    /// radix pass they saved: 7.0 against 6.1 ms at 1024², one thread.)
    const LOW: usize = 1;
}

impl RadixKey for u64 {
    const BYTES: usize = 8;
    const LOW: usize = 0;
}

/// Rows shorter than this take every radix pass (an insertion sort's saving is small).
const FINISH_MIN_LEN: usize = 64;
/// Moves per item the insertion sort may make before it gives up for the radix passes.
const FINISH_MOVES_PER_ITEM: usize = 4;

/// Independent runs the sort interleaves. A radix pass that takes its items one by one
/// waits on the previous item's counter whenever two neighbours share a digit (a
/// store-to-load round trip per item, and scores share their high bytes often); four
/// runs, each with its own counters, keep four of those chains in flight.
const RUNS: usize = 4;

struct RadixScratch<K> {
    items: Vec<(K, u32)>,
    swap: Vec<(K, u32)>,
    /// One histogram per run, then each run's next slot per digit.
    counts: [[u32; 256]; RUNS],
}

impl<K> Default for RadixScratch<K> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            swap: Vec::new(),
            counts: [[0; 256]; RUNS],
        }
    }
}

/// Sort the columns listed in `perm` by `key` ascending, stably, one 8-bit pass per key
/// byte that not every key shares, into `out` (all of it written: `perm` is as long).
///
/// Each pass cuts the items into [`RUNS`] consecutive runs and gives run `r` the slots
/// of a digit after those of runs `0..r`: items keep their order within a run, and runs
/// keep theirs, so the pass is stable while the runs are scattered side by side.
fn radix_order<K: RadixKey>(
    perm: &[u32],
    key: impl Fn(u32) -> K,
    sc: &mut RadixScratch<K>,
    out: &mut [MaybeUninit<u32>],
) {
    let len = perm.len();
    sc.items.clear();
    sc.items.extend(perm.iter().map(|&c| (key(c), c)));
    // Every pass overwrites all of `swap`: its old contents need no clearing.
    sc.swap.resize(len, (K::default(), 0));
    // The bits in which some key differs from the first: the bytes worth a pass.
    let first: u64 = sc.items.first().map_or(0, |&(k, _)| k.into());
    let differ = sc
        .items
        .iter()
        .fold(0u64, |acc, &(k, _)| acc | (k.into() ^ first));
    let run = len.div_ceil(RUNS);
    let bounds: [usize; RUNS + 1] = std::array::from_fn(|r| (r * run).min(len));
    let passes = |bytes: std::ops::Range<usize>, sc: &mut RadixScratch<K>| {
        for shift in bytes.map(|b| 8 * b) {
            if (differ >> shift) & 0xFF == 0 {
                continue;
            }
            radix_pass(&sc.items, &mut sc.swap, &mut sc.counts, &bounds, shift);
            std::mem::swap(&mut sc.items, &mut sc.swap);
        }
    };
    // The high bytes by radix, then the low ones by a stable insertion sort on the whole
    // key, which moves only items whose high bytes tie. If the ties are many, it stops,
    // and all bytes get their passes: the items' order is then still the permutation's
    // among equal keys (both sorts are stable), which is all a radix sort asks of it.
    let finished = K::LOW > 0 && len >= FINISH_MIN_LEN && {
        passes(K::LOW..K::BYTES, sc);
        insertion_sort(&mut sc.items, FINISH_MOVES_PER_ITEM * len)
    };
    if !finished {
        passes(0..K::BYTES, sc);
    }
    for (o, &(_, c)) in out.iter_mut().zip(&sc.items) {
        o.write(c);
    }
}

/// One stable pass by the byte at `shift`, from `items` into `swap`, over the runs that
/// `bounds` cut.
fn radix_pass<K: RadixKey>(
    items: &[(K, u32)],
    swap: &mut [(K, u32)],
    counts: &mut [[u32; 256]; RUNS],
    bounds: &[usize; RUNS + 1],
    shift: usize,
) {
    let digit = |k: K| ((k.into() >> shift) & 0xFF) as usize;
    let runs: [&[(K, u32)]; RUNS] = std::array::from_fn(|r| &items[bounds[r]..bounds[r + 1]]);
    // The first `common` items of every run (the last run is the shortest) go side by
    // side; the longer runs' remaining items one by one.
    let common = runs[RUNS - 1].len();
    for hist in counts.iter_mut() {
        hist.fill(0);
    }
    for i in 0..common {
        for (run, hist) in runs.iter().zip(counts.iter_mut()) {
            hist[digit(run[i].0)] += 1;
        }
    }
    for (run, hist) in runs.iter().zip(counts.iter_mut()) {
        for &(k, _) in &run[common..] {
            hist[digit(k)] += 1;
        }
    }
    // Each run's first slot per digit: the digits' exclusive prefix sums over all runs,
    // then the counts of the earlier runs for that digit.
    let mut total = [0u32; 256];
    for hist in counts.iter() {
        for (t, &c) in total.iter_mut().zip(hist) {
            *t += c;
        }
    }
    let mut next = 0;
    for t in total.iter_mut() {
        let here = *t;
        *t = next;
        next += here;
    }
    for hist in counts.iter_mut() {
        for (t, c) in total.iter_mut().zip(hist.iter_mut()) {
            let here = *c;
            *c = *t;
            *t += here;
        }
    }
    for i in 0..common {
        for (run, hist) in runs.iter().zip(counts.iter_mut()) {
            let item = run[i];
            let slot = &mut hist[digit(item.0)];
            swap[*slot as usize] = item;
            *slot += 1;
        }
    }
    for (run, hist) in runs.iter().zip(counts.iter_mut()) {
        for &item in &run[common..] {
            let slot = &mut hist[digit(item.0)];
            swap[*slot as usize] = item;
            *slot += 1;
        }
    }
}

/// Sorts `items` by key, stably, if that takes at most `budget` moves; `false` if it
/// stopped (the items are then a permutation of what they were, equal keys still in
/// their original order).
fn insertion_sort<K: Ord + Copy>(items: &mut [(K, u32)], budget: usize) -> bool {
    let mut moves = 0;
    for i in 1..items.len() {
        let item = items[i];
        let mut j = i;
        while j > 0 && items[j - 1].0 > item.0 {
            items[j] = items[j - 1];
            j -= 1;
        }
        items[j] = item;
        moves += i - j;
        if moves > budget {
            return false;
        }
    }
    true
}
