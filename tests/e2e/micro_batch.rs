//! A step over micro-batches (`train.micro_batch`) is the step over the whole batch:
//! B = 128 as 4 × 32 gives the weights of 1 × 128 after 5 AdamW steps, to f32 rounding,
//! for InfoNCE and for RankCLIP's list-wise terms; recomputing the forward changes no
//! bit, and neither does the number of threads.

use std::collections::HashMap;

use candle_core::{DType, Device};
use rankalign_train::data::Batch;
use rankalign_train::losses::{
    ClipObjective, Objective, RankClipConfig, RankClipObjective, StepContext,
};
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};
use rankalign_train::optim::{AdamW, AdamWConfig};
use rankalign_train::step::{StepGrads, StepPlan, loss_and_grads};

#[path = "../common/tiny_step.rs"]
pub mod tiny_step;
use tiny_step::{Tiny, ctx, scene_batches, tiny};

pub const B: usize = 128;
const STEPS: usize = 5;

/// Five batches of 128 digit scenes at the tiny preset's 48 px.
pub fn batches() -> Vec<Batch> {
    scene_batches(9, STEPS, B)
}

/// The weights after [`STEPS`] steps of `objective` split by `plan`, on `threads`.
pub fn train(
    objective: &dyn Objective,
    plan: StepPlan,
    threads: usize,
    data: &[Batch],
) -> HashMap<String, Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        train_with(data, |t, batch, ctx| {
            loss_and_grads(
                &t.model,
                &t.params,
                &t.logit_scale,
                objective,
                batch,
                ctx,
                plan,
            )
        })
    })
}

