//! Every CUDA kernel against its CPU path on the same inputs: values and gradients in
//! f32, at the sizes of the CPU tests and at B = 4096. Each comparison prints one line
//! `GPUCHECK {json}` that the GPU bundle's report collects (run with `--nocapture`).
//!
//! Compiled only with the `cuda` feature and run only where a GPU is: the bundle's
//! `run.sh` runs them (`kernel_tests cuda:: --test-threads 1 --nocapture`); CI compiles
//! them in `cargo xtask cuda-check` and `gpu-bundle`, and cannot run them.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use rankalign_kernels::{PairwiseForm, PlMode, layer_norm, pl_nll, weighted_pairwise};

/// f32 on both sides; sums of up to 4096 terms in different orders differ by a few ulp
/// of the largest partial sum, so each output is compared relative to its largest entry.
const TOL: f64 = 2e-4;

/// GPU 0, opened once: each new device would load (and JIT-compile) the kernels again.
fn gpu() -> Device {
    static GPU: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        Device::new_cuda(0).unwrap_or_else(|e| panic!("no CUDA device 0 for the GPU checks: {e}"))
    })
    .clone()
}

type Outputs = Vec<(&'static str, Vec<f64>)>;

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// Runs `f` on the CPU and on the GPU and compares every named output: the largest
/// difference over the largest CPU magnitude must be at most [`TOL`]; non-finite
/// entries must agree exactly.
fn compare(op: &str, size: &str, f: impl Fn(&Device) -> Result<Outputs>) -> Result<()> {
    let cpu = f(&Device::Cpu)?;
    let dev = gpu();
    let t = Instant::now();
    let on_gpu = f(&dev)?;
    dev.synchronize()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let mut bad = Vec::new();
    for ((name, want), (_, got)) in cpu.iter().zip(&on_gpu) {
        assert_eq!(want.len(), got.len(), "{op} {size} {name}: lengths");
        let scale = want
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f64, |m, v| m.max(v.abs()))
            .max(f64::MIN_POSITIVE);
        let mut worst = 0f64;
        let mut mismatched_inf = 0usize;
        for (a, b) in got.iter().zip(want) {
            if a.is_finite() && b.is_finite() {
                worst = worst.max((a - b).abs());
            } else if a != b && !(a.is_nan() && b.is_nan()) {
                mismatched_inf += 1;
            }
        }
        let rel = worst / scale;
        let ok = rel <= TOL && mismatched_inf == 0;
        #[allow(clippy::print_stdout)]
        {
            println!(
                r#"GPUCHECK {{"op":"{op}","size":"{size}","output":"{name}","max_abs_diff":{worst:e},"scale":{scale:e},"rel":{rel:e},"tol":{TOL:e},"non_finite_mismatches":{mismatched_inf},"gpu_ms":{ms:.3},"ok":{ok}}}"#
            );
        }
        if !ok {
            bad.push(format!(
                "{name}: rel {rel:e} (non-finite mismatches {mismatched_inf})"
            ));
        }
    }
    assert!(bad.is_empty(), "{op} {size}: GPU differs from CPU: {bad:?}");
    Ok(())
}

