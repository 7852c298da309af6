# Sourced by the GPU scripts (bench/gpu_check.sh, bench/gpu_suite.sh): make the server's Python
# stack importable on the GPU image, which has torch, triton, transformers, accelerate, httpx,
# pillow, scikit-image, matplotlib and prometheus-client but not fastapi / uvicorn / pydantic.
#
#   bash bench/gpu_check.sh --fetch-wheels [NAME==V]  # where PyPI answers: wheels into .whl/
#
# Those travel as wheels (3 MB): fetch them here (same versions as this checkout's .venv) and name
# .whl (git-ignored) in the device call's carry. They are installed into
# /tmp/veq-site and the checkout runs from PYTHONPATH: nothing goes into the image's own
# environment. Expects ROOT (the checkout) to be set.
WHEELS="${VEQ_WHEELS:-$ROOT/.whl}"
SERVER_PACKAGES="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
annotated-types annotated-doc typing-inspection typing-extensions uvicorn"

fetch_wheels() {
  local py="${PYTHON:-$ROOT/.venv/bin/python}" specs=() name version
  for name in $SERVER_PACKAGES "$@"; do
    if [[ "$name" == *==* ]]; then
      specs+=("$name")
      continue
    fi
    version="$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
      "$name" 2>/dev/null || true)"
    specs+=("$name${version:+==$version}")
  done
  mkdir -p "$WHEELS"
  # The GPU image's python is CPython 3.12 on x86-64 Linux.
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${specs[@]}"
  ls -1 "$WHEELS"
  echo "now name .whl in the device call's carry (it is git-ignored)"
}

# Installs the carried wheels when the server stack is missing; returns 1 (with a message)
# when it is missing and there are no wheels.
server_stack() {
  local py="${PYTHON:-python3}"
  if ! "$py" -c 'import fastapi, uvicorn, pydantic_settings' 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/veq-site "$WHEELS"/*.whl
      export PYTHONPATH="/tmp/veq-site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "fastapi, uvicorn or pydantic-settings is missing and $WHEELS has no wheels;" \
        "run 'bash bench/gpu_check.sh --fetch-wheels' where PyPI answers, carry .whl" >&2
      return 1
    fi
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
}
