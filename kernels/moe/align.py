"""The align step of the fused MoE: (token, slot) assignments sorted by expert, padded per block.

Owns the routing → block-schedule transform that lets one launch serve every expert: each
M-block of the GEMM belongs to exactly one expert. Pure torch, no host synchronisation (so it
can run ahead on a CUDA stream); the kernels read the padded total from device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Alignment:
    """Block schedule of one expert group.

    sorted_ids: int32 [L]: flat assignment ids `t·A + j` (token t's j-th pick) grouped by local
        expert, each expert's run padded to a multiple of block_m with the sentinel `T·A`.
    block_expert: int32 [L / block_m]: local expert of each block (E_g - 1 past the end).
    num_padded: int32 [1]: used length; blocks starting at or beyond it exit at once.
    block_m: rows per block. L is a host-side upper bound (see `max_padded`).
    """

    sorted_ids: Tensor
    block_expert: Tensor
    num_padded: Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_expert.shape[0])


def max_padded(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded length: every active expert (at most min(E, T·A)) wastes at
    most block_m - 1 rows; rounded up to whole blocks."""
    bound = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return -(-bound // block_m) * block_m


def moe_align_block_size(local_ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort assignments by expert and pad each expert's run to a multiple of `block_m`.

    Args:
        local_ids: int [T, A] expert of each assignment, in this group's local numbering;
            ids outside [0, num_experts) (other groups' experts, dropped tokens) are skipped.
        num_experts: E_g, experts in this group.
        block_m: the GEMM's BLOCK_M.

    Worked example: T = 3 tokens, A = 2, E_g = 4, block_m = 4, and
    `local_ids = [[2, 0], [2, 3], [0, 2]]`, i.e. flat assignments 0..5 go to experts
    `[2, 0, 2, 3, 0, 2]`. Expert 0 gets assignments {1, 4}, expert 1 none, expert 2 {0, 2, 5},
    expert 3 {3}. Padding each run to 4 with the sentinel T·A = 6:

        sorted_ids   = [1, 4, 6, 6,  0, 2, 5, 6,  3, 6, 6, 6,  6, 6, 6, 6,  6, 6, 6, 6]
        block_expert = [0,           2,           3,           3,           3]
        num_padded   = [12]

    Expert 1 gets no block at all (an expert with no tokens costs nothing). L = 20 is the bound
    `6 + min(4, 6)·3 = 18` rounded up to blocks; blocks 3 and 4 start at ≥ 12 and exit at once.
    The kernel gathers row `sorted_ids[i] // A` of x (GEMM 1) or row `sorted_ids[i]` of the
    intermediate (GEMM 2) and masks sentinel rows.
    """
    t, a = local_ids.shape
    n = t * a
    dev = local_ids.device
    length = max_padded(n, num_experts, block_m)
    flat = local_ids.reshape(-1).to(torch.int64)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    run_starts = torch.cumsum(counts, 0) - counts  # first index of each expert in sorted order
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank = torch.arange(n, device=dev) - run_starts[sorted_key]
    # Skipped assignments land in a scratch slot past the end, cut off below.
    dest = torch.where(sorted_key < num_experts, starts[sorted_key] + rank, length)
    sorted_ids = torch.full((length + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=dev)
    block_expert = torch.searchsorted(ends[:num_experts], block_starts, right=True)
    block_expert = block_expert.clamp(max=num_experts - 1).to(torch.int32)
    return Alignment(
        sorted_ids=sorted_ids[:length],
        block_expert=block_expert,
        num_padded=ends[num_experts - 1 : num_experts].to(torch.int32),
        block_m=block_m,
    )
