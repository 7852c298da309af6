"""veq.nn: quantized modules against float math, the kernel path against the reference path,
the drop-in contract with transformers' fused experts, and memory (no 16-bit weight copies)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeTextExperts,
    Qwen3VLMoeTextSparseMoeBlock,
)

from kernels._testing import assert_close
from kernels.layout import kernel_nbytes
from veq.config import QuantConfig
from veq.format.pack import packed_nbytes
from veq.nn import QuantLinear, QuantMoEExperts, kernel_path
from veq.quantizer import QuantizedWeight, quantize_weight
from veq.testing import qwen3_vl_moe_text_config

CFGS = [
    QuantConfig(bits=4, group_size=32, symmetric=False),
    QuantConfig(bits=3, group_size=64, symmetric=True),
    QuantConfig(bits=2, group_size=128, symmetric=False),
    QuantConfig(bits=8, group_size=None, symmetric=True),
]


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"w{c.bits}-g{c.group_size}-s{c.symmetric}")
def test_quant_linear_paths_match_float_linear(cfg, make_weight, make_inputs, monkeypatch):
    n, k = 40, 256
    qw = quantize_weight(make_weight(n, k, seed=cfg.bits), cfg)
    bias = torch.randn(n) * 0.1
    lin = QuantLinear.from_quantized(qw, bias=bias, dtype=torch.float32)
    assert (lin.in_features, lin.out_features, lin.cfg) == (k, n, cfg)
    x = make_inputs(6, k, seed=1).view(2, 3, k)
    expect = torch.nn.functional.linear(x, qw.dequantize(), bias)
    monkeypatch.setenv("VEQ_KERNELS", "reference")
    torch.testing.assert_close(lin(x), expect, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("VEQ_KERNELS", "triton")
    xh = x.half()
    assert_close(lin(xh), expect, torch.float16, "triton fp16")


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"w{c.bits}-g{c.group_size}-s{c.symmetric}")
def test_quant_linear_holds_only_packed_bytes(cfg, make_weight):
    n, k = 96, 384
    qw = quantize_weight(make_weight(n, k, seed=0), cfg)
    lin = QuantLinear.from_quantized(qw)  # no bias: every byte is the quantized weight
    expect = kernel_nbytes(n, k, cfg.bits, cfg.group_size, cfg.symmetric)
    assert lin.weight_nbytes() == _module_bytes(lin) == expect
    ng = 1 if cfg.group_size is None else k // cfg.group_size
    # Within the zero points' byte-vs-b-bits difference of the on-disk packed size...
    assert abs(expect - packed_nbytes(n, k, cfg)) <= n * ng + 16
    # ...and far from any 16-bit copy of the weight.
    assert _module_bytes(lin) < 0.6 * 2 * n * k
    assert not any(t.is_floating_point() and t.numel() >= n * k for t in lin.buffers())


def test_dtype_casts_do_not_touch_scales(make_weight, make_inputs):
    qw = quantize_weight(make_weight(16, 64, seed=2), QuantConfig(bits=4, group_size=32))
    lin = QuantLinear.from_quantized(qw).to(torch.bfloat16)
    assert torch.equal(lin.packed_weight().scale.t(), qw.scale)
    assert lin.packed_weight().scale.dtype == torch.float16


def _tiny_moe(
    num_experts: int = 8, hidden: int = 64, inter: int = 32, top_k: int = 2
) -> Qwen3VLMoeTextConfig:
    """The `veq.testing` Qwen3-VL-MoE text config for one MoE block (`num_experts` experts
    `hidden` -> `inter` -> `hidden`, `top_k` per token), experts run eagerly."""
    config = Qwen3VLMoeTextConfig(
        **qwen3_vl_moe_text_config(
            vocab=256, hidden=hidden, experts=num_experts, moe_intermediate=inter, top_k=top_k
        )
    )
    config._experts_implementation = "eager"
    return config


def _quantize_experts(
    experts: Qwen3VLMoeTextExperts, bits_of: list[int], group: int, symmetric: bool
) -> tuple[list[QuantizedWeight], list[QuantizedWeight], list[QuantizedWeight]]:
    i_dim = experts.intermediate_dim
    gate, up, down = [], [], []
    for e, bits in enumerate(bits_of):
        cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
        gate.append(quantize_weight(experts.gate_up_proj[e, :i_dim].detach(), cfg))
        up.append(quantize_weight(experts.gate_up_proj[e, i_dim:].detach(), cfg))
        down.append(quantize_weight(experts.down_proj[e].detach(), cfg))
    # The float module now runs exactly the dequantized weights.
    with torch.no_grad():
        for e in range(len(bits_of)):
            experts.gate_up_proj[e] = torch.cat([gate[e].dequantize(), up[e].dequantize()])
            experts.down_proj[e] = down[e].dequantize()
    return gate, up, down


@pytest.mark.parametrize(
    ("bits_of", "symmetric"),
    [([4] * 8, False), ([4, 2, 2, 4, 3, 2, 8, 2], False), ([3] * 8, True)],
    ids=["w4", "mixed-4-3-2-8", "w3-sym"],
)
def test_moe_experts_drop_in_for_qwen3_vl_moe(bits_of, symmetric, monkeypatch):
    torch.manual_seed(0)
    config = _tiny_moe()
    block = Qwen3VLMoeTextSparseMoeBlock(config).float()
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, 0.05)
        block.experts.down_proj.normal_(0, 0.05)
    gate, up, down = _quantize_experts(block.experts, bits_of, 32, symmetric)
    x = torch.randn(2, 9, config.hidden_size)
    with torch.no_grad():
        expect = block(x)
        block.experts = QuantMoEExperts.from_quantized(gate, up, down, dtype=torch.float32)
        assert block.experts.num_experts == 8
        monkeypatch.setenv("VEQ_KERNELS", "auto")  # CPU → reference, fp32 math
        torch.testing.assert_close(block(x), expect, rtol=1e-4, atol=1e-5)
        monkeypatch.setenv("VEQ_KERNELS", "triton")
        flat = x.view(-1, config.hidden_size)
        _, weights, ids = block.gate(flat)  # route in fp32, run the experts in fp16
        out = block.experts(flat.half(), ids, weights)
        assert_close(out.float(), expect.view_as(flat), torch.float16, "triton fp16")


def test_moe_experts_with_idle_experts_and_dropped_ids(monkeypatch):
    torch.manual_seed(1)
    config = _tiny_moe(num_experts=6, top_k=3)
    experts = Qwen3VLMoeTextExperts(config).float()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    gate, up, down = _quantize_experts(experts, [4, 4, 2, 2, 8, 3], 32, False)
    q = QuantMoEExperts.from_quantized(gate, up, down, dtype=torch.float32)
    x = torch.randn(5, config.hidden_size)
    ids = torch.tensor([[0, 2, 6], [2, 0, 4], [0, 4, 2], [2, 6, 0], [4, 0, 2]])  # 6 = no expert
    w = torch.softmax(torch.randn(5, 3), dim=-1)
    with torch.no_grad():
        expect = experts(x, ids, w)
        for mode in ("reference", "triton"):
            monkeypatch.setenv("VEQ_KERNELS", mode)
            assert_close(q(x.half(), ids, w).float(), expect, torch.float16, mode)
        monkeypatch.setenv("VEQ_KERNELS", "reference")
        assert q(x[:0], ids[:0], w[:0]).shape == (0, config.hidden_size)
        monkeypatch.setenv("VEQ_KERNELS", "triton")
        assert q(x[:0].half(), ids[:0], w[:0]).shape == (0, config.hidden_size)


def test_moe_experts_hold_only_packed_bytes():
    torch.manual_seed(2)
    config = _tiny_moe(num_experts=4, hidden=128, inter=64)
    experts = Qwen3VLMoeTextExperts(config).float()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    bits_of = [4, 2, 3, 8]
    gate, up, down = _quantize_experts(experts, bits_of, 64, False)
    q = QuantMoEExperts.from_quantized(gate, up, down)
    h, i = 128, 64
    expect = sum(
        kernel_nbytes(2 * i, h, b, 64, False) + kernel_nbytes(h, i, b, 64, False) for b in bits_of
    )
    assert q.weight_nbytes() == expect
    index_maps = 2 * len(set(bits_of)) * 8 * (len(bits_of) + 1)  # int64 [E + 1] per group
    assert _module_bytes(q) == expect + index_maps
    disk = sum(packed_nbytes(i, h, c) * 2 + packed_nbytes(h, i, c) for c in (g.cfg for g in gate))
    assert q.weight_nbytes() <= disk + 4 * (2 * i + h) * (h // 64)  # zero points 1 B vs b bits
    assert _module_bytes(q) < 0.6 * 2 * 3 * h * i * len(bits_of)


def test_moe_experts_reject_mismatched_gate_and_up():
    w = torch.randn(32, 64) * 0.05
    g = quantize_weight(w, QuantConfig(bits=4, group_size=32))
    u = quantize_weight(w, QuantConfig(bits=2, group_size=32))
    d = quantize_weight(torch.randn(64, 32) * 0.05, QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="must match"):
        QuantMoEExperts.from_quantized([g], [u], [d])


def test_kernel_path_selection(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("VEQ_KERNELS", raising=False)
    assert kernel_path(x) == "reference"  # auto on CPU
    monkeypatch.setenv("VEQ_KERNELS", "reference")
    assert kernel_path(x) == "reference"
    monkeypatch.setenv("VEQ_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_path(x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel_path(x)
    monkeypatch.setenv("VEQ_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, triton or reference"):
        kernel_path(x)
