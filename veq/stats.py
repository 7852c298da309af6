"""Streaming calibration statistics: weighted Hessians, their asymmetric residuals and
per-channel activation magnitudes.

Owns accumulation over batches (token-weighted; Hessians and activation statistics also
mergeable across workers). It does not decide the token weights (the methods in
`veq.algorithms` do) nor where inputs come from (the calibration pipeline's hooks do).

Shape legend: T tokens in a batch, K in-features.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flatten_tokens(x: Tensor, k: int) -> Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"expected inputs with {k} features, got shape {tuple(x.shape)}")
    return x.reshape(-1, k)


def _check_token_weights(weights: Tensor | None, t: int) -> Tensor | None:
    if weights is None:
        return None
    weights = weights.reshape(-1)
    if weights.numel() != t:
        raise ValueError(f"got {weights.numel()} token weights for {t} tokens")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("token weights must be finite and non-negative")
    return weights


class HessianAccumulator:
    """`H = 2 · Σ_j c_j x_j x_jᵀ / Σ_j c_j` over every token seen, with optional weights `c_j`.

    With all `c_j` equal this is GPTQ's `2 XᵀX / n`; normalising by the total weight keeps the
    damping (relative to the mean diagonal) and hence the solution independent of the weights'
    overall scale.
    """

    def __init__(
        self,
        in_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate in float32 or float64, not {dtype}")
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.tokens = 0
        self.total_weight = 0.0

    def add(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Accumulate inputs `x: [..., K]` with optional per-token weights `[...]` (c_j ≥ 0)."""
        x = _flatten_tokens(x, self.in_features).to(self.sum)
        w = _check_token_weights(weights, x.shape[0])
        if w is None:
            self.total_weight += float(x.shape[0])
        else:
            w = w.to(self.sum)
            self.total_weight += float(w.sum())
            x = x * w.sqrt().unsqueeze(1)
        self.sum.addmm_(x.T, x)
        self.tokens += int(x.shape[0])

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's tokens into this one."""
        if other.in_features != self.in_features:
            raise ValueError("cannot merge Hessians of different widths")
        self.sum += other.sum.to(self.sum)
        self.tokens += other.tokens
        self.total_weight += other.total_weight

    def hessian(self) -> Tensor:
        """`[K, K]` float32, normalised by the total token weight; raises when nothing was seen."""
        if self.total_weight <= 0:
            raise ValueError("no calibration tokens (or only zero-weight ones) were accumulated")
        return (2.0 * self.sum / self.total_weight).float()


class ResidualAccumulator:
    """`D = 2 · Σ_j c_j (x_j − x̃_j) x̃_jᵀ / Σ_j c_j`: how the full-precision model's inputs `x`
    of a linear differ from the quantized model's `x̃` at the same tokens, seen through `x̃` (the
    asymmetric term of GPTAQ, Li et al. 2025). Normalised as `HessianAccumulator` is, with the
    same weights, so that `W D H⁻¹` needs no rescaling."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.total_weight = 0.0

    def add(self, x_fp: Tensor, x_q: Tensor, weights: Tensor | None = None) -> None:
        """Accumulate paired inputs `x_fp, x_q: [..., K]` (one row per token in both) with
        optional per-token weights `[...]`."""
        x_q = _flatten_tokens(x_q, self.in_features).to(self.sum)
        x_fp = _flatten_tokens(x_fp, self.in_features).to(self.sum)
        if x_fp.shape != x_q.shape:
            raise ValueError(f"unpaired inputs: {tuple(x_fp.shape)} and {tuple(x_q.shape)}")
        w = _check_token_weights(weights, x_q.shape[0])
        delta = x_fp - x_q
        if w is None:
            self.total_weight += float(x_q.shape[0])
        else:
            w = w.to(self.sum)
            self.total_weight += float(w.sum())
            delta = delta * w.unsqueeze(1)
        self.sum.addmm_(delta.T, x_q)

    def residual(self) -> Tensor:
        """`[K, K]` float32; raises when nothing was seen."""
        if self.total_weight <= 0:
            raise ValueError("no calibration tokens (or only zero-weight ones) were accumulated")
        return (2.0 * self.sum / self.total_weight).float()


class ActivationStats:
    """Per-input-channel mean magnitude `Σ_j c_j |x_j| / Σ_j c_j`, AWQ's salience statistic."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.sum_abs = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.total_weight = 0.0

    def add(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Accumulate inputs `x: [..., K]` with optional per-token weights `[...]`."""
        x = _flatten_tokens(x, self.in_features).abs().double()
        w = _check_token_weights(weights, x.shape[0])
        if w is None:
            self.sum_abs += x.sum(0)
            self.total_weight += float(x.shape[0])
        else:
            w = w.double()
            self.sum_abs += w @ x
            self.total_weight += float(w.sum())
        self.tokens += int(x.shape[0])

    def merge(self, other: ActivationStats) -> None:
        """Add another accumulator's tokens into this one."""
        if other.in_features != self.in_features:
            raise ValueError("cannot merge statistics of different widths")
        self.sum_abs += other.sum_abs.to(self.sum_abs)
        self.tokens += other.tokens
        self.total_weight += other.total_weight

    def mean_abs(self) -> Tensor:
        """`[K]` float32 mean |x| per channel."""
        if self.total_weight <= 0:
            raise ValueError("no calibration tokens (or only zero-weight ones) were accumulated")
        return (self.sum_abs / self.total_weight).float()
