//! The order in which a reference ranks each row: the sort that turns reference scores
//! into the `order` input of [`crate::pl_nll`].

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// The order that sorts each row of `reference` `(n, m)` descending, ties broken by
/// `perm` (an item earlier in `perm` comes first): `(n, m)` u32, ready for [`pl_nll`].
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
    let mut order = vec![0u32; n * m];
    // Sort rows of `values` (the reference's contiguous data) by `key`.
    fn sort_rows<T: Copy + Sync, K: RadixKey>(
        values: &[T],
        perm: &[u32],
        m: usize,
        key: impl Fn(T) -> K + Sync,
        order: &mut [u32],
    ) {
        order.par_chunks_mut(m.max(1)).enumerate().for_each_init(
            RadixScratch::default,
            |sc, (i, row_order)| {
                let row = &values[i * m..(i + 1) * m];
                radix_order(perm, |c| key(row[c as usize]), sc, row_order);
            },
        );
    }
    // CPU f32 / f64 are read in place; anything else is copied to the host as f32.
    let reference = reference.contiguous()?;
    let (storage, layout) = reference.storage_and_layout();
    let span = layout.contiguous_offsets();
    match (&*storage, span) {
        (Storage::Cpu(CpuStorage::F64(v)), Some((a, b))) => {
            sort_rows(&v[a..b], perm, m, |x| !f64_key(x), &mut order)
        }
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
            sort_rows(&v[a..b], perm, m, |x| !f32_key(x), &mut order)
        }
        _ => {
            drop(storage);
            let values = reference
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            sort_rows(&values, perm, m, |x| !f32_key(x), &mut order)
        }
    }
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
trait RadixKey: Copy + Default + Into<u64> + Send {
    const BYTES: usize;
}

impl RadixKey for u32 {
    const BYTES: usize = 4;
}

impl RadixKey for u64 {
    const BYTES: usize = 8;
}

struct RadixScratch<K> {
    items: Vec<(K, u32)>,
    swap: Vec<(K, u32)>,
    /// One histogram per key byte.
    counts: Vec<[u32; 256]>,
}

impl<K> Default for RadixScratch<K> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            swap: Vec::new(),
            counts: Vec::new(),
        }
    }
}

/// Sort the columns listed in `perm` by `key` ascending, stably, one 8-bit pass per key
/// byte (the histograms of all bytes counted in one read; a byte every key shares is
/// skipped), into `out`.
fn radix_order<K: RadixKey>(
    perm: &[u32],
    key: impl Fn(u32) -> K,
    sc: &mut RadixScratch<K>,
    out: &mut [u32],
) {
    let len = perm.len();
    sc.items.clear();
    sc.items.extend(perm.iter().map(|&c| (key(c), c)));
    sc.swap.clear();
    sc.swap.resize(len, (K::default(), 0));
    sc.counts.clear();
    sc.counts.resize(K::BYTES, [0; 256]);
    for &(k, _) in &sc.items {
        let k: u64 = k.into();
        for (pass, hist) in sc.counts.iter_mut().enumerate() {
            hist[((k >> (8 * pass)) & 0xFF) as usize] += 1;
        }
    }
    for (pass, hist) in sc.counts.iter_mut().enumerate() {
        if hist.contains(&(len as u32)) {
            continue; // every key has the same byte here
        }
        // Exclusive prefix sums: each digit's first slot.
        let mut next = 0;
        for c in hist.iter_mut() {
            let here = *c;
            *c = next;
            next += here;
        }
        let shift = 8 * pass;
        for &item in &sc.items {
            let slot = &mut hist[((item.0.into() >> shift) & 0xFF) as usize];
            sc.swap[*slot as usize] = item;
            *slot += 1;
        }
        std::mem::swap(&mut sc.items, &mut sc.swap);
    }
    for (o, &(_, c)) in out.iter_mut().zip(&sc.items) {
        *o = c;
    }
}
