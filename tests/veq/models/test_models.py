"""Architecture tables against real module trees."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from veq.models import (
    MoEView,
    UnsupportedModelError,
    decoder_layers,
    get_architecture,
    is_moe_layer,
    layer_linears,
)
from veq.models.base import get_module

LAYOUTS = ["qwen3_vl_moe", "kimi_vl", "kimi_k25"]


def test_unsupported_architecture_names_what_is_supported():
    model = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            vocab_size=64,
        )
    )
    with pytest.raises(UnsupportedModelError, match="'llama'.*qwen3_vl_moe, kimi_k25, kimi_vl"):
        get_architecture(model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_linear_is_named_once(layout, tiny_model):
    """Each language-model linear is either in a table group, an expert, or a 16-bit module."""
    model = tiny_model(layout)
    arch = get_architecture(model)
    named = set()
    for i, layer in enumerate(decoder_layers(model, arch)):
        for g in layer_linears(layer, arch):
            for path in g.linears:
                assert isinstance(get_module(layer, path), torch.nn.Linear), path
                named.add((i, path))
        if is_moe_layer(layer, arch):
            moe = MoEView(layer, arch.moe)
            assert moe.num_experts == 8
            ew = moe.expert(3)
            assert ew.gate.shape == ew.up.shape and ew.down.shape == ew.gate.shape[::-1]
            if moe.shared is not None:
                for n in ("gate_proj", "up_proj"):
                    named.add((i, f"{arch.moe.block}.{arch.moe.shared}.{n}"))
    # Every attention projection of every layer is covered.
    for i, layer in enumerate(decoder_layers(model, arch)):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and "self_attn" in name:
                assert (i, name) in named, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_routing_matches_the_model(layout, tiny_model):
    model = tiny_model(layout)
    arch = get_architecture(model)
    layer = next(lyr for lyr in decoder_layers(model, arch) if is_moe_layer(lyr, arch))
    moe = MoEView(layer, arch.moe)
    h = torch.randn(10, layer.post_attention_layernorm.weight.shape[0])
    probs, idx, weights = moe.route(h)
    assert probs.shape == (10, 8) and idx.shape == weights.shape == (10, 2)
    assert (probs >= 0).all() and (probs <= 1).all()
    assert torch.isfinite(weights).all()
