#!/usr/bin/env bash
# rankalign's GPU bundle: checks the CUDA build on a GPU machine that has an NVIDIA driver,
# CUDA 13 libraries (PyTorch's nvidia-* wheels or a system CUDA) and Python, and no Rust.
#
#   bash run.sh OUT_DIR
#
# Writes OUT_DIR/report.json (what ran, what passed, the numbers) and OUT_DIR/log.txt.
# Stages, each with its own time limit, in this order: every CUDA kernel against its CPU
# path; 300 training steps of the tiny preset on cuda and on cpu (loss curves compared);
# the ViT-B/16 training step at b = 128 and 256 in f32 and bf16, ours and PyTorch's; the
# RankCLIP loss at B = 4096 and 16,384, ours and PyTorch's. About 8 minutes on one H200.
# Exit status: 0 all checks passed, 1 a check failed, 3 no GPU, 4 a library is missing,
# 2 bad usage.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
if [ $# -ne 1 ]; then
    echo "usage: bash run.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT" || { echo "run.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
: >"$LOG"
STAGES="$OUT/stages.tsv" # stage, status, seconds, note
: >"$STAGES"
START=$(date +%s)
BUDGET=${RANKALIGN_GPU_BUDGET_S:-480}

say() { echo "run.sh: $*" | tee -a "$LOG" >&2; }
elapsed() { echo $(($(date +%s) - START)); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STAGES"; }

# The report: report.py when Python is there, else a minimal JSON written here.
finish() {
    local status=$1 code=$2
    if command -v python3 >/dev/null 2>&1; then
        # report.py exits 1 when a check it reads did not pass (a kernel, the curves).
        if ! python3 "$HERE/report.py" "$OUT" "$status" 2>&1 | tee -a "$LOG" >&2; then
            [ "$code" -eq 0 ] && code=1
            status=failed
        fi
    fi
    if [ ! -s "$OUT/report.json" ]; then
        printf '{"status": "%s", "note": "report.py did not run (no python3?); see log.txt"}\n' \
            "$status" >"$OUT/report.json"
    fi
    say "report: $OUT/report.json (status $status, $(elapsed) s)"
    exit "$code"
}

# --- where the libraries are -------------------------------------------------------
# The NVIDIA wheels' lib folders (PyTorch's CUDA libraries), then the usual places.
WHEEL_LIBS=""
if command -v python3 >/dev/null 2>&1; then
    WHEEL_LIBS=$(python3 - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = set()
for root in nvidia.__path__:
    for name in os.listdir(root):
        lib = os.path.join(root, name, "lib")
        if os.path.isdir(lib):
            dirs.add(lib)
print(":".join(sorted(dirs)))
EOF
    )
fi
SEARCH="${LD_LIBRARY_PATH:-}:$WHEEL_LIBS:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib"

find_lib() {
    local dir
    IFS=: read -ra dirs <<<"$SEARCH"
    for dir in "${dirs[@]}"; do
        [ -n "$dir" ] && [ -e "$dir/$1" ] && { echo "$dir/$1"; return 0; }
    done
    ldconfig -p 2>/dev/null | awk -v n="$1" '$1 == n { print $NF; found = 1; exit } END { exit !found }'
}

{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(uname -n)"
    echo "cpus=$(nproc 2>/dev/null || echo ?)"
    echo "wheel_libs=$WHEEL_LIBS"
} >"$OUT/env.txt"

if ! DRIVER=$(find_lib libcuda.so.1); then
    say "no NVIDIA driver here (libcuda.so.1 is in none of: ld.so's cache, LD_LIBRARY_PATH, /usr/local/nvidia, /usr/lib): no GPU to check, nothing was run"
    record environment no_gpu "$(elapsed)" "no libcuda.so.1"
    finish no_gpu 3
fi
echo "driver=$DRIVER" >>"$OUT/env.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>>"$LOG")
    if [ -z "$GPUS" ]; then
        say "nvidia-smi lists no GPU (driver at $DRIVER): nothing was run"
        record environment no_gpu "$(elapsed)" "nvidia-smi lists no GPU"
        finish no_gpu 3
    fi
    echo "gpus=$(echo "$GPUS" | paste -sd ';')" >>"$OUT/env.txt"
    say "GPU: $GPUS"
fi

missing=""
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnccl.so.2; do
    if path=$(find_lib "$so"); then
        echo "lib_$so=$path" >>"$OUT/env.txt"
    else
        missing="$missing $so"
    fi
done
if [ -n "$missing" ]; then
    say "missing CUDA 13 libraries:$missing (looked in ld.so's cache, LD_LIBRARY_PATH, the nvidia-* Python wheels and /usr/local/cuda); install PyTorch's CUDA 13 wheels or add their folder to LD_LIBRARY_PATH"
    record environment missing_library "$(elapsed)" "missing:$missing"
    finish missing_library 4
fi
export LD_LIBRARY_PATH="$WHEEL_LIBS:$(dirname "$DRIVER"):${LD_LIBRARY_PATH:-}"

# The binaries travel xz-compressed; unpack them into a temporary folder.
BIN=$(mktemp -d "${TMPDIR:-/tmp}/rankalign-bin.XXXXXX")
trap 'rm -rf "$BIN"' EXIT
for packed in "$HERE"/bin/*.xz; do
    name=$(basename "$packed" .xz)
    if command -v xz >/dev/null 2>&1; then
        xz -dc "$packed" >"$BIN/$name"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$packed" "$BIN/$name"
    fi || {
        say "cannot unpack $packed (no xz, and python3's lzma failed)"
        record environment failed "$(elapsed)" "unpacking $name"
        finish failed 1
    }
    chmod +x "$BIN/$name"
done
if unresolved=$(ldd "$BIN/rankalign" 2>&1 | grep 'not found'); then
    say "the bundled binaries cannot load: $unresolved"
    record environment missing_library "$(elapsed)" "$unresolved"
    finish missing_library 4
fi
record environment ok "$(elapsed)" "driver $DRIVER"

TORCH=no
if python3 -c "import torch, transformers; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
    TORCH=yes
    echo "torch=$(python3 -c 'import torch; print(torch.__version__)')" >>"$OUT/env.txt"
else
    say "PyTorch with CUDA (and transformers) is not importable: the rows have no PyTorch side"
fi

# stage NAME SECONDS COMMAND…: runs a stage under its own limit and the overall budget.
failed=0
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed)))
    if [ "$left" -le 10 ]; then
        say "$name: skipped, the ${BUDGET} s budget is spent"
        record "$name" skipped 0 "budget spent"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0
    t0=$(date +%s)
    say "$name: started (limit $limit s)"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        record "$name" ok "$took" ""
        say "$name: ok in $took s"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" timeout "$took" "over $limit s"
        say "$name: stopped at its $limit s limit (see $name.log)"
        failed=1
    else
        record "$name" failed "$took" "exit $rc"
        say "$name: failed with exit $rc (last lines of $name.log follow)"
        tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG" >&2
        failed=1
    fi
}

cd "$HERE" || exit 2

# 1. Every CUDA kernel against its CPU path.
stage kernels 120 "$BIN/kernel_tests" cuda:: --test-threads 1 --nocapture

# 2. 300 tiny training steps on each device.
stage train_cuda 100 "$BIN/rankalign" train --config "$HERE/tiny-300.toml" --out-dir "$OUT/train-cuda" --device cuda --overwrite
stage train_cpu 200 "$BIN/rankalign" train --config "$HERE/tiny-300.toml" --out-dir "$OUT/train-cpu" --device cpu --overwrite

# 3 and 4. Training step and loss rows, ours then PyTorch's, one JSON line each.
bench() {
    local name=$1
    shift
    stage "$name" 75 "$BIN/bench_models" --device cuda "$@"
    if [ "$TORCH" = yes ]; then
        stage "${name}_torch" 75 python3 "$HERE/torch_models.py" --threads "$(nproc)" --device cuda "$@"
    fi
}
for dtype in f32 bf16; do
    for b in 128 256; do
        bench "vit_b${b}_${dtype}" --only vit_b16_train_step --batch "$b" --dtype "$dtype"
    done
done
for b in 4096 16384; do
    bench "rankclip_B${b}" --only rankclip_loss --batch "$b"
done

if [ $failed -eq 0 ]; then
    finish ok 0
else
    finish failed 1
fi
