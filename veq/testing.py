"""Synthetic weights, activations and tiny models for tests and benchmarks (deterministic from a
seed).

Activations are shaped like LLM activations rather than white noise, because white-noise inputs
hide exactly what the solvers exploit: correlated channels (GPTQ), a few large channels (AWQ),
and token populations from different distributions (MBQ, VEQ).

The one builder of small models: `qwen3_vl_moe_text_config` / `qwen3_vl_moe_config` (the
Qwen3-VL-MoE configuration that `veq.models.synthetic`, the benchmarks and the reference model
build on) and `tiny_model` (a random fp32 model of each supported layout, as the tests use it).
Importing this module imports no transformers; the builders import it when called.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def correlated_inputs(t: int, k: int, seed: int, rank: int = 16, outliers: int = 0) -> Tensor:
    """`[t, k]` fp32: a rank-`rank` correlated part, isotropic noise, uneven channel magnitudes,
    and optionally `outliers` channels ~20× larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rank, generator=g) @ torch.randn(rank, k, generator=g) / rank**0.5
    x = x + 0.3 * torch.randn(t, k, generator=g)
    x = x * torch.empty(k).uniform_(0.3, 2.0, generator=g)
    if outliers:
        idx = torch.randperm(k, generator=g)[:outliers]
        x[:, idx] *= 20.0
    return x


def random_weight(n: int, k: int, seed: int) -> Tensor:
    """`[n, k]` fp32 weight with LLM-like magnitude (std 0.05)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def two_populations(
    k: int, seed: int, n_vision: int = 3000, n_text: int = 200
) -> tuple[Tensor, Tensor]:
    """Many 'vision' tokens and few 'text' tokens from a different (lower-rank, larger)
    distribution: `x: [n_vision + n_text, k]` fp32 and `is_text: [n_vision + n_text]` bool."""
    xv = correlated_inputs(n_vision, k, seed=seed)
    xt = correlated_inputs(n_text, k, seed=seed + 1, rank=4) * 1.5
    is_text = torch.cat(
        [torch.zeros(n_vision, dtype=torch.bool), torch.ones(n_text, dtype=torch.bool)]
    )
    return torch.cat([xv, xt]), is_text


#: The layouts `tiny_model` builds: one per supported MoE block type (`veq.models`).
TINY_LAYOUTS = ("qwen3_vl_moe", "kimi_vl", "kimi_k25")


def qwen3_vl_moe_text_config(
    *,
    vocab: int,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    moe_intermediate: int = 32,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    mlp_only_layers: tuple[int, ...] = (),
    rope_theta: float = 10000.0,
    mrope_section: tuple[int, int, int] | None = None,
    max_positions: int = 4096,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of a Qwen3-VL-MoE text config (`Qwen3VLMoeTextConfig(**d)`).

    `layers` decoder layers of width `hidden` (H); attention: `heads` query and `kv_heads` KV
    heads of `head_dim` (default H // heads, D), M-RoPE with `rope_theta` and `mrope_section`
    (default [D/4, D/8, D/8], interleaved); MoE: `experts` experts, `top_k` per token, each a
    SwiGLU MLP H -> `moe_intermediate` -> H (fused `gate_up_proj [E, 2I, H]`, `down_proj
    [E, H, I]`); layers in `mlp_only_layers` get a dense MLP of `intermediate` (default 2H)
    instead; embeddings and the untied lm_head are `[vocab, H]`.
    """
    if head_dim is None:
        head_dim = hidden // heads
    if mrope_section is None:
        mrope_section = (head_dim // 4, head_dim // 8, head_dim // 8)
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden if intermediate is None else intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "moe_intermediate_size": moe_intermediate,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "mlp_only_layers": list(mlp_only_layers),
        "max_position_embeddings": max_positions,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": list(mrope_section),
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": False,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
    }


def qwen3_vl_moe_config(
    processor: Any,
    *,
    vocab: int | None = None,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    vision_positions: int = 256,
    deepstack: tuple[int, ...] = (0,),
    **text: Any,
) -> Any:
    """A Qwen3-VL-MoE configuration (`Qwen3VLMoeConfig`) matched to `processor` (a
    `build_processor()` result): the special-token ids, and the vocabulary size unless `vocab`
    is given, come from its tokenizer.

    The language model is `qwen3_vl_moe_text_config(**text)` (defaults: 2 layers, H = 64, 4/2
    heads of 16, 8 experts top-2 of intermediate 32). The vision tower: `vision_depth` blocks of
    width `vision_hidden` (MLP `vision_intermediate`, default 2x) with `vision_heads` heads over
    16x16 patches, 2 frames each, `vision_positions` learned position embeddings, 2x2 patches
    merged into one H-wide token; `deepstack` lists the vision blocks whose features are also
    added to the first decoder layers.
    """
    from transformers import Qwen3VLMoeConfig

    tok = processor.tokenizer
    text_config = qwen3_vl_moe_text_config(
        vocab=len(tok) if vocab is None else vocab,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **text,
    )
    return Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": (
                2 * vision_hidden if vision_intermediate is None else vision_intermediate
            ),
            "num_heads": vision_heads,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text_config["hidden_size"],
            "num_position_embeddings": vision_positions,
            "deepstack_visual_indexes": list(deepstack),
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_model(layout: str, processor: Any, seed: int = 0) -> nn.Module:
    """A fresh tiny model of `layout` (one of `TINY_LAYOUTS`) matched to `processor`, fp32, in
    eval mode, deterministic from `seed`. Matrices (ndim >= 2, embeddings excepted) are
    redrawn from N(0, 0.08²): random init leaves tiny experts nearly identical, and the
    wider spread makes quantization methods differ.

    - `qwen3_vl_moe`: `qwen3_vl_moe_config(processor)` (2 layers, H = 64, 8 fused experts
      top-2 of intermediate 32, a 2-block vision tower of width 32).
    - `kimi_vl`: `veq.testing_kimi.KimiVLForConditionalGeneration` (Kimi-VL's remote-code
      layout: a dense first layer, then 8 ModuleList experts + 1 shared expert, top-2, MLA
      attention, H = 64; a stub vision tower), registered with the Auto classes.
    - `kimi_k25`: transformers' Kimi K2.5 with the same DeepSeek-V3 text model (fused experts)
      and a 1-layer vision tower of width 32.
    """
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    tok = processor.tokenizer
    image = tok.convert_tokens_to_ids("<|image_pad|>")
    if layout == "qwen3_vl_moe":
        config = qwen3_vl_moe_config(processor)
    elif layout == "kimi_vl":
        from veq import testing_kimi

        testing_kimi.register()
        config = testing_kimi.KimiVLConfig(
            text_config=testing_kimi.text_config(len(tok)), media_placeholder_token_id=image
        )
    elif layout == "kimi_k25":
        from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config

        from veq import testing_kimi

        config = Kimi_K25Config(
            text_config=dict(model_type="deepseek_v3", **testing_kimi.text_config(len(tok))),
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
        raise ValueError(
            f"unknown tiny layout {layout!r}; choose one of: {', '.join(TINY_LAYOUTS)}"
        )
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model
