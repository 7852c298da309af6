"""Batched sampling draws what the per-row sampler it replaced drew: greedy rows their argmax,
seeded rows the same token for the same seed, top-k and top-p the same support."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling import sample, suppress_eos
from server.engine.types import SamplingParams


def per_row_reference(logits, params, generators) -> list[int]:
    """The sampler before batching (one row at a time, a host copy per draw)."""
    logits = logits.float()
    out = []
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
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
    return out


PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.3, top_k=5, seed=2),
    SamplingParams(temperature=1.0, top_p=0.3, seed=3),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.8, seed=4),
    SamplingParams(temperature=0, top_k=3),
    SamplingParams(temperature=2.0, top_p=0.95, seed=5),
]


def _gens(params, offset: int = 0):
    return [
        torch.Generator().manual_seed(p.seed + offset) if p.seed is not None else None
        for p in params
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [17, 1000])
def test_batched_sampler_draws_the_per_row_samplers_tokens(dtype, vocab):
    for trial in range(20):
        logits = (
            torch.randn(len(PARAMS), vocab, generator=torch.Generator().manual_seed(trial)) * 3
        ).to(dtype)
        # Several steps from the same generators: the streams stay in step.
        gens_new, gens_ref = _gens(PARAMS, trial), _gens(PARAMS, trial)
        for _ in range(3):
            assert sample(logits, PARAMS, gens_new) == per_row_reference(logits, PARAMS, gens_ref)


def test_unseeded_rows_stay_inside_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    params = [SamplingParams(temperature=1.0, top_k=3)] * 32 + [
        SamplingParams(temperature=1.0, top_p=0.2)
    ] * 32
    for _ in range(10):
        tokens = sample(logits, params, [None] * 64)
        for i, t in enumerate(tokens[:32]):
            assert t in logits[i].topk(3).indices.tolist()
        for i, t in enumerate(tokens[32:], 32):
            p = logits[i].softmax(-1)
            sorted_p, order = p.sort(descending=True)
            support = order[(sorted_p.cumsum(0) - sorted_p) < 0.2].tolist()
            assert t in support


def test_empty_batch_and_eos_suppression():
    assert sample(torch.zeros(0, 10), [], []) == []
    logits = torch.zeros(2, 6)
    logits[:, 5] = 10.0
    params = [SamplingParams(temperature=0, min_tokens=2)] * 2
    out = suppress_eos(logits, params, [0, 3], {5})
    assert sample(out, params, [None, None])[1] == 5 and sample(out, params, [None, None])[0] != 5


def test_a_vanishing_temperature_is_greedy():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=t, seed=0) for t in (1e-45, 1e-7, 0.0)]
    assert sample(logits, params, _gens(params)) == logits.argmax(-1).tolist()
