"""The weights of one SwiGLU expert, as the MoE views hand them to the solvers.

A leaf type: `veq.models` (which reads experts out of a model) and `veq.algorithms` (which
quantizes them) both use it, and loading a checkpoint imports no solver for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: `down(silu(gate x) * up x)`.

    gate, up: [I, H]; down: [H, I].
    """

    gate: Tensor
    up: Tensor
    down: Tensor

    def forward(self, x: Tensor, gate: Tensor | None = None, up: Tensor | None = None) -> Tensor:
        """`x: [T, H]` → `[T, H]`, optionally with replacement gate/up weights."""
        g = self.gate if gate is None else gate
        u = self.up if up is None else up
        return (F.silu(x @ g.T) * (x @ u.T)) @ self.down.T
