"""kernels.moe.align: the worked example and the schedule's invariants on ragged routings."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kernels._testing import random_routing
from kernels.moe.align import max_padded, moe_align_block_size


def test_worked_example_from_docstring():
    al = moe_align_block_size(torch.tensor([[2, 0], [2, 3], [0, 2]]), num_experts=4, block_m=4)
    assert al.sorted_ids.tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6] + [6] * 8
    assert al.block_expert.tolist() == [0, 2, 3, 3, 3]
    assert al.num_padded.tolist() == [12]


@dataclass(frozen=True)
class Case:
    t: int
    k: int
    experts: int
    block_m: int
    skip: tuple[int, ...] = ()
    foreign: bool = False  # some ids belong to other groups / are dropped (-1, E, E + 3)


CASES = [
    Case(0, 2, 4, 16),
    Case(1, 1, 8, 16, skip=(0, 1, 2)),
    Case(3, 2, 4, 16),
    Case(17, 4, 6, 16, skip=(5,)),
    Case(17, 3, 5, 32, foreign=True),
    Case(64, 8, 16, 64, skip=(3, 7)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_schedule_invariants(case: Case):
    ids, _ = random_routing(case.t, case.k, case.experts, seed=case.t, skip=case.skip)
    if case.foreign and case.t:
        ids[0, 0], ids[1, -1], ids[2, 0] = -1, case.experts, case.experts + 3
    al = moe_align_block_size(ids, case.experts, case.block_m)
    n = case.t * case.k
    total = int(al.num_padded)
    assert al.sorted_ids.numel() == max_padded(n, case.experts, case.block_m) >= total
    assert total % case.block_m == 0
    flat = ids.reshape(-1)
    valid = ((flat >= 0) & (flat < case.experts)).nonzero().flatten().sort().values
    used = al.sorted_ids[:total]
    real = used[used < n].long()
    assert torch.equal(real.sort().values, valid)  # every valid assignment exactly once
    assert (al.sorted_ids[total:] == n).all()
    for b in range(total // case.block_m):
        rows = used[b * case.block_m : (b + 1) * case.block_m].long()
        rows = rows[rows < n]
        assert rows.numel() > 0  # no block is pure padding: empty experts get no block
        assert (flat[rows] == int(al.block_expert[b])).all()
    for e in case.skip:
        assert e not in al.block_expert[: total // case.block_m].tolist()
