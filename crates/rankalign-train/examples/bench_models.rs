//! Model benchmarks for `cargo xtask bench`: the ViT-B/16 image tower's forward pass
//! without gradients (evaluation throughput), one linear-probe fit on 10,000 × 512
//! features (against scikit-learn), one ViT-B/16 CLIP training step at batch 16,
//! RankCLIP's whole loss at B = 1024 (forward and backward), and one training step of
//! the tiny CLIP preset (both towers, InfoNCE on scaled cosine logits, backward,
//! AdamW). Median time of several runs after warm-up, and peak heap growth during one
//! run (a counting allocator, as in the kernel bench).
//!
//! Prints one JSON object per line; `benches/torch_models.py` does the same for the
//! Hugging Face `CLIPModel` in PyTorch, and `cargo xtask bench` runs both with the same
//! thread count and joins them into a table. Usage: `bench_models [--quick]
//! [--train-steps | --one-thread-steps]` (`--quick`: fewer runs, ViT at batch 1 only;
//! `--train-steps`: only the training steps (tiny and ViT-B/16, in one piece and
//! micro-batched), which want `CANDLE_NUM_THREADS=1` as `rankalign train` sets it;
//! `--one-thread-steps`: only the steps on one thread, to be run with
//! `RAYON_NUM_THREADS=1`; `--only OP`: one op's rows, for profiling, where a training
//! step implies `--train-steps`).
//!
//! On a GPU (`--device cuda`, a build with the `cuda` feature; the GPU bundle's
//! `run.sh`): `--only vit_b16_train_step|rankclip_loss --batch B [--dtype bf16]` times
//! that row at batch `B`, synchronising the device after each run; the peak is the
//! high-water mark of the device's memory pool, which candle allocates from.

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

/// Median seconds and peak extra bytes of `f` over `runs` runs after `warmup`: heap
/// bytes on the CPU, the memory pool's high-water mark on a GPU. The device is
/// synchronised after each run, so that its time is the work's, not the launches'.
fn measure(
    dev: &Device,
    mut f: impl FnMut() -> anyhow::Result<()>,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<(f64, usize)> {
    let mut run = || -> anyhow::Result<()> {
        f()?;
        dev.synchronize()?;
        Ok(())
    };
    for _ in 0..warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut peak = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let (done, bytes) = if dev.is_cpu() {
            peak_during(&mut run)
        } else {
            gpu_memory::peak_during(dev, &mut run)?
        };
        done?;
        times.push(t.elapsed().as_secs_f64());
        peak = peak.max(bytes);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak))
}

