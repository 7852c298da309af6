"""kernels.tuning: tiles GPUs accept, that fit their shared memory and fill them at decode."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import tuning
from kernels.tuning import TARGETS, BlockConfig

SHAPES = ((7, 32), (768, 2048), (1536, 2048), (2048, 768), (4096, 2048), (2048, 4096))


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_heuristic_never_below_gpu_dot_minimum(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for m in (1, 2, 7, 16, 33, 128, 4096):
        for n, k in SHAPES:
            for bits in (2, 3, 4, 8):
                cfg = tuning.heuristic("moe_down", m, n, k, bits, 128)
                assert min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16, cfg
                if bits == 3:
                    assert cfg.block_k >= 32, cfg  # one word of the third bit plane


@pytest.mark.parametrize("target", list(TARGETS.values()), ids=list(TARGETS))
def test_heuristic_fits_shared_memory_of_every_target(monkeypatch, target):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for kind in tuning.KINDS:
        for m in (1, 4, 16, 17, 64, 65, 512):
            for n, k in SHAPES:
                for bits in (2, 3, 4, 8):
                    for group in (32, 64, 128, k):
                        for dtype in (torch.float16, torch.bfloat16, torch.float32):
                            cfg = tuning.heuristic(kind, m, n, k, bits, group, dtype, target)
                            size = dtype.itemsize
                            assert tuning.shared_bytes(cfg, kind, bits, group, size) <= (
                                target.smem_per_block
                            ), (kind, m, n, k, bits, group, dtype, cfg)
                            assert kind != "moe_gate_up" or cfg.split_k == 1, cfg


def test_decode_grid_covers_the_sms_several_times(monkeypatch):
    """At T = 1 the Qwen3-VL-30B-A3B projections get 4 programs per SM, or as many as give each
    program MIN_PROGRAM_BYTES of codes to read (k_proj, W2 gate_up)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h100 = TARGETS["sm_90"]
    for kind, n, k, batches in (
        ("dense", 4096, 2048, 1), ("dense", 2048, 4096, 1), ("dense", 512, 2048, 1),
        ("moe_gate_up", 768, 2048, 8), ("moe_down", 2048, 768, 8),
    ):  # fmt: skip
        for bits in (2, 3, 4, 8):
            cfg = tuning.heuristic(kind, 1, n, k, bits, 128, torch.bfloat16, h100, batches)
            programs = batches * -(-n // cfg.block_n) * cfg.split_k
            weights = 2 if kind == "moe_gate_up" else 1
            code_bytes = weights * batches * n * k * bits // 8
            enough = min(4 * h100.sms, code_bytes // tuning.MIN_PROGRAM_BYTES)
            if kind == "moe_gate_up":  # no K split (SiLU·mul epilogue): N tiles of 16 at most
                enough = min(enough, batches * n // 16)
            assert programs >= enough, (kind, n, k, bits, cfg, programs)


def test_block_config_rejects_small_or_odd_tiles():
    for bad in ({"block_m": 8}, {"block_k": 48}, {"block_n": 0}):
        with pytest.raises(ValueError, match="tl.dot"):
            BlockConfig(**bad)
    with pytest.raises(ValueError, match="split_k"):
        BlockConfig(split_k=0)


def test_device_table_overrides_heuristic_unless_it_does_not_fit(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "interpreted", lambda: False)
    monkeypatch.setattr(tuning, "_device_name", lambda index: "Fake GPU")
    monkeypatch.setattr(tuning, "target_of", lambda device: TARGETS["sm_80"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tuning._table.cache_clear()
    huge = BlockConfig(128, 128, 128, num_stages=8)  # ~0.5 MB of shared memory
    table = {"dense": {"4:64:128": {"16": BlockConfig(16, 32, 32).to_dict(),
                                    "256": BlockConfig(64, 64, 64).to_dict(),
                                    "4096": huge.to_dict()}}}  # fmt: skip
    (tmp_path / "Fake_GPU.json").write_text(json.dumps(table))
    dev = torch.device("cuda")
    fp16 = torch.float16
    try:
        assert tuning.choose("dense", 4, 64, 128, 4, 32, fp16, dev) == BlockConfig(16, 32, 32)
        assert tuning.choose("dense", 100, 64, 128, 4, 32, fp16, dev) == BlockConfig(64, 64, 64)
        fallback = tuning.choose("dense", 9999, 64, 128, 4, 32, fp16, dev)
        assert fallback == tuning.heuristic("dense", 9999, 64, 128, 4, 32, fp16, TARGETS["sm_80"])
        other = tuning.choose("dense", 4, 64, 256, 4, 32, fp16, dev)
        assert other == tuning.heuristic("dense", 4, 64, 256, 4, 32, fp16, TARGETS["sm_80"])
    finally:
        tuning._table.cache_clear()
