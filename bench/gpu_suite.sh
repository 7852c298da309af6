#!/usr/bin/env bash
# Run bench/gpu_suite.py on a GPU host: a Qwen3-VL-30B-A3B-shaped model with random weights,
# served at 16, 4 and 3 bits and load-tested in under 8 minutes (its docstring says what it
# checks and how the time is planned).
#
#   bash bench/gpu_suite.sh [gpu_suite.py options]    # on the GPU host
#   bash bench/gpu_suite.sh --fetch-wheels [NAME==V]  # where PyPI answers: wheels into .whl/
#
# The GPU image has torch, triton, transformers, accelerate, httpx, pillow, scikit-image,
# matplotlib and prometheus-client, but not the server's fastapi / uvicorn / pydantic stack.
# Those travel as wheels: fetch them here (same versions as this checkout's .venv), add
# '/.whl/' to .git/info/exclude, name .whl in the device call's carry. This script installs
# them into /tmp/veq-site and runs veq from the checkout (PYTHONPATH): nothing is installed
# into the image's own environment. With the device tool, pass `--export "$OUT"` to get the
# report back (report.md, report.json, BENCHMARKS.md, steps.tar.gz).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${VEQ_WHEELS:-$ROOT/.whl}"
SERVER_PACKAGES="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
annotated-types annotated-doc typing-inspection typing-extensions uvicorn"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  shift
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  specs=()
  for name in $SERVER_PACKAGES "$@"; do
    if [[ "$name" == *==* ]]; then
      specs+=("$name")
      continue
    fi
    version="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
      "$name" 2>/dev/null || true)"
    specs+=("$name${version:+==$version}")
  done
  mkdir -p "$WHEELS"
  # The GPU image's python is CPython 3.12 on x86-64 Linux.
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${specs[@]}"
  ls -1 "$WHEELS"
  echo "now: echo /.whl/ >> .git/info/exclude; name .whl in the device call's carry"
  exit 0
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import fastapi, uvicorn, pydantic_settings' 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/veq-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/veq-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_suite.sh: fastapi, uvicorn or pydantic-settings is missing and $WHEELS has no" \
      "wheels; run 'bash bench/gpu_suite.sh --fetch-wheels' where PyPI answers, carry .whl" >&2
    exit 2
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_suite.py "$@"
