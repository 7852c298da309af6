#!/usr/bin/env bash
# Run bench/gpu_suite.py on a GPU host: a Qwen3-VL-30B-A3B-shaped model with random weights,
# served at 16, 4 and 3 bits and load-tested in under 8 minutes (its docstring says what it
# checks and how the time is planned).
#
#   bash bench/gpu_suite.sh [gpu_suite.py options]    # on the GPU host
#   bash bench/gpu_suite.sh --fetch-wheels [NAME==V]  # where PyPI answers: wheels into .whl/
#
# The server stack travels as carried wheels (bench/_gpu_env.sh says how). With the device
# tool, pass `--export "$OUT"` to get the report back (report.md, report.json, BENCHMARKS.md,
# steps.tar.gz).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=bench/_gpu_env.sh
source "$ROOT/bench/_gpu_env.sh"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  shift
  fetch_wheels "$@"
  exit 0
fi

PY="${PYTHON:-python3}"
server_stack || exit 2
exec "$PY" bench/gpu_suite.py "$@"
