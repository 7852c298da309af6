# The README's two commands. Both create .venv when missing (or when pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
# Pinned in the same pip command as everything else: an unpinned torch pulls a multi-GB CUDA
# build on CPU hosts. GPU hosts override, e.g. `make serve TORCH_SPEC='torch==2.11.0'`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test serve lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/veq serve $(SERVE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/solvers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
