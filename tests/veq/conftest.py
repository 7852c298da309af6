"""Tiny models of the three supported layouts (`veq.testing.tiny_model`) and calibration data
for them."""

from __future__ import annotations

from typing import Any

import pytest

from veq.calib.data import CalibSample, encode_conversation
from veq.calib.sources import builtin_conversations
from veq.models.processor import build_processor
from veq.testing import tiny_model as build_tiny_model
from veq.testing_kimi import register
from veq.tokens import TokenKind

# As `trust_remote_code` would: the Auto classes know `kimi_vl` before any test loads one.
register()


@pytest.fixture(scope="session")
def processor():
    return build_processor()


def make_samples(layout: str, processor: Any, n: int, seed: int) -> list[CalibSample]:
    """`n` built-in conversations (from `seed`) encoded for `layout`."""
    image = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    samples = [
        encode_conversation(processor, c, image) for c in builtin_conversations(n, seed=seed)
    ]
    if layout != "kimi_k25":
        return samples
    # Kimi K2.5's own vision tower takes another pixel format: feed the text model only, with
    # the image placeholders still tagged as vision tokens (embedded as token 0, as the model
    # does without pixels).
    out = []
    for s in samples:
        inputs = {"input_ids": s.inputs["input_ids"], "attention_mask": s.inputs["attention_mask"]}
        out.append(CalibSample(inputs, s.kinds))
    assert any((s.kinds == TokenKind.VISION).any() for s in out)
    return out


@pytest.fixture(scope="session")
def calib(processor):
    cache: dict[tuple[str, int, int], list[CalibSample]] = {}

    def get(layout: str, n: int = 3, seed: int = 0) -> list[CalibSample]:
        key = (layout, n, seed)
        if key not in cache:
            cache[key] = make_samples(layout, processor, n, seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(processor):
    """`tiny_model(layout, seed=0)` -> a fresh model (`veq.testing.tiny_model`)."""
    return lambda layout, seed=0: build_tiny_model(layout, processor, seed)
