//! The fused linear layer, QuickGELU, softmax, attention and the similarity-matrix ops
//! (L2 normalisation, scaling by a learned scalar, Gram matrix, transpose, symmetric InfoNCE) against their composed references
//! (values and the gradient of every input, f32 and f64) and against central finite
//! differences in f64.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankalign_kernels::{
    attention, attention_reference, gram, gram_reference, info_nce, info_nce_reference,
    l2_normalize, l2_normalize_reference, linear, linear_reference, quick_gelu,
    quick_gelu_reference, scale, scale_reference, softmax_last_dim, softmax_last_dim_reference,
    transpose, transpose_reference,
};

/// An op under test: its inputs' shapes and how to apply it (fused or composed).
struct Case {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
    apply: fn(&[Tensor], bool) -> Result<Tensor>,
}

fn cases() -> Vec<Case> {
    fn lin(t: &[Tensor], fused: bool) -> Result<Tensor> {
        let b = t.get(2);
        if fused {
            linear(&t[0], &t[1], b)
        } else {
            linear_reference(&t[0], &t[1], b)
        }
    }
    fn gelu(t: &[Tensor], fused: bool) -> Result<Tensor> {
        if fused {
            quick_gelu(&t[0])
        } else {
            quick_gelu_reference(&t[0])
        }
    }
    fn softmax(t: &[Tensor], fused: bool) -> Result<Tensor> {
        if fused {
            softmax_last_dim(&t[0])
        } else {
            softmax_last_dim_reference(&t[0])
        }
    }
    /// Heads by width: 1 for width 2, else 2 (or 4 from width 96).
    fn heads(t: &[Tensor]) -> Result<usize> {
        let w = t[0].dim(2)?;
        Ok(if w >= 96 {
            4
        } else if w > 2 {
            2
        } else {
            1
        })
    }
    fn att(t: &[Tensor], fused: bool) -> Result<Tensor> {
        let h = heads(t)?;
        if fused {
            attention(&t[0], &t[1], &t[2], h, None)
        } else {
            attention_reference(&t[0], &t[1], &t[2], h, None)
        }
    }
    fn causal(t: &[Tensor], fused: bool) -> Result<Tensor> {
        let (h, s) = (heads(t)?, t[0].dim(1)?);
        let m: Vec<f32> = (0..s * s)
            .map(|i| {
                if i % s > i / s {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(m, (s, s), t[0].device())?;
        if fused {
            attention(&t[0], &t[1], &t[2], h, Some(&mask))
        } else {
            attention_reference(&t[0], &t[1], &t[2], h, Some(&mask))
        }
    }
    /// A `(1, 1, 1, s)` padding mask (the last position masked), as RankFormer passes.
    fn padded(t: &[Tensor], fused: bool) -> Result<Tensor> {
        let (h, s) = (heads(t)?, t[0].dim(1)?);
        let m: Vec<f32> = (0..s)
            .map(|j| {
                if j + 1 == s && s > 1 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(m, (1, 1, 1, s), t[0].device())?;
        if fused {
            attention(&t[0], &t[1], &t[2], h, Some(&mask))
        } else {
            attention_reference(&t[0], &t[1], &t[2], h, Some(&mask))
        }
    }
    /// One-input ops: the fused function and its reference.
    fn unary(t: &[Tensor], fused: bool, ops: [fn(&Tensor) -> Result<Tensor>; 2]) -> Result<Tensor> {
        ops[usize::from(!fused)](&t[0])
    }
    fn norm(t: &[Tensor], fused: bool) -> Result<Tensor> {
        unary(t, fused, [l2_normalize, l2_normalize_reference])
    }
    fn gram_op(t: &[Tensor], fused: bool) -> Result<Tensor> {
        unary(t, fused, [gram, gram_reference])
    }
    fn transpose_op(t: &[Tensor], fused: bool) -> Result<Tensor> {
        unary(t, fused, [transpose, transpose_reference])
    }
    fn scaled(t: &[Tensor], fused: bool) -> Result<Tensor> {
        if fused {
            scale(&t[0], &t[1])
        } else {
            scale_reference(&t[0], &t[1])
        }
    }
    fn nce(t: &[Tensor], fused: bool) -> Result<Tensor> {
        unary(t, fused, [info_nce, info_nce_reference])
    }
    let mut out = Vec::new();
    for shape in [vec![1, 1], vec![5, 3], vec![2, 3, 7], vec![70, 512]] {
        out.push(Case {
            name: "l2_normalize",
            shapes: vec![shape],
            apply: norm,
        });
    }
    // Sizes around the 32-wide transpose tiles, the 128-column InfoNCE blocks and the
    // Gram matrix's 128-row blocks.
    for shape in [vec![1, 1], vec![3, 5], vec![33, 7], vec![40, 70]] {
        out.push(Case {
            name: "gram",
            shapes: vec![shape.clone()],
            apply: gram_op,
        });
        out.push(Case {
            name: "transpose",
            shapes: vec![shape],
            apply: transpose_op,
        });
    }
    // A 0-d and a one-element scale; sizes around the 8192-element blocks.
    for (x, s) in [
        (vec![1, 1], vec![]),
        (vec![5, 3], vec![1]),
        (vec![2, 4, 7], vec![]),
        (vec![3, 8193], vec![]),
    ] {
        out.push(Case {
            name: "scale",
            shapes: vec![x, s],
            apply: scaled,
        });
    }
    for shape in [vec![128, 3], vec![129, 4], vec![300, 5]] {
        out.push(Case {
            name: "gram",
            shapes: vec![shape],
            apply: gram_op,
        });
    }
    for b in [1, 2, 7, 33, 130, 300] {
        out.push(Case {
            name: "info_nce",
            shapes: vec![vec![b, b]],
            apply: nce,
        });
    }
    for shape in [vec![1, 3, 4], vec![2, 17, 96]] {
        out.push(Case {
            name: "attention+padding mask",
            shapes: vec![shape; 3],
            apply: padded,
        });
    }
    for shape in [vec![1, 1, 2], vec![1, 3, 4], vec![2, 5, 6], vec![3, 17, 96]] {
        out.push(Case {
            name: "attention",
            shapes: vec![shape.clone(); 3],
            apply: att,
        });
        out.push(Case {
            name: "attention+causal mask",
            shapes: vec![shape; 3],
            apply: causal,
        });
    }
    for (x, w) in [
        (vec![1, 1], vec![1, 1]),
        (vec![3, 5], vec![4, 5]),
        (vec![2, 17, 96], vec![384, 96]),
        (vec![4, 9, 33], vec![7, 33]),
    ] {
        let out_dim = w[0];
        out.push(Case {
            name: "linear+bias",
            shapes: vec![x.clone(), w.clone(), vec![out_dim]],
            apply: lin,
        });
        out.push(Case {
            name: "linear",
            shapes: vec![x, w],
            apply: lin,
        });
    }
    for shape in [vec![1], vec![7, 3], vec![2, 17, 384], vec![40_000]] {
        out.push(Case {
            name: "quick_gelu",
            shapes: vec![shape],
            apply: gelu,
        });
    }
    for shape in [vec![1, 1], vec![3, 7], vec![2, 4, 17, 17], vec![5, 1000]] {
        out.push(Case {
            name: "softmax",
            shapes: vec![shape],
            apply: softmax,
        });
    }
    out
}

fn draw(rng: &mut ChaCha8Rng, shape: &[usize], scale: f64) -> Vec<f64> {
    let n = shape.iter().product();
    (0..n)
        .map(|_| scale * (rng.random::<f64>() * 2.0 - 1.0))
        .collect()
}

/// The op's output and the gradients of `Σ y∘u` for a random `u`, fused or composed.
fn run(
    case: &Case,
    inputs: &[Vec<f64>],
    up: &[f64],
    dtype: DType,
    fused: bool,
) -> Result<Vec<Vec<f64>>> {
    let dev = Device::Cpu;
    let vars = case
        .shapes
        .iter()
        .zip(inputs)
        .map(|(s, v)| {
            Var::from_tensor(&Tensor::from_vec(v.clone(), s.as_slice(), &dev)?.to_dtype(dtype)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = (case.apply)(&tensors, fused)?;
    let u = Tensor::from_vec(up.to_vec(), y.shape(), &dev)?.to_dtype(dtype)?;
    let grads = (&y * &u)?.sum_all()?.backward()?;
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let mut out = vec![flat(&y)?];
    for v in &vars {
        let g = grads.get(v).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: an input got no gradient", case.name))
        })?;
        out.push(flat(g)?);
    }
    Ok(out)
}

#[test]
fn fused_ops_match_their_references() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for case in cases() {
        let inputs: Vec<Vec<f64>> = case.shapes.iter().map(|s| draw(&mut rng, s, 3.0)).collect();
        // The output's size, for the upstream gradient.
        let n_out = {
            let dev = Device::Cpu;
            let t: Vec<Tensor> = case
                .shapes
                .iter()
                .zip(&inputs)
                .map(|(s, v)| Tensor::from_vec(v.clone(), s.as_slice(), &dev))
                .collect::<Result<_>>()?;
            (case.apply)(&t, false)?.elem_count()
        };
        let up = draw(&mut rng, &[n_out], 1.0);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let (f, r) = (
                run(&case, &inputs, &up, dtype, true)?,
                run(&case, &inputs, &up, dtype, false)?,
            );
            // Untracked inputs take the no-gradient paths (attention keeps no
            // probabilities then): the same values, bit for bit.
            let plain = case
                .shapes
                .iter()
                .zip(&inputs)
                .map(|(s, v)| {
                    Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu)?.to_dtype(dtype)
                })
                .collect::<Result<Vec<_>>>()?;
            let untracked = (case.apply)(&plain, true)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            assert_eq!(
                untracked, f[0],
                "{} {:?} {dtype:?}: the untracked output differs from the tracked one",
                case.name, case.shapes
            );
            for (k, (a, b)) in f.iter().zip(&r).enumerate() {
                let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (i, (u, v)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (u - v).abs() <= tol * scale,
                        "{} {:?} {dtype:?} output {k} [{i}]: fused {u}, reference {v}",
                        case.name,
                        case.shapes
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fused_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for case in cases()
        .into_iter()
        .filter(|c| c.shapes.iter().all(|s| s.iter().product::<usize>() <= 64))
    {
        let inputs: Vec<Vec<f64>> = case.shapes.iter().map(|s| draw(&mut rng, s, 2.0)).collect();
        let as_tensors = |xs: &[Vec<f64>]| -> Result<Vec<Tensor>> {
            case.shapes
                .iter()
                .zip(xs)
                .map(|(s, v)| Tensor::from_vec(v.clone(), s.as_slice(), &dev))
                .collect()
        };
        let n_out = (case.apply)(&as_tensors(&inputs)?, true)?.elem_count();
        let up = draw(&mut rng, &[n_out], 1.0);
        let backward = run(&case, &inputs, &up, DType::F64, true)?;
        for k in 0..inputs.len() {
            let f = |x: &[f64]| -> Result<f64> {
                let mut xs = inputs.clone();
                xs[k] = x.to_vec();
                let y = (case.apply)(&as_tensors(&xs)?, true)?;
                (y.flatten_all()? * Tensor::from_vec(up.clone(), n_out, &dev)?)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let fd = crate::central_differences(f, &inputs[k], 1e-6)?;
            for (i, (d, g)) in fd.iter().zip(&backward[k + 1]).enumerate() {
                assert!(
                    (d - g).abs() < 1e-6 * (1.0 + g.abs()),
                    "{} {:?} input {k} [{i}]: finite difference {d}, backward {g}",
                    case.name,
                    case.shapes
                );
            }
        }
    }
    Ok(())
}

#[test]
fn similarity_ops_name_the_op_and_the_shape_they_expected() -> Result<()> {
    let dev = Device::Cpu;
    let wide = Tensor::zeros((2, 3), DType::F32, &dev)?;
    let cube = Tensor::zeros((2, 2, 2), DType::F32, &dev)?;
    for (err, want) in [
        (
            info_nce(&wide).unwrap_err(),
            "info_nce: logits must be a square (b, b) matrix, got [2, 3]",
        ),
        (
            gram(&cube).unwrap_err(),
            "gram: expected a matrix, got [2, 2, 2]",
        ),
        (
            transpose(&cube).unwrap_err(),
            "transpose: expected a matrix, got [2, 2, 2]",
        ),
        (
            scale(&cube, &wide).unwrap_err(),
            "scale: the scale must have one element, got [2, 3]",
        ),
    ] {
        assert!(err.to_string().contains(want), "{err}");
    }
    Ok(())
}