/// The weights of the tiny preset (seed 4) after one AdamW step per batch of `data`,
/// each step's gradients from `step`.
pub fn train_with(
    data: &[Batch],
    mut step: impl FnMut(&Tiny, &Batch, &StepContext<'_>) -> rankalign_train::Result<StepGrads>,
) -> HashMap<String, Vec<f32>> {
    let t = tiny(4);
    let mut opt = AdamW::new(
        t.vars.clone(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
    )
    .unwrap();
    for (i, batch) in data.iter().enumerate() {
        let out = step(&t, batch, &ctx(i as u64)).unwrap();
        opt.step(&out.grads, 1e-3).unwrap();
    }
    t.vars
        .iter()
        .map(|(n, v)| {
            let w = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.clone(), w)
        })
        .collect()
}

/// The largest `‖a − b‖ / ‖b‖` over the tensors, and its name. Attention's key biases
/// are left out: softmax is unchanged by a constant added to every key, so their true
/// gradient is exactly zero and what they get is rounding noise, which AdamW's
/// normalisation turns into steps of ±lr in any two runs that round differently.
pub fn worst_relative(
    a: &HashMap<String, Vec<f32>>,
    b: &HashMap<String, Vec<f32>>,
) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (name, x) in a.iter().filter(|(n, _)| !n.contains("k_proj.bias")) {
        let y = &b[name];
        let diff: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum();
        let norm: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
        let rel = (diff / norm.max(1e-30)).sqrt();
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    worst
}

fn micro(recompute: bool) -> StepPlan {
    StepPlan {
        micro_batch: Some(32),
        recompute,
    }
}

#[test]
fn four_micro_batches_of_32_equal_one_batch_of_128() {
    let data = batches();
    let rankclip = RankClipObjective(RankClipConfig::rankclip());
    let objectives: [(&str, &dyn Objective); 2] =
        [("clip", &ClipObjective), ("rankclip", &rankclip)];
    for (name, objective) in objectives {
        let whole = train(objective, StepPlan::default(), 2, &data);
        let split = train(objective, micro(false), 2, &data);
        let (rel, at) = worst_relative(&split, &whole);
        assert!(
            rel < 1e-5,
            "{name}: 4 × 32 differs from 1 × 128 by {rel:e} (relative) in {at}"
        );
        // The weights did move: the comparison is not between two initialisations.
        let init = train(objective, StepPlan::default(), 1, &data[..0]);
        let (moved, _) = worst_relative(&whole, &init);
        assert!(moved > 1e-3, "{name}: the weights moved by only {moved:e}");

        if name == "rankclip" {
            // Recomputing the forward, and the thread count, change no bit.
            assert_eq!(
                train(objective, micro(true), 2, &data),
                split,
                "{name}: recompute"
            );
            assert_eq!(
                train(objective, micro(false), 1, &data),
                split,
                "{name}: 1 thread"
            );
        }
    }
}

/// The batch in one piece runs its towers as two tasks (forward and backward) with the
/// loss between them on detached embeddings. That is the same arithmetic as one
/// backward through the whole graph: five steps give the same bits, on 1 and 2 threads.
#[test]
fn one_piece_towers_in_parallel_equal_one_graph() {
    let data = batches();
    let rankclip = RankClipObjective(RankClipConfig::rankclip());
    let objectives: [(&str, &dyn Objective); 2] =
        [("clip", &ClipObjective), ("rankclip", &rankclip)];
    for (name, objective) in objectives {
        let one_graph = train_with(&data, |t, batch, ctx| {
            let image = t.model.encode_image_t(&batch.pixels, true)?;
            let text = t.model.encode_text(&batch.ids, &batch.eot)?;
            let terms = objective.loss(&image, &text, t.logit_scale.as_tensor(), ctx)?;
            let grads = terms.total.backward()?;
            Ok(StepGrads { terms, grads })
        });
        for threads in [1, 2] {
            assert!(
                train(objective, StepPlan::default(), threads, &data) == one_graph,
                "{name}: the one-piece step on {threads} thread(s) differs from one backward"
            );
        }
    }
}

/// What [`worst_relative`] leaves out is noise: the key biases' gradient is many orders
/// below the value biases'.
#[test]
fn key_bias_gradients_are_rounding_noise() {
    let data = batches();
    let Tiny {
        model,
        vars,
        params,
        logit_scale,
    } = tiny(4);
    let out = loss_and_grads(
        &model,
        &params,
        &logit_scale,
        &ClipObjective,
        &data[0],
        &ctx(0),
        StepPlan::default(),
    )
    .unwrap();
    let norm = |name: &str| -> f64 {
        let v = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let g = out.grads.get(v.as_tensor()).unwrap();
        g.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64
    };
    for tower in ["vision_model", "text_model"] {
        let k = norm(&format!("{tower}.encoder.layers.1.self_attn.k_proj.bias"));
        let v = norm(&format!("{tower}.encoder.layers.1.self_attn.v_proj.bias"));
        assert!(
            k < 1e-4 * v,
            "{tower}: key bias gradient {k:e}, value bias {v:e}"
        );
    }
}

#[test]
fn a_batchnorm_tower_is_refused() {
    let cfg = ClipConfig::tiny_rn();
    let vm = SeededVarMap::new(1);
    let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let err = micro(false).check(&model).unwrap_err().to_string();
    assert!(
        err.contains("micro_batch") && err.contains("BatchNorm"),
        "{err}"
    );
    let err = StepPlan {
        micro_batch: None,
        recompute: true,
    }
    .check(&tiny(1).model)
    .unwrap_err()
    .to_string();
    assert!(err.contains("recompute"), "{err}");
}

/// A batch with no rows is refused with an error that says so, in one piece and split.
#[test]
fn an_empty_batch_is_a_clear_error() {
    let data = batches();
    let empty = data[0].narrow(0, 0).unwrap();
    let t = tiny(1);
    for plan in [StepPlan::default(), micro(false)] {
        let err = loss_and_grads(
            &t.model,
            &t.params,
            &t.logit_scale,
            &ClipObjective,
            &empty,
            &ctx(0),
            plan,
        )
        .err()
        .expect("an empty batch must be refused")
        .to_string();
        assert!(err.contains("empty batch"), "{err}");
    }
}
