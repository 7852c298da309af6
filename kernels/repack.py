"""Load-time conversion from the on-disk format to the kernel layout (`kernels.layout`).

Owns reading compressed-tensors `pack-quantized` tensors (docs/design.md §Weight formats: a
dense little-endian bitstream per row, 3-bit codes straddling words; zero points packed along N)
without importing `veq`, and re-laying them out as a `PackedWeight`. Writing the disk format is
`veq.format`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kernels.layout import PackedWeight, pack_codes


def unpack_bitstream(packed: Tensor, bits: int, length: int) -> Tensor:
    """Dense bitstream words → unsigned codes.

    Args:
        packed: int32 [R, W], element i of a row at bits [i·b, (i+1)·b) of the row's stream.
        bits: 1..8.
        length: codes per row (W == ceil(length·b/32)).

    Returns:
        int32 [R, length] unsigned codes in [0, 2^b).
    """
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"expected int32 [R, W] words, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != -(-length * bits // 32):
        raise ValueError(f"{packed.shape[1]} words cannot hold {length} {bits}-bit codes")
    words = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    start = torch.arange(length, device=packed.device) * bits
    word, shift = start // 32, start % 32
    v = (words[:, word] >> shift) | (words[:, word + 1] << (32 - shift))
    return (v & ((1 << bits) - 1)).to(torch.int32)


def from_codes(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> PackedWeight:
    """Signed codes `[(E,) N, K]`, scales/zeros `[(E,) N, ng]` → PackedWeight (see `pack_codes`)."""
    return pack_codes(codes, scale, zero, bits)


def from_compressed(tensors: Mapping[str, Tensor], bits: int) -> PackedWeight:
    """One Linear's compressed-tensors tensors → PackedWeight.

    Args:
        tensors: `weight_packed` int32 [N, ceil(K·b/32)], `weight_scale` [N, ng] 16-bit,
            `weight_shape` int64 [2] = (N, K), and `weight_zero_point` int32 [ceil(N·b/32), ng]
            (packed along N) when asymmetric; symmetry is read from its presence.
        bits: 2, 3, 4 or 8.
    """
    missing = {"weight_packed", "weight_scale", "weight_shape"} - tensors.keys()
    if missing:
        raise ValueError(f"packed weight is missing {sorted(missing)}")
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    scale = tensors["weight_scale"]
    if scale.ndim != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"weight_scale {tuple(scale.shape)} does not fit weight {(n, k)}")
    offset = 1 << (bits - 1)
    codes = unpack_bitstream(tensors["weight_packed"], bits, k) - offset
    zero = None
    if "weight_zero_point" in tensors:
        zp = tensors["weight_zero_point"]  # [ceil(N·b/32), ng], packed along N
        zero = unpack_bitstream(zp.t().contiguous(), bits, n).t() - offset
    return pack_codes(codes, scale, zero, bits)
