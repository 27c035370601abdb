//! The parity form on f32 scores, in f32 as the authors' code computes it: each row's
//! exponentials, logarithms and divisions in vector passes ([`exp_f32`], [`ln_f32`]),
//! the suffix and prefix sums in one scalar pass each.

use super::PARITY_EPS;
use crate::cpu::{exp_f32, ln_f32, sum, sum_map};

#[derive(Default)]
pub(super) struct Scratch {
    /// The row in order, `exp(x − max)`, the suffix sums `c`, and a work row.
    x: Vec<f32>,
    e: Vec<f32>,
    c: Vec<f32>,
    t: Vec<f32>,
}

/// Gathers the row in `order` and fills `e` and `c`; returns the shift (the first
/// maximum among present items, 0 if none) and its position.
#[inline(always)]
fn prepare(row: &[f32], order: &[u32], sc: &mut Scratch) -> (f32, Option<usize>) {
    let m = order.len();
    sc.x.resize(m, 0.0);
    for (x, &c) in sc.x.iter_mut().zip(order) {
        *x = row[c as usize];
    }
    let arg = first_max(&sc.x);
    let shift = arg.map_or(0.0, |a| sc.x[a]);
    sc.e.resize(m, 0.0);
    for (e, &v) in sc.e.iter_mut().zip(&sc.x) {
        *e = exp_f32(v - shift);
    }
    sc.c.resize(m, 0.0);
    let mut run = 0f32;
    for (c, &e) in sc.c.iter_mut().zip(&sc.e).rev() {
        run += e;
        *c = run;
    }
    (shift, arg)
}

/// Lanes of [`first_max`]'s vector pass.
const LANES: usize = 16;

/// Position of the first maximum among present (not −∞) entries; a NaN counts only
/// where it is the first present entry (as a scan with `>` takes it).
#[inline(always)]
pub(super) fn first_max(x: &[f32]) -> Option<usize> {
    // Each lane's first maximum (a strict `>` keeps the first; −∞ and NaN never
    // win), and whether any NaN is present; then the lanes' best, ties to the
    // smallest position.
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [u32::MAX; LANES];
    let mut nan = [false; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        for k in 0..LANES {
            let v = chunk[k];
            nan[k] |= v.is_nan();
            if v > best[k] {
                best[k] = v;
                at[k] = (c * LANES + k) as u32;
            }
        }
    }
    let base = x.len() - rest.len();
    for (k, &v) in rest.iter().enumerate() {
        nan[k] |= v.is_nan();
        if v > best[k] {
            best[k] = v;
            at[k] = (base + k) as u32;
        }
    }
    if nan.iter().any(|&n| n) {
        return super::first_max_by(x.iter().map(|&v| f64::from(v)));
    }
    let mut arg: Option<(f32, u32)> = None;
    for (&v, &a) in best.iter().zip(&at) {
        if a != u32::MAX && arg.is_none_or(|(bv, ba)| v > bv || (v == bv && a < ba)) {
            arg = Some((v, a));
        }
    }
    arg.map(|(_, a)| a as usize)
}

/// One row's loss: `Σ_k μ_k (ln(c_k + ε) − (x_k − max))` over present items.
#[inline(always)]
pub(super) fn row_loss(row: &[f32], order: &[u32], mu: Option<&[f32]>, sc: &mut Scratch) -> f32 {
    let (shift, _) = prepare(row, order, sc);
    loss_of_prepared(shift, mu, sc)
}

/// One row's loss, and its gradient (for an upstream gradient of 1) into `out`, from
/// one gather and one pass of exponentials.
#[inline(always)]
pub(super) fn row_loss_grad(
    row: &[f32],
    order: &[u32],
    mu: Option<&[f32]>,
    sc: &mut Scratch,
    out: &mut [f32],
) -> f32 {
    let (shift, arg) = prepare(row, order, sc);
    let loss = loss_of_prepared(shift, mu, sc);
    grad_of_prepared(order, mu, 1.0, arg, sc, out);
    loss
}

#[inline(always)]
fn loss_of_prepared(shift: f32, mu: Option<&[f32]>, sc: &mut Scratch) -> f32 {
    let eps = PARITY_EPS as f32;
    sc.t.resize(sc.x.len(), 0.0);
    for ((t, &x), &c) in sc.t.iter_mut().zip(&sc.x).zip(&sc.c) {
        *t = if x == f32::NEG_INFINITY {
            0.0
        } else {
            ln_f32(c + eps) - (x - shift)
        };
    }
    match mu {
        Some(mu) => sum_map(&sc.t, mu, |t, w| t * w),
        None => sum(&sc.t),
    }
}

/// One row's gradient times `up`, scattered back to the row's columns in `out`.
#[inline(always)]
pub(super) fn row_grad(
    row: &[f32],
    order: &[u32],
    mu: Option<&[f32]>,
    up: f32,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    let (_, arg) = prepare(row, order, sc);
    grad_of_prepared(order, mu, up, arg, sc, out);
}

/// The gradient of a prepared row times `up`, scattered back to its columns.
#[inline(always)]
fn grad_of_prepared(
    order: &[u32],
    mu: Option<&[f32]>,
    up: f32,
    arg: Option<usize>,
    sc: &mut Scratch,
    out: &mut [f32],
) {
    let eps = PARITY_EPS as f32;
    // t_k = μ_k / (c_k + ε) for present items.
    sc.t.resize(sc.x.len(), 0.0);
    let term = |x: f32, w: f32, c: f32| {
        if x == f32::NEG_INFINITY {
            0.0
        } else {
            w / (c + eps)
        }
    };
    match mu {
        Some(mu) => {
            for (((t, &x), &c), &w) in sc.t.iter_mut().zip(&sc.x).zip(&sc.c).zip(mu) {
                *t = term(x, w, c);
            }
        }
        None => {
            for ((t, &x), &c) in sc.t.iter_mut().zip(&sc.x).zip(&sc.c) {
                *t = term(x, 1.0, c);
            }
        }
    }
    let via_max = eps * sum(&sc.t);
    // ∂/∂x_j = −μ_j + e_j · Σ_{k≤j} t_k; e is overwritten with the gradient. The
    // running sum is one scalar pass (t becomes its prefix sums), the rest a
    // vector pass.
    let mut b = 0f32;
    for t in sc.t.iter_mut() {
        b += *t;
        *t = b;
    }
    let grad = |x: f32, w: f32, e: f32, b: f32| {
        if x == f32::NEG_INFINITY {
            0.0
        } else {
            -w + e * b
        }
    };
    match mu {
        Some(mu) => {
            for (((e, &b), &x), &w) in sc.e.iter_mut().zip(&sc.t).zip(&sc.x).zip(mu) {
                *e = grad(x, w, *e, b);
            }
        }
        None => {
            for ((e, &b), &x) in sc.e.iter_mut().zip(&sc.t).zip(&sc.x) {
                *e = grad(x, 1.0, *e, b);
            }
        }
    }
    if let Some(a) = arg {
        sc.e[a] += via_max;
    }
    // A column repeated in `order` sums, as a gather's backward does.
    out.fill(0.0);
    for (&c, &g) in order.iter().zip(&sc.e) {
        out[c as usize] += g * up;
    }
}
