"""A model's decoder-layer-0 inputs: what calibration runs layer by layer and what chunked
prefill feeds the decoder a slice at a time.

Owns running a Hugging Face VLM forward (vision tower, embeddings, position ids included) up to
its first decoder layer and keeping what that layer receives, plus the text model's kwargs the
architecture's `post_layer` needs (Qwen3-VL's deepstack features). It does not run any layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from veq.models import Architecture, decoder_layers, get_module

#: Text-model kwargs `post_layer` reads (Qwen3-VL deepstack); others have none.
POST_LAYER_KWARGS = ("visual_pos_masks", "deepstack_visual_embeds")


class _Stop(Exception):
    """Raised by the capture hook to stop the forward at the first decoder layer."""


def to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor inside (dicts, lists, tuples) moved to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@dataclass
class LayerInputs:
    """What decoder layer 0 got for one input: `hidden [B, S, H]` and its kwargs (position
    embeddings, masks, ...), and the text model's `post_layer` kwargs."""

    hidden: Tensor
    kwargs: dict[str, Any]
    text_kwargs: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, arch: Architecture, inputs: dict[str, Tensor], keep_on: torch.device | str
) -> LayerInputs:
    """Run `inputs` (on the model's device) through `model` up to decoder layer 0; return that
    layer's inputs on `keep_on`."""
    text = get_module(model, arch.text_model)
    layer0 = decoder_layers(model, arch)[0]
    got: dict[str, Any] = {}

    def text_hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        got["text"] = {k: to_device(kwargs.get(k), keep_on) for k in POST_LAYER_KWARGS}

    def layer_hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got["hidden"] = hidden.detach().to(keep_on)
        got["kwargs"] = to_device(kwargs, keep_on)
        raise _Stop

    handles = [
        text.register_forward_pre_hook(text_hook, with_kwargs=True),
        layer0.register_forward_pre_hook(layer_hook, with_kwargs=True),
    ]
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "hidden" not in got:
        raise RuntimeError("the forward finished without reaching decoder layer 0")
    return LayerInputs(got["hidden"], got["kwargs"], got.get("text", {}))
