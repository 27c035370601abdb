#!/usr/bin/env python3
"""PyTorch side of the data-throughput benchmark (`cargo xtask bench`, op data_decode_rrc).

Reads the shards of make_bench_shards.py the way open_clip's webdataset loader does, with
the webdataset package:

    wds.DataPipeline(SimpleShardList(urls), split_by_worker, tarfile_to_samples(),
                     to_tuple("jpg", "txt"), map_tuple(decode+transform, utf-8),
                     batched(64, partial=True))

served by `torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=N,
persistent_workers=True)` (open_clip batches inside the pipeline too, so each worker
yields whole batches of 64 and each shard goes to one worker: shard i to worker i % N).
Per image: PIL decode (`Image.open(...).convert("RGB")`, as webdataset's "pilrgb"), then
open_clip's training transform: RandomResizedCrop(224, scale=(0.9, 1.0), BICUBIC) ->
ToTensor() -> Normalize(CLIP mean, std). `torch.set_num_threads(1)` in every worker
(and in the main process, which does the work itself when N=0).

Timing: one warm-up pass over the first shard (its own short-lived DataLoader with the same
N), then full passes over all shards with the persistent loader: 3 in full mode, 1 with
--quick; the first pass includes forking the workers. `ms` is the median pass time divided
by the number of 64-image batches it delivered (images / 64); `images_per_s` is images per
second of that median pass.

Peak memory: the sum of VmHWM (peak resident set, /proc/<pid>/status) of the main process
and of its child processes, read right after the last timed pass while the persistent
workers are still alive (children found by scanning /proc/*/stat for this parent pid), so
each worker's own high-water mark is exact. Pages shared between processes (the forked
interpreter, torch's libraries) count once per process, as summing RSS does.

Prints one JSON line on stdout:
  {"op": "data_decode_rrc", "size": "jpeg 224px b64 w<N>", "impl": "torch", "ms": ...,
   "peak_mb": ..., "images_per_s": ...}
Progress goes to stderr.

Needs: torch, torchvision, webdataset, Pillow (tested: torch 2.15.0, torchvision 0.29.2,
webdataset 1.0.2, Pillow 13.0.0).

Run
  python make_bench_shards.py --out /tmp/rankalign-bench-shards
  python torch_data.py --shards /tmp/rankalign-bench-shards --threads 4 [--quick]
"""

import argparse
import glob
import io
import json
import os
import statistics
import sys
import time

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

BATCH = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TRANSFORM = transforms.Compose([
    transforms.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC),
    transforms.ToTensor(),
    transforms.Normalize(CLIP_MEAN, CLIP_STD),
])


def decode_transform(data):
    return TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_text(data):
    return data.decode("utf-8")


def worker_init(_worker_id):
    torch.set_num_threads(1)


def pipeline(urls):
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.to_tuple("jpg", "txt"),
        wds.map_tuple(decode_transform, decode_text),
        wds.batched(BATCH, partial=True),
    )


def loader(urls, workers, persistent):
    return torch.utils.data.DataLoader(
        pipeline(urls), batch_size=None, num_workers=workers,
        persistent_workers=persistent and workers > 0,
        worker_init_fn=worker_init if workers > 0 else None)


def one_pass(dl):
    images = 0
    t0 = time.perf_counter()
    for imgs, _caps in dl:
        images += imgs.shape[0]
    return time.perf_counter() - t0, images


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_pids(parent):
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces or parentheses.
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(stat.split("/")[2]))
    return pids


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="folder with bench-*.tar")
    ap.add_argument("--threads", type=int, required=True,
                    help="DataLoader num_workers (1 = one worker process, 0 = in-process)")
    ap.add_argument("--quick", action="store_true", help="one timed pass instead of three")
    args = ap.parse_args()

    urls = sorted(glob.glob(os.path.join(args.shards, "bench-*.tar")))
    if not urls:
        sys.exit(f"no bench-*.tar in {args.shards}")
    expected = None
    sizes_path = os.path.join(args.shards, "sizes.json")
    if os.path.exists(sizes_path):
        with open(sizes_path) as f:
            sizes = json.load(f)
        expected = sum(sizes.get(os.path.basename(u), 0) for u in urls)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.threads

    warm = loader(urls[:1], n, persistent=False)
    secs, images = one_pass(warm)
    del warm
    print(f"warm-up: {images} images in {secs:.2f} s", file=sys.stderr)

    dl = loader(urls, n, persistent=True)
    reps = 1 if args.quick else 3
    times = []
    for rep in range(reps):
        secs, images = one_pass(dl)
        if expected is not None and images != expected:
            sys.exit(f"pass {rep}: {images} images, sizes.json says {expected}")
        times.append(secs)
        print(f"pass {rep}: {images} images in {secs:.2f} s ({images / secs:.1f}/s)", file=sys.stderr)

    me = os.getpid()
    workers = child_pids(me)
    peak_kib = vm_hwm_kib(me) + sum(vm_hwm_kib(p) for p in workers)
    print(f"peak: main {vm_hwm_kib(me) / 1024:.1f} MiB + {len(workers)} children "
          f"{[round(vm_hwm_kib(p) / 1024, 1) for p in workers]} MiB", file=sys.stderr)
    del dl

    med = statistics.median(times)
    print(json.dumps({
        "op": "data_decode_rrc",
        "size": f"jpeg 224px b{BATCH} w{n}",
        "impl": "torch",
        "ms": round(med * 1000 / (images / BATCH), 3),
        "peak_mb": round(peak_kib / 1024, 1),
        "images_per_s": round(images / med, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
