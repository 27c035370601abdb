//! RankCLIP's loss against a PyTorch re-expression of the authors' formulation
//! (`tests/fixtures/gen_rankclip.py` → `rankclip_cases.json`, float64 autograd): values
//! and gradients for the spec's §1.8 vectors, random batches at logit scales 14.3 and
//! 100, both modes, all μ weightings, ties with explicit permutations, B = 1, and
//! ListMLE alone (ties, a −inf score, gaps where ε dominates).

mod ordinal;

use candle_core::{DType, Device, Tensor, Var};
use rankalign_losses::rankclip::listmle;
use rankalign_losses::{
    ListPerms, RankClipConfig, RankDecay, RankMode, WeightSchedule, rankclip_loss,
};
use serde_json::Value;

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::String(s) if s == "nan" => f64::NAN,
        _ => v.as_f64().expect("number"),
    }
}

fn matrix(v: &Value, dtype: DType) -> Tensor {
    let rows: Vec<Vec<f64>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(num).collect())
        .collect();
    let (n, m) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, m), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn perm(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn mode(v: &Value) -> RankMode {
    match v.as_str().unwrap() {
        "parity" => RankMode::Parity,
        "exact" => RankMode::Exact,
        m => panic!("mode {m}"),
    }
}

fn decay(v: &Value) -> RankDecay {
    match v.as_str().unwrap() {
        "none" => RankDecay::None,
        "ln" => RankDecay::Ln,
        "log2" => RankDecay::Log2,
        m => panic!("mu {m}"),
    }
}

fn mu_tensor(d: RankDecay, m: usize, dtype: DType) -> Option<Tensor> {
    let f: fn(f64) -> f64 = match d {
        RankDecay::None => return None,
        RankDecay::Ln => f64::ln,
        RankDecay::Log2 => f64::log2,
    };
    let mu: Vec<f64> = (1..=m).map(|k| 1.0 / f((k + 1) as f64)).collect();
    Some(
        Tensor::from_vec(mu, m, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
}

fn close(name: &str, what: &str, got: f64, want: f64, rel: f64, abs: f64) {
    assert!(
        (got - want).abs() <= abs + rel * want.abs() || (got.is_infinite() && got == want),
        "{name}: {what} = {got}, reference {want}"
    );
}

fn close_all(name: &str, what: &str, got: &Tensor, want: &Value, rel: f64, abs: f64) {
    let got = got.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    for (i, (g, w)) in got.iter().zip(want.as_array().unwrap()).enumerate() {
        for (j, (g, w)) in g.iter().zip(w.as_array().unwrap()).enumerate() {
            close(name, &format!("{what}[{i}][{j}]"), *g, num(w), rel, abs);
        }
    }
}

fn cases() -> Vec<Value> {
    let json: Value =
        serde_json::from_str(include_str!("../fixtures/rankclip_cases.json")).unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn check_rankclip(case: &Value, dtype: DType, rel: f64, abs: f64) {
    let name = case["name"].as_str().unwrap();
    let v = Var::from_tensor(&matrix(&case["V"], dtype)).unwrap();
    let t = Var::from_tensor(&matrix(&case["T"], dtype)).unwrap();
    let ls = Var::from_tensor(
        &Tensor::new(num(&case["logit_scale"]), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let p = case["perms"].as_array().unwrap();
    let perms = ListPerms([perm(&p[0]), perm(&p[1]), perm(&p[2]), perm(&p[3])]);
    let cfg = RankClipConfig {
        mode: mode(&case["mode"]),
        decay: decay(&case["mu"]),
        weight_schedule: WeightSchedule::Constant { value: 0.0 },
        ..RankClipConfig::rankclip()
    };
    let w = num(&case["w"]);
    let terms = rankclip_loss(&cfg, &v, &t, &ls, w, &perms).unwrap();
    let scalar = |x: &Tensor| x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    close(
        name,
        "l_clip",
        scalar(&terms.clip),
        num(&case["l_clip"]),
        rel,
        abs,
    );
    close(
        name,
        "l_cross",
        scalar(&terms.cross),
        num(&case["l_cross"]),
        rel,
        abs,
    );
    close(
        name,
        "l_in",
        scalar(&terms.inmodal),
        num(&case["l_in"]),
        rel,
        abs,
    );
    close(
        name,
        "total",
        scalar(&terms.total),
        num(&case["total"]),
        rel,
        abs,
    );
    let grads = terms.total.backward().unwrap();
    close_all(
        name,
        "dV",
        grads.get(&v).unwrap(),
        &case["grad_V"],
        rel,
        abs,
    );
    close_all(
        name,
        "dT",
        grads.get(&t).unwrap(),
        &case["grad_T"],
        rel,
        abs,
    );
    close(
        name,
        "d logit_scale",
        scalar(grads.get(&ls).unwrap()),
        num(&case["grad_logit_scale"]),
        rel,
        abs,
    );
}

#[test]
fn rankclip_matches_reference_in_f64() {
    let n = cases()
        .iter()
        .filter(|c| c["kind"] == "rankclip")
        .inspect(|c| check_rankclip(c, DType::F64, 1e-10, 1e-12))
        .count();
    assert!(n >= 40, "{n} cases");
}

#[test]
fn rankclip_matches_reference_in_f32() {
    // Parity-mode rows at logit scale 100 sum terms of ~100 whose f32 rounding is ~1e-5.
    for case in cases().iter().filter(|c| c["kind"] == "rankclip") {
        check_rankclip(case, DType::F32, 1e-4, 1e-4);
    }
}

#[test]
fn listmle_matches_reference() {
    let mut n = 0;
    for case in cases().iter().filter(|c| c["kind"] == "listmle") {
        let name = case["name"].as_str().unwrap();
        let p = Var::from_tensor(&matrix(&case["P"], DType::F64)).unwrap();
        let r = matrix(&case["R"], DType::F64);
        let d = mu_tensor(decay(&case["mu"]), r.dim(1).unwrap(), DType::F64);
        let loss = listmle(
            &p,
            &r,
            &perm(&case["perm"]),
            mode(&case["mode"]),
            d.as_ref(),
        )
        .unwrap();
        let want = num(&case["loss"]);
        let got = loss.to_scalar::<f64>().unwrap();
        if want.is_finite() {
            close(name, "loss", got, want, 1e-10, 1e-12);
            let grads = loss.backward().unwrap();
            close_all(
                name,
                "dP",
                grads.get(&p).unwrap(),
                &case["grad_P"],
                1e-10,
                1e-12,
            );
        } else {
            // The authors' code has no mask, so a −inf score makes its term (and the loss)
            // +inf. rankalign treats −inf as an absent item: finite loss, zero gradient there.
            assert!(got.is_finite(), "{name}: {got}");
            let g = loss
                .backward()
                .unwrap()
                .get(&p)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let pm = matrix(&case["P"], DType::F64).to_vec2::<f64>().unwrap();
            for (gr, pr) in g.iter().zip(&pm) {
                for (gv, pv) in gr.iter().zip(pr) {
                    if *pv == f64::NEG_INFINITY {
                        assert_eq!(*gv, 0.0, "{name}");
                    }
                }
            }
        }
        n += 1;
    }
    assert!(n >= 16, "{n} cases");
}

#[test]
fn spec_weight_ramp() {
    let cfg = RankClipConfig::rankclip();
    assert_eq!(cfg.weight(1, 64), 0.0);
    assert!((cfg.weight(2, 64) - 3.0 / 63.0).abs() < 1e-15);
    assert_eq!(cfg.weight(43, 64), 2.0);
    assert!(cfg.validate(1).unwrap_err().contains("ramp"));
    assert!(
        RankClipConfig {
            lambda_in: -1.0,
            ..cfg
        }
        .validate(10)
        .unwrap_err()
        .contains("lambda_in")
    );
}

#[test]
fn ablations_drop_their_terms() {
    let dev = Device::Cpu;
    let v = Tensor::new(&[[1.0f64, 0.2], [0.3, 1.0], [0.5, 0.5]], &dev).unwrap();
    let t = Tensor::new(&[[0.9f64, 0.1], [0.2, 1.0], [0.4, 0.6]], &dev).unwrap();
    let ls = Tensor::new(2.0f64, &dev).unwrap();
    let perms = ListPerms::identity(3);
    let full = rankclip_loss(&RankClipConfig::rankclip(), &v, &t, &ls, 1.0, &perms).unwrap();
    let only_in = rankclip_loss(&RankClipConfig::rankclip_i(), &v, &t, &ls, 1.0, &perms).unwrap();
    let only_cross =
        rankclip_loss(&RankClipConfig::rankclip_c(), &v, &t, &ls, 1.0, &perms).unwrap();
    let s = |x: &Tensor| x.to_scalar::<f64>().unwrap();
    assert_eq!(s(&only_in.cross), 0.0);
    assert_eq!(s(&only_cross.inmodal), 0.0);
    assert!((s(&only_in.inmodal) - s(&full.inmodal)).abs() < 1e-15);
    assert!((s(&only_cross.cross) - s(&full.cross)).abs() < 1e-15);
}
