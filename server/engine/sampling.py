"""Next-token sampling for a batch whose rows have their own parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from server.engine.types import SamplingParams


def suppress_eos(
    logits: Tensor, params: Sequence[SamplingParams], generated: Sequence[int], eos_ids: set[int]
) -> Tensor:
    """`logits: [B, V]` with the end-of-sequence ids at -inf in rows that have generated fewer
    than their `min_tokens` (`generated[b]` tokens so far); unchanged when no row needs it."""
    rows = [b for b, (p, n) in enumerate(zip(params, generated, strict=True)) if n < p.min_tokens]
    if not rows or not eos_ids:
        return logits
    logits = logits.clone()
    ids = torch.tensor(sorted(eos_ids), device=logits.device)
    logits[torch.tensor(rows, device=logits.device)[:, None], ids[None, :]] = float("-inf")
    return logits


def sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits: [B, V]` (any float dtype; computed in fp32 on its device).

    temperature 0 → argmax; otherwise softmax(logits / T), restricted to the `top_k` largest and
    to the smallest set whose probability reaches `top_p`, drawn with the row's generator (a
    seeded request repeats exactly).
    """
    logits = logits.float()
    out: list[int] = []
    for row, p, gen in zip(logits, params, generators, strict=True):
        if p.temperature <= 0:
            out.append(int(row.argmax()))
            continue
        row = row / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = row.softmax(-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
    return out
