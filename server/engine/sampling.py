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


MIN_TEMPERATURE = 1e-5


def sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits: [B, V]` (any float dtype; computed in fp32 on its device).

    temperature below `MIN_TEMPERATURE` → argmax; otherwise softmax(logits / T), restricted to
    the `top_k` largest and to the smallest set whose probability reaches `top_p`, drawn with
    the row's generator (a seeded request repeats exactly). The filtering is batched on the
    device and the tokens come to the host in one transfer; only seeded rows draw one by one,
    each with its own generator.
    """
    logits = logits.float()
    v = logits.shape[-1]
    dev = logits.device
    if not params:
        return []
    # Below MIN_TEMPERATURE a row is greedy: 1/T would overflow the logits to inf (vLLM's rule).
    temps = torch.tensor(
        [p.temperature if p.temperature >= MIN_TEMPERATURE else 1.0 for p in params], device=dev
    )
    scaled = logits / temps[:, None]
    top_k = [p.top_k if 0 < p.top_k < v else v for p in params]
    if min(top_k) < v:
        k = torch.tensor(top_k, device=dev)
        kth = scaled.topk(max(top_k), dim=-1).values.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Always keeps the top token; rows with top_p = 1 keep everything.
        keep = (sorted_p.cumsum(-1) - sorted_p < top_p) | (top_p >= 1.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p * keep)
    tokens = logits.argmax(-1)
    drawn = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    shared = [i for i in drawn if generators[i] is None]
    if shared:
        rows = torch.tensor(shared, device=dev)
        tokens[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i in drawn:
        gen = generators[i]
        if gen is not None:
            tokens[i] = torch.multinomial(probs[i].to(gen.device), 1, generator=gen)[0]
    return tokens.tolist()
