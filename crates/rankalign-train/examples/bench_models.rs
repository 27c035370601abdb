//! Model benchmarks for `cargo xtask bench`: the ViT-B/16 image tower's forward pass
//! without gradients (evaluation throughput), one linear-probe fit on 10,000 × 512
//! features (against scikit-learn), one ViT-B/16 CLIP training step at batch 16, RankCLIP's whole loss at B = 1024 (forward and
//! backward), and one training step of the tiny CLIP preset (both towers,
//! InfoNCE on scaled cosine logits, backward, AdamW). Median time of several runs after
//! warm-up, and peak heap growth during one run (a counting allocator, as in the kernel
//! bench).
//!
//! Prints one JSON object per line; `benches/torch_models.py` does the same for the
//! Hugging Face `CLIPModel` in PyTorch, and `cargo xtask bench` runs both with the same
//! thread count and joins them into a table. Usage: `bench_models [--quick]
//! [--micro-steps | --one-thread-steps]` (`--quick`: fewer runs, ViT at batch 1 only;
//! `--micro-steps`: only the micro-batched training steps, which want
//! `CANDLE_NUM_THREADS=1`; `--one-thread-steps`: only the steps on one thread, to be run
//! with `RAYON_NUM_THREADS=1`; `--only OP`: one op's rows, for profiling).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rankalign_train::data::Batch;
use rankalign_train::losses::{ClipObjective, StepContext};
use rankalign_train::memory::{Counting, peak_during};
use rankalign_train::models::layers::{WeightInit, linear};
use rankalign_train::models::{ClipConfig, ClipModel, SeededVarMap, VisionTransformer};
use rankalign_train::optim::{AdamW, AdamWConfig};
use rankalign_train::step::{StepPlan, loss_and_grads};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Median seconds and peak extra heap bytes of `f` over `runs` runs after `warmup`.
fn measure(
    mut f: impl FnMut() -> anyhow::Result<()>,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<(f64, usize)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut peak = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let (done, bytes) = peak_during(&mut f);
        done?;
        times.push(t.elapsed().as_secs_f64());
        peak = peak.max(bytes);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak))
}

fn emit(op: &str, size: &str, (secs, peak): (f64, usize)) {
    #[allow(clippy::print_stdout)]
    {
        println!(
            r#"{{"op":"{op}","size":"{size}","impl":"ours","ms":{:.3},"peak_mb":{:.2}}}"#,
            secs * 1e3,
            peak as f64 / 1048576.0
        );
    }
}

/// Deterministic values in [-1, 1) (the bench only needs data of the right shape).
fn pseudo_random(shape: &[usize], seed: u64) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = ((i as f64 * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).fract();
            x as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// ViT-B/16 image embeddings `(b, 512)` of `b` 224 px images, as inference runs them:
/// the weights are plain tensors rather than `Var`s, so no op records a graph (the
/// counterpart of `torch.no_grad()`).
fn vit_b16_forward(batch: usize, warmup: usize, runs: usize) -> anyhow::Result<(f64, usize)> {
    let dev = Device::Cpu;
    let cfg = ClipConfig::vit_b16();
    let vit = cfg
        .vision
        .as_vit()
        .ok_or_else(|| anyhow::anyhow!("the vit-b16 preset has a ViT tower"))?
        .clone();
    let build = |vb: VarBuilder| -> anyhow::Result<_> {
        let vision = VisionTransformer::new(&vit, vb.pp("vision_model"))?;
        let proj = linear(
            vit.width,
            cfg.embed_dim,
            WeightInit::Normal((vit.width as f64).powf(-0.5)),
            None,
            vb.pp("visual_projection"),
        )?;
        Ok((vision, proj))
    };
    let vm = SeededVarMap::new(0);
    build(vm.var_builder(DType::F32, &dev))?;
    let weights: HashMap<String, Tensor> = vm
        .named_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().detach()))
        .collect();
    drop(vm);
    let (vision, proj) = build(VarBuilder::from_tensors(weights, DType::F32, &dev))?;
    let size = cfg.vision.image_size();
    let pixels = pseudo_random(&[batch, 3, size, size], 1)?;
    measure(
        || {
            let emb = proj.forward(&vision.forward(&pixels)?)?;
            debug_assert!(!emb.track_op());
            Ok(())
        },
        warmup,
        runs,
    )
}

