#!/usr/bin/env bash
# The speed benchmark on a GPU, in one command: the same model, cells and rows as on the CPU (benchmarks/speed.py),
# with the denoiser on CUDA, the fast rows in bf16, and the table written to the `speed-gpu` section of
# docs/benchmarks.md. Run from the repository root on a machine with a CUDA GPU and the trained models:
#
#   DATA=../shared/data/cells MODEL=runs/quality/diffusion BASELINE=runs/quality/baseline benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
exec "$PYTHON" benchmarks/speed.py \
    --data "${DATA:-../shared/data/cells}" \
    --model "${MODEL:-runs/quality/diffusion}" \
    --baseline "${BASELINE:-runs/quality/baseline}" \
    --out "${SPEED_OUT:-runs/speed-gpu}" \
    --device cuda \
    --fast-precision "${PRECISION:-bf16}" \
    "$@"
