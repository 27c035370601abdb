//! Fused LayerNorm against the composed reference: values and gradients of x, weight and
//! bias, f32 and f64, at transformer shapes and edge cases.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankalign_kernels::{layer_norm, layer_norm_reference};

/// Seeded inputs of a LayerNorm of `shape`: x, weight, bias and the upstream gradient.
pub(crate) fn inputs(shape: &[usize], seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |k: usize, scale: f64, shift: f64| -> Vec<f64> {
        (0..k)
            .map(|_| shift + scale * (rng.random::<f64>() * 2.0 - 1.0))
            .collect()
    };
    (
        draw(n, 3.0, 0.5),
        draw(d, 1.0, 1.0),
        draw(d, 0.5, 0.0),
        draw(n, 1.0, 0.0),
    )
}

fn check(shape: &[usize], dtype: DType, tol: f64, seed: u64) -> Result<()> {
    let dev = Device::Cpu;
    let d = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    let (xv, wv, bv, gv) = inputs(shape, seed);
    let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
        let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), shape, &dev)?.to_dtype(dtype)?)?;
        let w = Var::from_tensor(&Tensor::from_vec(wv.clone(), d, &dev)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(bv.clone(), d, &dev)?.to_dtype(dtype)?)?;
        let y = if fused {
            layer_norm(&x, &w, &b, 1e-5)?
        } else {
            layer_norm_reference(&x, &w, &b, 1e-5)?
        };
        let up = Tensor::from_vec(gv.clone(), shape, &dev)?.to_dtype(dtype)?;
        let grads = (&y * &up)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        Ok(vec![
            flat(&y),
            flat(grads.get(&x).unwrap()),
            flat(grads.get(&w).unwrap()),
            flat(grads.get(&b).unwrap()),
        ])
    };
    let (f, r) = (run(true)?, run(false)?);
    for (name, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(f.iter().zip(&r)) {
        // ∂w and ∂b sum over all rows; scale the tolerance with their magnitude.
        let scale = if name.starts_with("dw") || name.starts_with("db") {
            (n / d) as f64
        } else {
            1.0
        };
        for (i, (u, v)) in a.iter().zip(b).enumerate() {
            assert!(
                (u - v).abs() <= tol * (scale.sqrt() + v.abs()),
                "{shape:?} {dtype:?} {name}[{i}]: fused {u} reference {v}"
            );
        }
    }
    Ok(())
}

#[test]
fn fused_matches_reference() -> Result<()> {
    for (shape, seed) in [
        (vec![1, 1], 1),
        (vec![3, 7], 2),
        (vec![2, 17, 96], 3),
        (vec![130, 512], 4),
        (vec![4, 1], 5),
    ] {
        check(&shape, DType::F64, 1e-10, seed)?;
        check(&shape, DType::F32, 1e-5, seed)?;
    }
    Ok(())
}

#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let xv = vec![0.3, -1.2, 2.0, 0.7, 1.1, -0.4];
    let w = Tensor::new(&[1.5f64, -0.5, 2.0], &dev)?;
    let b = Tensor::new(&[0.1f64, 0.2, 0.3], &dev)?;
    let up = Tensor::new(&[[1.0f64, -2.0, 0.5], [0.3, 0.9, -1.1]], &dev)?;
    let f = |x: &[f64]| -> Result<f64> {
        (layer_norm(&Tensor::from_vec(x.to_vec(), (2, 3), &dev)?, &w, &b, 1e-5)? * &up)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), (2, 3), &dev)?)?;
    let g = (layer_norm(&x, &w, &b, 1e-5)? * &up)?
        .sum_all()?
        .backward()?
        .get(&x)
        .unwrap()
        .flatten_all()?
        .to_vec1::<f64>()?;
    for (i, fd) in crate::central_differences(f, &xv, 1e-6)?
        .into_iter()
        .enumerate()
    {
        assert!(
            (fd - g[i]).abs() < 1e-6,
            "x[{i}]: finite difference {fd}, backward {}",
            g[i]
        );
    }
    Ok(())
}