/// Token ids `(b, ctx)` of captions of 10 to 14 tokens (start, words, end, then zero
/// padding) and the flat index of each row's end token. `torch_models.py` builds the
/// same ids.
fn captions(b: usize, ctx: usize) -> anyhow::Result<(Tensor, Tensor)> {
    const SOT: u32 = 49406;
    const EOT: u32 = 49407;
    let mut ids = vec![0u32; b * ctx];
    let mut eot = Vec::with_capacity(b);
    for r in 0..b {
        let len = 10 + r % 5;
        let row = &mut ids[r * ctx..(r + 1) * ctx];
        row[0] = SOT;
        for (j, id) in row.iter_mut().enumerate().take(len - 1).skip(1) {
            *id = ((r * 7919 + j * 104_729) % 49_000) as u32 + 1;
        }
        row[len - 1] = EOT;
        eot.push((r * ctx + len - 1) as u32);
    }
    Ok((
        Tensor::from_vec(ids, (b, ctx), &Device::Cpu)?,
        Tensor::from_vec(eot, b, &Device::Cpu)?,
    ))
}

/// One optimiser step of the tiny preset at batch `b`, as the trainer runs it
/// (`step::loss_and_grads` split by `plan`, then AdamW with decay 0.1 on matrices only):
/// both towers, `exp(logit_scale)`-scaled cosine logits, symmetric InfoNCE, backward.
/// It runs on a rayon pool of `threads` workers, as a variant trains.
fn clip_step(
    cfg: &ClipConfig,
    b: usize,
    plan: StepPlan,
    threads: usize,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<(f64, usize)> {
    let dev = Device::Cpu;
    let vm = SeededVarMap::new(0);
    let model = ClipModel::new(cfg, vm.var_builder(DType::F32, &dev))?;
    let vars = vm.named_vars();
    let params: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
    let logit_scale = vars
        .iter()
        .find(|(n, _)| n == "logit_scale")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| anyhow::anyhow!("no logit_scale"))?;
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
    )?;
    let size = cfg.vision.image_size();
    let (ids, eot) = captions(b, cfg.text.context_length)?;
    let batch = Batch {
        pixels: pseudo_random(&[b, 3, size, size], 2)?,
        ids,
        eot,
    };
    let ctx = StepContext {
        epoch: 1,
        epochs: 1,
        tie_seed: 0,
        labels: None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| {
        measure(
            || {
                let out = loss_and_grads(
                    &model,
                    &params,
                    &logit_scale,
                    &ClipObjective,
                    &batch,
                    &ctx,
                    plan,
                )?;
                opt.step(&out.grads, 5e-4)?;
                Ok(())
            },
            warmup,
            runs,
        )
    })
}

/// The probe's features: 10 classes of 512-d rows (noise plus a class offset on every
/// tenth coordinate), L2-normalised; `torch_models.py` builds the same.
fn probe_features(n: usize, d: usize) -> anyhow::Result<(Tensor, Vec<usize>)> {
    let noise = pseudo_random(&[n, d], 3)?.to_vec2::<f32>()?;
    let labels: Vec<usize> = (0..n).map(|i| i % 10).collect();
    let rows: Vec<f32> = noise
        .into_iter()
        .enumerate()
        .flat_map(|(i, r)| {
            let r: Vec<f32> = r
                .into_iter()
                .enumerate()
                .map(|(j, v)| v + if j % 10 == i % 10 { 0.5 } else { 0.0 })
                .collect();
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.into_iter().map(move |v| v / norm)
        })
        .collect();
    Ok((Tensor::from_vec(rows, (n, d), &Device::Cpu)?, labels))
}

/// One linear-probe fit as `rankalign eval` runs it: full-batch L-BFGS on `n × d`
/// features, 10 classes, λ = 1e-4 (scikit-learn's C = 1 at n = 10,000), tolerance
/// 1e-6 on the largest gradient entry.
fn probe_fit(n: usize, d: usize, warmup: usize, runs: usize) -> anyhow::Result<(f64, usize)> {
    let (x, y) = probe_features(n, d)?;
    let opts = rankalign_train::eval::probe::FitOptions {
        lambda: 1.0 / n as f64,
        max_iter: 1000,
        tol: 1e-6,
    };
    let mut iters = 0;
    let r = measure(
        || {
            iters = rankalign_train::eval::probe::fit(&x, &y, 10, opts)?.iterations;
            Ok(())
        },
        warmup,
        runs,
    )?;
    eprintln!("bench_models: probe fit took {iters} L-BFGS iterations");
    Ok(r)
}

