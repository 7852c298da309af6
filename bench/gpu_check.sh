#!/usr/bin/env bash
# The one GPU check: everything that needs a real GPU, in under 8 minutes of an H100/H200.
#
#   bash bench/gpu_check.sh                    # on the GPU host; results under $OUT
#   bash bench/gpu_check.sh --fetch-wheels     # here, where PyPI answers (see bench/_gpu_env.sh)
#
# With the device tool: `bash bench/gpu_check.sh` with .whl carried and timeout_s 540; the files
# come back under $OUT. Steps (each with its own time limit, each logged to $OUT/<step>.log;
# a failed step does not stop the others, the exit code says whether all passed):
#   1. nvidia-smi and versions
#   2. bench/kernels.py: bf16 correctness of every variant, decode/prefill timings against a
#      bf16 grouped matmul with GB/s and the fraction of copy bandwidth (BENCHMARKS "kernels")
#   3. pytest -m gpu tests/kernels tests/server/test_graphs.py: the kernels at Qwen3-VL-30B-A3B
#      shapes, fp16 and bf16, and CUDA-graph replays of the decode step against eager steps
#   4. veq quantize --model mini with the defaults on CUDA (method veq, W4, gamma auto)
#   5. one served answer from the bundled model on CUDA (bench/gpu_answer.py, from step 4's cache)
#   6. bench/decode.py on CUDA: the engine's decode tokens/s at batch 1/4/16/64, 16-bit and W4,
#      dynamic steps against fixed-shape steps replayed from CUDA graphs (--cuda-graphs)
#   7. where vllm is importable: `vllm serve` of a W4 and a symmetric W8 checkpoint of the
#      bundled model, one chat each (bench/gpu_vllm.py; README's portability table)
# BENCHMARKS.md (with the sections the steps rewrote) is copied to $OUT for committing here.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=bench/_gpu_env.sh
source "$ROOT/bench/_gpu_env.sh"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  shift
  fetch_wheels "$@"
  exit 0
fi

OUT="${OUT:-$ROOT/bench/reports/gpu-check-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
CACHE="$OUT/cache"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0
start=$SECONDS

step() {  # step NAME SECONDS CMD...: run with a time limit, log, record the outcome
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  printf '%-10s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$SUMMARY"
  [[ $rc -eq 0 ]] || failed=1
}

step env 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, \
triton.__version__, torch.cuda.get_device_name())'"
# The kernel benchmark needs only torch + triton; the tests' conftest imports veq (pydantic).
step kernels 240 "$PY" bench/kernels.py --tokens 1,4,16,256,2048
if server_stack; then
  step pytest 120 "$PY" -m pytest -q -m gpu tests/kernels tests/server/test_graphs.py \
    -p no:cacheprovider
  step quantize 120 "$PY" -m server.cli quantize --model mini --device cuda --cache-dir "$CACHE"
  step answer 90 "$PY" bench/gpu_answer.py --device cuda --cache-dir "$CACHE" \
    --out "$OUT/answer.json" --log "$OUT/answer-serve.log"
  step decode 150 "$PY" bench/decode.py --device cuda --modes dynamic,graphs --repeats 2 \
    --label "GPU check"
  if "$PY" -c 'import vllm' 2> /dev/null; then
    step vllm 300 "$PY" bench/gpu_vllm.py --cache-dir "$CACHE" --out "$OUT/vllm.json"
  else
    echo "vllm: skipped (vllm not installed)" | tee -a "$SUMMARY"
  fi
else
  echo "pytest, quantize, answer, vllm: skipped (no server stack)" | tee -a "$SUMMARY"
  failed=1
fi
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
echo "total $((SECONDS - start))s" | tee -a "$SUMMARY"
exit $failed
