"""Tiny models of the three supported layouts, built in code, and calibration data for them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from veq.calib.data import CalibSample, builtin_conversations, encode_conversation
from veq.models.processor import build_processor
from veq.testing import qwen3_vl_moe_config
from veq.tokens import TokenKind


def _remote():
    spec = importlib.util.spec_from_file_location(
        "kimi_vl_remote", Path(__file__).with_name("kimi_vl_remote.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register()
    return module


kimi_vl_remote = _remote()


@pytest.fixture(scope="session")
def processor():
    return build_processor()


def build_model(layout: str, processor, seed: int = 0):
    """A fresh tiny model of `layout` (fp32, eval mode), deterministic from `seed`."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config

    torch.manual_seed(seed)
    tok = processor.tokenizer
    image = tok.convert_tokens_to_ids("<|image_pad|>")
    if layout == "qwen3_vl_moe":
        config = qwen3_vl_moe_config(processor)
    elif layout == "kimi_vl":
        config = kimi_vl_remote.KimiVLConfig(
            text_config=kimi_vl_remote.text_config(len(tok)), media_placeholder_token_id=image
        )
    elif layout == "kimi_k25":
        config = Kimi_K25Config(
            text_config=dict(model_type="deepseek_v3", **kimi_vl_remote.text_config(len(tok))),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                pos_emb_height=8,
                pos_emb_width=8,
            ),
            projection_hidden_size=128,
            image_token_id=image,
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        )
    else:
        raise AssertionError(layout)
    model = AutoModelForImageTextToText.from_config(config).eval()
    # Random init leaves tiny experts nearly identical; widen the spread so methods differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model


def make_samples(layout: str, processor, n: int, seed: int) -> list[CalibSample]:
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
    """`tiny_model(layout, seed=0)` -> a fresh model."""
    return lambda layout, seed=0: build_model(layout, processor, seed)
