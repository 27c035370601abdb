"""PyTorch eager references for `cargo xtask bench`: forward + backward time (median of
several runs after warm-up) and peak resident memory, one JSON object per line, in the
same format and at the same sizes as `examples/bench.rs`.

- pl_nll: allRank's ListMLE as RankCLIP's code runs it (shuffle, sort, gather, max shift,
  flipped cumsum of exp, log(. + 1e-10)), on scores scaled like logits;
- pairwise_dist: L2RCLIP's weighted mean of `torch.cdist` distances;
- layer_norm: `torch.nn.functional.layer_norm`;
- matmul: `F.linear` without bias or grad (the floor under every tower).

Run: `python torch_reference.py --threads N [--quick]` (needs torch; `cargo xtask bench
--setup-torch` makes a venv with it).
"""
import argparse
import json
import time

import torch


def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss():
    return status_bytes("VmHWM:")


def rss():
    return status_bytes("VmRSS:")


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def profiled_peak(fn):
    """Peak growth of bytes held by PyTorch's CPU allocator during one call of `fn`,
    from the profiler's allocation events (the counterpart of the Rust side's counting
    allocator); falls back to resident-set growth if the profiler records none."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event's *self* allocations (frees are negative), in start order.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    if not events:
        reset_peak()
        base = rss()
        fn()
        return peak_rss() - base
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], profiled_peak(fn)


def emit(op, size, secs, peak):
    print(json.dumps({"op": op, "size": size, "impl": "torch", "ms": round(secs * 1e3, 4),
                      "peak_mb": round(peak / 1048576, 2)}), flush=True)


def list_mle(y_pred, y_true, eps=1e-10):
    perm = torch.randperm(y_pred.shape[-1], device=y_pred.device)
    y_pred_s, y_true_s = y_pred[:, perm], y_true[:, perm]
    _, idx = y_true_s.sort(descending=True, dim=-1)
    x = torch.gather(y_pred_s, dim=1, index=idx)
    mx, _ = x.max(dim=1, keepdim=True)
    x = x - mx
    cums = torch.cumsum(x.exp().flip(dims=[1]), dim=1).flip(dims=[1])
    return torch.mean(torch.sum(torch.log(cums + eps) - x, dim=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warmup, runs = (1, 3) if args.quick else (3, 15)
    sizes = [128, 512] if args.quick else [128, 512, 1024, 2048]
    for b in sizes:
        scores = (torch.rand(b, b) * 14).requires_grad_()
        ref = torch.rand(b, b)

        def pl():
            list_mle(scores, ref).backward()

        emit("pl_nll", f"{b}x{b}", *measure(pl, warmup, runs))
        a = torch.rand(b, 512, requires_grad=True)
        c = torch.rand(b, 512, requires_grad=True)
        w = torch.rand(b, b)

        def pw():
            (torch.cdist(a, c) * w).mean().backward()

        emit("pairwise_dist", f"{b}x{b}x512", *measure(pw, warmup, runs))
    shapes = [(2048, 512)] if args.quick else [(2048, 512), (8192, 512), (16384, 512), (4096, 768)]
    for rows, d in shapes:
        x = torch.rand(rows, d, requires_grad=True)
        wt = (torch.rand(d) + 1).requires_grad_()
        bs = torch.rand(d, requires_grad=True)
        def ln():
            y = torch.nn.functional.layer_norm(x, (d,), wt, bs, 1e-5)
            y.backward(torch.ones_like(y))

        emit("layer_norm", f"{rows}x{d}", *measure(ln, warmup, runs))
    mm = [(197, 768, 2304)] if args.quick else [(197, 768, 2304), (1576, 768, 3072), (3152, 3072, 768)]
    for rows, k, n in mm:
        x = torch.rand(rows, k)
        w = torch.rand(n, k)

        def matmul():
            with torch.no_grad():
                torch.nn.functional.linear(x, w)

        emit("matmul", f"{rows}x{k}x{n}", *measure(matmul, warmup, runs))


if __name__ == "__main__":
    main()
