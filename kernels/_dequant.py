"""In-register dequantization of one weight tile, shared by the dense and MoE kernels.

Owns the Triton side of `kernels.layout` (the torch side is `kernels.layout.dequantize`): a
`[BLOCK_K, BLOCK_N]` tile of `Ŵᵀ` is read as int32 words, shifted and masked into unsigned
codes, and turned into `(u - z) · s` in the activation dtype. Nothing is written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import PackedWeight
from kernels.tuning import BlockConfig


@triton.jit
def dequant_tile(
    # Pointers (already offset to the expert, if any)
    q_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    # Tile coordinates
    k0,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    # Strides
    stride_qk,
    stride_qn,
    stride_hk,
    stride_hn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    # Meta-parameters
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):
    """`[BLOCK_K, BLOCK_N]` fp32 tile of `Ŵᵀ` (rows k = offs_k, columns n = offs_n); the caller
    casts it to the activation dtype for `tl.dot`.

    q_ptr: int32 [Kp·lo/32, N] whole codes per word (lo = 2 if BITS == 3 else BITS).
    qh_ptr: int32 [Kp/32, N] third bit plane (BITS == 3 only).
    s_ptr: [ng, N] scales; z_ptr: uint8 [ng, N] offset-binary zeros (HAS_ZERO only).
    GROUP: group size, a power of two; per-channel passes any power of two >= K.
    SCALE_PER_TILE: the tile lies in one group (GROUP % BLOCK_K == 0 or ng == 1): load one scale
        row `[BLOCK_N]` at group k0 // GROUP; otherwise one per k (BLOCK_K % GROUP == 0).
    """
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PACK: tl.constexpr = 32 // LO
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(
        q_ptr + (offs_k // PACK)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
        mask=mask,
        other=0,
    )
    u = (words >> ((offs_k % PACK) * LO)[:, None]) & ((1 << LO) - 1)
    if BITS == 3:
        hi = tl.load(
            qh_ptr + (offs_k // 32)[:, None] * stride_hk + offs_n[None, :] * stride_hn,
            mask=mask,
            other=0,
        )
        u = u | (((hi >> (offs_k % 32)[:, None]) & 1) << 2)
    if SCALE_PER_TILE:
        g = k0 // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
        s = s.to(tl.float32)[None, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0)
            z = z.to(tl.int32)[None, :]
        else:
            z = 1 << (BITS - 1)
    else:
        g2 = (offs_k // GROUP)[:, None]
        s = tl.load(s_ptr + g2 * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        s = s.to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g2 * stride_zg + offs_n[None, :] * stride_zn, mask=mask, other=0)
            z = z.to(tl.int32)
        else:
            z = 1 << (BITS - 1)
    return (u - z).to(tl.float32) * s


def weight_args(w: PackedWeight, cfg: BlockConfig) -> tuple[list[Tensor | int], dict[str, int]]:
    """Pointer/stride arguments and meta-parameters of `dequant_tile` for a PackedWeight.

    Returns `(args, meta)`: args = [q, qh, s, z, stride_qe, stride_qk, stride_qn, stride_he,
    stride_hk, stride_hn, stride_se, stride_sg, stride_sn, stride_ze, stride_zg, stride_zn]
    (expert strides 0 for a single weight; absent tensors replaced by `qweight`, strides 0),
    meta = {BITS, GROUP, SCALE_PER_TILE, HAS_ZERO}.
    """

    def strides(t: Tensor | None) -> list[int]:
        if t is None:
            return [0, 0, 0]
        s = list(t.stride())
        return s if t.ndim == 3 else [0, *s]

    q, qh, s, z = w.qweight, w.qweight_hi, w.scale, w.zero
    args: list[Tensor | int] = [q, q if qh is None else qh, s, q if z is None else z]
    args += strides(q) + strides(qh) + strides(s) + strides(z)
    per_channel = w.num_groups == 1
    group = triton.next_power_of_2(w.k) if per_channel else w.group_size
    if not per_channel and w.group_size & (w.group_size - 1):
        raise ValueError(f"group_size {w.group_size} must be a power of two (or per-channel)")
    meta = {
        "BITS": w.bits,
        "GROUP": group,
        "SCALE_PER_TILE": per_channel or group % cfg.block_k == 0,
        "HAS_ZERO": z is not None,
    }
    return args, meta


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton dtype of an activation dtype (fp16, bf16 or fp32)."""
    table = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
    if dtype not in table:
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {dtype}")
    return table[dtype]
