"""One loaded model, ready to prefill a request and to decode a batch by one token.

Prefill runs the model's own forward (vision tower, image merging, multimodal RoPE) on one
request and hands back its KV cache; decode runs the decoder layers directly on the whole batch
against the engine's KV slots (`SlotBatch`) and a padding mask, so rows of different lengths
advance together.

Shape legend: B batch rows, S prompt length, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from server.engine.kv import FusedStep, KVGeometry, SlotBatch, SlotChunk, StaticSlots
from veq.models import decoder_layers, get_architecture, get_module
from veq.models.capture import LayerInputs, capture_layer_inputs
from veq.models.patch_embed import linearize_patch_embeddings


@dataclass
class Prefill:
    logits: Tensor  # [V] fp32, the distribution of the first generated token
    keys: list[Tensor]  # per layer [1, Hk, S, D]
    values: list[Tensor]
    next_position: int  # RoPE position of the first generated token


@dataclass
class ChunkedPrefill:
    """A prompt prefilled a chunk at a time: decoder-layer-0 inputs for all its positions
    (vision tower and embeddings already run) and how many positions are done."""

    inputs: LayerInputs
    length: int
    next_position: int  # RoPE position of the first generated token
    done: int = 0

    @property
    def remaining(self) -> int:
        return self.length - self.done


@dataclass
class ModelInfo:
    """What `/v1/models` and `/admin/stats` say about the loaded model."""

    name: str
    method: str
    bits: int
    group_size: int | None
    weight_bytes: int
    checkpoint: str | None = None
    symmetric: bool | None = None
    """Whether the codes are symmetric; None when unquantized."""
    label: str | None = None
    """The recipe's short name (`veq-w4g128`); None when unquantized."""
    extra: dict[str, Any] = field(default_factory=dict)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (packed weights, scales, zeros included)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in skip:
                total += buf.numel() * buf.element_size()
    return total


