"""Dense WxA16 kernel against its torch reference (interpreter on CPU, real shapes on GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kernels._testing import assert_close, random_activations, random_packed
from kernels.dense.op import dense_wxa16
from kernels.dense.reference import dense_reference
from kernels.tuning import BlockConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    k: int
    bits: int
    group: int | None
    sym: bool
    config: BlockConfig | None = None
    bias: bool = False

    def __str__(self) -> str:
        g = self.group or "ch"
        s = "sym" if self.sym else "asym"
        c = "" if self.config is None else f"-bk{self.config.block_k}-s{self.config.split_k}"
        b = "-bias" if self.bias else ""
        return f"m{self.m}-n{self.n}-k{self.k}-w{self.bits}-g{g}-{s}{c}{b}"


def _cases() -> list[Case]:
    out = []
    ms = (1, 3, 17)
    i = 0
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128):
            for sym in (True, False):
                # Ragged M and odd N rotate through the table; K = 256 covers two 128-groups.
                out.append(Case(ms[i % 3], (40, 7, 64)[i % 3], 256, bits, group, sym))
                i += 1
    return out


CASES = _cases() + [
    Case(0, 32, 64, 4, 32, False),  # no rows
    Case(5, 24, 100, 3, None, False),  # per-channel, K not a multiple of 32
    Case(5, 24, 96, 8, None, True, bias=True),
    # Tiles smaller and larger than the group: both scale-loading paths of dequant_tile.
    Case(17, 48, 256, 4, 128, False, BlockConfig(16, 16, 32)),
    Case(17, 48, 256, 3, 32, False, BlockConfig(32, 32, 128)),
    Case(3, 48, 256, 2, 64, True, BlockConfig(16, 32, 128), bias=True),
    # Split K (fp32 partials summed by the launcher): even, ragged (K = 100 over 3 splits of
    # 64 leaves the last split empty) and with a bias added by one split only.
    Case(1, 40, 256, 4, 32, False, BlockConfig(16, 16, 32, split_k=4)),
    Case(3, 24, 100, 3, None, True, BlockConfig(16, 16, 32, split_k=3)),
    Case(2, 64, 256, 2, 128, False, BlockConfig(16, 32, 64, split_k=2), bias=True),
    Case(16, 7, 256, 8, 64, True, BlockConfig(16, 16, 32, split_k=8)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dense_matches_reference_fp16(case: Case):
    w = random_packed(case.n, case.k, case.bits, case.group, case.sym, seed=case.m + case.bits)
    x = random_activations(case.m, case.k, seed=case.n, dtype=torch.float16)
    bias = torch.randn(case.n).to(torch.float16) if case.bias else None
    w, x = w.to(DEVICE), x.to(DEVICE)
    bias = None if bias is None else bias.to(DEVICE)
    out = dense_wxa16(x, w, bias, config=case.config)
    ref = dense_reference(x, w, bias, compute_dtype=torch.float32)
    assert out.dtype == torch.float16 and out.shape == (case.m, case.n)
    assert_close(out, ref, torch.float16, str(case))


@pytest.mark.parametrize("case", [c for c in CASES if c.m and (c.config or c.bits == 3)], ids=str)
def test_dense_matches_reference_fp32(case: Case):
    """fp32 activations take the fp32 dequantization path (the one bf16 uses on a GPU)."""
    w = random_packed(case.n, case.k, case.bits, case.group, case.sym, seed=case.m + case.bits)
    x = random_activations(case.m, case.k, seed=case.n, dtype=torch.float32).to(DEVICE)
    bias = torch.randn(case.n).to(DEVICE) if case.bias else None
    w = w.to(DEVICE)
    out = dense_wxa16(x, w, bias, config=case.config)
    assert out.dtype == torch.float32
    assert_close(out, dense_reference(x, w, bias, compute_dtype=torch.float32), torch.float32,
                 str(case))  # fmt: skip


def test_dense_keeps_leading_dims():
    w = random_packed(32, 64, 4, 32, False)
    x = random_activations(6, 64).view(2, 3, 64)
    out = dense_wxa16(x, w)
    assert out.shape == (2, 3, 32)
    assert_close(out, dense_reference(x, w), torch.float16)


def test_dense_rejects_mismatched_k():
    with pytest.raises(ValueError, match="K=64"):
        dense_wxa16(torch.zeros(2, 32, dtype=torch.float16), random_packed(8, 64, 4, 32, True))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_realistic_shapes_gpu(bits: int, m: int, dtype: torch.dtype):
    w = random_packed(2048, 4096, bits, 128, False, seed=bits, device="cuda",
                      scale_dtype=dtype)  # fmt: skip
    x = random_activations(m, 4096, seed=m, dtype=dtype, device="cuda")
    assert_close(dense_wxa16(x, w), dense_reference(x, w, compute_dtype=torch.float32), dtype)
