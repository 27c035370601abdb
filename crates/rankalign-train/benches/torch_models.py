"""PyTorch counterparts of `examples/bench_models.rs` for `cargo xtask bench`: the same
models from Hugging Face `transformers`, random weights, one JSON object per line in the
same format (median time of several runs after warm-up, and peak allocation growth
during one run).

- vit_b16_image_forward: `CLIPVisionModelWithProjection` with `CLIPVisionConfig`'s
  defaults (ViT-B: 768 wide, 12 layers, 12 heads, 224 px, QuickGELU) at patch 16 and
  projection 512, under `torch.no_grad()`; `image_embeds` of a batch of 224 px images;
- linear_probe_fit: scikit-learn's `LogisticRegression` (lbfgs) on the probe features
  of `bench_models.rs`, C = 1, tol 1e-6, BLAS threads limited to `--threads`;
- tiny_clip_train_step: `CLIPModel` shaped as `ClipConfig::tiny()` (vision 3 x 96, 4 heads,
  patch 12, 48 px; text 3 x 96, 4 heads, context 32; projection 64), batch 128: forward
  with `return_loss=True` (InfoNCE on exp(logit_scale)-scaled cosine logits), backward,
  `torch.optim.AdamW` (betas 0.9/0.98, eps 1e-6, decay 0.1 on matrices only, as ours).

Attention is whatever `transformers` picks by default (SDPA in 4.57). Run:
`python torch_models.py --threads N [--quick]` (needs torch and transformers; `cargo
xtask bench --setup-torch` makes a venv with both).

On a GPU (the GPU bundle's `run.sh`): `--device cuda --only vit_b16_train_step|rankclip_loss
--batch B [--dtype bf16]` times that one row, as `bench_models` does: the model and
inputs in that dtype (not autocast: ours holds its weights in the dtype too), the device
synchronised after each run, and the peak from `torch.cuda.max_memory_allocated`.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection


DEVICE = torch.device("cpu")
DTYPE = torch.float32


def profiled_peak(fn):
    """Peak growth of bytes held by PyTorch's CPU allocator during one call of `fn`,
    from the profiler's allocation events (the Rust side counts its heap)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(fn, warmup, runs):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    times.sort()
    if DEVICE.type != "cuda":
        return times[len(times) // 2], profiled_peak(fn)
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    run()
    return times[len(times) // 2], torch.cuda.max_memory_allocated(DEVICE) - base


def emit(op, size, result):
    secs, peak = result
    print(json.dumps({"op": op, "size": size, "impl": "torch", "ms": round(secs * 1e3, 3),
                      "peak_mb": round(peak / 1048576, 2)}), flush=True)


def vit_b16_forward(batch, warmup, runs):
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=16, projection_dim=512)).eval()
    print(f"torch_models: ViT-B/16 attention = {model.config._attn_implementation}", file=sys.stderr)
    pixels = torch.rand(batch, 3, 224, 224) * 2 - 1

    def fwd():
        with torch.no_grad():
            model(pixel_values=pixels).image_embeds

    return measure(fwd, warmup, runs)


def captions(b, ctx):
    """The ids of `captions` in bench_models.rs: start, 8-12 words, end, zero padding."""
    sot, eot = 49406, 49407
    ids = torch.zeros(b, ctx, dtype=torch.long)
    for r in range(b):
        n = 10 + r % 5
        ids[r, 0] = sot
        for j in range(1, n - 1):
            ids[r, j] = (r * 7919 + j * 104729) % 49000 + 1
        ids[r, n - 1] = eot
    return ids


def clip_step(cfg, b, ctx, size, warmup, runs):
    """One training step of a random-init `CLIPModel`: InfoNCE, backward, AdamW with
    the decay groups of ours."""
    model = CLIPModel(cfg).to(device=DEVICE, dtype=DTYPE).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or any(k in name for k in ("bias", "norm", "layrnorm", "logit_scale"))
        (no_decay if exempt else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    pixels = (torch.rand(b, 3, size, size) * 2 - 1).to(device=DEVICE, dtype=DTYPE)
    ids = captions(b, ctx).to(DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()
        opt.step()

    return measure(step, warmup, runs)


def tiny_step(b, warmup, runs):
    layers = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=64)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=32, eos_token_id=49407, **layers),
        vision_config=dict(image_size=48, patch_size=12, **layers),
        projection_dim=64,
    )
    return clip_step(cfg, b, 32, 48, warmup, runs)


def vit_b16_step(b, warmup, runs):
    """OpenAI's ViT-B/16 CLIP shape: a 12-layer 768-wide vision tower on 16-px patches
    of 224 px, a 12-layer 512-wide text tower on 77 tokens, 512-d embeddings."""
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, eos_token_id=49407,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=512,
    )
    return clip_step(cfg, b, 77, 224, warmup, runs)


