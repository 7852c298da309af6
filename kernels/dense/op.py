"""Launcher of the dense WxA16 GEMM: checks, allocates, picks the tile, launches.

Imports Triton (and decorates the kernel) on import: set `TRITON_INTERPRET` before importing
this module when running on CPU.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from kernels import tuning
from kernels._dequant import weight_args
from kernels._launch import launch
from kernels.dense._kernel import dense_wxa16_kernel
from kernels.layout import PackedWeight
from kernels.tuning import BlockConfig


def dense_wxa16(
    x: Tensor, w: PackedWeight, bias: Tensor | None = None, config: BlockConfig | None = None
) -> Tensor:
    """`x @ Ŵᵀ (+ bias)` with the weight dequantized in registers.

    Args:
        x: [..., K] fp16/bf16 (fp32 accepted), on the weight's device.
        w: PackedWeight [N, K] (single, not stacked).
        bias: [N] or None.
        config: tile override; default `kernels.tuning.choose("dense", ...)`.

    Returns:
        [..., N] in x.dtype.
    """
    if w.num_experts is not None:
        raise ValueError("dense_wxa16 takes a single weight, not stacked experts")
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects K={w.k}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, w.n)
    cfg = config or tuning.choose("dense", m, w.n, w.k, w.bits, w.group_size, x.dtype, x.device)
    wargs, meta = weight_args(w, cfg, x.dtype)
    if cfg.split_k == 1:
        out = torch.empty(1, m, w.n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(cfg.split_k, m, w.n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(w.n, cfg.block_n), cfg.split_k)
    launch(
        dense_wxa16_kernel, grid,
        x2, out, x2 if bias is None else bias, *wargs[:4],
        m, w.n, w.k,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), out.stride(2), *wargs[4:],
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **meta,
    )  # fmt: skip
    y = out[0] if cfg.split_k == 1 else out.sum(dim=0).to(x.dtype)
    return y.reshape(*lead, w.n)
