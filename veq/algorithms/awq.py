"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then round-to-nearest.

Weights whose input channels carry large activations are scaled up before rounding, so they
lose less relative precision; the previous operation (an RMSNorm, or the linear before) divides
its output by the same scales so the layer's function is unchanged. The scale is
`s = mean|x|^α`, normalised to a geometric mean of one, with α picked on a grid by the
(optionally token-weighted) error of the inspected outputs. An optional clip search then shrinks
each group's range.

Pure functions: folding `1/s` into the previous operation is the pipeline's job.

Shape legend: T tokens, N out-features, K in-features, G group size, ng = K / G.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight, best_clip, fake_quantize, quantize_weight
from veq.stats import ActivationStats


@dataclass(frozen=True)
class AWQResult:
    """Quantized weights of `W_i · diag(s)` and the scales `s` the inputs must be divided by.

    qweights: one per input linear, each of a scaled `[N_i, K]` weight.
    scales: [K] fp32, geometric mean one.
    ratio: the chosen exponent α (0 means no scaling was better).
    """

    qweights: list[QuantizedWeight]
    scales: Tensor
    ratio: float

    def effective_weight(self, i: int = 0) -> Tensor:
        """`[N, K]` fp32 weight the layer effectively applies to *unscaled* inputs: `Ŵ_s / s`."""
        return self.qweights[i].dequantize() / self.scales


def candidate_scales(act_mean: Tensor, ratio: float) -> Tensor:
    """`mean|x|^α`, clamped away from zero and normalised to geometric mean one: `[K]` fp32."""
    s = act_mean.float().clamp(min=1e-4).pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(
    act_mean: Tensor, loss: Callable[[Tensor], float], grid: int = 20
) -> tuple[Tensor, float]:
    """Pick α ∈ {0, 1/grid, …, (grid-1)/grid} minimising `loss(s)`; α = 0 is plain RTN.

    Returns the best `[K]` scales and α.
    """
    best: tuple[float, Tensor, float] | None = None
    for i in range(grid):
        ratio = i / grid
        s = candidate_scales(act_mean, ratio)
        value = loss(s)
        if best is None or value < best[0]:
            best = (value, s, ratio)
    assert best is not None
    return best[1], best[2]


def weighted_mse(out: Tensor, ref: Tensor, token_weights: Tensor | None) -> float:
    """Token-weighted mean over tokens of the squared error summed over features."""
    err = (out - ref).pow(2).sum(-1)
    if token_weights is None:
        return float(err.mean())
    return float((err * token_weights).sum() / token_weights.sum())


def search_clip(
    weight: Tensor,
    x: Tensor,
    cfg: QuantConfig,
    *,
    token_weights: Tensor | None = None,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    rows_per_chunk: int = 256,
) -> Tensor:
    """Per-(row, group) range shrink minimising the group's output error `Σ_t c_t (x_tg·Δw_g)²`.

    Args:
        weight: [N, K] (already scaled) weight.
        x: [T, K] its (already scaled) inputs; at most `max_tokens` evenly spaced ones are used.
        token_weights: optional [T] non-negative weights.

    Returns:
        [N, ng] fp32 clip ratios in (1 - max_shrink, 1].
    """
    k = weight.shape[1]
    g = cfg.group_for(k)
    ng = k // g
    stride = max(1, x.shape[0] // max_tokens)
    xs = x[::stride].float()
    c = token_weights[::stride].float() if token_weights is not None else None
    xg = xs.reshape(-1, ng, g)

    def output_error(r0: int, w: Tensor, wq: Tensor) -> Tensor:
        delta = (wq - w).reshape(-1, ng, g)
        err = torch.einsum("tgk,ngk->tng", xg, delta).pow(2)
        return (err * c[:, None, None]).sum(0) if c is not None else err.sum(0)

    return best_clip(
        weight, cfg, output_error, grid=grid, max_shrink=max_shrink, rows_per_chunk=rows_per_chunk
    )


def awq_scales(
    weights: Sequence[Tensor],
    x: Tensor,
    cfg: QuantConfig,
    *,
    token_weights: Tensor | None = None,
    act_mean: Tensor | None = None,
    grid: int = 20,
) -> tuple[Tensor, float]:
    """The AWQ scale `[K]` shared by linears `[N_i, K]` reading `x: [T, K]`, and its exponent α.

    Args:
        token_weights: optional [T] weights c_t of each token in the loss (MBQ, VEQ).
        act_mean: optional [K] mean |x| over the full calibration set; computed from `x`
            (weighted) when omitted.
    """
    if not weights:
        raise ValueError("awq needs at least one weight")
    k = x.shape[-1]
    x = x.reshape(-1, k).float()
    ws = [w.detach().float() for w in weights]
    for w in ws:
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"weight {tuple(w.shape)} does not take {k} input features")
    c = token_weights.reshape(-1).float() if token_weights is not None else None
    if act_mean is None:
        stats = ActivationStats(k, device=x.device)
        stats.add(x, c)
        act_mean = stats.mean_abs()
    refs = [x @ w.T for w in ws]

    def loss(s: Tensor) -> float:
        return sum(
            weighted_mse(x @ (fake_quantize(w * s, cfg) / s).T, ref, c)
            for w, ref in zip(ws, refs, strict=True)
        )

    return search_scale(act_mean, loss, grid)


def awq_quantize(
    weight: Tensor,
    x: Tensor | None,
    cfg: QuantConfig,
    *,
    token_weights: Tensor | None = None,
    clip: bool = True,
) -> QuantizedWeight:
    """Round-to-nearest of an (already scaled) `weight: [N, K]`, after the clip search on its
    (already scaled) inputs `x: [T, K]` when `clip` and inputs are given."""
    clip_ratio = None
    if clip and x is not None and x.shape[0] > 0:
        clip_ratio = search_clip(weight.float(), x.float(), cfg, token_weights=token_weights)
    return quantize_weight(weight, cfg, clip_ratio)


def awq(
    weights: Sequence[Tensor],
    x: Tensor,
    cfg: QuantConfig,
    *,
    token_weights: Tensor | None = None,
    act_mean: Tensor | None = None,
    grid: int = 20,
    clip: bool = True,
) -> AWQResult:
    """Search one scale shared by linears that read the same input, then quantize each.

    Args:
        weights: linears `[N_i, K]` fed by the same input (q/k/v, or gate/up).
        x: [T, K] calibration inputs (a subsample is fine: the loss is a mean).
        token_weights: optional [T] weights c_t of each token in the loss (MBQ, VEQ).
        act_mean: optional [K] mean |x| over the full calibration set.
        grid: number of α candidates.
        clip: also search per-group clipping after scaling.
    """
    scales, ratio = awq_scales(
        weights, x, cfg, token_weights=token_weights, act_mean=act_mean, grid=grid
    )
    xs = x.reshape(-1, x.shape[-1]).float() / scales
    qweights = [
        awq_quantize(w.detach().float() * scales, xs, cfg, token_weights=token_weights, clip=clip)
        for w in weights
    ]
    return AWQResult(qweights, scales, ratio)
