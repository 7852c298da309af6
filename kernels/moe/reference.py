"""Torch reference of the fused MoE, also the CPU execution path.

Owns the semantics the Triton kernels are tested against, in the form transformers' fused
experts compute them: a loop over the experts that received tokens, dequantized transiently
(gate‖up `[2I, H]` and down `[H, I]`), only those, at most `DEQUANT_CHUNK` at a time. The routed
experts of one bit-width group are dequantized together: on the CPU serving path a decode step
is dominated by per-op overhead, and one unpack per group instead of per expert is 4–16× fewer
ops. No Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dense.reference import default_compute_dtype
from kernels.layout import dequantize
from kernels.moe.weights import ExpertGroup, MoEWeights

#: Routed experts dequantized at a time: bounds the transient fp32 copies (16 Qwen3-VL-30B
#: experts ≈ 200 MB) while still batching the unpacking of a small model's experts.
DEQUANT_CHUNK = 16


def _dequantize_routed(
    groups: tuple[ExpertGroup, ...], routed: list[int], dtype: torch.dtype
) -> dict[int, Tensor]:
    """Global expert id → its dequantized `[N, K]` weight, for the `routed` experts only."""
    wanted = set(routed)
    out: dict[int, Tensor] = {}
    for g in groups:
        ids = [e for e in g.experts if e in wanted]
        if not ids:
            continue
        local = torch.tensor([g.experts.index(e) for e in ids], device=g.weight.device)
        for e, w in zip(ids, dequantize(g.weight.select(local), dtype), strict=True):
            out[e] = w
    return out


def fused_moe_reference(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    weights: MoEWeights,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """`out[t] = Σ_j w[t, j] · down_e(silu(gate_e x[t]) · up_e x[t])`, e = topk_ids[t, j].

    Args:
        x: [T, H] fp16/bf16/fp32.
        topk_ids: int [T, A] global expert ids; ids outside [0, E) contribute nothing.
        topk_weights: [T, A].
        weights: the layer's packed experts.
        compute_dtype: math dtype; default fp32 on CPU, x.dtype on GPU.

    Returns:
        [T, H] in x.dtype (accumulated over picks in fp32).
    """
    if x.ndim != 2 or x.shape[1] != weights.hidden:
        raise ValueError(f"x must be [T, {weights.hidden}], got {tuple(x.shape)}")
    cd = compute_dtype or default_compute_dtype(x)
    i_dim = weights.intermediate
    out = torch.zeros(x.shape[0], weights.hidden, dtype=torch.float32, device=x.device)
    ids = topk_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < weights.num_experts)
    if not valid.any():
        return out.to(x.dtype)
    routed = torch.unique(ids[valid]).tolist()
    xc = x.to(cd)
    for c in range(0, len(routed), DEQUANT_CHUNK):
        chunk = routed[c : c + DEQUANT_CHUNK]
        gate_up = _dequantize_routed(weights.gate_up, chunk, cd)  # e → [2I, H]
        down = _dequantize_routed(weights.down, chunk, cd)  # e → [H, I]
        for e in chunk:
            token, pick = torch.nonzero(ids == e, as_tuple=True)
            gu = xc[token] @ gate_up[e].t()
            hidden = torch.nn.functional.silu(gu[:, :i_dim]) * gu[:, i_dim:]
            y = hidden @ down[e].t()  # [n_e, H]
            # A token picks an expert at most once, so plain indexed += has no duplicate rows;
            # it avoids index_add_'s parallel path, which stalls badly on a busy CPU.
            out[token] += y.float() * topk_weights[token, pick].float()[:, None]
    return out.to(x.dtype)
