#!/bin/sh
# Fetch the CLIP byte-level BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) from the
# PyPI package open-clip-torch 3.3.0 and store it byte-identically next to this script.
# Needs: pip (any Python 3) and python3 (used to read the wheel, which is a zip file).
# Usage: sh data/clip/fetch_vocab.sh
set -eu
VERSION=3.3.0
MEMBER=open_clip/bpe_simple_vocab_16e6.txt.gz
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --no-deps --only-binary=:all: "open-clip-torch==$VERSION" -d "$TMP" >/dev/null
WHEEL=$(ls "$TMP"/open_clip_torch-"$VERSION"-*.whl)
python3 - "$WHEEL" "$MEMBER" "$HERE/bpe_simple_vocab_16e6.txt.gz" <<'PY'
import sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(dest, "wb") as f:
    f.write(z.read(member))
PY
if command -v sha256sum >/dev/null; then sha256sum "$HERE/bpe_simple_vocab_16e6.txt.gz"; fi
