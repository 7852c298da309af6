"""Torch reference of the dense WxA16 GEMM, also the CPU execution path.

Owns the semantics the Triton kernel is tested against: dequantize the whole weight
(transiently) and multiply. Nothing here imports Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.layout import PackedWeight, dequantize


def default_compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 on CPU (~5× faster than bf16 there, docs/design.md §Environment facts), the
    activation dtype on GPU."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def dense_reference(
    x: Tensor,
    w: PackedWeight,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """`x @ Ŵᵀ (+ bias)`.

    Args:
        x: [..., K] fp16/bf16/fp32.
        w: PackedWeight [N, K] (single, not stacked).
        bias: [N] or None.
        compute_dtype: matmul dtype; default `default_compute_dtype(x)`.

    Returns:
        [..., N] in x.dtype.
    """
    if w.num_experts is not None:
        raise ValueError("dense_reference takes a single weight, not stacked experts")
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects K={w.k}")
    cd = compute_dtype or default_compute_dtype(x)
    out = torch.nn.functional.linear(x.to(cd), dequantize(w, cd))
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(x.dtype)
