"""The kernel-side storage layout of a low-bit weight, and its torch pack/unpack/dequantize.

Owns `PackedWeight` and the bit layout the Triton kernels read. It deliberately knows nothing of
the on-disk format (that is `kernels.repack`) nor of how codes were chosen (that is `veq`).

Layout (for one `[N, K]` weight; stacked experts add a leading `E` dimension everywhere):

- K is padded to `Kp = ceil(K / 32) · 32` (pad codes are 0; the kernels mask x there).
- Codes are unsigned offset-binary, `u = q + 2^(b-1)` in `[0, 2^b)` (compressed-tensors' stored
  form), packed **along K into int32 words that each hold whole codes**, transposed so that N is
  the contiguous dimension (GPTQ's `[K/pack, N]` orientation: neighbouring threads of a tile read
  neighbouring words):
    - b = 2, 4, 8: `qweight: int32 [Kp·b/32, N]`; word w, slot j (bits `[j·b, (j+1)·b)`) holds
      k = w·(32/b) + j.
    - b = 3: two bit planes, so no code straddles a word: `qweight: int32 [Kp/16, N]` holds the
      low 2 bits of each code as for b = 2, `qweight_hi: int32 [Kp/32, N]` the third bit, bit j
      of word w for k = 32·w + j. `u = lo | hi << 2`.
- `scale: [ng, N]` in the scale dtype (fp16/bf16), unchanged values, transposed.
- `zero: uint8 [ng, N]` offset-binary zero points `z + 2^(b-1)`, or None when symmetric
  (the kernels then subtract the constant `2^(b-1)`).
- Per-channel (one group per row) is `group_size = K`, `ng = 1`.

Bytes for an `[N, K]` weight (K a multiple of 32): codes exactly `N·K·b/8` for every b (3-bit
included: 2 + 1 bit planes), scales `2·N·ng`, zeros `N·ng` when asymmetric. Versus disk
(`veq.format.packed_nbytes`), only the zero points differ: one byte each here, b bits there,
plus the 16-byte `weight_shape`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)


def lo_bits(bits: int) -> int:
    """Bits per code in the main `qweight` plane (2 for b = 3, else b)."""
    return 2 if bits == 3 else bits


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 32 (the largest codes-per-word)."""
    return -(-k // 32) * 32


@dataclass(frozen=True)
class PackedWeight:
    """One low-bit weight `[N, K]` (or `E` stacked experts) in the kernel layout (module doc).

    qweight:    int32 [(E,) Kp·lo/32, N], lo = 2 for b = 3 else b; whole codes per word.
    qweight_hi: int32 [(E,) Kp/32, N], the third bit of 3-bit codes; None otherwise.
    scale:      fp16/bf16 [(E,) ng, N].
    zero:       uint8 [(E,) ng, N] offset-binary, or None (symmetric).
    bits, group_size (K when per-channel), n, k: the logical weight.
    """

    qweight: Tensor
    qweight_hi: Tensor | None
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int
    n: int
    k: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.k % self.group_size:
            raise ValueError(f"K={self.k} is not a multiple of group_size={self.group_size}")
        lead = tuple(self.qweight.shape[:-2])
        words = padded_k(self.k) * lo_bits(self.bits) // 32
        expect = {
            "qweight": (self.qweight, (*lead, words, self.n), torch.int32),
            "scale": (self.scale, (*lead, self.num_groups, self.n), None),
        }
        if self.bits == 3:
            if self.qweight_hi is None:
                raise ValueError("3-bit weights need qweight_hi (the third bit plane)")
            expect["qweight_hi"] = (
                self.qweight_hi,
                (*lead, padded_k(self.k) // 32, self.n),
                torch.int32,
            )
        elif self.qweight_hi is not None:
            raise ValueError(f"qweight_hi is only for 3-bit weights, got bits={self.bits}")
        if self.zero is not None:
            expect["zero"] = (self.zero, (*lead, self.num_groups, self.n), torch.uint8)
        for name, (t, shape, dtype) in expect.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
        if self.scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"scale must be a float tensor, got {self.scale.dtype}")

    @property
    def num_groups(self) -> int:
        return self.k // self.group_size

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def num_experts(self) -> int | None:
        """E for stacked experts, None for a single weight."""
        return int(self.qweight.shape[0]) if self.qweight.ndim == 3 else None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (absent ones omitted)."""
        out = {"qweight": self.qweight, "scale": self.scale}
        if self.qweight_hi is not None:
            out["qweight_hi"] = self.qweight_hi
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    def nbytes(self) -> int:
        """Bytes actually held by the tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def expert(self, e: int) -> PackedWeight:
        """Expert `e` of a stacked weight, as a single `[N, K]` PackedWeight (views)."""
        if self.num_experts is None:
            raise ValueError("not a stacked expert weight")
        return replace(
            self,
            qweight=self.qweight[e],
            qweight_hi=None if self.qweight_hi is None else self.qweight_hi[e],
            scale=self.scale[e],
            zero=None if self.zero is None else self.zero[e],
        )

    def select(self, experts: Tensor) -> PackedWeight:
        """Experts `experts` (int64 `[S]` local indices) of a stacked weight, stacked `[S, ...]`."""
        if self.num_experts is None:
            raise ValueError("not a stacked expert weight")
        return replace(
            self,
            qweight=self.qweight.index_select(0, experts),
            qweight_hi=None
            if self.qweight_hi is None
            else self.qweight_hi.index_select(0, experts),
            scale=self.scale.index_select(0, experts),
            zero=None if self.zero is None else self.zero.index_select(0, experts),
        )

    def to(self, device: torch.device | str) -> PackedWeight:
        return replace(
            self,
            qweight=self.qweight.to(device),
            qweight_hi=None if self.qweight_hi is None else self.qweight_hi.to(device),
            scale=self.scale.to(device),
            zero=None if self.zero is None else self.zero.to(device),
        )


def kernel_nbytes(
    n: int, k: int, bits: int, group_size: int | None, symmetric: bool, scale_bytes: int = 2
) -> int:
    """Bytes of one `[N, K]` PackedWeight: the formula tests hold modules to.

    `N·Kp·b/8 + scale_bytes·N·ng (+ N·ng zero bytes when asymmetric)`, Kp = K padded to 32.
    """
    ng = 1 if group_size is None else k // group_size
    total = n * padded_k(k) * bits // 8 + scale_bytes * n * ng
    return total if symmetric else total + n * ng


def _pack_plane(u: Tensor, bits: int) -> Tensor:
    """Unsigned `[..., Kp, N]` values < 2^bits → int32 `[..., Kp·bits/32, N]`, whole codes."""
    per = 32 // bits
    *lead, kp, n = u.shape
    v = u.to(torch.int64).reshape(*lead, kp // per, per, n)
    shifts = (torch.arange(per, device=u.device, dtype=torch.int64) * bits).view(per, 1)
    words = (v << shifts).sum(dim=-2)  # disjoint bit fields: sum == bitwise or
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack_plane(words: Tensor, bits: int) -> Tensor:
    """Inverse of `_pack_plane`: int32 `[..., W, N]` → int32 `[..., W·32/bits, N]`."""
    per = 32 // bits
    *lead, w, n = words.shape
    out = torch.empty(*lead, w, per, n, dtype=torch.int32, device=words.device)
    # All slots in one broadcast op written in place: a per-slot loop is 16–32 ops per weight,
    # which dominates a CPU decode step of a small model.
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    torch.bitwise_right_shift(words.unsqueeze(-2), shifts[:, None], out=out)
    out &= (1 << bits) - 1
    return out.reshape(*lead, w * per, n)


def pack_codes(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
) -> PackedWeight:
    """Pack signed codes into the kernel layout.

    Args:
        codes: integer [(E,) N, K] signed codes in [-2^(b-1), 2^(b-1)-1].
        scale: [(E,) N, ng] fp16/bf16 (ng = 1 means per-channel).
        zero:  integer [(E,) N, ng] signed zero points, or None (symmetric).
        bits:  2, 3, 4 or 8.

    Returns:
        The PackedWeight (on `codes.device`); values are copied, never changed.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if codes.is_floating_point():
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    *lead, n, k = codes.shape
    ng = int(scale.shape[-1])
    if tuple(scale.shape) != (*lead, n, ng) or k % ng:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit codes {tuple(codes.shape)}")
    offset = 1 << (bits - 1)
    u = codes.to(torch.int32) + offset
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ValueError(f"codes out of the signed {bits}-bit range")
    kp = padded_k(k)
    ut = torch.zeros(*lead, kp, n, dtype=torch.int32, device=codes.device)
    ut[..., :k, :] = u.transpose(-1, -2)
    if bits == 3:
        qweight, qweight_hi = _pack_plane(ut & 3, 2), _pack_plane(ut >> 2, 1)
    else:
        qweight, qweight_hi = _pack_plane(ut, bits), None
    zero_u = None
    if zero is not None:
        if tuple(zero.shape) != tuple(scale.shape):
            raise ValueError(f"zero {tuple(zero.shape)} does not match scale {tuple(scale.shape)}")
        zu = zero.to(torch.int32) + offset
        if zu.numel() and (int(zu.min()) < 0 or int(zu.max()) >= 1 << bits):
            raise ValueError(f"zero points out of the signed {bits}-bit range")
        zero_u = zu.transpose(-1, -2).to(torch.uint8).contiguous()
    return PackedWeight(
        qweight=qweight.contiguous(),
        qweight_hi=None if qweight_hi is None else qweight_hi.contiguous(),
        scale=scale.transpose(-1, -2).contiguous(),
        zero=zero_u,
        bits=bits,
        group_size=k // ng,
        n=n,
        k=k,
    )


def unpack_codes(w: PackedWeight) -> Tensor:
    """Unsigned codes `int32 [(E,) K, N]` (offset-binary, K unpadded) of a PackedWeight."""
    if w.bits == 3:
        assert w.qweight_hi is not None
        u = _unpack_plane(w.qweight, 2)
        u |= _unpack_plane(w.qweight_hi, 1) << 2
    else:
        u = _unpack_plane(w.qweight, w.bits)
    return u[..., : w.k, :]


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """`(u - z_u) · s` as `[(E,) N, K]` in `dtype` (nn.Linear orientation), computed in fp32.

    Bit-identical to `veq.quantizer.dequantize` of the codes this was packed from. The result
    is a transposed view of a contiguous `[(E,) K, N]` tensor (so `x @ result.T` reads it as is).
    """
    u = unpack_codes(w)  # [(E,) K, N]
    *lead, k, n = u.shape
    q = u.to(torch.float32).reshape(*lead, w.num_groups, w.group_size, n)
    if w.zero is None:
        q -= float(1 << (w.bits - 1))
    else:
        q -= w.zero.unsqueeze(-2)
    q *= w.scale.unsqueeze(-2)
    return q.reshape(*lead, k, n).transpose(-1, -2).to(dtype)


def stack_experts(weights: list[PackedWeight]) -> PackedWeight:
    """Stack single `[N, K]` PackedWeights of equal shape/bits/group/symmetry into `[E, ...]`."""
    if not weights:
        raise ValueError("need at least one expert weight")
    first = weights[0]
    for i, w in enumerate(weights):
        same = (w.bits, w.group_size, w.n, w.k, w.symmetric, w.scale.dtype) == (
            first.bits,
            first.group_size,
            first.n,
            first.k,
            first.symmetric,
            first.scale.dtype,
        )
        if not same or w.num_experts is not None:
            raise ValueError(
                f"expert {i} differs from expert 0 in shape, bits, group size, symmetry or scale "
                "dtype; stack only experts quantized alike (group them by bits first)"
            )
    return replace(
        first,
        qweight=torch.stack([w.qweight for w in weights]),
        qweight_hi=None
        if first.qweight_hi is None
        else torch.stack(
            [w.qweight_hi for w in weights]  # type: ignore[misc]
        ),
        scale=torch.stack([w.scale for w in weights]),
        zero=None if first.zero is None else torch.stack([w.zero for w in weights]),  # type: ignore[misc]
    )
