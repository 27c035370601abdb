//! `pl_nll` (fused) against `pl_nll_reference` (plain candle ops, autograd) and finite
//! differences, over ties, list length 1, logit scale 100, −inf entries, n or m = 1 and
//! position weights.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankalign_kernels::{PlMode, pl_nll, pl_nll_reference};

pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) scores: Vec<f64>,
    pub(crate) n: usize,
    pub(crate) m: usize,
    pub(crate) order: Vec<u32>,
}

pub(crate) fn random_case(name: &'static str, n: usize, m: usize, scale: f64, seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scores = (0..n * m)
        .map(|_| scale * (rng.random::<f64>() * 2.0 - 1.0))
        .collect();
    let order = (0..n)
        .flat_map(|_| {
            let mut p: Vec<u32> = (0..m as u32).collect();
            for i in (1..m).rev() {
                p.swap(i, rng.random_range(0..=i));
            }
            p
        })
        .collect();
    Case {
        name,
        scores,
        n,
        m,
        order,
    }
}

pub(crate) fn cases() -> Vec<Case> {
    let mut out = vec![
        random_case("small", 3, 5, 2.0, 1),
        random_case("scale 100", 4, 16, 100.0, 2),
        random_case("one row", 1, 9, 3.0, 3),
        random_case("one column", 5, 1, 3.0, 4),
        random_case("wide", 2, 300, 14.0, 5),
    ];
    out.push(Case {
        name: "ties",
        scores: vec![1.0, 1.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0],
        n: 2,
        m: 4,
        order: vec![0, 1, 2, 3, 3, 2, 1, 0],
    });
    let mut neg = random_case("-inf entries", 3, 6, 4.0, 6);
    neg.scores[2] = f64::NEG_INFINITY;
    neg.scores[7] = f64::NEG_INFINITY;
    neg.scores[11] = f64::NEG_INFINITY;
    neg.scores[12..18].fill(f64::NEG_INFINITY); // a row with no item left
    out.push(neg);
    out
}

fn weights(m: usize, on: bool) -> Option<Tensor> {
    on.then(|| {
        Tensor::from_vec(
            (1..=m)
                .map(|k| 1.0 / ((k + 1) as f64).ln())
                .collect::<Vec<_>>(),
            m,
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn compare(case: &Case, mode: PlMode, dtype: DType, weighted: bool, tol: f64) -> Result<()> {
    let dev = Device::Cpu;
    let order = Tensor::from_vec(case.order.clone(), (case.n, case.m), &dev)?;
    let w = weights(case.m, weighted);
    let run = |fused: bool| -> Result<(Vec<f64>, Vec<f64>)> {
        let s = Var::from_tensor(
            &Tensor::from_vec(case.scores.clone(), (case.n, case.m), &dev)?.to_dtype(dtype)?,
        )?;
        let rows = if fused {
            pl_nll(&s, &order, mode, w.as_ref())?
        } else {
            pl_nll_reference(&s, &order, mode, w.as_ref())?
        };
        // Weight rows differently so that the upstream gradient is not uniform.
        let up = Tensor::from_vec(
            (0..case.n)
                .map(|i| 1.0 + i as f64 * 0.5)
                .collect::<Vec<_>>(),
            case.n,
            &dev,
        )?
        .to_dtype(dtype)?;
        let loss = (&rows * &up)?.sum_all()?;
        let g = loss
            .backward()?
            .get(&s)
            .expect("gradient")
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok((rows.to_dtype(DType::F64)?.to_vec1::<f64>()?, g))
    };
    let (fv, fg) = run(true)?;
    let (rv, rg) = run(false)?;
    let what = format!("{} {mode:?} {dtype:?} weighted={weighted}", case.name);
    for (i, (a, b)) in fv.iter().zip(&rv).enumerate() {
        assert!(a.is_finite(), "{what}: row {i} loss {a}");
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: row {i} fused {a} reference {b}"
        );
    }
    for (i, (a, b)) in fg.iter().zip(&rg).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: grad {i} fused {a} reference {b}"
        );
    }
    Ok(())
}

#[test]
fn fused_matches_reference_f64() -> Result<()> {
    for case in cases() {
        for mode in [PlMode::Exact, PlMode::Parity] {
            for weighted in [false, true] {
                compare(&case, mode, DType::F64, weighted, 1e-10)?;
            }
        }
    }
    Ok(())
}

#[test]
fn fused_matches_reference_f32() -> Result<()> {
    for case in cases() {
        // At logit scale 100 the f32 reference itself rounds sums of terms ~100 to ~1e-5.
        let tol = if case.name == "scale 100" { 1e-4 } else { 1e-5 };
        for mode in [PlMode::Exact, PlMode::Parity] {
            compare(&case, mode, DType::F32, false, tol)?;
        }
    }
    Ok(())
}

/// Central differences of the fused loss against its hand-written backward.
#[test]
fn fused_gradient_matches_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    for (case, mode) in [
        (random_case("fd", 2, 7, 3.0, 9), PlMode::Exact),
        (random_case("fd", 2, 7, 3.0, 10), PlMode::Parity),
    ] {
        let order = Tensor::from_vec(case.order.clone(), (case.n, case.m), &dev)?;
        let loss_at = |x: &[f64]| -> Result<f64> {
            pl_nll(
                &Tensor::from_vec(x.to_vec(), (case.n, case.m), &dev)?,
                &order,
                mode,
                None,
            )?
            .sum_all()?
            .to_scalar::<f64>()
        };
        let s = Var::from_tensor(&Tensor::from_vec(
            case.scores.clone(),
            (case.n, case.m),
            &dev,
        )?)?;
        let g = pl_nll(&s, &order, mode, None)?
            .sum_all()?
            .backward()?
            .get(&s)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        for (i, fd) in crate::central_differences(loss_at, &case.scores, 1e-6)?
            .into_iter()
            .enumerate()
        {
            assert!(
                (fd - g[i]).abs() < 1e-6,
                "{mode:?} entry {i}: finite difference {fd}, backward {}",
                g[i]
            );
        }
    }
    Ok(())
}

