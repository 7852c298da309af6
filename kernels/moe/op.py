"""Launcher of the fused MoE WxA16: align, GEMM 1 (gate‖up + SiLU·mul), GEMM 2 (down), sum.

Imports Triton (and decorates the kernels) on import: set `TRITON_INTERPRET` before importing
this module when running on CPU. Per expert group (one bit width) it launches each GEMM once;
a layer with uniform bits is two launches plus the align step and the top-k sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from kernels import tuning
from kernels._dequant import weight_args
from kernels._launch import launch
from kernels.moe._kernel import moe_down_kernel, moe_gate_up_kernel
from kernels.moe.align import Alignment, moe_align_block_size
from kernels.moe.weights import ExpertGroup, MoEWeights
from kernels.tuning import BlockConfig


@dataclass(frozen=True)
class MoEConfig:
    """Tile overrides for the two GEMMs (None: `kernels.tuning.choose` per group)."""

    gate_up: BlockConfig | None = None
    down: BlockConfig | None = None


def _config(
    kind: str, override: BlockConfig | None, group: ExpertGroup, assignments: int, x: Tensor
) -> BlockConfig:
    if override is not None:
        if kind == "moe_gate_up" and override.split_k != 1:
            raise ValueError("moe_gate_up cannot split K (its SiLU·mul epilogue is not linear)")
        return override
    w = group.weight
    experts = len(group.experts)
    rows_per_expert = -(-assignments // experts)
    n = w.n // 2 if kind == "moe_gate_up" else w.n  # gate‖up: I output columns
    return tuning.choose(
        kind, rows_per_expert, n, w.k, w.bits, w.group_size, x.dtype, x.device,
        batches=min(experts, assignments),
    )  # fmt: skip


def _grid(align: Alignment, n: int, cfg: BlockConfig) -> tuple[int, int]:
    return (align.num_blocks * triton.cdiv(n, cfg.block_n), cfg.split_k)


def fused_moe(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    weights: MoEWeights,
    config: MoEConfig | None = None,
) -> Tensor:
    """`out[t] = Σ_j w[t, j] · down_e(silu(gate_e x[t]) · up_e x[t])`, e = topk_ids[t, j].

    Args:
        x: [T, H] fp16/bf16 (fp32 accepted), on the weights' device.
        topk_ids: int [T, A] global expert ids; ids outside [0, E) contribute nothing.
        topk_weights: [T, A] routing weights (any float dtype; applied in fp32).
        weights: the layer's packed experts (any mix of bit widths, one launch per group).
        config: tile overrides.

    Returns:
        [T, H] in x.dtype. The per-pick (and per-split) results are summed in fp32.
    """
    if x.ndim != 2 or x.shape[1] != weights.hidden:
        raise ValueError(f"x must be [T, {weights.hidden}], got {tuple(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[:1] != x.shape[:1]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={x.shape[0]}, A]"
        )
    t, top_k = topk_ids.shape
    h_dim, i_dim, e = weights.hidden, weights.intermediate, weights.num_experts
    if t == 0:
        return x.new_zeros(0, h_dim)
    config = config or MoEConfig()
    dev = x.device
    x = x.contiguous()
    n_assign = t * top_k
    ids = topk_ids.to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < e), ids, e)  # the "no expert" slot of local_of
    routed = topk_weights.reshape(-1).to(torch.float32).contiguous()
    hidden = torch.empty(n_assign, i_dim, dtype=x.dtype, device=dev)
    down_cfgs = [_config("moe_down", config.down, g, n_assign, x) for g in weights.down]
    splits = max(c.split_k for c in down_cfgs)
    # Assignments whose expert is out of range are never written by GEMM 2, nor are splits a
    # group does not use: start from zeros. Split partial sums stay fp32 until the final sum.
    out_dtype = x.dtype if splits == 1 else torch.float32
    out = torch.zeros(splits, n_assign, h_dim, dtype=out_dtype, device=dev)
    aligned: dict[tuple[tuple[int, ...], int], Alignment] = {}

    def align(group: ExpertGroup, block_m: int) -> Alignment:
        key = (group.experts, block_m)
        if key not in aligned:
            local = group.local_of.to(dev)[ids]
            aligned[key] = moe_align_block_size(local, len(group.experts), block_m)
        return aligned[key]

    for group in weights.gate_up:
        cfg = _config("moe_gate_up", config.gate_up, group, n_assign, x)
        al = align(group, cfg.block_m)
        wargs, meta = weight_args(group.weight, cfg, x.dtype)
        launch(
            moe_gate_up_kernel, _grid(al, i_dim, cfg),
            x, hidden, *wargs[:4], al.sorted_ids, al.block_expert, al.num_padded,
            i_dim, h_dim, n_assign,
            x.stride(0), x.stride(1), hidden.stride(0), hidden.stride(1), *wargs[4:],
            TOP_K=top_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **meta,
        )  # fmt: skip
    for group, cfg in zip(weights.down, down_cfgs, strict=True):
        al = align(group, cfg.block_m)
        wargs, meta = weight_args(group.weight, cfg, x.dtype)
        launch(
            moe_down_kernel, _grid(al, h_dim, cfg),
            hidden, out, routed, *wargs[:4], al.sorted_ids, al.block_expert, al.num_padded,
            h_dim, i_dim, n_assign,
            hidden.stride(0), hidden.stride(1), out.stride(0), out.stride(1), out.stride(2),
            *wargs[4:],
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **meta,
        )  # fmt: skip
    return out.view(splits, t, top_k, h_dim).sum(dim=(0, 2), dtype=torch.float32).to(x.dtype)
