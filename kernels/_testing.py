"""Random low-bit weights, routings and error metrics for kernel tests and the benchmark.

Owns synthetic data at the `kernels` level (plain tensors; no `veq`, no pydantic, so the bench
runs on the bare GPU image). Everything is deterministic from a seed and never all-zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.layout import PackedWeight, pack_codes


def random_packed(
    n: int,
    k: int,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    experts: int | None = None,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> PackedWeight:
    """A random `[(E,) N, K]` PackedWeight with LLM-like magnitudes (|ŵ| ~ 0.05).

    Codes are uniform over the full signed range, zero points uniform too (asymmetric), and
    scales `~0.05 / 2^(b-1)` with ±50 % spread, so dequantized weights are O(0.05).
    """
    g = torch.Generator().manual_seed(seed)
    lead = () if experts is None else (experts,)
    ng = 1 if group_size is None else k // group_size
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (*lead, n, k), generator=g, dtype=torch.int32)
    zero = None
    if not symmetric:
        # Zeros near the middle of the range, as min/max quantization of roughly centred
        # weights gives; extreme zeros would make |ŵ| ~ 2× larger and are still exercised.
        zero = torch.randint(-half, half, (*lead, n, ng), generator=g, dtype=torch.int32)
    spread = 0.5 + torch.rand((*lead, n, ng), generator=g)
    scale = (0.05 / half * spread).to(scale_dtype)
    return pack_codes(codes, scale, zero, bits).to(device)


def random_routing(
    t: int, k: int, num_experts: int, seed: int = 0, skip: tuple[int, ...] = ()
) -> tuple[Tensor, Tensor]:
    """Top-k routing `(topk_ids int64 [T, k], topk_weights fp32 [T, k])`.

    Each token picks k distinct experts, never one of `skip` (experts that get no tokens);
    weights are a softmax over random logits, renormalised over the k picks.
    """
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip], dtype=torch.int64)
    if k > allowed.numel():
        raise ValueError(f"cannot pick {k} distinct experts out of {allowed.numel()}")
    scores = torch.rand(t, allowed.numel(), generator=g)
    ids = allowed[scores.topk(k, dim=-1).indices]
    w = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return ids, w


def random_activations(
    t: int, h: int, seed: int = 0, dtype: torch.dtype = torch.float16, device: str = "cpu"
) -> Tensor:
    """`[T, H]` activations ~N(0, 1) with uneven channel magnitudes (0.3..2), never zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * torch.empty(h).uniform_(0.3, 2.0, generator=g)
    return x.to(dtype).to(device)


def rel_errors(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """(max |out − ref| / max |ref|, ‖out − ref‖₂ / ‖ref‖₂), computed in fp32."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0, 0.0
    d = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().clamp(min=1e-12)
    rms = d.norm() / ref.float().norm().clamp(min=1e-12)
    return float(d.max() / scale), float(rms)


#: (max relative, RMS relative) tolerances of a Triton kernel against the fp32 reference, per
#: activation dtype. fp16: weights and the MoE intermediate are rounded to fp16 (2^-11 relative)
#: before fp32-accumulated dots; bf16 has 8 bits of mantissa (2^-8), so 8× looser.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-3, 2e-3),
    torch.bfloat16: (4e-2, 1.6e-2),
}


def assert_close(out: Tensor, ref: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Fail with both error figures when `out` is outside `TOLERANCES[dtype]` of `ref`."""
    max_tol, rms_tol = TOLERANCES[dtype]
    mx, rms = rel_errors(out, ref)
    if not (mx <= max_tol and rms <= rms_tol) or not torch.isfinite(out).all():
        raise AssertionError(
            f"{what}: max rel err {mx:.2e} (tol {max_tol:.0e}), rms rel err {rms:.2e} "
            f"(tol {rms_tol:.0e}), finite={bool(torch.isfinite(out).all())}"
        )


def random_packed_words(
    n: int,
    k: int,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    experts: int | None = None,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> PackedWeight:
    """Like `random_packed` but drawn directly in the kernel layout, on `device` (fast at full
    model sizes: every bit pattern of a word is a valid set of codes, so random words are
    uniform random codes). Padding codes of K not a multiple of 32 are random too (harmless)."""
    g = torch.Generator(device=device).manual_seed(seed)
    lead = () if experts is None else (experts,)
    ng = 1 if group_size is None else k // group_size
    kp = -(-k // 32) * 32
    lo = 2 if bits == 3 else bits
    i32 = torch.iinfo(torch.int32)

    def words(rows: int) -> Tensor:
        return torch.randint(i32.min, i32.max, (*lead, rows, n), generator=g, device=device,
                             dtype=torch.int32)  # fmt: skip

    half = 1 << (bits - 1)
    spread = 0.5 + torch.rand((*lead, ng, n), generator=g, device=device)
    zero = None
    if not symmetric:
        zero = torch.randint(0, 1 << bits, (*lead, ng, n), generator=g, device=device)
        zero = zero.to(torch.uint8)
    return PackedWeight(
        qweight=words(kp * lo // 32),
        qweight_hi=words(kp // 32) if bits == 3 else None,
        scale=(0.05 / half * spread).to(scale_dtype),
        zero=zero,
        bits=bits,
        group_size=group_size or k,
        n=n,
        k=k,
    )
