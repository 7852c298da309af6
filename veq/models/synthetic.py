"""Synthetic models: a real architecture's shapes with seeded random weights, built in code.

`synthetic:NAME[?key=value&...]` is a model name every command accepts (`veq serve`, `veq
quantize`, `veq bench --spawn`), e.g. `synthetic:qwen3-vl-30b-a3b` (the Qwen3-VL-30B-A3B
shapes, 31 B parameters), `synthetic:qwen3-vl-30b-a3b?layers=8` (its first 8 decoder layers),
or `synthetic:tiny` (the same module tree at test size). Overrides: `layers`, `experts`,
`top_k`, `seed`. Nothing is downloaded: the config is written here, the processor is the
offline recipe (`veq.models.processor.build_processor`), the weights are random.

Owns the presets, parsing a spec, materialising it as a small model directory (config.json,
processor files and `synthetic.json`; no weight files) so that everything that takes a model
directory works unchanged, the fingerprint of that directory (the resolved spec: the model is a
pure function of it), and building the model directly on a device in one allocation.

Weights are a counter-based hash of (seed, parameter name, element index), so they are the
same on every device (like a checkpoint on disk) and are filled in chunks on the target
device, rounded to the preset's storage dtype (bf16) first: no fp32 host copy, no
transformers init. Norm weights are 1 and biases 0. Two output-side choices make load tests
meaningful on a random model: `lm_head` rows are non-zero only for tokens that decode to
printable text, with logits spread wide enough that those always win, so every generated
token is visible text (time to first token is measured at the first token) and EOS is never
chosen (every request runs to `max_tokens`, like `ignore_eos` in serving benchmarks).

It does not quantize, serve, or decide what a benchmark measures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import Tensor, nn

PREFIX = "synthetic:"
#: Written into every materialised directory; its content is the model's identity.
MARKER = "synthetic.json"
#: Bump when the weight generator changes: the fingerprint (and so the cache key) changes too.
GENERATOR = "fmix32-uniform-v1"
#: Elements hashed per step: on a GPU few large launches (int64 temporaries of 128 MiB); on a
#: CPU cache-sized pieces (7x faster than memory-sized ones on the 2-core dev machine).
_CHUNK = {"cuda": 1 << 24, "cpu": 1 << 16}
_M32 = 0xFFFFFFFF
#: Std of `lm_head` logits over decodable tokens (the final norm gives hidden rms 1).
_LOGIT_STD = 12.0


@dataclass(frozen=True)
class Preset:
    """The shapes of one synthetic model (Qwen3-VL-MoE layout)."""

    hidden: int
    layers: int
    experts: int
    top_k: int
    moe_intermediate: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int | None  # None: the tokenizer's size
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_positions: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    vision_positions: int
    deepstack: tuple[int, ...]
    dtype: str = "bfloat16"  # storage dtype of the weights (what a checkpoint would hold)
    init_std: float = 0.02


PRESETS: dict[str, Preset] = {
    # Qwen/Qwen3-VL-30B-A3B-Instruct, from its config.json on the Hugging Face Hub
    # (https://huggingface.co/Qwen/Qwen3-VL-30B-A3B-Instruct/blob/main/config.json; text_config:
    # 48 layers, hidden 2048, intermediate 6144, 32 heads / 4 KV heads, head_dim 128, 128
    # experts top-8, moe_intermediate 768, vocab 151936, rope_theta 5e6, mrope_section
    # [24, 20, 20], max_position_embeddings 262144; vision_config: depth 27, hidden 1152,
    # intermediate 4304, 16 heads, 2304 position embeddings, out_hidden 2048, deepstack
    # [8, 16, 24]). transformers' `Qwen3VLMoeVisionConfig` defaults carry the same vision
    # numbers; its `Qwen3VLMoeTextConfig` defaults do NOT describe this model (24 layers, 60
    # experts), so every text number is spelled out here. 31.07 B parameters (the Hub lists
    # 31.1 B), 3.35 B active per token counting embeddings and lm_head.
    "qwen3-vl-30b-a3b": Preset(
        hidden=2048,
        layers=48,
        experts=128,
        top_k=8,
        moe_intermediate=768,
        intermediate=6144,
        heads=32,
        kv_heads=4,
        head_dim=128,
        vocab=151936,
        rope_theta=5_000_000.0,
        mrope_section=(24, 20, 20),
        max_positions=262144,
        vision_hidden=1152,
        vision_depth=27,
        vision_heads=16,
        vision_intermediate=4304,
        vision_positions=2304,
        deepstack=(8, 16, 24),
    ),
    # The same module tree at test size (CPU, well under a second to build). Its vocabulary is
    # larger than the tokenizer's, as the real preset's is, so the lm_head masking is exercised.
    "tiny": Preset(
        hidden=64,
        layers=2,
        experts=8,
        top_k=2,
        moe_intermediate=32,
        intermediate=128,
        heads=4,
        kv_heads=2,
        head_dim=16,
        vocab=512,
        rope_theta=10_000.0,
        mrope_section=(4, 2, 2),
        max_positions=4096,
        vision_hidden=32,
        vision_depth=2,
        vision_heads=2,
        vision_intermediate=64,
        vision_positions=256,
        deepstack=(0,),
    ),
}

#: Spec keys that override a preset, with their lower bounds.
OVERRIDES: dict[str, int] = {"layers": 1, "experts": 1, "top_k": 1, "seed": 0}


@dataclass(frozen=True)
class SyntheticSpec:
    """A parsed `synthetic:NAME?...` name: preset, overrides applied, seed."""

    name: str
    preset: Preset
    seed: int = 0

    @property
    def canonical(self) -> str:
        """`synthetic:NAME?k=v&...` listing only the values that differ from the preset."""
        base = PRESETS[self.name]
        parts = [
            f"{k}={getattr(self.preset, k)}"
            for k in ("layers", "experts", "top_k")
            if getattr(self.preset, k) != getattr(base, k)
        ]
        if self.seed:
            parts.append(f"seed={self.seed}")
        return PREFIX + self.name + ("?" + "&".join(parts) if parts else "")

    def identity(self) -> dict[str, Any]:
        """Everything the weights depend on (the content of `synthetic.json`)."""
        return {
            "spec": self.canonical,
            "preset": self.name,
            "shapes": dataclasses.asdict(self.preset),
            "seed": self.seed,
            "generator": GENERATOR,
        }

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over `identity()` (same format as `model_fingerprint`)."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_spec(model: object) -> bool:
    """True for a `synthetic:...` model name."""
    return isinstance(model, str) and model.startswith(PREFIX)


def parse_spec(spec: str | SyntheticSpec) -> SyntheticSpec:
    """Parse `synthetic:NAME[?layers=8&experts=..&top_k=..&seed=..]`.

    Raises ValueError naming what is wrong and what is allowed."""
    if isinstance(spec, SyntheticSpec):
        return spec
    if not is_spec(spec):
        raise ValueError(f"{spec!r} is not a synthetic model name ({PREFIX}NAME[?key=value&...])")
    body = spec[len(PREFIX) :]
    name, _, query = body.partition("?")
    if name not in PRESETS:
        raise ValueError(
            f"unknown synthetic model {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        )
    values: dict[str, int] = {}
    for key, text in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in OVERRIDES:
            raise ValueError(f"unknown synthetic override {key!r}; allowed: {', '.join(OVERRIDES)}")
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"synthetic override {key}={text!r} is not an integer") from None
        if value < OVERRIDES[key]:
            raise ValueError(f"synthetic override {key}={value} must be >= {OVERRIDES[key]}")
        values[key] = value
    seed = values.pop("seed", 0)
    preset = dataclasses.replace(PRESETS[name], **values)
    if preset.top_k > preset.experts:
        raise ValueError(f"top_k={preset.top_k} exceeds experts={preset.experts}")
    return SyntheticSpec(name, preset, seed)


# -- config and processor --------------------------------------------------------------------


def build_config(spec: str | SyntheticSpec, processor: Any) -> Any:
    """The `Qwen3VLMoeConfig` of `spec`, token ids wired to `processor` (`build_processor()`):
    `veq.testing.qwen3_vl_moe_config` with every number of the preset, weights typed as the
    preset's storage dtype."""
    from veq.testing import qwen3_vl_moe_config

    p = parse_spec(spec).preset
    config = qwen3_vl_moe_config(
        processor,
        vocab=p.vocab,
        hidden=p.hidden,
        layers=p.layers,
        experts=p.experts,
        top_k=p.top_k,
        moe_intermediate=p.moe_intermediate,
        intermediate=p.intermediate,
        heads=p.heads,
        kv_heads=p.kv_heads,
        head_dim=p.head_dim,
        rope_theta=p.rope_theta,
        mrope_section=p.mrope_section,
        max_positions=p.max_positions,
        vision_hidden=p.vision_hidden,
        vision_depth=p.vision_depth,
        vision_heads=p.vision_heads,
        vision_intermediate=p.vision_intermediate,
        vision_positions=p.vision_positions,
        deepstack=p.deepstack,
    )
    config.dtype = p.dtype
    return config


