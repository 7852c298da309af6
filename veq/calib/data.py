"""Calibration data: conversations with images, turned into model inputs with token kinds.

Owns the conversation type every calibration source produces (`Conversation`; the sources are
`veq.calib.sources`), encoding a conversation through the model's own chat template and
processor with each token tagged vision / prompt / answer (`veq.tokens.TokenKind`), and the
fingerprint of an encoded set. It does not run the model and knows no source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from veq.tokens import TokenKind


@dataclass(frozen=True)
class Conversation:
    """Images in order of appearance, and chat messages whose content parts reference them as
    `{"type": "image"}`; assistant messages are the answers the loss and MBQ weigh."""

    images: tuple[Image.Image, ...]
    messages: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class CalibSample:
    """One tokenized sequence: model forward kwargs (batch of one) and token kinds `[S]` int8."""

    inputs: dict[str, Tensor]
    kinds: Tensor


class CalibrationError(ValueError):
    pass


def image_parts(messages: Sequence[dict[str, Any]]) -> int:
    """How many `{"type": "image"}` placeholders `messages` hold."""
    return sum(
        1
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "image"
    )


def _encode(
    processor: Any,
    messages: Sequence[dict[str, Any]],
    images: Sequence[Image.Image],
    generation_prompt: bool,
) -> dict[str, Tensor]:
    text = processor.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = list(images)
    return dict(processor(**kwargs))


def encode_conversation(
    processor: Any, conv: Conversation, image_token_id: int, max_len: int = 2048
) -> CalibSample:
    """Tokenize through the model's chat template and processor; tag every token's kind.

    Answer spans come from prefix lengths: the tokens between "everything before this assistant
    turn + generation prompt" and "everything up to the end of this turn" are answer tokens.
    """
    full = _encode(processor, conv.messages, conv.images, False)
    ids = full["input_ids"][0]
    if ids.numel() > max_len:
        raise CalibrationError(f"calibration sample of {ids.numel()} tokens exceeds {max_len}")
    kinds = torch.full(ids.shape, int(TokenKind.PROMPT), dtype=torch.int8)
    for k, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        before = conv.messages[:k]
        start = _encode(processor, before, conv.images[: image_parts(before)], True)
        end = _encode(processor, conv.messages[: k + 1], conv.images[: image_parts(before)], False)
        kinds[start["input_ids"].shape[1] : end["input_ids"].shape[1]] = int(TokenKind.ANSWER)
    kinds[ids == image_token_id] = int(TokenKind.VISION)
    return CalibSample(inputs=full, kinds=kinds)


def fingerprint(samples: Sequence[CalibSample]) -> str:
    """Stable hash of the calibration inputs (token ids, pixels, kinds)."""
    h = hashlib.sha256()
    for s in samples:
        for key in sorted(s.inputs):
            h.update(key.encode())
            h.update(s.inputs[key].detach().cpu().contiguous().numpy().tobytes())
        h.update(s.kinds.numpy().tobytes())
    return h.hexdigest()[:16]