/// RankCLIP's whole loss (InfoNCE and the four ListMLE terms, the authors' parity form
/// and λ = 1/16) on `b × 512` image and text embeddings, forward and backward.
fn rankclip_loss_step(b: usize, warmup: usize, runs: usize) -> anyhow::Result<(f64, usize)> {
    use rankalign_train::losses::{ListPerms, RankClipConfig, rankclip_loss};
    let image = candle_core::Var::from_tensor(&pseudo_random(&[b, 512], 11)?)?;
    let text = candle_core::Var::from_tensor(&pseudo_random(&[b, 512], 12)?)?;
    let scale = candle_core::Var::new((1.0f32 / 0.07).ln(), &Device::Cpu)?;
    let cfg = RankClipConfig::rankclip();
    let perms = ListPerms::from_seed(b, 5);
    measure(
        || {
            let terms = rankclip_loss(&cfg, &image, &text, &scale, 1.0, &perms)?;
            terms.total.backward()?;
            Ok(())
        },
        warmup,
        runs,
    )
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (warmup, runs) = if quick { (1, 3) } else { (2, 10) };
    let batches: &[usize] = if quick { &[1] } else { &[1, 8] };
    let micro_only = std::env::args().any(|a| a == "--micro-steps" || a == "--one-thread-steps");
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let wanted = |op: &str| !micro_only && only.as_deref().is_none_or(|o| o == op);
    for &b in batches.iter().filter(|_| wanted("vit_b16_image_forward")) {
        emit(
            "vit_b16_image_forward",
            &format!("b{b} 224px"),
            vit_b16_forward(b, warmup, runs)?,
        );
    }
    if wanted("linear_probe_fit") {
        emit(
            "linear_probe_fit",
            "10000x512 k10",
            probe_fit(10_000, 512, 1, if quick { 1 } else { 3 })?,
        );
    }
    if wanted("rankclip_loss") {
        emit(
            "rankclip_loss",
            "B1024 d512",
            rankclip_loss_step(1024, warmup, runs)?,
        );
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    let whole = StepPlan::default();
    let micro = |recompute| StepPlan {
        micro_batch: Some(32),
        recompute,
    };
    // `--micro-steps`: only the micro-batched steps (`cargo xtask bench` runs them in a
    // second process with candle's elementwise ops inline, as `rankalign train` does);
    // `--one-thread-steps`: both steps on one thread, in a process started with one
    // thread (so that gemm is not told of threads the pool does not have).
    let mut steps = Vec::new();
    if std::env::args().any(|a| a == "--one-thread-steps") {
        steps.push(("b128 48px ctx32; 1 thread", whole, 1));
        steps.push(("b128 48px ctx32; 4x32 micro; 1 thread", micro(false), 1));
    } else if std::env::args().any(|a| a == "--micro-steps") {
        steps.push(("b128 48px ctx32; 4x32 micro", micro(false), threads));
        steps.push((
            "b128 48px ctx32; 4x32 micro recompute",
            micro(true),
            threads,
        ));
    } else {
        steps.push(("b128 48px ctx32", whole, threads));
    }
    if wanted("vit_b16_train_step") {
        let (warm, n) = if quick { (0, 1) } else { (1, 3) };
        emit(
            "vit_b16_train_step",
            "b16 224px ctx77",
            clip_step(&ClipConfig::vit_b16(), 16, whole, threads, warm, n)?,
        );
    }
    let steps_wanted = micro_only || only.as_deref().is_none_or(|o| o == "tiny_clip_train_step");
    for (size, plan, t) in steps.into_iter().filter(|_| steps_wanted) {
        emit(
            "tiny_clip_train_step",
            size,
            clip_step(&ClipConfig::tiny(), 128, plan, t, warmup, runs)?,
        );
    }
    Ok(())
}
