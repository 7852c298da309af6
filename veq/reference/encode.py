"""ShapesVQA samples → model inputs, fast enough for a CPU training loop.

Owns the reference processor (the offline processor of `veq.models.processor` with the ShapesVQA
vocabulary as whole-word tokens), turning samples into chat conversations
(`veq.calib.data.Conversation`), and a batched encoder that produces exactly what the processor
and chat template produce (a test checks token ids and pixels against them) without calling the
slow per-image processor: it tokenizes the templated text in one call and patchifies the pixels in
torch. It also marks the answer spans (for the loss and exact match) and the per-cell targets of
the vision auxiliary loss. It does not run the model.

Shape legend: B sequences, S padded length, N images, P = N·64 patches, C = N·16 merged cells.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from veq.calib.data import Conversation
from veq.models.processor import ImageOnlyQwen3VLProcessor, build_processor, build_tokenizer
from veq.reference.shapes import (
    CALIB_SEEDS,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    Sample,
    answer_words,
    training_sample,
    vocabulary,
)

PATCH = 16
MERGE = 2
TEMPORAL = 2
GRID = IMAGE_SIZE // PATCH  # 8 patches per side
CELLS = GRID // MERGE  # 4 merged cells per side
IMAGE_TOKENS = CELLS * CELLS  # 16 merged vision tokens per image


def _single_token(tok: Any, word: str) -> bool:
    return len(tok(word, add_special_tokens=False)["input_ids"]) == 1


def reference_words() -> list[str]:
    """The whole-word tokens of the reference tokenizer, in the order that makes them whole.

    `build_tokenizer` registers each word's merges as a left-to-right chain, and BPE applies
    merges by rank over the whole word, so a pair from an earlier word ("al" from "alphabet")
    can fire first and leave a later word ("half") in pieces. Every answer word and chat role
    must be one token (exact match and answer NLL are per token): those go first, in any order
    that works, and question words that still split are left out (they stay byte-level).
    """
    must = {w for a in [*answer_words(), "user", "assistant"] for w in (a, " " + a)}
    order = sorted(
        vocabulary(), key=lambda w: (w not in must, -len(w.strip()), not w.startswith(" "), w)
    )
    for _ in range(20):
        tok = build_tokenizer(order)
        bad = [w for w in order if not _single_token(tok, w)]
        if not bad:
            return order
        bad_must = [w for w in bad if w in must]
        if bad_must:
            order = bad_must + [w for w in order if w not in bad_must]
        else:
            order = [w for w in order if w not in bad]
    raise RuntimeError(f"cannot make every answer a single token: {bad}")


def reference_processor() -> ImageOnlyQwen3VLProcessor:
    """The processor shipped with the reference model (deterministic vocabulary in which every
    answer is one token)."""
    return build_processor(words=reference_words())


def to_conversation(sample: Sample) -> Conversation:
    """A sample as chat messages: the image (if any) opens the first user turn; one user and one
    assistant message per question."""
    messages: list[dict[str, Any]] = []
    for k, qa in enumerate(sample.qas):
        if k == 0 and sample.image is not None:
            content: Any = [{"type": "image"}, {"type": "text", "text": qa.question}]
        else:
            content = qa.question
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": qa.answer})
    images = (sample.image,) if sample.image is not None else ()
    return Conversation(images, tuple(messages))


def chat_text(sample: Sample, image_tokens: int = 1) -> str:
    """The chat template's text for `sample` with `image_tokens` image placeholders."""
    parts = []
    for k, qa in enumerate(sample.qas):
        vision = ""
        if k == 0 and sample.image is not None:
            vision = "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
        parts.append(f"<|im_start|>user\n{vision}{qa.question}<|im_end|>\n")
        parts.append(f"<|im_start|>assistant\n{qa.answer}<|im_end|>\n")
    return "".join(parts)