#[test]
fn plackett_luce_matches_cpu() -> Result<()> {
    let mut cases = crate::plackett_luce::cases();
    cases.push(crate::plackett_luce::random_case(
        "B4096", 4096, 4096, 14.0, 40,
    ));
    for case in &cases {
        for mode in [PlMode::Parity, PlMode::Exact] {
            for weighted in [false, true] {
                let size = format!(
                    "{} {}x{} {mode:?}{}",
                    case.name,
                    case.n,
                    case.m,
                    if weighted { " weighted" } else { "" }
                );
                compare("pl_nll", &size, |dev| {
                    let s = Var::from_tensor(
                        &Tensor::from_vec(case.scores.clone(), (case.n, case.m), dev)?
                            .to_dtype(DType::F32)?,
                    )?;
                    let order = Tensor::from_vec(case.order.clone(), (case.n, case.m), dev)?;
                    let w = weighted
                        .then(|| {
                            let w: Vec<f32> =
                                (1..=case.m).map(|k| 1.0 / ((k + 1) as f32).ln()).collect();
                            Tensor::from_vec(w, case.m, dev)
                        })
                        .transpose()?;
                    let rows = pl_nll(&s, &order, mode, w.as_ref())?;
                    let up: Vec<f32> = (0..case.n).map(|i| 1.0 + i as f32 * 0.5).collect();
                    let loss = (&rows * Tensor::from_vec(up, case.n, dev)?)?.sum_all()?;
                    let g = loss.backward()?;
                    let ds = g.get(&s).expect("scores have a gradient");
                    Ok(vec![("rows", flat(&rows)?), ("d_scores", flat(ds)?)])
                })?;
            }
        }
    }
    Ok(())
}

#[test]
fn layer_norm_matches_cpu() -> Result<()> {
    let shapes: [&[usize]; 6] = [
        &[1, 1],
        &[3, 7],
        &[2, 17, 96],
        &[130, 512],
        &[4, 1],
        &[4096, 768],
    ];
    for (seed, shape) in shapes.iter().enumerate() {
        let d = *shape.last().expect("a shape has a last dimension");
        let (xv, wv, bv, gv) = crate::layer_norm::inputs(shape, seed as u64);
        let f32s = |v: &[f64], shape: &[usize], dev: &Device| {
            Tensor::from_vec(v.to_vec(), shape, dev)?.to_dtype(DType::F32)
        };
        compare("layer_norm", &format!("{shape:?}"), |dev| {
            let x = Var::from_tensor(&f32s(&xv, shape, dev)?)?;
            let w = Var::from_tensor(&f32s(&wv, &[d], dev)?)?;
            let b = Var::from_tensor(&f32s(&bv, &[d], dev)?)?;
            let y = layer_norm(&x, &w, &b, 1e-5)?;
            let loss = (&y * f32s(&gv, shape, dev)?)?.sum_all()?;
            let g = loss.backward()?;
            let grad = |v: &Var| flat(g.get(v).expect("every input has a gradient"));
            Ok(vec![
                ("y", flat(&y)?),
                ("dx", grad(&x)?),
                ("dw", grad(&w)?),
                ("db", grad(&b)?),
            ])
        })?;
    }
    Ok(())
}

#[test]
fn pairwise_matches_cpu() -> Result<()> {
    let sizes = [
        (5, 7, 3, 1),
        (1, 4, 8, 2),
        (6, 1, 8, 3),
        (33, 40, 64, 4),
        (4096, 4096, 512, 5),
    ];
    for form in [PairwiseForm::Euclidean, PairwiseForm::LogSquared] {
        for (n, m, d, seed) in sizes {
            let (av, bv, wv) = crate::pairwise::data(n, m, d, seed);
            compare(
                "weighted_pairwise",
                &format!("{n}x{m}x{d} {form:?}"),
                |dev| {
                    let f32s = |v: &[f64], shape: (usize, usize)| {
                        Tensor::from_vec(v.to_vec(), shape, dev)?.to_dtype(DType::F32)
                    };
                    let a = Var::from_tensor(&f32s(&av, (n, d))?)?;
                    let b = Var::from_tensor(&f32s(&bv, (m, d))?)?;
                    let loss = weighted_pairwise(&a, &b, &f32s(&wv, (n, m))?, form)?;
                    let g = loss.backward()?;
                    let grad = |v: &Var| flat(g.get(v).expect("both inputs have a gradient"));
                    Ok(vec![
                        ("loss", vec![loss.to_dtype(DType::F64)?.to_scalar::<f64>()?]),
                        ("da", grad(&a)?),
                        ("db", grad(&b)?),
                    ])
                },
            )?;
        }
    }
    Ok(())
}
