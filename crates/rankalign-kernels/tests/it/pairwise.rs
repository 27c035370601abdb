//! The fused weighted pairwise-distance term against its reference and finite
//! differences, both forms, with coincident points below the clamp.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankalign_kernels::{PairwiseForm, weighted_pairwise, weighted_pairwise_reference};

pub(crate) fn data(n: usize, m: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw =
        |k: usize| -> Vec<f64> { (0..k).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect() };
    let (a, b) = (draw(n * d), draw(m * d));
    let w = (0..n * m).map(|k| ((k % 7) as f64 - 2.0).abs()).collect();
    (a, b, w)
}

#[allow(clippy::too_many_arguments)]
fn grads(
    n: usize,
    m: usize,
    d: usize,
    seed: u64,
    form: PairwiseForm,
    dtype: DType,
    fused: bool,
    coincide: bool,
) -> Result<Vec<Vec<f64>>> {
    let dev = Device::Cpu;
    let (av, mut bv, wv) = data(n, m, d, seed);
    if coincide {
        bv[..d].copy_from_slice(&av[..d]); // b_0 = a_0: distance 0, below the clamp
    }
    let a = Var::from_tensor(&Tensor::from_vec(av, (n, d), &dev)?.to_dtype(dtype)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(bv, (m, d), &dev)?.to_dtype(dtype)?)?;
    let w = Tensor::from_vec(wv, (n, m), &dev)?.to_dtype(dtype)?;
    let loss = if fused {
        weighted_pairwise(&a, &b, &w, form)?
    } else {
        weighted_pairwise_reference(&a, &b, &w, form)?
    };
    let g = loss.backward()?;
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    Ok(vec![
        vec![loss.to_dtype(DType::F64)?.to_scalar::<f64>()?],
        flat(g.get(&a).unwrap()),
        flat(g.get(&b).unwrap()),
    ])
}

#[test]
fn fused_matches_reference() -> Result<()> {
    for form in [PairwiseForm::Euclidean, PairwiseForm::LogSquared] {
        for (n, m, d, seed) in [(5, 7, 3, 1), (1, 4, 8, 2), (6, 1, 8, 3), (33, 40, 64, 4)] {
            for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
                let f = grads(n, m, d, seed, form, dtype, true, false)?;
                let r = grads(n, m, d, seed, form, dtype, false, false)?;
                for (part, (x, y)) in ["loss", "da", "db"].iter().zip(f.iter().zip(&r)) {
                    for (i, (u, v)) in x.iter().zip(y).enumerate() {
                        assert!(
                            (u - v).abs() <= tol * (1.0 + v.abs()),
                            "{form:?} {n}x{m}x{d} {dtype:?} {part}[{i}]: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn coincident_points_are_clamped_without_nan() -> Result<()> {
    for form in [PairwiseForm::Euclidean, PairwiseForm::LogSquared] {
        let f = grads(3, 3, 4, 9, form, DType::F64, true, true)?;
        let r = grads(3, 3, 4, 9, form, DType::F64, false, true)?;
        assert!(f.iter().flatten().all(|v| v.is_finite()), "{form:?}: {f:?}");
        // At the clamp the two differ only in float rounding of s ≈ 0 (either side of 1e-12);
        // the loss must agree.
        assert!(
            (f[0][0] - r[0][0]).abs() < 1e-5,
            "{form:?}: {} vs {}",
            f[0][0],
            r[0][0]
        );
    }
    Ok(())
}

#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let (av, bv, wv) = data(3, 4, 5, 11);
    let b = Tensor::from_vec(bv, (4, 5), &dev)?;
    let w = Tensor::from_vec(wv, (3, 4), &dev)?;
    for form in [PairwiseForm::Euclidean, PairwiseForm::LogSquared] {
        let f = |x: &[f64]| -> Result<f64> {
            weighted_pairwise(&Tensor::from_vec(x.to_vec(), (3, 5), &dev)?, &b, &w, form)?
                .to_scalar::<f64>()
        };
        let a = Var::from_tensor(&Tensor::from_vec(av.clone(), (3, 5), &dev)?)?;
        let g = weighted_pairwise(&a, &b, &w, form)?
            .backward()?
            .get(&a)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        for (i, fd) in crate::central_differences(f, &av, 1e-6)?
            .into_iter()
            .enumerate()
        {
            assert!(
                (fd - g[i]).abs() < 1e-6,
                "{form:?} a[{i}]: {fd} vs {}",
                g[i]
            );
        }
    }
    Ok(())
}

#[test]
fn bad_shapes_name_the_op() {
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let err = weighted_pairwise(&a, &b, &w, PairwiseForm::Euclidean)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("weighted_pairwise") && err.contains("[2, 3]") && err.contains("[4, 5]"),
        "{err}"
    );
}
