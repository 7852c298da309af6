"""Torch reference of the fused MoE, also the CPU execution path.

Owns the semantics the Triton kernels are tested against, in the form transformers' fused
experts compute them: a loop over the experts that received tokens, each dequantized
transiently (gate‖up `[2I, H]` and down `[H, I]`), never all experts at once. No Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dense.reference import default_compute_dtype
from kernels.layout import dequantize
from kernels.moe.weights import ExpertGroup, MoEWeights


def _locate(groups: tuple[ExpertGroup, ...]) -> dict[int, tuple[ExpertGroup, int]]:
    return {e: (g, i) for g in groups for i, e in enumerate(g.experts)}


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
    gate_up, down = _locate(weights.gate_up), _locate(weights.down)
    xc = x.to(cd)
    for e in torch.unique(ids[valid]).tolist():
        token, pick = torch.nonzero(ids == e, as_tuple=True)
        g13, i13 = gate_up[e]
        g2, i2 = down[e]
        w13 = dequantize(g13.weight.expert(i13), cd)  # [2I, H]
        gu = xc[token] @ w13.t()
        hidden = torch.nn.functional.silu(gu[:, :i_dim]) * gu[:, i_dim:]
        y = hidden @ dequantize(g2.weight.expert(i2), cd).t()  # [n_e, H]
        # A token picks an expert at most once, so plain indexed += has no duplicate rows; it
        # avoids index_add_'s parallel path, which stalls badly on a busy CPU.
        out[token] += y.float() * topk_weights[token, pick].float()[:, None]
    return out.to(x.dtype)
