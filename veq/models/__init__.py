"""Architecture adapters: one mapping table per supported MoE VLM family (see `base`).

| name          | model_type   | experts            | router                        |
|---------------|--------------|--------------------|-------------------------------|
| qwen3_vl_moe  | qwen3_vl_moe | fused [E, 2I, H]   | softmax top-k, renormalised   |
| kimi_k25      | kimi_k25     | fused + shared     | sigmoid, grouped, scaled      |
| kimi_vl       | kimi_vl      | ModuleList + shared| remote-code MoEGate           |
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from veq.models.base import (
    Architecture,
    LinearGroup,
    MoESpec,
    MoEView,
    get_module,
    has_module,
    moegate_router,
    set_module,
    sigmoid_router,
    softmax_router,
)


def _deepstack(i: int, hidden: Tensor, captured: dict[str, Any]) -> Tensor:
    """Qwen3-VL adds vision-tower features to the image positions after the first layers."""
    embeds = captured.get("deepstack_visual_embeds")
    mask = captured.get("visual_pos_masks")
    if embeds is None or mask is None or i >= len(embeds):
        return hidden
    hidden = hidden.clone()
    hidden[mask] = hidden[mask] + embeds[i].to(hidden)
    return hidden


_MLA = (
    # DeepSeek-V3 multi-head latent attention: q_proj when q_lora_rank is None (Kimi-VL-A3B),
    # else q_a_proj; both read the input norm together with kv_a_proj_with_mqa.
    LinearGroup(
        ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        "input_layernorm",
    ),
    LinearGroup(("self_attn.q_b_proj",), "self_attn.q_a_layernorm"),
    LinearGroup(("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm"),
    LinearGroup(("self_attn.o_proj",), None),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        text_model="model.language_model",
        attention=(
            LinearGroup(
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"
            ),
            LinearGroup(("self_attn.o_proj",), "self_attn.v_proj"),
        ),
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        mlp_prev="post_attention_layernorm",
        moe=MoESpec("mlp", "gate", "experts", "fused", softmax_router),
        ignore=("re:.*lm_head$", "re:.*visual\\..*", "re:.*mlp\\.gate$"),
        post_layer=_deepstack,
    ),
    Architecture(
        name="kimi_k25",
        model_types=("kimi_k25",),
        text_model="model.language_model",
        attention=_MLA,
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        mlp_prev="post_attention_layernorm",
        moe=MoESpec("mlp", "gate", "experts", "fused", sigmoid_router, shared="shared_experts"),
        ignore=(
            "re:.*lm_head$",
            "re:.*vision_tower\\..*",
            "re:.*mm_projector\\..*",
            "re:.*mlp\\.gate$",
        ),
    ),
    Architecture(
        name="kimi_vl",
        model_types=("kimi_vl",),
        text_model="language_model.model",
        attention=_MLA,
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        mlp_prev="post_attention_layernorm",
        moe=MoESpec("mlp", "gate", "experts", "list", moegate_router, shared="shared_experts"),
        ignore=(
            "re:.*lm_head$",
            "re:.*vision_tower\\..*",
            "re:.*multi_modal_projector\\..*",
            "re:.*mlp\\.gate$",
        ),
        image_token_attr="media_placeholder_token_id",
    ),
)

SUPPORTED = tuple(t for a in ARCHITECTURES for t in a.model_types)


class UnsupportedModelError(ValueError):
    pass


def get_architecture(model: nn.Module) -> Architecture:
    """The table for `model` (by `config.model_type`); a clear error naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: veq supports {', '.join(SUPPORTED)}"
    )


def source_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (`config.json`'s `dtype`, or the text
    config's): what the model is served in, and what its unquantized tensors are saved in.
    Unknown (an in-memory model built without one): float32."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return torch.float32


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return get_module(get_module(model, arch.text_model), "layers")


def image_token_id(model: nn.Module, arch: Architecture) -> int | None:
    value = getattr(model.config, arch.image_token_attr, None)
    return int(value) if value is not None else None


def is_moe_layer(layer: nn.Module, arch: Architecture) -> bool:
    return has_module(layer, f"{arch.moe.block}.{arch.moe.experts}")


def layer_linears(layer: nn.Module, arch: Architecture) -> list[LinearGroup]:
    """The groups of this layer that exist (MLA variants and dense/MoE layers differ)."""
    groups = [
        LinearGroup(tuple(p for p in g.linears if has_module(layer, p)), g.prev, g.companions)
        for g in arch.attention
    ]
    if not is_moe_layer(layer, arch):
        gate, up, down = arch.dense_mlp
        groups.append(LinearGroup((gate, up), arch.mlp_prev))
        groups.append(LinearGroup((down,), up))
    elif arch.moe.shared:
        shared = f"{arch.moe.block}.{arch.moe.shared}"
        groups.append(LinearGroup((f"{shared}.down_proj",), f"{shared}.up_proj"))
    return [g for g in groups if g.linears]


def weight_views(model: nn.Module, arch: Architecture) -> dict[str, Tensor]:
    """Every weight the pipeline may quantize, by the name it records it under (experts
    unfused: `{layer}.mlp.experts.{e}.gate_proj`): a view into the model's own parameters
    (`[N, K]`, writable in place; a fused expert's is a slice of the fused tensor)."""
    views: dict[str, Tensor] = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.text_model}.layers.{i}"
        for g in layer_linears(layer, arch):
            for path in g.linears:
                views[f"{prefix}.{path}"] = get_module(layer, path).weight
        if not is_moe_layer(layer, arch):
            continue
        moe = MoEView(layer, arch.moe)
        for e in range(moe.num_experts):
            ew = moe.expert(e)
            for name, w in zip(moe.expert_names(prefix, e), (ew.gate, ew.up, ew.down), strict=True):
                views[name] = w
        if moe.shared is not None:
            base = f"{prefix}.{arch.moe.block}.{arch.moe.shared}"
            for name in ("gate_proj", "up_proj"):
                views[f"{base}.{name}"] = getattr(moe.shared, name).weight
    return views


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "LinearGroup",
    "MoESpec",
    "MoEView",
    "SUPPORTED",
    "UnsupportedModelError",
    "decoder_layers",
    "get_architecture",
    "get_module",
    "has_module",
    "image_token_id",
    "is_moe_layer",
    "layer_linears",
    "set_module",
    "source_dtype",
    "weight_views",
]