/// The high-water mark of the default memory pool, where cudarc's stream-ordered
/// allocations (candle's) come from.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // two driver calls on the pool, each with a SAFETY note.
mod gpu_memory {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    pub fn peak_during<R>(dev: &Device, f: impl FnOnce() -> R) -> anyhow::Result<(R, usize)> {
        let stream = dev.as_cuda_device()?.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: `cu_device` is the context's own device, as `get_default_mem_pool` needs.
        let pool = unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }?;
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH takes a `cuuint64_t`; setting it to 0 resets the mark.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&raw mut zero).cast()) }.result()?;
        let out = f();
        let mut high: u64 = 0;
        // SAFETY: as above; the driver writes one `cuuint64_t`.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&raw mut high).cast()) }.result()?;
        Ok((out, usize::try_from(high)?))
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu_memory {
    pub fn peak_during<R>(
        dev: &candle_core::Device,
        _: impl FnOnce() -> R,
    ) -> anyhow::Result<(R, usize)> {
        anyhow::bail!("{dev:?} is not the CPU, and this build has no cuda feature")
    }
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
    // On a pool's worker, as `rankalign eval` runs it.
    rankalign_train::experiment::in_pool(rayon::current_num_threads(), || {
        Ok(measure(
            &dev,
            || {
                let emb = proj.forward(&vision.forward(&pixels)?)?;
                debug_assert!(!emb.track_op());
                Ok(())
            },
            warmup,
            runs,
        ))
    })?
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

/// Where a row runs: the device and the dtype of weights and inputs.
struct Target {
    dev: Device,
    dtype: DType,
}

impl Target {
    /// `t` (made on the CPU) on this device, floats in this dtype.
    fn put(&self, t: Tensor) -> anyhow::Result<Tensor> {
        let t = t.to_device(&self.dev)?;
        Ok(if t.dtype().is_float() {
            t.to_dtype(self.dtype)?
        } else {
            t
        })
    }

    /// The row's size label: `size`, then the dtype and device unless f32 on the CPU.
    fn label(&self, size: &str) -> String {
        let mut out = size.to_string();
        if self.dtype != DType::F32 {
            out.push_str(&format!(" {}", self.dtype.as_str()));
        }
        if !self.dev.is_cpu() {
            out.push_str(" cuda");
        }
        out
    }
}

/// One optimiser step of the tiny preset at batch `b`, as the trainer runs it
/// (`step::loss_and_grads` split by `plan`, then AdamW with decay 0.1 on matrices only):
/// both towers, `exp(logit_scale)`-scaled cosine logits, symmetric InfoNCE, backward.
/// It runs on a rayon pool of `threads` workers, as a variant trains.
fn clip_step(
    on: &Target,
    cfg: &ClipConfig,
    b: usize,
    plan: StepPlan,
    threads: usize,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<(f64, usize)> {
    let vm = SeededVarMap::new(0);
    let model = ClipModel::new(cfg, vm.var_builder(on.dtype, &on.dev))?;
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
        pixels: on.put(pseudo_random(&[b, 3, size, size], 2)?)?,
        ids: on.put(ids)?,
        eot: on.put(eot)?,
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
            &on.dev,
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
        &Device::Cpu,
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
fn rankclip_loss_step(
    on: &Target,
    b: usize,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<(f64, usize)> {
    use rankalign_train::losses::{ListPerms, RankClipConfig, rankclip_loss};
    let image = candle_core::Var::from_tensor(&on.put(pseudo_random(&[b, 512], 11)?)?)?;
    let text = candle_core::Var::from_tensor(&on.put(pseudo_random(&[b, 512], 12)?)?)?;
    let scale =
        candle_core::Var::from_tensor(&on.put(Tensor::new((1.0f32 / 0.07).ln(), &Device::Cpu)?)?)?;
    let cfg = RankClipConfig::rankclip();
    let perms = ListPerms::from_seed(b, 5);
    measure(
        &on.dev,
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
    // The allocator settings `rankalign train` runs with.
    rankalign_train::memory::keep_freed_memory();
    let quick = std::env::args().any(|a| a == "--quick");
    let (warmup, runs) = if quick { (1, 3) } else { (2, 10) };
    let batches: &[usize] = if quick { &[1] } else { &[1, 8] };
    let one_thread_steps = std::env::args().any(|a| a == "--one-thread-steps");
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only = value("--only");
    // `--only` a step implies the steps' pass.
    let train_steps = std::env::args().any(|a| a == "--train-steps")
        || (!one_thread_steps
            && matches!(
                only.as_deref(),
                Some("tiny_clip_train_step" | "vit_b16_train_step")
            ));
    let steps_only = train_steps || one_thread_steps;
    let on = Target {
        dev: match value("--device").as_deref() {
            None | Some("cpu") => Device::Cpu,
            Some(d) => {
                let ordinal = d.strip_prefix("cuda").map(|n| n.trim_start_matches(':'));
                match ordinal {
                    Some("") => Device::new_cuda(0)?,
                    Some(n) => Device::new_cuda(n.parse()?)?,
                    None => anyhow::bail!("--device {d}: expected cpu, cuda or cuda:N"),
                }
            }
        },
        dtype: match value("--dtype").as_deref() {
            None | Some("f32") => DType::F32,
            Some("bf16") => DType::BF16,
            Some("f16") => DType::F16,
            Some(d) => anyhow::bail!("--dtype {d}: expected f32, bf16 or f16"),
        },
    };
    let batch: Option<usize> = value("--batch").map(|b| b.parse()).transpose()?;
    if !on.dev.is_cpu() || on.dtype != DType::F32 {
        // One row on a device or in a dtype: the GPU bundle's rows.
        let b = batch.unwrap_or(if only.as_deref() == Some("rankclip_loss") {
            1024
        } else {
            16
        });
        let (op, size, result) = match only.as_deref() {
            Some("vit_b16_train_step") => (
                "vit_b16_train_step",
                format!("b{b} 224px ctx77"),
                clip_step(&on, &ClipConfig::vit_b16(), b, StepPlan::default(), 1, 1, 3)?,
            ),
            Some("tiny_clip_train_step") => (
                "tiny_clip_train_step",
                format!("b{b} 48px ctx32"),
                clip_step(
                    &on,
                    &ClipConfig::tiny(),
                    b,
                    StepPlan::default(),
                    1,
                    warmup,
                    runs,
                )?,
            ),
            Some("rankclip_loss") => (
                "rankclip_loss",
                format!("B{b} d512"),
                rankclip_loss_step(&on, b, 1, 5)?,
            ),
            _ => anyhow::bail!(
                "--device/--dtype need --only vit_b16_train_step, tiny_clip_train_step or rankclip_loss"
            ),
        };
        emit(op, &on.label(&size), result);
        return Ok(());
    }
    let wanted = |op: &str| !steps_only && only.as_deref().is_none_or(|o| o == op);
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
            rankclip_loss_step(&on, batch.unwrap_or(1024), warmup, runs)?,
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
    // `--train-steps`: the steps on the bench's threads (`cargo xtask bench` runs them
    // in a second process with candle's elementwise ops inline, as `rankalign train`
    // does: the towers, or the micro-batches, are the step's parallel tasks);
    // `--one-thread-steps`: the tiny steps on one thread, in a process started with one
    // thread (so that gemm is not told of threads the pool does not have).
    let mut steps = Vec::new();
    if one_thread_steps {
        steps.push(("b128 48px ctx32; 1 thread", whole, 1));
        steps.push(("b128 48px ctx32; 4x32 micro; 1 thread", micro(false), 1));
    } else if train_steps {
        steps.push(("b128 48px ctx32", whole, threads));
        steps.push(("b128 48px ctx32; 4x32 micro", micro(false), threads));
        steps.push((
            "b128 48px ctx32; 4x32 micro recompute",
            micro(true),
            threads,
        ));
    }
    let vit_wanted = only.as_deref().is_none_or(|o| o == "vit_b16_train_step");
    let vit_plans = [
        ("b16 224px ctx77", whole),
        // 2 x 8 micro-batches (one per thread of a 2-thread pool), the objective once
        // over all 16.
        (
            "b16 224px ctx77; 2x8 micro",
            StepPlan {
                micro_batch: Some(8),
                recompute: false,
            },
        ),
    ];
    for (size, plan) in vit_plans.into_iter().filter(|_| vit_wanted && train_steps) {
        let (warm, n) = if quick { (0, 1) } else { (1, 3) };
        emit(
            "vit_b16_train_step",
            size,
            clip_step(&on, &ClipConfig::vit_b16(), 16, plan, threads, warm, n)?,
        );
    }
    let steps_wanted = only.as_deref().is_none_or(|o| o == "tiny_clip_train_step");
    for (size, plan, t) in steps.into_iter().filter(|_| steps_wanted) {
        emit(
            "tiny_clip_train_step",
            size,
            clip_step(&on, &ClipConfig::tiny(), 128, plan, t, warmup, runs)?,
        );
    }
    Ok(())
}
