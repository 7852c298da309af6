"""The packed experts of one MoE layer, grouped by bit width (mixed precision).

Owns `ExpertGroup` (experts of one bit width stacked into one PackedWeight, with the map from
global to local expert ids) and `MoEWeights` (one layer: gate‖up groups and down groups). The
two projections are grouped independently, so an expert's down projection may use other bits
than its gate/up. Each group is one kernel launch per GEMM. Pure torch, no Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.layout import PackedWeight, stack_experts


@dataclass(frozen=True)
class ExpertGroup:
    """Experts sharing one bit width.

    experts: ascending global expert ids held here (host metadata, one per stacked weight).
    weight: PackedWeight [E_g, N, K] stacked in the order of `experts`.
    local_of: int64 [E + 1]: local index of each global expert, -1 when not here; index E is
        the slot of ids outside [0, E) (dropped tokens), always -1.
    """

    experts: tuple[int, ...]
    weight: PackedWeight
    local_of: Tensor

    @staticmethod
    def build(experts: list[int], weights: list[PackedWeight], num_experts: int) -> ExpertGroup:
        local_of = torch.full((num_experts + 1,), -1, dtype=torch.int64)
        local_of[torch.tensor(experts, dtype=torch.int64)] = torch.arange(len(experts))
        stacked = stack_experts(weights)
        return ExpertGroup(tuple(experts), stacked, local_of.to(stacked.device))


def group_by_bits(weights: list[PackedWeight]) -> list[ExpertGroup]:
    """One ExpertGroup per distinct bit width among per-expert `weights` (index = expert id)."""
    by_bits: dict[int, list[int]] = {}
    for e, w in enumerate(weights):
        by_bits.setdefault(w.bits, []).append(e)
    return [
        ExpertGroup.build(ids, [weights[e] for e in ids], len(weights))
        for _, ids in sorted(by_bits.items())
    ]


@dataclass(frozen=True)
class MoEWeights:
    """All experts of one layer.

    gate_up: groups of fused `[2I, H]` weights (gate rows 0..I-1, up rows I..2I-1).
    down: groups of `[H, I]` weights.
    Every expert 0..E-1 appears in exactly one gate_up group and one down group.
    """

    gate_up: tuple[ExpertGroup, ...]
    down: tuple[ExpertGroup, ...]
    num_experts: int
    hidden: int
    intermediate: int

    def __post_init__(self) -> None:
        for name, groups, (n, k) in (
            ("gate_up", self.gate_up, (2 * self.intermediate, self.hidden)),
            ("down", self.down, (self.hidden, self.intermediate)),
        ):
            held = sorted(e for g in groups for e in g.experts)
            if held != list(range(self.num_experts)):
                raise ValueError(
                    f"{name} groups must hold each of the {self.num_experts} experts once"
                )
            for g in groups:
                if (g.weight.n, g.weight.k) != (n, k):
                    raise ValueError(
                        f"{name} weights are {(g.weight.n, g.weight.k)}, expected {(n, k)}"
                    )

    @staticmethod
    def from_experts(gate_up: list[PackedWeight], down: list[PackedWeight]) -> MoEWeights:
        """Group per-expert fused gate‖up `[2I, H]` and down `[H, I]` weights by bits."""
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError(f"got {len(gate_up)} gate_up and {len(down)} down expert weights")
        return MoEWeights(
            gate_up=tuple(group_by_bits(gate_up)),
            down=tuple(group_by_bits(down)),
            num_experts=len(gate_up),
            hidden=gate_up[0].k,
            intermediate=gate_up[0].n // 2,
        )

    def nbytes(self) -> int:
        """Bytes of the packed weights (index maps excluded)."""
        return sum(g.weight.nbytes() for g in (*self.gate_up, *self.down))
