"""ShapesVQA samples → model inputs, fast enough for a CPU training loop.

Owns the reference processor (the offline processor of `veq.models.processor` with the ShapesVQA
vocabulary as whole-word tokens and a pixel budget of 128²–192²), turning samples into chat
conversations (`veq.calib.data.Conversation`), and a batched encoder that produces exactly what
the processor and chat template produce (a test checks token ids and pixels against them): it
runs the image processor once over a batch's images, then tokenizes the templated text in one
call. It also marks the answer spans (for the loss and exact match) and the per-cell targets of
the vision auxiliary loss. It does not run the model.

Shape legend: B sequences, S padded length, N images, P patches (64–144 per image), C merged
cells (P / 4).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from veq.calib.data import Conversation
from veq.models.processor import ImageOnlyQwen3VLProcessor, build_processor, build_tokenizer
from veq.reference.shapes import (
    CALIB_SEEDS,
    COLORS,
    SHAPES,
    Sample,
    Scene,
    answer_words,
    label_map,
    plural,
    training_sample,
    vocabulary,
)

PATCH = 16
MERGE = 2
#: The reference processor's pixel budget: images are resized (aspect kept, sides multiples of 32)
#: to between 128² and 192² pixels, so 16–36 merged vision tokens (aspect 2:1: 256×128, 32).
MIN_PIXELS, MAX_PIXELS = 128 * 128, 192 * 192
#: A merged cell's dominant object must cover this share of it, else the cell is background.
CELL_COVER = 0.12
#: Horizontal and vertical position classes of a merged cell (its centre, in bins of the image).
POSITION_BINS = 4
#: A cell shows an object (a pointer target, `object_cells`) when it holds at least this share of
#: the object's pixels in its fullest cell.
OBJECT_SHARE = 0.3


def _single_token(tok: Any, word: str) -> bool:
    return len(tok(word, add_special_tokens=False)["input_ids"]) == 1


@functools.cache
def reference_words() -> tuple[str, ...]:
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
            return tuple(order)
        bad_must = [w for w in bad if w in must]
        if bad_must:
            order = bad_must + [w for w in order if w not in bad_must]
        else:
            order = [w for w in order if w not in bad]
    raise RuntimeError(f"cannot make every answer a single token: {bad}")


def reference_processor() -> ImageOnlyQwen3VLProcessor:
    """The processor shipped with the reference model (deterministic vocabulary in which every
    answer is one token)."""
    return build_processor(words=reference_words(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


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


CELL_TARGETS = ("colors", "shapes", "centres", "cols", "rows")
"""The auxiliary per-cell targets (see `cell_targets`)."""


def _cell_pixels(scene: Scene, grid_h: int, grid_w: int) -> Tensor:
    """Pixels of each object in each merged cell (raster order over `grid_h/2 × grid_w/2`) of the
    scene resized to `16·grid_w × 16·grid_h`: `[cells, 1 + objects]` int64, column 0 zeroed
    (background)."""
    ch, cw = grid_h // MERGE, grid_w // MERGE
    side = PATCH * MERGE
    owner = label_map(scene, cw * side, ch * side).reshape(ch, side, cw, side)
    owner = torch.from_numpy(owner.transpose(0, 2, 1, 3).reshape(ch * cw, side * side).copy())
    counts = F.one_hot(owner.long(), 1 + len(scene.shapes)).sum(1)
    counts[:, 0] = 0
    return counts


def object_cells(scene: Scene, grid_h: int, grid_w: int) -> list[Tensor]:
    """Per object of the scene, the merged cells (indices as in `cell_targets`) that show it:
    those holding at least OBJECT_SHARE of its pixels in its fullest cell, so a small shape still
    has the cell it sits in. `[K]` int64 each."""
    counts = _cell_pixels(scene, grid_h, grid_w)[:, 1:]  # [cells, objects]
    fullest = counts.max(0).values.clamp(min=1)
    return [
        torch.nonzero(counts[:, i] >= OBJECT_SHARE * fullest[i])[:, 0]
        for i in range(counts.shape[1])
    ]


def cell_targets(scene: Scene, grid_h: int, grid_w: int) -> dict[str, Tensor]:
    """Per merged cell (raster order over `grid_h/2 × grid_w/2`, the processor's patch grid) of
    the scene resized to `16·grid_w × 16·grid_h` pixels, each `[cells]` int64:

    - `colors`, `shapes`: the object covering most of the cell (at least CELL_COVER of it),
      0 = background, else 1 + index in COLORS / SHAPES;
    - `centres`: how many object centres fall in the cell (0..3, 3 = three or more), which
      counting reads off;
    - `cols`, `rows`: the cell's own position, in POSITION_BINS bins of the image width/height,
      which keeps position in the tokens' content (without it a probe of the merged tokens finds
      none, and position questions sit at chance).
    """
    ch, cw = grid_h // MERGE, grid_w // MERGE
    side = PATCH * MERGE
    counts = _cell_pixels(scene, grid_h, grid_w)  # [cells, 1 + objects]
    best = counts.argmax(1)
    covered = counts.gather(1, best[:, None])[:, 0] >= CELL_COVER * side * side
    color_ids = torch.tensor([0] + [1 + list(COLORS).index(s.color) for s in scene.shapes])
    shape_ids = torch.tensor([0] + [1 + SHAPES.index(s.shape) for s in scene.shapes])
    colors = torch.where(covered, color_ids[best], 0)
    kinds = torch.where(covered, shape_ids[best], 0)
    centres = torch.zeros(ch * cw, dtype=torch.long)
    for s in scene.shapes:
        r = min(ch - 1, int(s.cy / scene.height * ch))
        c = min(cw - 1, int(s.cx / scene.width * cw))
        centres[r * cw + c] += 1
    rows, cols = torch.meshgrid(torch.arange(ch), torch.arange(cw), indexing="ij")
    cols = ((cols.flatten() + 0.5) / cw * POSITION_BINS).long()
    rows = ((rows.flatten() + 0.5) / ch * POSITION_BINS).long()
    return {
        "colors": colors,
        "shapes": kinds,
        "centres": centres.clamp(max=3),
        "cols": cols,
        "rows": rows,
    }


@dataclass
class Batch:
    """Model inputs and answer bookkeeping for B samples.

    `inputs`: input_ids, attention_mask, mm_token_type_ids `[B, S]` int64 (right-padded), and if
    any sample has an image pixel_values `[P, 1536]` fp32 and image_grid_thw `[N, 3]`.
    `labels`: `[B, S]` int64, the token at each answer position (answer tokens and the closing
    `<|im_end|>`), -100 elsewhere. `spans`: per answer (batch row, first, last position inclusive,
    family). `cells`: the auxiliary vision targets `[C]` int64 per name of CELL_TARGETS (see
    `cell_targets`), images in order. `pointers` and `word_pointers`: per answer read off shapes
    of the image (a question's `about`), its batch row, a query position, and the image-token
    positions showing those shapes `[K]` int64 (`object_cells`); the query is the position that
    predicts the answer's first token (`pointers`) or the question's last colour or shape word,
    the one that names what is asked about (`word_pointers`; questions without one, "How many
    shapes are there?", have none).
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    spans: list[tuple[int, int, int, str]]
    cells: dict[str, Tensor]
    pointers: list[tuple[int, int, Tensor]] = field(default_factory=list)
    word_pointers: list[tuple[int, int, Tensor]] = field(default_factory=list)

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
        self.im_end = ids("<|im_end|>")
        self.im_start = ids("<|im_start|>")
        self.image_pad = ids("<|image_pad|>")
        self.prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.images = processor.image_processor
        words = [*COLORS, *SHAPES, *map(plural, SHAPES)]
        self.attribute_words = {ids("Ġ" + w) for w in words}

    def __call__(self, samples: Sequence[Sample], targets: bool = False) -> Batch:
        """Encode `samples`; with `targets`, also the auxiliary per-cell targets."""
        with_images = [sm for sm in samples if sm.image is not None]
        vision: dict[str, Tensor] = {}
        tokens: list[int] = []
        if with_images:
            vision = dict(self.images(images=[sm.image for sm in with_images], return_tensors="pt"))
            tokens = [int(g.prod()) // (MERGE * MERGE) for g in vision["image_grid_thw"]]
        per_sample = iter(tokens)
        texts = [chat_text(s, next(per_sample) if s.image is not None else 0) for s in samples]
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
            **vision,
        }
        cells: dict[str, Tensor] = {}
        pointers: list[tuple[int, int, Tensor]] = []
        word_pointers: list[tuple[int, int, Tensor]] = []
        if targets and with_images:
            if any(sm.scene is None for sm in with_images):
                raise ValueError("cell targets need every image's scene")
            grids = iter(vision["image_grid_thw"])
            per_image = []
            for row, sample in enumerate(samples):
                if sample.scene is None or sample.image is None:
                    continue
                _, gh, gw = (int(v) for v in next(grids))
                per_image.append(cell_targets(sample.scene, gh, gw))
                shown = object_cells(sample.scene, gh, gw)
                image_pos = torch.nonzero(input_ids[row] == self.image_pad)[:, 0]
                answers = [sp for sp in spans if sp[0] == row]
                for qa, (_, start, _, _) in zip(sample.qas, answers, strict=True):
                    cells = [shown[i] for i in qa.about]
                    if cells and all(c.numel() for c in cells):
                        keys = image_pos[torch.cat(cells).unique()]
                        pointers.append((row, start - 1, keys))
                        word = self._naming_word(encoded[row], start - k)
                        if word is not None:
                            word_pointers.append((row, word, keys))
            cells = {name: torch.cat([t[name] for t in per_image]) for name in CELL_TARGETS}
        return Batch(inputs, labels, spans, cells, pointers, word_pointers)

    def _naming_word(self, ids: list[int], prompt: int) -> int | None:
        """The position of the last colour or shape word of the user turn before `prompt` (the
        answer's `<|im_start|>assistant` position), None if it has none."""
        for pos in range(prompt - 1, -1, -1):
            if ids[pos] == self.im_start:  # the user turn's first token
                return None
            if ids[pos] in self.attribute_words:
                return pos
        return None


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
