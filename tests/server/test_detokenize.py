"""Incremental detokenisation emits exactly what decoding the whole token list each step did."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from server.engine.engine import _Seq
from server.engine.types import GenerationRequest, SamplingParams
from veq.models.processor import build_processor


def full_decode_deltas(tokenizer, tokens: list[int], params: SamplingParams) -> tuple[str, str]:
    """The engine's text before incremental decoding: every step decodes all tokens so far."""
    emitted, out, kept = 0, [], []
    for token in tokens:
        kept.append(token)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        finish = None
        for stop in params.stop:
            at = text.find(stop, max(0, emitted - len(stop)))
            if at >= 0:
                text, finish = text[:at], "stop"
                break
        if finish is None and len(kept) >= params.max_tokens:
            finish = "length"
        if finish is not None:
            out.append(text[emitted:])
            return "".join(out), finish
        safe = len(text) - max((len(s) - 1 for s in params.stop), default=0)
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        delta = text[emitted : max(safe, emitted)]
        emitted += len(delta)
        out.append(delta)
    raise AssertionError("max_tokens not reached")


@pytest.fixture(scope="module")
def tokenizer():
    return build_processor(words=("hello", " world", " the", "ing")).tokenizer


@pytest.mark.parametrize("stop", [(), ("lo w",), ("é", "\n\n")])
def test_incremental_text_equals_full_decoding(tokenizer, stop):
    rng = random.Random(0)
    texts = ["hello world, the thing", "naïve café ☕ 日本語", "a\n\nb ending🙂🙂", "é" * 7]
    for trial in range(40):
        if trial % 2:
            tokens = tokenizer.encode(rng.choice(texts), add_special_tokens=False)
        else:  # random ids: split multi-byte characters, special tokens, partial UTF-8
            tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(max_tokens=len(tokens), stop=stop)
        runner = SimpleNamespace(processor=SimpleNamespace(tokenizer=tokenizer), eos_ids=set())
        seq = _Seq(GenerationRequest({}, params), runner, 0, None)
        out, finish = [], None
        for token in tokens:
            delta, finish = seq.advance(token)
            out.append(delta)
            if finish is not None:
                break
        assert ("".join(out), finish) == full_decode_deltas(tokenizer, tokens, params), tokens
