"""kernels.tuning: block sizes never below what tl.dot accepts on a GPU; device tables."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import tuning
from kernels.tuning import BlockConfig


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_heuristic_never_below_gpu_dot_minimum(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for m in (1, 2, 7, 16, 33, 128, 4096):
        for n, k in ((7, 32), (768, 2048), (2048, 768), (4096, 4096)):
            for bits in (2, 3, 4, 8):
                cfg = tuning.heuristic("moe_down", m, n, k, bits, 128)
                assert min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16, cfg


def test_block_config_rejects_small_or_odd_tiles():
    for bad in ({"block_m": 8}, {"block_k": 48}, {"block_n": 0}):
        with pytest.raises(ValueError, match="tl.dot"):
            BlockConfig(**bad)


def test_device_table_overrides_heuristic(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    tuning._table.cache_clear()
    table = {"dense": {"4:64:128": {"16": BlockConfig(16, 32, 32).to_dict(),
                                    "256": BlockConfig(64, 64, 64).to_dict()}}}  # fmt: skip
    (tmp_path / "Fake_GPU.json").write_text(json.dumps(table))
    dev = torch.device("cuda")
    try:
        assert tuning.choose("dense", 4, 64, 128, 4, 32, dev) == BlockConfig(16, 32, 32)
        assert tuning.choose("dense", 100, 64, 128, 4, 32, dev) == BlockConfig(64, 64, 64)
        assert tuning.choose("dense", 9999, 64, 128, 4, 32, dev) == BlockConfig(64, 64, 64)
        other = tuning.choose("dense", 4, 64, 256, 4, 32, dev)
        assert other == tuning.heuristic("dense", 4, 64, 256, 4, 32)
    finally:
        tuning._table.cache_clear()
