//! Times the parts of one tiny-CLIP training step (forward, loss and backward as the
//! trainer runs them, then the optimiser), alternating InfoNCE and RankCLIP.
//! `cargo run --release -p rankalign-train --example profile_step -- [batch]`; env:
//! `MICRO=m` micro-batches of m rows, `RECOMPUTE=1`, `ITERS=n`, and the shape
//! overrides `PATCH`, `VW`, `VL`, `TW`, `TL`.

use std::time::Instant;

use candle_core::{DType, Device};
use rankalign_train::data::{
    ClipTokenizer, Dataset, DigitScenes, Digits, SceneConfig, Split, collate_pairs,
};
use rankalign_train::losses::{
    ClipObjective, Objective, RankClipConfig, RankClipObjective, StepContext,
};
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap};
use rankalign_train::optim::{AdamW, AdamWConfig};
use rankalign_train::step::loss_and_grads;

/// The allocator `rankalign` trains with.
#[global_allocator]
static ALLOCATOR: rankalign_train::memory::MiMalloc = rankalign_train::memory::MiMalloc;

fn main() -> anyhow::Result<()> {
    rankalign_train::memory::keep_freed_memory();
    let b: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(128);
    let dev = Device::Cpu;
    let mut cfg = ClipConfig::tiny();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    if let rankalign_train::models::VisionConfig::Vit(vision) = &mut cfg.vision {
        vision.patch_size = env("PATCH", vision.patch_size);
        vision.width = env("VW", vision.width);
        vision.mlp_dim = 4 * vision.width;
        vision.layers = env("VL", vision.layers);
    }
    cfg.text.width = env("TW", cfg.text.width);
    cfg.text.mlp_dim = 4 * cfg.text.width;
    cfg.text.layers = env("TL", cfg.text.layers);
    let digits = std::sync::Arc::new(Digits::embedded()?);
    let scenes = DigitScenes::new(
        digits,
        SceneConfig {
            seed: 1,
            image_size: 48,
            train_size: 1024,
            val_size: 0,
            test_size: 0,
        },
        Split::Train,
    )
    .map_err(anyhow::Error::msg)?;
    let tok = ClipTokenizer::new(32)?;
    let items: Vec<_> = (0..b).map(|i| scenes.get(i)).collect();
    let t = Instant::now();
    let images: Vec<_> = items.iter().map(|i| &i.image).collect();
    let caps: Vec<_> = items.iter().map(|i| i.caption.as_str()).collect();
    let batch = collate_pairs(&images, &caps, 48, &tok, &dev)?;
    eprintln!(
        "collate {:.1} ms, ids {:?}",
        t.elapsed().as_secs_f64() * 1e3,
        batch.ids.dims()
    );
    let vm = SeededVarMap::new(0);
    let model = ClipModel::new(&cfg, vm.var_builder(DType::F32, &dev))?;
    let mut opt = AdamW::new(
        vm.named_vars(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
    )?;
    // MICRO=m splits the step into micro-batches of m rows (`train.micro_batch`).
    let plan = rankalign_train::step::StepPlan {
        micro_batch: std::env::var("MICRO").ok().and_then(|v| v.parse().ok()),
        recompute: std::env::var_os("RECOMPUTE").is_some(),
    };
    let vars = vm.named_vars();
    let params: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
    let logit_scale = vars
        .iter()
        .find(|(n, _)| n == "logit_scale")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| anyhow::anyhow!("no logit_scale"))?;
    let ctx = StepContext {
        epoch: 1,
        epochs: 1,
        tie_seed: 1,
        labels: None,
    };
    let objectives: [(&str, Box<dyn Objective>); 2] = [
        ("clip    ", Box::new(ClipObjective)),
        (
            "rankclip",
            Box::new(RankClipObjective(RankClipConfig::rankclip())),
        ),
    ];
    let iters = env("ITERS", 4);
    for it in 0..iters {
        let (name, objective) = &objectives[it % 2];
        let t0 = Instant::now();
        let out = loss_and_grads(
            &model,
            &params,
            &logit_scale,
            objective.as_ref(),
            &batch,
            &ctx,
            plan,
        )?;
        let _ = out.terms.total.to_scalar::<f32>()?;
        let t1 = Instant::now();
        opt.step(&out.grads, 1e-4)?;
        let t2 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        eprintln!(
            "{name} forward+loss+backward {:.0} optim {:.0} total {:.0} ms",
            ms(t0, t1),
            ms(t1, t2),
            ms(t0, t2)
        );
    }
    Ok(())
}