class ModelRunner:
    def __init__(self, model: nn.Module, processor: Any, info: ModelInfo) -> None:
        linearize_patch_embeddings(model)
        self.model = model.eval()
        self.processor = processor
        self.info = info
        self.arch = get_architecture(model)
        self.text = get_module(model, self.arch.text_model)
        self.layers = decoder_layers(model, self.arch)
        self.lm_head = model.get_output_embeddings()
        embed = self.text.embed_tokens
        self.device = embed.weight.device
        self.dtype = embed.weight.dtype
        self.mrope = self.arch.name == "qwen3_vl_moe"
        tok = processor.tokenizer
        eos = {tok.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = {int(e) for e in eos if e is not None}
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def kv_geometry(self) -> KVGeometry:
        """The cache's shape per token, from the config, in the activation dtype: key/value
        heads and head dims per layer (DeepSeek-style latent attention caches full keys, nope
        and rope dims, and values per head, as transformers does)."""
        cfg = self.text.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if getattr(cfg, "qk_nope_head_dim", None) is not None:
            dk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            dk = dv = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return KVGeometry(len(self.layers), heads, dk, dv, self.dtype)

    def _collate(self, batch: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[int]]:
        """Right-pad a list of single-request inputs into one batch; returns it and the lengths.

        Right padding keeps each row's valid positions at [0, S_b), the layout a KV slot
        uses, so a row's prefill cache moves into the running batch without shifting."""
        lengths = [int(x["input_ids"].shape[1]) for x in batch]
        top = max(lengths)
        pad_id = self.processor.tokenizer.pad_token_id or 0
        out: dict[str, Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            if all(key in x for x in batch):
                out[key] = torch.cat(
                    [
                        torch.nn.functional.pad(x[key], (0, top - x[key].shape[1]), value=fill)
                        for x in batch
                    ]
                )
        if "attention_mask" not in out:
            out["attention_mask"] = torch.cat(
                [
                    torch.nn.functional.pad(torch.ones(1, n, dtype=torch.long), (0, top - n))
                    for n in lengths
                ]
            )
        for key in ("pixel_values", "image_grid_thw"):
            parts = [x[key] for x in batch if key in x]
            if parts:
                out[key] = torch.cat(parts)
        if "image_grid_thw" in out and "mm_token_type_ids" not in out:
            raise ValueError("image inputs need mm_token_type_ids (use the model's processor)")
        return out, lengths

    @torch.no_grad()
    def prefill(self, batch: list[dict[str, Tensor]]) -> list[Prefill]:
        """Prefill several requests in one forward pass (images included)."""
        inputs, lengths = self._collate(batch)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        # The head only where a token is sampled (each row's last prompt position), not at
        # every position: `[S, 151936]` fp32 logits per prompt at Qwen3-VL's vocabulary.
        last = sorted({n - 1 for n in lengths})
        if self._logits_to_keep:
            inputs["logits_to_keep"] = torch.tensor(last, device=self.device)
        else:
            last = list(range(max(lengths)))
        out = self.model(**inputs, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        deltas = [0] * len(batch)
        if self.mrope and "image_grid_thw" in inputs:
            _, delta = self.model.model.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"],
            )
            deltas = [int(d) for d in delta.reshape(-1).tolist()]
        results = []
        for b, n in enumerate(lengths):
            results.append(
                Prefill(
                    out.logits[b, last.index(n - 1)].float(),
                    [layer.keys[b : b + 1, :, :n] for layer in cache.layers],
                    [layer.values[b : b + 1, :, :n] for layer in cache.layers],
                    n + deltas[b],
                )
            )
        return results

    @property
    def chunked_prefill(self) -> bool:
        """Whether long prompts can be prefilled in chunks (`start_prefill`): for the layouts
        whose layer inputs `prefill_chunk` knows how to slice (Qwen3-VL-MoE)."""
        return self.mrope

    @torch.no_grad()
    def start_prefill(self, inputs: dict[str, Tensor]) -> ChunkedPrefill:
        """Run one request's vision tower and embeddings (everything before decoder layer 0)."""
        x = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in x:
            x["pixel_values"] = x["pixel_values"].to(self.dtype)
        n = int(x["input_ids"].shape[1])
        delta = 0
        if "image_grid_thw" in x:
            _, d = self.model.model.get_rope_index(
                x["input_ids"],
                mm_token_type_ids=x["mm_token_type_ids"],
                image_grid_thw=x["image_grid_thw"],
                attention_mask=x.get("attention_mask"),
            )
            delta = int(d.reshape(-1)[0])
        return ChunkedPrefill(
            capture_layer_inputs(self.model, self.arch, x, self.device), n, n + delta
        )

    @torch.no_grad()
    def prefill_chunk(self, job: ChunkedPrefill, kv: SlotChunk) -> Tensor | None:
        """Run the decoder over the next `kv.n` positions of `job` into its slot; the logits
        `[V]` (fp32) of the last prompt position once the prompt is done, else None."""
        a, b = job.done, job.done + kv.n
        captured = job.inputs
        cos, sin = captured.kwargs["position_embeddings"]
        hidden = self._chunk_layers(
            captured.hidden[:, a:b],
            job,
            kv.causal_mask(),
            kv,
            (cos[:, a:b], sin[:, a:b]),
            _chunk_post_layer_kwargs(captured.text_kwargs, a, b),
        )
        job.done = b
        if job.done < job.length:
            return None
        return self.lm_head(self.text.norm(hidden)[:, -1]).float()[0]

    def _chunk_layers(
        self,
        hidden: Tensor,
        job: ChunkedPrefill,
        mask: Tensor,
        kv: SlotChunk | FusedStep,
        position_embeddings: tuple[Tensor, Tensor],
        post: dict[str, Any],
    ) -> Tensor:
        """Every decoder layer over `hidden: [1, S, H]` (a chunk, alone or after decode rows)
        with `job`'s captured layer kwargs, the additive `mask` (fp32) and `kv`; the cache's
        lengths advance. Returns the last layer's output `[1, S, H]`."""
        kwargs = dict(job.inputs.kwargs)
        kwargs.update(
            attention_mask=mask.to(self.device, hidden.dtype),
            cache=kv,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
        for i, layer in enumerate(self.layers):
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if self.arch.post_layer is not None:
                hidden = self.arch.post_layer(i, hidden, post)
        kv.end_step()
        return hidden

    @torch.no_grad()
    def decode_and_chunk(
        self, tokens: list[int], positions: Tensor, job: ChunkedPrefill, kv: FusedStep
    ) -> tuple[Tensor, Tensor | None]:
        """`decode` of B rows and `prefill_chunk` of the next `kv.chunk.n` positions of `job`
        in one forward, so that the step pays each layer's fixed cost (on the CPU, every
        expert's dequantization) once. Returns the rows' logits `[B, V]` and, once the prompt
        is done, its first token's logits `[V]` (else None); both fp32."""
        b, n = len(tokens), kv.chunk.n
        a, end = job.done, job.done + n
        captured = job.inputs
        ids = torch.tensor(tokens, device=self.device)
        rows = self.text.embed_tokens(ids.unsqueeze(1))  # [B, 1, H]
        hidden = torch.cat([rows.transpose(0, 1), captured.hidden[:, a:end].to(rows)], dim=1)
        pos = positions.to(self.device)
        position_ids = pos.view(1, b, 1).expand(3, b, 1)
        cos_rows, sin_rows = self.text.rotary_emb(rows, position_ids)  # [B, 1, D]
        cos, sin = captured.kwargs["position_embeddings"]
        position_embeddings = (
            torch.cat([cos_rows.transpose(0, 1), cos[:, a:end].to(cos_rows)], dim=1),
            torch.cat([sin_rows.transpose(0, 1), sin[:, a:end].to(sin_rows)], dim=1),
        )
        post = _chunk_post_layer_kwargs(captured.text_kwargs, a, end)
        if "visual_pos_masks" in post:  # the rows hold no image position
            none = torch.zeros(1, b, dtype=torch.bool, device=self.device)
            post["visual_pos_masks"] = torch.cat([none, post["visual_pos_masks"]], dim=1)
        hidden = self._chunk_layers(hidden, job, kv.mask(), kv, position_embeddings, post)
        job.done = end
        last = [*range(b), b + n - 1] if job.done == job.length else list(range(b))
        logits = self.lm_head(self.text.norm(hidden[0, last])).float()
        return logits[:b], (logits[b] if job.done == job.length else None)

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: Tensor, kv: SlotBatch) -> Tensor:
        """Feed one token per row (`tokens` [B], RoPE `positions` [B]); returns logits [B, V]."""
        ids = torch.tensor(tokens, device=self.device)
        hidden = self.text.embed_tokens(ids.unsqueeze(1))
        mask = kv.begin_step().to(self.device, hidden.dtype)
        logits = self._decode_layers(hidden, positions.to(self.device), mask, kv)
        kv.end_step()
        return logits

    @torch.no_grad()
    def decode_static(self, ids: Tensor, positions: Tensor, kv: StaticSlots) -> Tensor:
        """`decode` at fixed shapes, every input already on the device (`ids`, `positions`:
        long [R]): no host tensor, no host sync, so a CUDA graph can capture it. The caller
        advances the slots' lengths. Returns logits [R, V] fp32."""
        hidden = self.text.embed_tokens(ids.unsqueeze(1))
        return self._decode_layers(hidden, positions, kv.mask(hidden.dtype), kv)

    def _decode_layers(
        self, hidden: Tensor, pos: Tensor, mask: Tensor, kv: SlotBatch | StaticSlots
    ) -> Tensor:
        """hidden: [B, 1, H] embeddings; pos: long [B] RoPE positions on the device; mask:
        [B, 1, 1, top] additive. Runs every decoder layer against `kv`; logits [B, V] fp32."""
        b = hidden.shape[0]
        position_ids = pos.view(1, b, 1).expand(3, b, 1) if self.mrope else pos.view(b, 1)
        position_embeddings = self.text.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=None if self.mrope else position_ids,
                cache=kv,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm_head(self.text.norm(hidden)[:, -1]).float()


def _chunk_post_layer_kwargs(text_kwargs: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    """Qwen3-VL's deepstack inputs for positions [a, b): the image-position mask's slice and
    the rows of the visual features that belong to the image tokens inside it."""
    mask = text_kwargs.get("visual_pos_masks")
    embeds = text_kwargs.get("deepstack_visual_embeds")
    if mask is None or embeds is None:
        return {}
    lo, hi = int(mask[:, :a].sum()), int(mask[:, :b].sum())
    return {"visual_pos_masks": mask[:, a:b], "deepstack_visual_embeds": [e[lo:hi] for e in embeds]}
