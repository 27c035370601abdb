#!/usr/bin/env python3
"""Webdataset shards of JPEGs for the data-throughput benchmark (`cargo xtask bench`).

Writes DIR/bench-00000.tar .. bench-{shards-1}.tar, each with --per-shard samples
`<key>.jpg` (JPEG quality 90, 4:2:0, sizes varied between 320x256 and 400x300) and
`<key>.txt` (a caption), keys `s<shard:05d>-<index:05d>`, members in the order
webdataset's TarWriter uses (sorted extensions: jpg, txt), plus DIR/sizes.json
({"bench-00000.tar": N, ...}) as open_clip reads it.

The pictures are drawn so that decoding costs about what a photo costs: smooth gradients,
filled shapes with hard edges, low-frequency blotches and fine grain noise; a 360x280 image
comes out at roughly 35-45 KB. Every image depends only on (shard, index) through fixed
seeds, and tar headers have a fixed mtime/uid/gid, so reruns give identical bytes (for the
same Pillow / libjpeg-turbo).

Writes the tars with Python's tarfile (no webdataset needed): Pillow and numpy only.

Run
  python make_bench_shards.py --out /tmp/rankalign-bench-shards [--shards 10] [--per-shard 200]
"""

import argparse
import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MTIME = 1700000000
WORDS = ("a photo of a red car near a tree on a sunny street with two people and a small dog "
         "under a blue sky beside an old stone house in winter at night").split()


def make_image(shard, index):
    rng = np.random.default_rng([shard, index, 2024])
    w = int(rng.integers(320, 401))
    h = int(rng.integers(256, 301))
    # Smooth colour gradient background.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1, c2 = rng.uniform(0, 255, size=(3, 3))
    t = (xx / w)[..., None]
    s = (yy / h)[..., None]
    base = c0 * (1 - t) * (1 - s) + c1 * t + c2 * s * (1 - t)
    # Low-frequency blotches: upsampled coarse noise.
    coarse = rng.normal(0, 40, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    blot = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8), "RGB")
                      .resize((w, h), Image.BICUBIC), dtype=np.float32) - 128
    img = Image.fromarray(np.clip(base + blot, 0, 255).astype(np.uint8), "RGB")
    # Hard-edged shapes.
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.ellipse((x0, y0, x1, y1), fill=fill)
    for _ in range(int(rng.integers(5, 15))):
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        d.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)),
               width=int(rng.integers(1, 5)))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    # Fine grain, as in camera images.
    grain = rng.normal(0, 9, size=(h, w, 3)).astype(np.float32)
    arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def caption(shard, index):
    rng = np.random.default_rng([shard, index, 7])
    n = int(rng.integers(5, 16))
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n))


def add(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = MTIME
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "bigdata"
    tar.addfile(ti, io.BytesIO(data))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--per-shard", type=int, default=200)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sizes = {}
    total = 0
    for shard in range(args.shards):
        name = f"bench-{shard:05d}.tar"
        tmp = os.path.join(args.out, name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(args.per_shard):
                key = f"s{shard:05d}-{index:05d}"
                jpg = make_image(shard, index)
                total += len(jpg)
                add(tar, key + ".jpg", jpg)
                add(tar, key + ".txt", caption(shard, index).encode("utf-8"))
        os.replace(tmp, os.path.join(args.out, name))
        sizes[name] = args.per_shard
        print(f"{name}: {args.per_shard} samples", file=sys.stderr)
    with open(os.path.join(args.out, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=2)
        f.write("\n")
    n = args.shards * args.per_shard
    print(f"wrote {n} JPEGs, {total / max(n, 1) / 1024:.1f} KiB each on average, to {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
