"""Fused MoE kernels against the torch reference, and the reference against plain float math."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kernels._testing import assert_close, random_activations, random_packed, random_routing
from kernels.layout import dequantize
from kernels.moe.op import MoEConfig, fused_moe
from kernels.moe.reference import fused_moe_reference
from kernels.moe.weights import MoEWeights
from kernels.tuning import BlockConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@dataclass(frozen=True)
class Case:
    t: int
    k: int
    experts: int
    hidden: int
    inter: int
    bits: tuple[int, ...]  # per-expert bit widths cycle through this (mixed precision if > 1)
    group: int | None
    sym: bool
    skip: tuple[int, ...] = ()  # experts that receive no tokens
    down_bits: tuple[int, ...] | None = None  # down projections' bits (default: as gate/up)
    config: MoEConfig | None = None

    def __str__(self) -> str:
        g = self.group or "ch"
        s = "sym" if self.sym else "asym"
        b = "+".join(map(str, self.bits))
        d = "" if self.down_bits is None else "-down" + "+".join(map(str, self.down_bits))
        c = "" if self.config is None else "-cfg"
        return f"t{self.t}-k{self.k}-e{self.experts}-w{b}{d}-g{g}-{s}{c}"


def _weights(case: Case, dtype: torch.dtype = torch.float16) -> MoEWeights:
    def bits_of(e: int, table: tuple[int, ...]) -> int:
        return table[e % len(table)]

    gate_up = [
        random_packed(2 * case.inter, case.hidden, bits_of(e, case.bits), case.group, case.sym,
                      seed=e, scale_dtype=dtype)
        for e in range(case.experts)
    ]  # fmt: skip
    down = [
        random_packed(case.hidden, case.inter, bits_of(e, case.down_bits or case.bits),
                      case.group, case.sym, seed=1000 + e, scale_dtype=dtype)
        for e in range(case.experts)
    ]  # fmt: skip
    return MoEWeights.from_experts(gate_up, down)


def _cases() -> list[Case]:
    out = []
    tks = ((1, 1), (3, 2), (17, 3), (5, 4))
    i = 0
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128):
            for sym in (True, False):
                t, k = tks[i % 4]
                # H = I = max(group, 64): every group size divides both projections' K.
                d = max(group, 64)
                out.append(Case(t, k, 6, d, d, (bits,), group, sym, skip=(i % 6,)))
                i += 1
    return out


CASES = _cases() + [
    Case(0, 2, 4, 64, 32, (4,), 32, False),  # no tokens at all
    Case(1, 1, 8, 64, 32, (3,), 32, False),  # 7 of 8 experts get nothing
    Case(17, 2, 8, 64, 32, (4, 2), 32, False, skip=(1, 6)),  # mixed precision, hot 4 / cold 2
    Case(9, 4, 8, 64, 64, (2, 3, 4, 8), 64, True, down_bits=(8, 4)),  # down grouped differently
    Case(5, 3, 6, 96, 48, (4,), None, False),  # per-channel
    # Tiles smaller / larger than the group (both scale paths), BLOCK_M above tokens per expert.
    Case(17, 4, 6, 128, 128, (3,), 128, False,
         config=MoEConfig(BlockConfig(16, 32, 64), BlockConfig(32, 64, 32))),
    Case(17, 4, 6, 128, 64, (4,), 32, True,
         config=MoEConfig(BlockConfig(64, 64, 128), BlockConfig(16, 128, 64))),
    # Down split over K (fp32 partials), also with mixed-precision groups of different splits.
    Case(3, 2, 6, 64, 128, (2,), 32, False,
         config=MoEConfig(BlockConfig(16, 16, 32), BlockConfig(16, 32, 32, split_k=4))),
    Case(9, 3, 8, 64, 96, (3, 8), 32, True,
         config=MoEConfig(BlockConfig(16, 32, 32), BlockConfig(16, 16, 32, split_k=2))),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_moe_matches_reference_fp16(case: Case):
    w = _weights(case)
    ids, wt = random_routing(case.t, case.k, case.experts, seed=case.t + 7, skip=case.skip)
    x = random_activations(case.t, case.hidden, seed=case.k, dtype=torch.float16)
    out = fused_moe(x, ids, wt, w, case.config)
    ref = fused_moe_reference(x, ids, wt, w, compute_dtype=torch.float32)
    assert out.dtype == torch.float16 and out.shape == (case.t, case.hidden)
    assert_close(out, ref, torch.float16, str(case))


@pytest.mark.parametrize("case", [c for c in CASES if c.config is not None], ids=str)
def test_fused_moe_matches_reference_fp32(case: Case):
    """fp32 activations take the fp32 dequantization path (the one bf16 uses on a GPU)."""
    w = _weights(case)
    ids, wt = random_routing(case.t, case.k, case.experts, seed=case.t + 7, skip=case.skip)
    x = random_activations(case.t, case.hidden, seed=case.k, dtype=torch.float32)
    out = fused_moe(x, ids, wt, w, case.config)
    ref = fused_moe_reference(x, ids, wt, w, compute_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, str(case))


def test_gate_up_refuses_a_split_k():
    case = Case(2, 2, 4, 64, 32, (4,), 32, False)
    ids, wt = random_routing(case.t, case.k, case.experts)
    x = random_activations(case.t, case.hidden)
    bad = MoEConfig(gate_up=BlockConfig(16, 32, 32, split_k=2))
    with pytest.raises(ValueError, match="cannot split K"):
        fused_moe(x, ids, wt, _weights(case), bad)


def test_ids_outside_the_layer_contribute_nothing():
    case = Case(6, 2, 4, 64, 32, (4,), 32, False)
    w = _weights(case)
    ids, wt = random_routing(case.t, case.k, case.experts, seed=3)
    x = random_activations(case.t, case.hidden)
    dropped = ids.clone()
    dropped[0, 1], dropped[2, 0] = case.experts, -1  # e.g. transformers' "no expert" slot
    keep = torch.ones_like(wt)
    keep[0, 1] = keep[2, 0] = 0
    out = fused_moe(x, dropped, wt, w)
    ref = fused_moe_reference(x, ids, wt * keep, w, compute_dtype=torch.float32)
    assert_close(out, ref, torch.float16)
    assert_close(fused_moe_reference(x, dropped, wt, w), ref, torch.float16)


@pytest.mark.parametrize("chunk", [16, 2])
def test_reference_equals_plain_float_moe(chunk, monkeypatch):
    """The reference is the formula: Σ_j w_j · down(silu(gate x) · up x), per token, however
    many routed experts it dequantizes at a time (mixed bit-width groups included)."""
    import kernels.moe.reference as reference

    monkeypatch.setattr(reference, "DEQUANT_CHUNK", chunk)
    case = Case(5, 3, 6, 64, 32, (4, 2), 32, False, skip=(2,))
    w = _weights(case)
    ids, wt = random_routing(case.t, case.k, case.experts, seed=1, skip=case.skip)
    x = random_activations(case.t, case.hidden, dtype=torch.float32)
    where = {e: (g, i) for g in w.gate_up for i, e in enumerate(g.experts)}
    where_d = {e: (g, i) for g in w.down for i, e in enumerate(g.experts)}
    expect = torch.zeros(case.t, case.hidden)
    for t in range(case.t):
        for j in range(case.k):
            e = int(ids[t, j])
            g, i = where[e]
            w13 = dequantize(g.weight)[i]
            gd, i2 = where_d[e]
            w2 = dequantize(gd.weight)[i2]
            gate, up = w13[: case.inter] @ x[t], w13[case.inter :] @ x[t]
            expect[t] += wt[t, j] * (w2 @ (torch.nn.functional.silu(gate) * up))
    got = fused_moe_reference(x, ids, wt, w)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("t", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_moe_realistic_shapes_gpu(bits: int, t: int, dtype: torch.dtype):
    """Qwen3-VL-30B-A3B-like layer (E=128, k=8, H=2048, I=768), 16 experts skipped."""
    case = Case(t, 8, 128, 2048, 768, (bits,), 128, False, skip=tuple(range(0, 128, 8)))
    w = _weights(case, dtype)
    w = MoEWeights(
        tuple(type(g)(g.experts, g.weight.to("cuda"), g.local_of.cuda()) for g in w.gate_up),
        tuple(type(g)(g.experts, g.weight.to("cuda"), g.local_of.cuda()) for g in w.down),
        w.num_experts, w.hidden, w.intermediate,
    )  # fmt: skip
    ids, wt = random_routing(t, 8, 128, seed=t, skip=case.skip)
    x = random_activations(t, 2048, dtype=dtype, device="cuda")
    out = fused_moe(x, ids.cuda(), wt.cuda(), w)
    ref = fused_moe_reference(x, ids.cuda(), wt.cuda(), w, compute_dtype=torch.float32)
    assert_close(out, ref, dtype, f"w{bits} t{t} {dtype}")
