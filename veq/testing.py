"""Synthetic weights and activations for tests and benchmarks (deterministic from a seed).

Shaped like LLM activations rather than white noise, because white-noise inputs hide exactly
what the solvers exploit: correlated channels (GPTQ), a few large channels (AWQ), and token
populations from different distributions (MBQ, VEQ).
"""

from __future__ import annotations

import torch
from torch import Tensor


def correlated_inputs(t: int, k: int, seed: int, rank: int = 16, outliers: int = 0) -> Tensor:
    """`[t, k]` fp32: a rank-`rank` correlated part, isotropic noise, uneven channel magnitudes,
    and optionally `outliers` channels ~20× larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rank, generator=g) @ torch.randn(rank, k, generator=g) / rank**0.5
    x = x + 0.3 * torch.randn(t, k, generator=g)
    x = x * torch.empty(k).uniform_(0.3, 2.0, generator=g)
    if outliers:
        idx = torch.randperm(k, generator=g)[:outliers]
        x[:, idx] *= 20.0
    return x


def random_weight(n: int, k: int, seed: int) -> Tensor:
    """`[n, k]` fp32 weight with LLM-like magnitude (std 0.05)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def two_populations(
    k: int, seed: int, n_vision: int = 3000, n_text: int = 200
) -> tuple[Tensor, Tensor]:
    """Many 'vision' tokens and few 'text' tokens from a different (lower-rank, larger)
    distribution: `x: [n_vision + n_text, k]` fp32 and `is_text: [n_vision + n_text]` bool."""
    xv = correlated_inputs(n_vision, k, seed=seed)
    xt = correlated_inputs(n_text, k, seed=seed + 1, rank=4) * 1.5
    is_text = torch.cat(
        [torch.zeros(n_vision, dtype=torch.bool), torch.ones(n_text, dtype=torch.bool)]
    )
    return torch.cat([xv, xt]), is_text
