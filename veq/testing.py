"""Synthetic weights and activations for tests and benchmarks (deterministic from a seed).

Shaped like LLM activations rather than white noise, because white-noise inputs hide exactly
what the solvers exploit: correlated channels (GPTQ), a few large channels (AWQ), and token
populations from different distributions (MBQ, VEQ).
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def qwen3_vl_moe_config(
    processor: object,
    *,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    moe_intermediate: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    deepstack: tuple[int, ...] = (0,),
    mlp_only_layers: tuple[int, ...] = (),
):
    """A small Qwen3-VL-MoE configuration matched to `processor` (a `build_processor()` result:
    vocabulary size and special-token ids come from it)."""
    from transformers import Qwen3VLMoeConfig

    tok = processor.tokenizer  # type: ignore[attr-defined]
    head_dim = hidden // heads
    return Qwen3VLMoeConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "moe_intermediate_size": moe_intermediate,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "mlp_only_layers": list(mlp_only_layers),
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": list(deepstack),
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
