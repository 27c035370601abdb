//! L2RCLIP's and OrdinalCLIP's losses against a float64 PyTorch re-expression of the
//! official loss functions (`tests/fixtures/gen_l2rclip.py` → `l2rclip_cases.json`; the
//! script checks each re-expression against plain-Python loops, and was run once against
//! the official functions, patched only for the removed `addmm_` overload): values and gradients for
//! L_cop, L_scop, the asymmetric contrastive loss, cross-entropy and OrdinalCLIP's KL.
//! The paper form (log of squared distances) has no official code; it is checked by
//! central finite differences.

use candle_core::{DType, Device, Tensor, Var};
use rankalign_losses::{
    CopWeights, OrdinalForm, cop_stage1, cross_entropy, ordinal_kl, scop, sup_con,
};
use serde_json::Value;

use super::{matrix, num};

fn labels(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn var(v: &Value) -> Var {
    Var::from_tensor(&matrix(v, DType::F64)).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn official_loss_functions_match_in_values_and_gradients() {
    let text = include_str!("../fixtures/l2rclip_cases.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    assert_eq!(doc["supcon_logit_scale_is_raw"], Value::Bool(true));
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut worst = 0f64;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let inp = &case["inputs"];
        let want = num(&case["loss"]);
        let grads = &case["grads"];
        let (loss, checks): (Tensor, Vec<(&str, Var)>) = match case["kind"].as_str().unwrap() {
            "cop_stage1" => {
                let (v, r, g) = (var(&inp["v"]), var(&inp["r"]), var(&inp["g"]));
                let y = labels(&inp["labels"]);
                let l =
                    cop_stage1(&v, &r, &g, &y, CopWeights::default(), OrdinalForm::Code).unwrap();
                (l, vec![("v", v), ("r", r), ("g", g)])
            }
            "scop" => {
                let (v, r) = (var(&inp["v"]), var(&inp["r"]));
                let y = labels(&inp["labels"]);
                (
                    scop(&v, &r, &y, OrdinalForm::Code).unwrap(),
                    vec![("v", v), ("r", r)],
                )
            }
            "supcon" => {
                let (a, c) = (var(&inp["anchor"]), var(&inp["cand"]));
                let s =
                    Var::from_tensor(&Tensor::new(num(&inp["logit_scale"]), &Device::Cpu).unwrap())
                        .unwrap();
                let l = sup_con(
                    &a,
                    &c,
                    &labels(&inp["anchor_labels"]),
                    &labels(&inp["cand_labels"]),
                    &s,
                )
                .unwrap();
                let gs = l.backward().unwrap();
                let got = gs.get(&s).unwrap().to_scalar::<f64>().unwrap();
                let d = (got - num(&grads["logit_scale"])).abs();
                assert!(d < 1e-9, "{name}: d/d logit_scale off by {d}");
                (l, vec![("anchor", a), ("cand", c)])
            }
            "ce" => {
                let z = var(&inp["logits"]);
                (
                    cross_entropy(&z, &labels(&inp["labels"])).unwrap(),
                    vec![("logits", z)],
                )
            }
            "ordinal_kl" => {
                let z = var(&inp["logits"]);
                (
                    ordinal_kl(&z, &labels(&inp["labels"])).unwrap(),
                    vec![("logits", z)],
                )
            }
            k => panic!("unknown kind {k}"),
        };
        let got = loss.to_scalar::<f64>().unwrap();
        let d = (got - want).abs() / want.abs().max(1.0);
        assert!(d < 1e-10, "{name}: loss {got} vs {want}");
        worst = worst.max(d);
        let gs = loss.backward().unwrap();
        for (key, v) in checks {
            let want = matrix(&grads[key], DType::F64);
            let got = gs
                .get(&v)
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap());
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-9, "{name}: ∂/∂{key} off by {d}");
            worst = worst.max(d);
        }
    }
    eprintln!(
        "l2rclip fixtures: {} cases, worst difference {worst:.2e}",
        cases.len()
    );
}

/// Central differences of a scalar function of one matrix, against autograd.
fn check_gradient(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let grad = f(v.as_tensor())
        .backward()
        .unwrap()
        .get(&v)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-6;
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut p = base.clone();
            p[i] += delta;
            let t = Tensor::from_vec(p, x.dims(), &Device::Cpu).unwrap();
            f(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() < 1e-6 * fd.abs().max(1.0),
            "entry {i}: autograd {} vs finite differences {fd}",
            grad[i]
        );
    }
}

