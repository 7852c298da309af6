"""MBQ (Li et al., 2025): AWQ whose loss weighs vision tokens by their measured sensitivity.

Per layer, answer tokens weigh 1, vision tokens weigh `r_l` (the ratio of the loss gradient on
vision tokens to that on answer tokens, typically ≪ 1), and prompt tokens are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from veq.algorithms.awq import AWQResult, awq
from veq.config import QuantConfig
from veq.tokens import TokenKind


def mbq_token_weights(kinds: Tensor, vision_weight: float) -> Tensor:
    """`[T]` fp32 loss weights from token kinds `[T]` (`TokenKind` values)."""
    if vision_weight < 0:
        raise ValueError(f"vision_weight must be non-negative, got {vision_weight}")
    kinds = kinds.reshape(-1)
    c = torch.zeros(kinds.shape, dtype=torch.float32, device=kinds.device)
    c[kinds == TokenKind.VISION] = vision_weight
    c[kinds == TokenKind.ANSWER] = 1.0
    return c


def mbq(
    weights: Sequence[Tensor],
    x: Tensor,
    kinds: Tensor,
    cfg: QuantConfig,
    *,
    vision_weight: float,
    grid: int = 20,
    clip: bool = True,
) -> AWQResult:
    """AWQ on `weights [N_i, K]` with inputs `x: [T, K]` weighted by `kinds: [T]`.

    Raises ValueError when no token carries weight (no answer tokens and `vision_weight` 0).
    """
    c = mbq_token_weights(kinds, vision_weight)
    if float(c.sum()) <= 0:
        raise ValueError("MBQ needs answer tokens (or vision tokens with positive weight)")
    return awq(weights, x, cfg, token_weights=c, grid=grid, clip=clip)
