#!/usr/bin/env bash
# Issue 17's GPU figures in one device call, on the shipped PBC base model (no run of this machine needed):
#   speed   benchmarks/fast_paths.py on the GPU: exhaustive, tuned rule, route exits, candidate classes and the
#           cascade (the CNN in front), evaluations per cell and cells/s on 1,600 held-out PBC test cells and on
#           ALL-IDB2 blasts, agreement with exhaustive scoring: the targets (diffusion classifier alone >= 2,000
#           cells/s at >= 0.99 agreement, cascade >= 10,000 cells/s) are read off its table
#   pixels  32 against 64 px: a diffusion classifier trained at each resolution from scratch on the same packed PBC
#           cells (their own seeded split), for the same STEPS, tuned and evaluated as `cytoloop train` and
#           `cytoloop evaluate` do: balanced accuracy, ECE and evaluations per cell, and each one's training time
# A device machine starts bare, with PyTorch but neither our other packages nor the cells: pack them here first,
#
#   python benchmarks/gpu_prepare.py --data ../shared/data/manifest.csv --scorer runs/reference/cnn-seed0
#   device run (carry [".gpu"], timeout_s 590):  benchmarks/gpu.sh all
#
# then put the figures into docs/benchmarks.md from the returned files (fast_paths.json under fast-paths/; the
# 32 against 64 px figures by hand from pxNN.json and pxNN-training.json):
#   python benchmarks/fast_paths.py --data ../shared/data/manifest.csv --out <returned folder>/fast-paths --docs-only
# Results go to $OUT (the device's result folder; runs/gpu elsewhere), at most 8 files: nvidia-smi.txt,
# fast-paths/fast_paths.json, pxNN.json (evaluation) and pxNN-training.json per resolution. GPU_CHECK=0 runs it on
# a CPU, to try the script with CELLS, BLASTS, EXHAUSTIVE_CELLS and STEPS made small (and PACK a small pack; it
# ran so, end to end, on 2026-12-07).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
RUNS=${RUNS:-runs/gpu-work}
STAGE=${1:-all}
PACK=${PACK:-.gpu}  # what gpu_prepare.py wrote
export PYTHONUNBUFFERED=1
case "$STAGE" in speed | pixels | all) ;; *) echo "usage: $0 [speed|pixels|all]" >&2; exit 2 ;; esac
[ -f "$PACK/data/manifest.csv" ] || { echo "no $PACK/: run benchmarks/gpu_prepare.py here and carry it" >&2; exit 2; }
mkdir -p "$OUT/fast-paths" "$RUNS"
if ! "$PY" -c "import pydantic_settings, diffusers" 2>/dev/null; then  # the device's image lacks them
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/gpu-site "$PACK"/whl/*.whl
    export PYTHONPATH=/tmp/gpu-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}platform:.
if [ "${GPU_CHECK:-1}" = 1 ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

if [ "$STAGE" != pixels ]; then
    "$PY" benchmarks/fast_paths.py --data "$PACK"/data/manifest.csv --model models/base-pbc --scorer "$PACK"/scorer \
        --out "$RUNS/fast-paths" --cells "${CELLS:-1600}" --anomaly-cells "${BLASTS:-30}" \
        --exhaustive-cells "${EXHAUSTIVE_CELLS:-400}" --trials 100 --no-write-docs
    cp "$RUNS/fast-paths/fast_paths.json" "$OUT/fast-paths/"
fi
if [ "$STAGE" != speed ]; then
    for px in 32 64; do
        "$PY" -m ops.cli train --data "$PACK"/data/manifest.csv --domains pbc --out "$RUNS/px$px" --image-size "$px" \
            --steps "${STEPS:-3000}" --overwrite
        cp "$RUNS/px$px/training.json" "$OUT/px$px-training.json"
        "$PY" -m ops.cli evaluate --model "$RUNS/px$px" --data "$PACK"/data/manifest.csv --domains pbc --part test \
            --json "$RUNS/px$px-eval.json"
        cp "$RUNS/px$px-eval.json" "$OUT/px$px.json"
    done
fi