fn randn(rows: usize, cols: usize, seed: u64) -> Tensor {
    // A small deterministic generator: the test must not depend on candle's RNG.
    let mut s = seed;
    let v: Vec<f64> = (0..rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

#[test]
fn paper_form_gradients_match_finite_differences() {
    let y = [0u32, 3, 1, 3, 5, 2];
    let v = randn(6, 4, 1);
    let r = randn(6, 4, 2);
    let g = randn(6, 4, 3);
    let w = CopWeights::default();
    check_gradient(&v, |v| {
        cop_stage1(v, &r, &g, &y, w, OrdinalForm::Paper).unwrap()
    });
    check_gradient(&r, |r| {
        cop_stage1(&v, r, &g, &y, w, OrdinalForm::Paper).unwrap()
    });
    let ranks = randn(6, 4, 4);
    check_gradient(&v, |v| scop(v, &ranks, &y, OrdinalForm::Paper).unwrap());
    check_gradient(&ranks, |r| scop(&v, r, &y, OrdinalForm::Paper).unwrap());
}

#[test]
fn paper_form_is_the_log_of_squared_distances() {
    // Three samples with hand-computable weights; tightness and text terms off.
    let v = Tensor::new(&[[0f64, 0.0], [1.0, 0.0], [0.0, 2.0]], &Device::Cpu).unwrap();
    let r = Tensor::new(&[[0f64, 1.0], [3.0, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    let y = [0u32, 1, 3];
    // Pairs (0,1) |Δ|=1, (0,2) 3, (1,2) 2 → ŵ = (w − 1)/3 = 0, 2/3, 1/3.
    // v0 = r2, so ‖v0 − r2‖² = 0 is clamped to 1e-12.
    let l = cop_stage1(
        &v,
        &r,
        &r,
        &y,
        CopWeights {
            tightness: 0.0,
            text: 0.0,
        },
        OrdinalForm::Paper,
    )
    .unwrap()
    .to_scalar::<f64>()
    .unwrap();
    let s02 = 1e-12f64; // v0 = r2
    let s12 = 1.0f64; // ‖(1,0) − (0,0)‖²
    let want = -((2.0 / 3.0) * s02.ln() + (1.0 / 3.0) * s12.ln()) / 3.0;
    assert!((l - want).abs() < 1e-9, "{l} vs {want}");
}

#[test]
fn single_label_batches_do_not_give_nan() {
    let v = randn(4, 3, 5);
    let r = randn(4, 3, 6);
    let l = cop_stage1(
        &v,
        &r,
        &r,
        &[2, 2, 2, 2],
        CopWeights::default(),
        OrdinalForm::Code,
    )
    .unwrap()
    .to_scalar::<f64>()
    .unwrap();
    // Only the tightness term remains.
    let t = (&v - &r)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((l - 0.5 * t).abs() < 1e-12, "{l} vs {}", 0.5 * t);
    let one = cop_stage1(
        &v.narrow(0, 0, 1).unwrap(),
        &r.narrow(0, 0, 1).unwrap(),
        &r.narrow(0, 0, 1).unwrap(),
        &[1],
        CopWeights::default(),
        OrdinalForm::Code,
    )
    .unwrap();
    assert!(one.to_scalar::<f64>().unwrap().is_finite());
}

#[test]
fn bad_shapes_and_labels_are_errors() {
    let v = randn(3, 4, 7);
    let r = randn(2, 4, 8);
    let e = cop_stage1(
        &v,
        &r,
        &v,
        &[0, 1, 2],
        CopWeights::default(),
        OrdinalForm::Code,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cop_stage1: r") && e.contains("[3, 4]"), "{e}");
    let e = scop(&v, &r, &[0, 1, 2], OrdinalForm::Code)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 2") && e.contains("2 ranks"), "{e}");
    let e = sup_con(
        &v,
        &v,
        &[0, 1, 2],
        &[3, 4, 5],
        &Tensor::new(0f64, &Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("positive"), "{e}");
    let z = randn(3, 4, 9);
    assert!(cross_entropy(&z, &[0, 1]).is_err());
    assert!(ordinal_kl(&z, &[0, 1, 9]).is_err());
}
