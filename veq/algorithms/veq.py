"""VEQ (arXiv 2602.01037): Visual Expert Quantization for MoE vision-language models.

Two heterogeneities drive it: vision tokens are many and insensitive, text tokens few and
sensitive (their gradient ratio is γ); and experts are used unequally.

- VEQ-ME (on AWQ): the gate/up scale shared by all experts of an MoE layer is searched with the
  loss `Σ_i S_i · mean_t ‖E_i(x_t) − Ê_i(x_t)‖²` over each expert's routed tokens, with expert
  importance `S_i = γ·N_i^text + β·N_i^vis`. With `S_i = N_i` this is plain AWQ's pooled loss.
- VEQ-MA (on GPTQ): expert i's Hessian is `H̃_i = Σ_{j→i} c_{j,i} x_j x_jᵀ` with
  `c_{j,i} = p_{j,i}^λ · α_j`, α_j = γ for text tokens and 1 for vision tokens.

Shape legend: T tokens, E experts, H hidden, I expert intermediate, K in-features, N out-features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from veq.algorithms.awq import awq_quantize, search_scale, weighted_mse
from veq.algorithms.gptq import gptq
from veq.config import QuantConfig
from veq.experts import ExpertWeights
from veq.quantizer import QuantizedWeight, fake_quantize
from veq.stats import ActivationStats, HessianAccumulator


def expert_importance(n_text: Tensor, n_vision: Tensor, gamma: float, beta: float) -> Tensor:
    """`S_i = γ·N_i^text + β·N_i^vis` from routed token counts `[E]`; returns `[E]` fp32."""
    if gamma < 0 or beta < 0:
        raise ValueError(f"gamma and beta must be non-negative, got {gamma}, {beta}")
    return gamma * n_text.float() + beta * n_vision.float()


def ma_token_weights(
    is_text: Tensor, gamma: float, router_prob: Tensor | None = None, lam: float = 1.0
) -> Tensor:
    """VEQ-MA's `c_j = p_j^λ · α_j` for tokens `[T]` (α = γ on text, 1 on vision).

    `router_prob: [T]` is each token's probability for the expert being calibrated; None (dense
    modules such as attention) means p = 1.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    alpha = torch.where(is_text.reshape(-1).bool(), float(gamma), 1.0)
    if router_prob is None:
        return alpha
    return router_prob.reshape(-1).float().clamp(min=0).pow(lam) * alpha


def veq_ma(
    weight: Tensor,
    x: Tensor,
    is_text: Tensor,
    cfg: QuantConfig,
    *,
    gamma: float,
    router_prob: Tensor | None = None,
    lam: float = 1.0,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ of `weight: [N, K]` on the Hessian of `x: [T, K]` weighted by `ma_token_weights`."""
    acc = HessianAccumulator(weight.shape[1], dtype=torch.float64, device=x.device)
    acc.add(x, ma_token_weights(is_text, gamma, router_prob, lam))
    return gptq(weight, acc.hessian(), cfg, act_order=act_order)


@dataclass(frozen=True)
class SharedScaleResult:
    """Quantized `gate·diag(s)` and `up·diag(s)` per expert, and the shared `[H]` scales."""

    gate: list[QuantizedWeight]
    up: list[QuantizedWeight]
    scales: Tensor
    ratio: float


def shared_scale_search(
    experts: Sequence[ExpertWeights],
    inputs: Sequence[Tensor],
    importance: Tensor,
    cfg: QuantConfig,
    *,
    token_weights: Sequence[Tensor | None] | None = None,
    grid: int = 20,
) -> tuple[Tensor, float]:
    """VEQ-ME's search: the `[H]` gate/up scale shared by all experts, and its exponent α.

    Loss `Σ_i S_i · L_i / Σ_i S_i` with `L_i` expert i's (optionally token-weighted) mean squared
    output error over its tokens. The activation statistic behind the candidate scales is
    importance-weighted as well (`Σ_i S_i mean|X_i| / Σ_i S_i`); otherwise the grid could never
    move toward a hot expert's salient channels, only rescale the pooled ones. down_proj stays
    in full precision during the search.

    Args:
        experts: E experts.
        inputs: E tensors `[T_i, H]`, the tokens routed to each expert (may be empty).
        importance: [E] non-negative S_i.
        token_weights: optional E tensors `[T_i]` (or None entries) weighting tokens in L_i.
    """
    if not (len(experts) == len(inputs) == importance.numel()):
        raise ValueError("experts, inputs and importance must have one entry per expert")
    h = experts[0].gate.shape[1]
    xs = [x.reshape(-1, h).float() for x in inputs]
    cs = list(token_weights) if token_weights is not None else [None] * len(xs)
    imp = importance.reshape(-1).float()
    live = [i for i, x in enumerate(xs) if x.shape[0] > 0 and imp[i] > 0]
    if not live:
        raise ValueError("no expert has both routed tokens and positive importance")
    fp = [ExpertWeights(e.gate.float(), e.up.float(), e.down.float()) for e in experts]
    total = float(imp[live].sum())

    act_mean = torch.zeros(h, device=xs[live[0]].device)
    for i in live:
        stats = ActivationStats(h, device=xs[i].device)
        stats.add(xs[i], cs[i])
        act_mean += float(imp[i]) * stats.mean_abs()
    act_mean /= total
    refs = {i: fp[i].forward(xs[i]) for i in live}

    def loss(s: Tensor) -> float:
        value = 0.0
        for i in live:
            gq = fake_quantize(fp[i].gate * s, cfg) / s
            uq = fake_quantize(fp[i].up * s, cfg) / s
            value += float(imp[i]) * weighted_mse(fp[i].forward(xs[i], gq, uq), refs[i], cs[i])
        return value / total

    return search_scale(act_mean, loss, grid)


def veq_me(
    experts: Sequence[ExpertWeights],
    inputs: Sequence[Tensor],
    importance: Tensor,
    cfg: QuantConfig,
    *,
    grid: int = 20,
    clip: bool = True,
) -> SharedScaleResult:
    """Importance-weighted shared gate/up scale (`shared_scale_search`), then every expert's
    scaled gate/up quantized with its own clip search. Experts without tokens are still
    quantized (plain min/max), never left in 16 bits."""
    scales, ratio = shared_scale_search(experts, inputs, importance, cfg, grid=grid)
    gates, ups = [], []
    for e, x in zip(experts, inputs, strict=True):
        xs = x.reshape(-1, e.gate.shape[1]).float() / scales
        gates.append(awq_quantize(e.gate.float() * scales, xs, cfg, clip=clip))
        ups.append(awq_quantize(e.up.float() * scales, xs, cfg, clip=clip))
    return SharedScaleResult(gates, ups, scales, ratio)


def awq_moe(
    experts: Sequence[ExpertWeights], inputs: Sequence[Tensor], cfg: QuantConfig, **kwargs
) -> SharedScaleResult:
    """Plain AWQ for an MoE layer: the shared scale with every routed token counting once."""
    counts = torch.tensor([float(x.reshape(-1, x.shape[-1]).shape[0]) for x in inputs])
    return veq_me(experts, inputs, counts, cfg, **kwargs)
