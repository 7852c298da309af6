"""In-register dequantization of one weight tile, shared by the dense and MoE kernels.

Owns the Triton side of `kernels.layout` (the torch side is `kernels.layout.dequantize`): a
`[BLOCK_K, BLOCK_N]` tile of `Ŵᵀ` is read as int32 words (each word once), unpacked in
registers into unsigned codes, and turned into `(u - z) · s` in the activation dtype. Nothing
is written to memory.
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
    # Tile coordinates and the logical K
    k0,
    offs_n,
    mask_n,
    K,
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
    HAS_ZERO: tl.constexpr,
    FP16_MATH: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """`[BLOCK_K, BLOCK_N]` tile of `Ŵᵀ` in DTYPE: rows k0 .. k0 + BLOCK_K, columns offs_n.

    q_ptr: int32 [Kp·lo/32, N] whole codes per word (lo = 2 if BITS == 3 else BITS).
    qh_ptr: int32 [Kp/32, N] third bit plane (BITS == 3 only).
    s_ptr: [ng, N] scales; z_ptr: uint8 [ng, N] offset-binary zeros (HAS_ZERO only).
    k0: a multiple of BLOCK_K; BLOCK_K and GROUP powers of two (per-channel: GROUP >= K),
    BLOCK_K >= 32 at 3 bits. Rows past Kp read as code 0 and groups past ng as scale 0.
    FP16_MATH: DTYPE and the scales are fp16, so `(u - z)·s` is done in fp16 (exact: one
    rounding, as the fp32 reference); otherwise in fp32 and rounded to DTYPE once.

    Each packed word is loaded once (`[BLOCK_K / per-word, BLOCK_N]`) and each scale/zero row
    once per group, then codes are unpacked in registers: `[words, slot, n]` reshaped to
    `[k, n]` (slot j of word w is k = w·per-word + j). Integer → float uses the exponent-bias
    trick (`u | 0x6400` is the fp16 bit pattern of 1024 + u; `u | 0x4B000000` the fp32 one of
    2^23 + u) so the bias folds into the zero point and no int→float conversion runs.
    """
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PACK: tl.constexpr = 32 // LO
    KW: tl.constexpr = BLOCK_K // PACK
    GT: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # codes per scale row in the tile
    NGT: tl.constexpr = BLOCK_K // GT
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    k32 = tl.cdiv(K, 32)  # 32-code blocks of the padded K
    offs_w = k0 // PACK + tl.arange(0, KW)
    words = tl.load(
        q_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
        mask=(offs_w < k32 * (32 // PACK))[:, None] & mask_n[None, :],
        other=0,
    )
    u = (words[:, None, :] >> (tl.arange(0, PACK) * LO)[None, :, None]) & ((1 << LO) - 1)
    if BITS == 3:
        offs_h = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        hi = tl.load(
            qh_ptr + offs_h[:, None] * stride_hk + offs_n[None, :] * stride_hn,
            mask=(offs_h < k32)[:, None] & mask_n[None, :],
            other=0,
        )
        # bit b of hi word h is k = 32·h + b = 16·(2h + b // 16) + b % 16: lo word 2h + b // 16
        hb = (hi[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
        u = u | (tl.reshape(hb, (KW, PACK, BLOCK_N)) << 2)
    u = tl.reshape(u, (NGT, GT, BLOCK_N))
    offs_g = k0 // GROUP + tl.arange(0, NGT)
    mask_g = (offs_g < tl.cdiv(K, GROUP))[:, None] & mask_n[None, :]
    s = tl.load(s_ptr + offs_g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                mask=mask_g, other=0.0)  # fmt: skip
    if HAS_ZERO:
        z = tl.load(z_ptr + offs_g[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                    mask=mask_g, other=0).to(tl.int32)  # fmt: skip
    else:
        z = tl.full((NGT, BLOCK_N), 1 << (BITS - 1), tl.int32)
    if FP16_MATH:
        f = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        zf = (z + 1024).to(tl.float16)
        w = (f - zf[:, None, :]) * s[:, None, :]
    else:
        f = (u | 0x4B000000).to(tl.float32, bitcast=True)
        zf = z.to(tl.float32) + 8388608.0
        w = ((f - zf[:, None, :]) * s.to(tl.float32)[:, None, :]).to(DTYPE)
    return tl.reshape(w, (BLOCK_K, BLOCK_N))


def weight_args(
    w: PackedWeight, cfg: BlockConfig, act_dtype: torch.dtype
) -> tuple[list[Tensor | int], dict[str, int | bool | str]]:
    """Pointer/stride arguments and meta-parameters of `dequant_tile` for a PackedWeight.

    Returns `(args, meta)`: args = [q, qh, s, z, stride_qe, stride_qk, stride_qn, stride_he,
    stride_hk, stride_hn, stride_se, stride_sg, stride_sn, stride_ze, stride_zg, stride_zn]
    (expert strides 0 for a single weight; absent tensors replaced by `qweight`, strides 0),
    meta = {BITS, GROUP, HAS_ZERO, FP16_MATH, DOT_PRECISION}. DOT_PRECISION is for the kernels'
    `tl.dot`: fp32 activations would run as tf32 (10-bit mantissas) on a GPU; "tf32x3" keeps
    them fp32-accurate on the tensor cores (a correctness path: tiles are sized for 16-bit).
    """

    def strides(t: Tensor | None) -> list[int]:
        if t is None:
            return [0, 0, 0]
        s = list(t.stride())
        return s if t.ndim == 3 else [0, *s]

    if w.bits == 3 and cfg.block_k < 32:
        raise ValueError(f"3-bit weights need block_k >= 32 (one third-bit word), got {cfg}")
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
        "HAS_ZERO": z is not None,
        "FP16_MATH": act_dtype == torch.float16 and s.dtype == torch.float16,
        "DOT_PRECISION": "tf32x3" if act_dtype == torch.float32 else "tf32",
    }
    return args, meta
