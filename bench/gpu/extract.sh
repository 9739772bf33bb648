#!/usr/bin/env bash
# The extract stage's torch backend on a GPU (bench/gpu/extract.py): a Qwen2.5-7B-shaped
# random-weight model, hidden states 15-18, 16 x 512 tokens a batch, tokens/s vs the
# whole-model output_hidden_states + .cpu() baseline and % of the measured bf16 matmul
# peak. Under 5 minutes on one H100/H200 (install: bench/gpu/README.md).
#
#   bash bench/gpu/extract.sh           # on the GPU
#   bash bench/gpu/extract.sh --smoke   # tiny model on the CPU: proves the script only
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
OUT=${OUT:-bench/gpu/results/$(date -u +%Y%m%dT%H%M%SZ)${SMOKE:+-smoke}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout 300 "$PY" -m bench.gpu.extract $SMOKE --out "$OUT/extract.json" 2>&1 | tee "$OUT/extract.log"
