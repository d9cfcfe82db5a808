#!/usr/bin/env bash
# The speed benchmark on a GPU, in one command: the same model, cells and rows as the CPU table (benchmarks/speed.py,
# section `speed`: runs/quality-20k, exhaustive scoring in bf16), with the denoiser on CUDA, the fast rows in bf16,
# and the table written to the `speed-gpu` section of docs/benchmarks.md. Run from the repository root on a machine
# with a CUDA GPU, the cells and the trained models (a device machine gets neither unless they are carried):
#
#   DATA=../shared/data/cells MODEL=runs/quality-20k/diffusion BASELINE=runs/quality-20k/baseline benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
exec "$PYTHON" benchmarks/speed.py \
    --data "${DATA:-../shared/data/cells}" \
    --model "${MODEL:-runs/quality-20k/diffusion}" \
    --baseline "${BASELINE:-runs/quality-20k/baseline}" \
    --exhaustive-precision "${EXHAUSTIVE_PRECISION:-bf16}" \
    --out "${SPEED_OUT:-runs/speed-gpu}" \
    --device cuda \
    --fast-precision "${PRECISION:-bf16}" \
    "$@"