#[test]
fn bad_shapes_name_the_op_and_shapes() {
    let dev = Device::Cpu;
    let s = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let order = Tensor::zeros((2, 4), DType::U32, &dev).unwrap();
    let err = pl_nll(&s, &order, PlMode::Exact, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pl_nll") && err.contains("[2, 3]") && err.contains("[2, 4]"),
        "{err}"
    );
    let v = Tensor::zeros(3, DType::F32, &dev).unwrap();
    let err = pl_nll(&v, &order, PlMode::Exact, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pl_nll: scores must be (n, m), got [3]"),
        "{err}"
    );
}

/// The exact form stays finite and correct where f32 exponentials underflow.
#[test]
fn exact_form_is_stable_at_scale_100() -> Result<()> {
    let dev = Device::Cpu;
    let s = Tensor::new(&[[100f32, -100.0, 0.0]], &dev)?;
    let order = Tensor::new(&[[0u32, 1, 2]], &dev)?;
    let v = pl_nll(&s, &order, PlMode::Exact, None)?.to_vec1::<f32>()?[0];
    assert!((v - 100.0).abs() < 1e-4, "{v}");
    Ok(())
}

#[test]
fn order_sorts_descending_and_breaks_ties_by_the_permutation() -> Result<()> {
    use rankalign_kernels::pl_order;
    let dev = Device::Cpu;
    let r = Tensor::new(&[[0.5f32, 2.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]], &dev)?;
    let order = pl_order(&r, &[3, 2, 1, 0])?.to_vec2::<u32>()?;
    assert_eq!(order, vec![vec![1, 3, 2, 0], vec![3, 2, 1, 0]]);
    let order = pl_order(&r, &[0, 1, 2, 3])?.to_vec2::<u32>()?;
    assert_eq!(order[1], vec![0, 1, 2, 3]);
    let err = pl_order(&r, &[0, 0, 1, 2]).unwrap_err().to_string();
    assert!(
        err.contains("pl_order") && err.contains("not one of 0..4"),
        "{err}"
    );
    let err = pl_order(&r, &[0, 1]).unwrap_err().to_string();
    assert!(
        err.contains("permutation of length 2 for 4 columns"),
        "{err}"
    );
    Ok(())
}

/// `pl_order` against a stable comparison sort (descending by value under `total_cmp`,
/// ties in permutation order), f32 and f64, on rows that exercise every radix byte:
/// signs, zeros of both signs, infinities, NaN, values that share their high bytes (in
/// [1, 2), and differing in the lowest byte only), and heavy ties; at lengths around the
/// sort's four interleaved runs (1 to 9) and its insertion finish (64 and longer).
#[test]
fn order_matches_a_stable_comparison_sort() -> Result<()> {
    use rankalign_kernels::pl_order;
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for m in (1..=9).chain([63, 64, 257, 1024]) {
        for kind in 0..5 {
            let n = 3;
            let values: Vec<f32> = (0..n * m)
                .map(|_| match kind {
                    // Few distinct values: long runs of ties.
                    0 => rng.random_range(0..4) as f32 - 1.5,
                    // Values in [1, 2): one exponent, differing in the low bytes only.
                    1 => 1.0 + rng.random::<f32>(),
                    // Mixed signs and magnitudes.
                    2 => (rng.random::<f32>() - 0.5) * 10f32.powi(rng.random_range(-3..4)),
                    // Differing in the lowest byte only: more ties in the high bytes than
                    // the sort's insertion finish will take, so it falls back to radix.
                    3 => f32::from_bits(0x3F80_0000 + rng.random_range(0..256)),
                    // The special values among ordinary ones.
                    _ => [
                        0.0,
                        -0.0,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        f32::NAN,
                        1.0,
                        -1.0,
                    ][rng.random_range(0..7)],
                })
                .collect();
            let mut perm: Vec<u32> = (0..m as u32).collect();
            for i in (1..m).rev() {
                perm.swap(i, rng.random_range(0..=i));
            }
            let expected: Vec<Vec<u32>> = values
                .chunks(m)
                .map(|row| {
                    let mut o = perm.clone();
                    // `sort_by` is stable: ties keep `perm`'s order.
                    o.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                    o
                })
                .collect();
            let r32 = Tensor::from_vec(values.clone(), (n, m), &dev)?;
            assert_eq!(
                pl_order(&r32, &perm)?.to_vec2::<u32>()?,
                expected,
                "f32, m = {m}, kind {kind}"
            );
            let r64 = r32.to_dtype(DType::F64)?;
            assert_eq!(
                pl_order(&r64, &perm)?.to_vec2::<u32>()?,
                expected,
                "f64, m = {m}, kind {kind}"
            );
        }
    }
    Ok(())
}
