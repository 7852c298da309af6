"""Plain data passed between the serving layer and the engine."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length", "cancelled", "error"]

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling knobs; temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # vLLM's extensions for fixed-length generation (benchmarks): end-of-sequence is not
    # sampled before `min_tokens`, and with `ignore_eos` it is kept as a token, not a stop.
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass
class GenerationEvent:
    """A text delta (possibly empty), and on the last event the finish reason and usage."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """With `finish_reason="error"`: what went wrong, for the client (no traceback)."""
    error_status: int = 500
    """The HTTP status that error maps to: 503 when retrying may succeed (device memory)."""


@dataclass
class GenerationRequest:
    """One chat turn to complete: tokenized inputs (batch of one, images included) and sampling.

    `inputs` are the processor's tensors (`input_ids [1, S]`, `attention_mask`, and for images
    `pixel_values`, `image_grid_thw`, `mm_token_type_ids`).
    """

    inputs: dict[str, torch.Tensor]
    params: SamplingParams
    request_id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    """Set by the engine once the final event is sent: nothing else is sent after it."""
    # Filled by the engine: where events go.
    _queue: asyncio.Queue[GenerationEvent] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (client went away)."""
        self.cancelled = True