def default_root() -> Path:
    """Where materialised directories live: a per-user folder in the system temp directory
    (they are a few kilobytes and rebuilt in milliseconds; nothing needs to keep them)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"veq-synthetic-{uid}"


def is_synthetic_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_spec(path: str | Path) -> SyntheticSpec:
    """The spec a materialised directory was made from."""
    return parse_spec(json.loads((Path(path) / MARKER).read_text())["spec"])


def materialize(spec: str | SyntheticSpec, root: str | Path | None = None) -> Path:
    """A model directory for `spec` (config.json, processor files, synthetic.json; no weights),
    created once per spec and written atomically (a temporary sibling renamed into place)."""
    from veq.models.processor import build_processor

    s = parse_spec(spec)
    root = Path(root) if root is not None else default_root()
    final = root / f"{s.name}-{s.fingerprint()}"
    if _complete(final, s):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        processor = build_processor()
        build_config(s, processor).save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(s.identity(), indent=1, sort_keys=True))
        if final.exists() and not _complete(final, s):
            shutil.rmtree(final, ignore_errors=True)  # a broken leftover: replace it
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final, s):  # another process won the race with a good copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(path: Path, s: SyntheticSpec) -> bool:
    try:
        return (
            json.loads((path / MARKER).read_text())
            == json.loads(json.dumps(s.identity(), sort_keys=True))
            and (path / "config.json").is_file()
        )
    except (OSError, ValueError):
        return False


def fingerprint(path: str | Path) -> str:
    """The cache identity of a materialised directory: its spec (no weights to hash)."""
    return read_spec(path).fingerprint()


# -- parameters --------------------------------------------------------------------------------


def meta_model(spec: str | SyntheticSpec) -> nn.Module:
    """The model on the meta device: shapes only, nothing allocated."""
    from transformers import AutoModelForImageTextToText

    from veq.models.processor import build_processor

    config = build_config(spec, build_processor())
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """`total`, `vision`, `experts` and `active` parameters of a Qwen3-VL-MoE model.

    `active` is what one text token touches: the language model and lm_head with only top_k
    of the E experts of each layer (the vision tower excluded).
    """
    cfg = model.config.text_config
    total = vision = experts = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if ".visual." in f".{name}":
            vision += n
        elif ".mlp.experts." in name:
            experts += n
    active = total - vision - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "vision": vision, "experts": experts, "active": active}


def decodable_token_ids(tokenizer: Any) -> list[int]:
    """Ids that decode on their own to printable text (no special tokens, no partial UTF-8)."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text and text.isprintable() and "\ufffd" not in text:
            out.append(i)
    return out


