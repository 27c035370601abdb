//! The order in which a reference ranks each row: the sort that turns reference scores
//! into the `order` input of [`crate::pl_nll`].

use candle_core::{DType, Result, Tensor};
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
    match reference.dtype() {
        DType::F64 => {
            let values = reference.flatten_all()?.to_vec1::<f64>()?;
            order.par_chunks_mut(m.max(1)).enumerate().for_each_init(
                RadixScratch::default,
                |sc, (i, row_order)| {
                    let row = &values[i * m..(i + 1) * m];
                    radix_order(perm, |c| !f64_key(row[c as usize]), 8, sc, row_order);
                },
            );
        }
        _ => {
            let values = reference
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            order.par_chunks_mut(m.max(1)).enumerate().for_each_init(
                RadixScratch::default,
                |sc, (i, row_order)| {
                    let row = &values[i * m..(i + 1) * m];
                    radix_order(
                        perm,
                        |c| u64::from(!f32_key(row[c as usize])),
                        4,
                        sc,
                        row_order,
                    );
                },
            );
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

#[derive(Default)]
struct RadixScratch {
    items: Vec<(u64, u32)>,
    swap: Vec<(u64, u32)>,
}

/// Sort the columns listed in `perm` by `key` ascending, stably, with `bytes` 8-bit
/// passes, into `out`.
fn radix_order(
    perm: &[u32],
    key: impl Fn(u32) -> u64,
    bytes: usize,
    sc: &mut RadixScratch,
    out: &mut [u32],
) {
    sc.items.clear();
    sc.items.extend(perm.iter().map(|&c| (key(c), c)));
    sc.swap.clear();
    sc.swap.resize(sc.items.len(), (0, 0));
    for pass in 0..bytes {
        let shift = 8 * pass;
        let mut counts = [0usize; 257];
        for &(k, _) in &sc.items {
            counts[((k >> shift) & 0xFF) as usize + 1] += 1;
        }
        if counts[1..].contains(&sc.items.len()) {
            continue; // every key has the same byte here
        }
        for b in 0..256 {
            counts[b + 1] += counts[b];
        }
        for &item in &sc.items {
            let slot = &mut counts[((item.0 >> shift) & 0xFF) as usize];
            sc.swap[*slot] = item;
            *slot += 1;
        }
        std::mem::swap(&mut sc.items, &mut sc.swap);
    }
    for (o, &(_, c)) in out.iter_mut().zip(&sc.items) {
        *o = c;
    }
}
