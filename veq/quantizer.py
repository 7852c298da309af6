"""Group-wise integer quantization of weight matrices.

Owns the arithmetic of one quantized weight: choosing scales and zero points, rounding to codes,
and dequantizing. Codes follow compressed-tensors: signed integers in [-2^(b-1), 2^(b-1)-1],
`w_hat = (q - z) * s`, asymmetric z an integer in the same range, symmetric z = 0. Packing the
codes into words is `veq.format.pack`'s job; choosing *better* codes than rounding is the solvers'.

Shape legend: N out-features (rows), K in-features (columns), G group size, ng = K / G groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from veq.config import QuantConfig


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a weight of shape [N, K], got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; fix the checkpoint before quantizing")


def compute_qparams(
    w: Tensor, cfg: QuantConfig, clip_ratio: Tensor | float | None = None
) -> tuple[Tensor, Tensor | None]:
    """Min/max scales and zero points per (row, group).

    Args:
        w: [N, K] float weight.
        cfg: bits, group size and symmetry.
        clip_ratio: optional shrink of the range, scalar or [N, ng] in (0, 1] (AWQ's clip search).

    Returns:
        scale: [N, ng] in `cfg.scale_dtype`, always positive.
        zero: [N, ng] int8 signed zero points, or None when symmetric.
    """
    _check_weight(w)
    n, k = w.shape
    g = cfg.group_for(k)
    wg = w.detach().float().reshape(n, k // g, g)
    # Zero must be representable (compressed-tensors and GPTQ both widen the range to include 0).
    wmin = wg.amin(dim=-1).clamp(max=0)
    wmax = wg.amax(dim=-1).clamp(min=0)
    if clip_ratio is not None:
        wmin = wmin * clip_ratio
        wmax = wmax * clip_ratio
    if cfg.symmetric:
        scale = _store_scale(torch.maximum(-wmin, wmax) / ((cfg.qmax - cfg.qmin) / 2), cfg)
        return scale, None
    scale = _store_scale((wmax - wmin) / (cfg.qmax - cfg.qmin), cfg)
    zero = torch.round(cfg.qmin - wmin / scale.float()).clamp(cfg.qmin, cfg.qmax)
    return scale, zero.to(torch.int8)


def _store_scale(scale: Tensor, cfg: QuantConfig) -> Tensor:
    """Cast fp32 scales to the storage dtype, rounding *up* so the grid still spans the range
    (rounding down would clip the extreme weights by up to 2^(b-1) fp16 ulps: a visible error at
    8 bits). Degenerate (all-zero) groups get the smallest normal scale."""
    sdt = cfg.torch_scale_dtype
    scale = scale.clamp(min=torch.finfo(sdt).smallest_normal)
    stored = scale.to(sdt)
    return torch.where(
        stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored
    )


def quantize(w: Tensor, scale: Tensor, zero: Tensor | None, cfg: QuantConfig) -> Tensor:
    """Round `w: [N, K]` to signed int8 codes `[N, K]` against `scale/zero: [N, ng]`."""
    n, k = w.shape
    ng = scale.shape[-1]
    wg = w.detach().float().reshape(n, ng, k // ng)
    q = wg / scale.float().unsqueeze(-1)
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    q = torch.round(q).clamp(cfg.qmin, cfg.qmax)
    return q.reshape(n, k).to(torch.int8)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """`(q - z) * s` for `codes: int8 [N, K]`, `scale/zero: [N, ng]` → `[N, K]` in `dtype`.

    Computed in fp32, where `(q - z) * s` is exact for 16-bit scales, then cast: the result equals
    compressed-tensors' dequantization in the scale dtype bit for bit.
    """
    n, k = codes.shape
    ng = scale.shape[-1]
    q = codes.float().reshape(n, ng, k // ng)
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    return (q * scale.float().unsqueeze(-1)).reshape(n, k).to(dtype)


def fake_quantize(w: Tensor, cfg: QuantConfig, clip_ratio: Tensor | float | None = None) -> Tensor:
    """Round-trip `w: [N, K]` through RTN quantization; returns fp32 `[N, K]`."""
    scale, zero = compute_qparams(w, cfg, clip_ratio)
    return dequantize(quantize(w, scale, zero, cfg), scale, zero)


def best_clip(
    weight: Tensor,
    cfg: QuantConfig,
    group_error: Callable[[int, Tensor, Tensor], Tensor],
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 256,
) -> Tensor:
    """Per-(row, group) range shrink, from the grid 1, 1 − 1/grid, … above 1 − max_shrink, that
    minimises `group_error(r0, w, wq)`: the error of rows `r0 : r0 + len(w)` of `weight`,
    `w: [n, K]` fp32, quantized to `wq: [n, K]` fp32, as `[n, ng]` (lower is better).

    Returns:
        [N, ng] fp32 clip ratios for `compute_qparams(clip_ratio=...)`.
    """
    n, k = weight.shape
    ng = k // cfg.group_for(k)
    ratios = [1.0 - i / grid for i in range(int(max_shrink * grid))]
    best_ratio = torch.ones(n, ng, device=weight.device)
    for r0 in range(0, n, rows_per_chunk):
        w = weight[r0 : r0 + rows_per_chunk].float()
        best_err = torch.full((w.shape[0], ng), float("inf"), device=w.device)
        for ratio in ratios:
            err = group_error(r0, w, fake_quantize(w, cfg, clip_ratio=ratio))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0 : r0 + rows_per_chunk][better] = ratio
    return best_ratio


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight matrix, unpacked.

    codes: int8 [N, K] signed codes in [cfg.qmin, cfg.qmax].
    scale: [N, ng] in cfg.scale_dtype.
    zero:  int8 [N, ng] signed zero points, or None when symmetric.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    cfg: QuantConfig

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.codes.to(device),
            self.scale.to(device),
            None if self.zero is None else self.zero.to(device),
            self.cfg,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def group_size(self) -> int:
        return self.shape[1] // int(self.scale.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`[N, K]` weights in `dtype`."""
        return dequantize(self.codes, self.scale, self.zero, dtype)


def quantize_weight(
    w: Tensor, cfg: QuantConfig, clip_ratio: Tensor | float | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of `w: [N, K]` with min/max scales."""
    scale, zero = compute_qparams(w, cfg, clip_ratio)
    return QuantizedWeight(quantize(w, scale, zero, cfg), scale, zero, cfg)
