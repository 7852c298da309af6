"""Dense int32 bit-packing of quantized codes, as compressed-tensors `pack-quantized` stores them.

Owns the bit layout and nothing else: codes in, words out, and back. The layout (compressed-
tensors >= 0.18): codes are shifted to offset-binary `q + 2^(b-1)`, then laid end to end as one
little-endian bitstream per row, element i occupying bits [i·b, (i+1)·b). 32 consecutive codes
fill exactly b words, so 3-bit codes straddle word boundaries. A row of C codes takes
ceil(C·b/32) words. Weights pack along K (`weight_packed [N, ceil(K·b/32)]`); asymmetric zero
points pack along N (`weight_zero_point [ceil(N·b/32), K/G]`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight

_MASK32 = (1 << 32) - 1


def _words(length: int, bits: int) -> int:
    return math.ceil(length * bits / 32)


def pack_int32(codes: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Pack signed codes along `dim` into int32 words.

    Args:
        codes: int8 (or any integer) tensor of signed codes in [-2^(b-1), 2^(b-1)-1].
        bits: 1..8.
        dim: the dimension to pack; its length C becomes ceil(C·b/32).

    Returns:
        int32 tensor, same shape as `codes` except `dim`.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if codes.is_floating_point():
        raise ValueError(f"expected integer codes, got {codes.dtype}")
    offset = 1 << (bits - 1)
    u = codes.to(torch.int64) + offset
    if u.numel() and (u.min() < 0 or u.max() >= (1 << bits)):
        raise ValueError(f"codes out of the signed {bits}-bit range")
    u = u.movedim(dim, -1)
    lead, length = u.shape[:-1], u.shape[-1]
    rows = u.reshape(-1, length)
    chunks = math.ceil(length / 32)
    rows = F.pad(rows, (0, chunks * 32 - length)).reshape(-1, chunks, 32)
    out = torch.zeros(rows.shape[0], chunks, bits, dtype=torch.int64, device=codes.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        out[:, :, word] |= (rows[:, :, i] << shift) & _MASK32
        if shift + bits > 32:
            out[:, :, word + 1] |= rows[:, :, i] >> (32 - shift)
    out = out.reshape(-1, chunks * bits)[:, : _words(length, bits)]
    # Reinterpret the unsigned 32-bit words as two's-complement int32.
    out = torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)
    return out.reshape(*lead, out.shape[-1]).movedim(-1, dim)


def unpack_int32(packed: Tensor, bits: int, length: int, dim: int = -1) -> Tensor:
    """Inverse of `pack_int32`: int32 words along `dim` → int8 signed codes of `length` there."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if packed.dtype != torch.int32:
        raise ValueError(f"expected int32 words, got {packed.dtype}")
    p = packed.movedim(dim, -1)
    lead, words = p.shape[:-1], p.shape[-1]
    if words != _words(length, bits):
        raise ValueError(
            f"{words} words cannot hold {length} {bits}-bit codes (expected {_words(length, bits)})"
        )
    chunks = math.ceil(length / 32)
    rows = p.reshape(-1, words).to(torch.int64) & _MASK32
    rows = F.pad(rows, (0, chunks * bits - words)).reshape(-1, chunks, bits)
    out = torch.empty(rows.shape[0], chunks, 32, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        v = rows[:, :, word] >> shift
        if shift + bits > 32:
            v = v | (rows[:, :, word + 1] << (32 - shift))
        out[:, :, i] = v & mask
    out = out.reshape(-1, chunks * 32)[:, :length] - (1 << (bits - 1))
    return out.to(torch.int8).reshape(*lead, length).movedim(-1, dim)


def pack_weight(qw: QuantizedWeight) -> dict[str, Tensor]:
    """The compressed-tensors tensors of one Linear (names without the module prefix).

    Returns:
        weight_packed: int32 [N, ceil(K·b/32)], packed along K.
        weight_scale: [N, ng] 16-bit.
        weight_zero_point: int32 [ceil(N·b/32), ng], packed along N (asymmetric only).
        weight_shape: int64 [2] = (N, K).
    """
    bits = qw.cfg.bits
    out = {
        "weight_packed": pack_int32(qw.codes, bits, dim=1),
        "weight_scale": qw.scale.contiguous(),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.zero is not None:
        out["weight_zero_point"] = pack_int32(qw.zero, bits, dim=0).contiguous()
    return out


def unpack_weight(tensors: dict[str, Tensor], cfg: QuantConfig) -> QuantizedWeight:
    """Inverse of `pack_weight`; checks every shape against `weight_shape` and `cfg`."""
    missing = {"weight_packed", "weight_scale", "weight_shape"} - tensors.keys()
    if not cfg.symmetric and "weight_zero_point" not in tensors:
        missing.add("weight_zero_point")
    if missing:
        raise ValueError(f"packed weight is missing {sorted(missing)}")
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    ng = k // cfg.group_for(k)
    scale = tensors["weight_scale"]
    if tuple(scale.shape) != (n, ng):
        raise ValueError(f"weight_scale has shape {tuple(scale.shape)}, expected {(n, ng)}")
    codes = unpack_int32(tensors["weight_packed"], cfg.bits, k, dim=1)
    zero = None
    if not cfg.symmetric:
        zero = unpack_int32(tensors["weight_zero_point"], cfg.bits, n, dim=0)
        if tuple(zero.shape) != (n, ng):
            raise ValueError(
                f"weight_zero_point unpacks to {tuple(zero.shape)}, expected {(n, ng)}"
            )
    return QuantizedWeight(codes, scale, zero, cfg)


def packed_nbytes(n: int, k: int, cfg: QuantConfig) -> int:
    """Bytes of `pack_weight`'s tensors for an `[N, K]` weight: the formula the tests hold it to."""
    ng = k // cfg.group_for(k)
    scale_bytes = torch.finfo(cfg.torch_scale_dtype).bits // 8
    total = 4 * n * _words(k, cfg.bits) + scale_bytes * n * ng + 8 * 2
    if not cfg.symmetric:
        total += 4 * _words(n, cfg.bits) * ng
    return total