def _mul32(x: Tensor, c: int) -> Tensor:
    """`(x · c) mod 2^32` for int64 `x` in [0, 2^32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2^32)) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def hash_uniform(start: int, count: int, key: int, device: torch.device) -> Tensor:
    """`[count]` fp32 in (-1, 1): element `start + i` of the stream `key` (64-bit).

    A pure function of (key, index) computed with exact integer and fp32 operations, so every
    device gives the same bits; 24 random bits per value, never exactly ±1. Streams hold at
    most 2^32 elements (the largest Qwen3-VL-30B tensor has 4·10^8).
    """
    if start < 0 or start + count > 1 << 32:
        raise ValueError(f"elements [{start}, {start + count}) exceed a 2^32-element stream")
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _fmix32(idx ^ (key & _M32))
    x = _fmix32(x ^ ((key >> 32) & _M32))
    u24 = (x >> 8).to(torch.float32)  # [0, 2^24), exact
    return (u24 - 8388607.5) * (1.0 / 8388608.0)  # (k - 2^23 + 1/2) / 2^23, exact


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


@torch.no_grad()
def fill_uniform(p: Tensor, key: int, std: float, storage: torch.dtype) -> None:
    """Fill `p` (any shape, contiguous) in place with uniform values of std `std`, rounded to
    `storage` first; chunked so temporaries stay small (`_CHUNK`)."""
    flat = p.view(-1)
    amp = std * math.sqrt(3.0)
    chunk = _CHUNK.get(flat.device.type, _CHUNK["cuda"])
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        values = hash_uniform(start, n, key, flat.device) * amp
        flat[start : start + n].copy_(values.to(storage))


@torch.no_grad()
def init_weights(
    model: nn.Module, spec: str | SyntheticSpec, tokenizer: Any, storage: torch.dtype
) -> None:
    """Give every parameter its synthetic value (module docstring): norms 1, biases 0, matrices
    uniform with the preset's std, `lm_head` rows only for decodable tokens, wider."""
    s = parse_spec(spec)
    hidden = model.config.text_config.hidden_size
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        key = _key(s.seed, name)
        if name == "lm_head.weight":
            p.zero_()
            ids = torch.tensor(decodable_token_ids(tokenizer), device=p.device)
            rows = torch.empty(len(ids), p.shape[1], dtype=p.dtype, device=p.device)
            fill_uniform(rows, key, _LOGIT_STD / math.sqrt(hidden), storage)
            p.index_copy_(0, ids, rows)
            continue
        fill_uniform(p, key, s.preset.init_std, storage)


def build_model(
    source: str | Path | SyntheticSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The synthetic model of a materialised directory or a spec, on `device`, in eval mode.

    Parameters are allocated once, directly on `device` (transformers' init skipped) in `dtype`
    (default: fp32 on CPU, the preset's storage dtype elsewhere, as `veq.api.load_model` does
    for checkpoints), then filled in place.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from veq.models.processor import build_processor

    processor = build_processor()
    if isinstance(source, Path) or (isinstance(source, str) and not is_spec(source)):
        spec = read_spec(source)
        config = AutoConfig.from_pretrained(str(source))
    else:
        spec = parse_spec(source)
        config = build_config(spec, processor)
    dev = torch.device(device)
    storage = getattr(torch, spec.preset.dtype)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else storage
    with _no_init(), dev:
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    init_weights(model, spec, processor.tokenizer, storage)
    return model.eval()


def _no_init() -> Any:
    """transformers' context that skips weight init (torch.nn.init and `init_weights`)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: init runs, then is overwritten (slower, correct)
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()