def patchify(images: Sequence[Any]) -> Tensor:
    """Qwen2-VL pixel layout for 128×128 RGB images: `[N·64, 3·2·16·16]` fp32, normalised to
    [-1, 1], each image's patches ordered so that every 2×2 merge window is contiguous and the
    windows run in raster order (merged token r·4 + c covers pixel rows 32r.., columns 32c..)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [N, H, W, 3]
    x = torch.from_numpy(arr).float().div_(127.5).sub_(1.0).permute(0, 3, 1, 2)  # [N, 3, H, W]
    n = x.shape[0]
    x = x.unsqueeze(1).expand(n, TEMPORAL, 3, IMAGE_SIZE, IMAGE_SIZE)
    x = x.reshape(n, TEMPORAL, 3, CELLS, MERGE, PATCH, CELLS, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # N, gh, gw, mh, mw, C, T, ph, pw
    return x.reshape(n * GRID * GRID, 3 * TEMPORAL * PATCH * PATCH).contiguous()


def cell_targets(sample: Sample) -> tuple[Tensor, Tensor]:
    """Per merged cell (16, raster order) the colour and shape of the object in that cell's image
    quadrant: `colors, shapes: [16] int64`, 0 = nothing, else 1 + index in COLORS / SHAPES."""
    colors = torch.zeros(IMAGE_TOKENS, dtype=torch.long)
    kinds = torch.zeros(IMAGE_TOKENS, dtype=torch.long)
    assert sample.scene is not None
    names = list(COLORS)
    for s in sample.scene.shapes:
        qr, qc = divmod(s.quadrant, 2)
        for r in range(qr * 2, qr * 2 + 2):
            for c in range(qc * 2, qc * 2 + 2):
                colors[r * CELLS + c] = 1 + names.index(s.color)
                kinds[r * CELLS + c] = 1 + SHAPES.index(s.shape)
    return colors, kinds


@dataclass
class Batch:
    """Model inputs and answer bookkeeping for B samples.

    `inputs`: input_ids, attention_mask, mm_token_type_ids `[B, S]` int64 (right-padded), and if
    any sample has an image pixel_values `[P, 1536]` fp32 and image_grid_thw `[N, 3]`.
    `labels`: `[B, S]` int64, the token at each answer position (answer word(s) and the closing
    `<|im_end|>`), -100 elsewhere. `spans`: per answer (batch row, first, last position inclusive,
    family). `cell_colors`, `cell_shapes`: `[C]` int64 auxiliary vision targets (see
    `cell_targets`).
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    spans: list[tuple[int, int, int, str]]
    cell_colors: Tensor
    cell_shapes: Tensor

    @property
    def tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())


class Encoder:
    """Batched encoding with the reference processor's tokenizer (see module docstring)."""

    def __init__(self, processor: Any) -> None:
        tok = processor.tokenizer
        self.tokenizer = tok
        ids = tok.convert_tokens_to_ids
        self.pad = int(tok.pad_token_id)
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.image_pad = ids("<|image_pad|>")
        self.prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        texts = [chat_text(s, IMAGE_TOKENS) for s in samples]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        b, s = len(samples), max(len(e) for e in encoded)
        input_ids = torch.full((b, s), self.pad, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        labels = torch.full((b, s), -100, dtype=torch.long)
        spans: list[tuple[int, int, int, str]] = []
        k = len(self.prompt)
        for row, (ids, sample) in enumerate(zip(encoded, samples, strict=True)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            turn = 0
            for pos in range(len(ids) - k):
                if ids[pos : pos + k] == self.prompt:
                    start = pos + k
                    end = ids.index(self.im_end, start)
                    labels[row, start : end + 1] = input_ids[row, start : end + 1]
                    spans.append((row, start, end, sample.qas[turn].family))
                    turn += 1
            assert turn == len(sample.qas), "every question needs its answer span"
        inputs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "mm_token_type_ids": (input_ids == self.image_pad).long(),
        }
        with_images = [sm for sm in samples if sm.image is not None]
        colors, kinds = [], []
        if with_images:
            inputs["pixel_values"] = patchify([sm.image for sm in with_images])
            inputs["image_grid_thw"] = torch.tensor([[1, GRID, GRID]] * len(with_images))
            for sm in with_images:
                c, h = cell_targets(sm)
                colors.append(c)
                kinds.append(h)
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(
            inputs,
            labels,
            spans,
            torch.cat(colors) if colors else empty,
            torch.cat(kinds) if kinds else empty,
        )


def calibration_samples(
    n: int, seed: int = 0, questions: int = 4, text_fraction: float = 0.25
) -> list[Sample]:
    """`n` ShapesVQA samples for calibration from CALIB_SEEDS; calibration seed `seed` (0..99)
    picks a disjoint block of 10,000 seeds, so different seeds give different sets."""
    if not 0 <= seed < len(CALIB_SEEDS) // 10_000 or not 0 < n <= 10_000:
        raise ValueError(f"calibration seed must be in 0..99 and n in 1..10000, got {seed}, {n}")
    base = seed * 10_000
    return [training_sample(CALIB_SEEDS[base + i], questions, text_fraction) for i in range(n)]


def calibration_conversations(
    n: int, seed: int = 0, questions: int = 4, text_fraction: float = 0.25
) -> list[Conversation]:
    """ShapesVQA-style calibration conversations (`veq.calib.data.Conversation`): an image with
    `questions` question/answer turns, or (fraction `text_fraction`) text-only turns."""
    return [to_conversation(s) for s in calibration_samples(n, seed, questions, text_fraction)]


def write_calibration_jsonl(directory: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` calibration conversations as `calib.jsonl` + PNG images under `directory` (the
    JSONL format `veq quantize --calib FILE` reads); returns the JSONL path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(calibration_samples(n, seed)):
        conv = to_conversation(sample)
        images = []
        for k, image in enumerate(conv.images):
            name = f"{i:05d}-{k}.png"
            image.save(directory / name)
            images.append(name)
        lines.append(json.dumps({"images": images, "messages": list(conv.messages)}))
    path = directory / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
