"""A small reproduction of Kimi-VL-A3B's remote-code layout, for `veq.testing.tiny_model`.

Its modeling file is not in transformers (the real checkpoint ships it as `trust_remote_code`):
`language_model.model.layers[i].mlp` holds `experts` as a ModuleList of MLPs, a `MoEGate`
router returning `(topk_idx, topk_weight)`, and `shared_experts`; the first layer is dense;
attention is DeepSeek-V3 MLA. Module names and routing follow the original so the adapter table
(`veq.models`) is exercised as it would be on the real checkpoint. The vision tower is a stub
that consumes Qwen-format patches (so the offline processor can feed it), merged 2×2.

Test support only: `import veq` does not import it (it imports transformers' DeepSeek-V3).
`register()` makes the Auto classes know `kimi_vl`, as `trust_remote_code` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP


class KimiVLConfig(PretrainedConfig):
    model_type = "kimi_vl"
    sub_configs = {"text_config": DeepseekV3Config}

    def __init__(
        self,
        text_config: dict | DeepseekV3Config | None = None,
        vision_hidden: int = 32,
        patch_dim: int = 3 * 2 * 16 * 16,
        media_placeholder_token_id: int = 0,
        **kwargs,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = DeepseekV3Config(**text_config)
        self.text_config = text_config or DeepseekV3Config()
        self.vision_hidden = vision_hidden
        self.patch_dim = patch_dim
        self.media_placeholder_token_id = media_placeholder_token_id
        super().__init__(**kwargs)


class MoEGate(nn.Module):
    """Kimi-VL's router: sigmoid scores, noaux_tc bias correction, top-k, renormalised."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = "sigmoid"
        self.weight = nn.Parameter(torch.randn(self.n_routed_experts, config.hidden_size) * 0.1)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_routed_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = torch.sigmoid(F.linear(h.float(), self.weight.float()))
        _, idx = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1)
        weight = scores.gather(1, idx)
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        return idx, weight


class KimiVLMoE(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            DeepseekV3MLP(config, intermediate_size=config.moe_intermediate_size)
            for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = DeepseekV3MLP(
            config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        idx, weight = self.gate(hidden_states)
        h = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            if token.numel():
                out.index_add_(0, token, expert(h[token]) * weight[token, slot, None].to(h.dtype))
        return out.reshape(shape) + self.shared_experts(hidden_states)


class KimiVLForConditionalGeneration(PreTrainedModel):
    config_class = KimiVLConfig
    base_model_prefix = ""
    _no_split_modules: list[str] = []

    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__(config)
        text = config.text_config
        self.vision_tower = nn.Sequential(
            nn.Linear(config.patch_dim, config.vision_hidden), nn.GELU()
        )
        self.multi_modal_projector = nn.Linear(4 * config.vision_hidden, text.hidden_size)
        self.language_model = DeepseekV3ForCausalLM(text)
        for i, layer in enumerate(self.language_model.model.layers):
            if i >= text.first_k_dense_replace:
                layer.mlp = KimiVLMoE(text)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        **_: object,
    ) -> CausalLMOutputWithPast:
        placeholder = input_ids == self.config.media_placeholder_token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        if pixel_values is not None:
            feats = self.vision_tower(pixel_values.to(embeds.dtype))
            feats = self.multi_modal_projector(feats.reshape(-1, 4 * feats.shape[-1]))
            embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), feats.to(embeds.dtype))
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=use_cache
        )


def register() -> None:
    """What `trust_remote_code` does for the real model: make the Auto classes know it."""
    try:
        AutoConfig.register("kimi_vl", KimiVLConfig)
        AutoModelForImageTextToText.register(KimiVLConfig, KimiVLForConditionalGeneration)
    except ValueError:
        pass  # already registered in this process


def text_config(vocab_size: int, **overrides: object) -> dict[str, object]:
    """The DeepSeek-V3 text config (kwargs) of both tiny Kimi layouts: 2 layers of width 64, the
    first dense (MLP 128), then 8 routed experts top-2 plus 1 shared, each 64 -> 32 -> 64; MLA
    with 4 heads (KV LoRA rank 32, q/k 8 rope + 8 nope dims, v 16); `[vocab_size, 64]`
    embeddings and an untied lm_head. `overrides` replace any of these."""
    cfg: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg
