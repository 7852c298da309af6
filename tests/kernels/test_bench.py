"""bench/kernels.py runs end to end (CPU: the reference path at a tiny made-up layer)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark")
def test_bench_smoke_on_cpu(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.MODELS, "tiny", bench.Model("tiny", 8, 2, 128, 128))
    assert bench.main(["--no-write", "--models", "tiny", "--tokens", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "reference path only" in out
    assert out.count("| tiny |") == 2 * (1 + len(bench.BITS))
