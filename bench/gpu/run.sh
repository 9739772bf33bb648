#!/usr/bin/env bash
# The GPU smoke suite: one run on a machine with NVIDIA GPUs, under 8 minutes from a fresh
# clone (install: bench/gpu/README.md). Random-weight models from configs, nothing
# downloaded. Prints one table, writes bench/gpu/results/<stamp>/summary.json.
#
#   bash bench/gpu/run.sh            # the GPU suite: pytest -m gpu, embed, vLLM, k-means
#   bash bench/gpu/run.sh --smoke    # every script on the CPU with tiny sizes (no GPU)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
OUT=${OUT:-bench/gpu/results/$(date -u +%Y%m%dT%H%M%SZ)${SMOKE:+-smoke}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$SECONDS
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, note a failure, go on
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    failed+=("$name")
  fi
}

if [[ -z "$SMOKE" ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT/gpus.txt"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no GPU: install the CUDA build (bench/gpu/README.md)'" || exit 2
  step pytest-gpu 180 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
  [[ " ${failed[*]} " == *" pytest-gpu "* ]] || echo '{"meta": {}, "rows": [{"bench": "pytest", "what": "pytest -m gpu", "value": "passed", "unit": "", "note": ""}]}' > "$OUT/pytest.json"
fi
step embed 150 "$PY" -m bench.gpu.embed $SMOKE --out "$OUT/embed.json"
step vllm 180 "$PY" -m bench.gpu.vllm_embed $SMOKE --out "$OUT/vllm.json"
step kmeans 150 "$PY" -m bench.gpu.kmeans $SMOKE --out "$OUT/kmeans.json"
"$PY" -m bench.gpu.report "$OUT"
echo "elapsed $((SECONDS - start)) s; results in $OUT"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]} (logs in $OUT)"
  exit 1
fi