def rankclip_loss_step(b, warmup, runs):
    """RankCLIP's loss as the authors' code computes it: InfoNCE on the scaled cosine
    logits plus λ/2 times both directions of allRank's ListMLE, cross-modal (S, Sᵀ) and
    in-modal (S_II, S_TT), λ = 1/16, divided by B; forward and backward."""
    here = Path(__file__).resolve()
    sys.path.insert(0, str(here.parent))  # the GPU bundle keeps both scripts side by side
    sys.path.insert(0, str(here.parents[2] / "rankalign-kernels" / "benches"))
    from torch_reference import list_mle
    import torch.nn.functional as F
    image = (torch.rand(b, 512) * 2 - 1).to(device=DEVICE, dtype=DTYPE).requires_grad_()
    text = (torch.rand(b, 512) * 2 - 1).to(device=DEVICE, dtype=DTYPE).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), device=DEVICE, dtype=DTYPE, requires_grad=True)
    labels = torch.arange(b, device=DEVICE)
    lam = 1 / 16

    def step():
        v, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        s = logit_scale.exp()
        sim = s * v @ t.T
        clip = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
        cross = lam / 2 * (list_mle(sim, sim.T) + list_mle(sim.T, sim))
        s_ii, s_tt = s * v @ v.T, s * t @ t.T
        inmodal = lam / 2 * (list_mle(s_ii, s_tt) + list_mle(s_tt, s_ii))
        (clip + (cross + inmodal) / b).backward()

    return measure(step, warmup, runs)


def probe_features(n, d):
    """The features of `probe_features` in bench_models.rs."""
    import numpy as np
    i = np.arange(n * d, dtype=np.float64)
    noise = np.modf(np.sin(i * 12.9898 + 3 * 78.233) * 43758.5453)[0].astype(np.float32).reshape(n, d)
    labels = np.arange(n) % 10
    offset = (np.arange(d)[None, :] % 10 == labels[:, None]) * np.float32(0.5)
    x = noise + offset.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def probe_fit(n, d, warmup, runs):
    """scikit-learn's LogisticRegression (lbfgs, multinomial) at C = 1, the same
    objective and tolerance as ours; its peak is tracemalloc's (numpy allocations)."""
    import tracemalloc
    from sklearn.linear_model import LogisticRegression
    x, y = probe_features(n, d)

    def fit():
        LogisticRegression(C=1.0, max_iter=1000, tol=1e-6).fit(x, y)

    for _ in range(warmup):
        fit()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fit()
        times.append(time.perf_counter() - t)
    times.sort()
    tracemalloc.start()
    fit()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return times[len(times) // 2], peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--only")
    ap.add_argument("--batch", type=int)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global DEVICE, DTYPE
    DEVICE = torch.device(args.device)
    DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    if DEVICE.type != "cpu" or DTYPE != torch.float32:
        gpu_row(args)
        return
    warmup, runs = (1, 3) if args.quick else (2, 10)
    for b in [1] if args.quick else [1, 8]:
        emit("vit_b16_image_forward", f"b{b} 224px", vit_b16_forward(b, warmup, runs))
    try:
        import threadpoolctl
        with threadpoolctl.threadpool_limits(args.threads):
            emit("linear_probe_fit", "10000x512 k10", probe_fit(10000, 512, 1, 1 if args.quick else 3))
    except ImportError as e:
        print(f"torch_models: no scikit-learn ({e}); the probe row has no reference", file=sys.stderr)
    emit("vit_b16_train_step", "b16 224px ctx77", vit_b16_step(16, 0 if args.quick else 1, 1 if args.quick else 3))
    emit("rankclip_loss", "B1024 d512", rankclip_loss_step(1024, warmup, runs))
    emit("tiny_clip_train_step", "b128 48px ctx32", tiny_step(128, warmup, runs))


def gpu_row(args):
    """One row on a device or in a dtype, labelled as `bench_models` labels it."""
    suffix = ("" if args.dtype == "f32" else f" {args.dtype}") + ("" if DEVICE.type == "cpu" else " cuda")
    if args.only == "vit_b16_train_step":
        b = args.batch or 16
        emit(args.only, f"b{b} 224px ctx77{suffix}", vit_b16_step(b, 1, 3))
    elif args.only == "tiny_clip_train_step":
        b = args.batch or 128
        emit(args.only, f"b{b} 48px ctx32{suffix}", tiny_step(b, 2, 10))
    elif args.only == "rankclip_loss":
        b = args.batch or 1024
        emit(args.only, f"B{b} d512{suffix}", rankclip_loss_step(b, 1, 5))
    else:
        sys.exit("--device/--dtype need --only vit_b16_train_step, tiny_clip_train_step or rankclip_loss")


if __name__ == "__main__":
    main()
