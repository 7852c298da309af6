"""Held-out ShapesVQA evaluation: exact-match accuracy per family, answer NLL, answer logits.

Owns scoring a model (16-bit or quantized, anything with the Hugging Face Qwen3-VL forward) on
single-question ShapesVQA samples. Exact match is greedy decoding's: an answer counts when the
argmax at every answer position, the closing `<|im_end|>` included, is the reference token; with
teacher forcing this equals greedy generation from the prompt, in one batched forward pass.
Answer NLL is −log p(answer tokens + `<|im_end|>`) per question, averaged. It does not choose
which methods to compare (`veq eval` does) and does not train.

Shape legend: B sequences, S padded length, V vocabulary, Q answers, A answer positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veq.reference.encode import Batch, Encoder
from veq.reference.shapes import FAMILIES, HELDOUT_SEEDS, Sample, evaluation_set


@dataclass
class EvalResult:
    """Exact-match accuracy overall and per family (fractions in [0, 1]), mean answer NLL."""

    accuracy: float
    per_family: dict[str, float]
    answer_nll: float
    n: int
    per_family_n: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        fam = " ".join(f"{k}={v:.3f}" for k, v in self.per_family.items())
        return f"acc={self.accuracy:.4f} nll={self.answer_nll:.4f} n={self.n} | {fam}"


@dataclass
class AnswerScores:
    """Per answer of a batch: exact match `[Q]` bool, NLL `[Q]` fp32, family names; and the
    log-probabilities at every answer position `[A, V]` fp32 (for KL between models)."""

    correct: Tensor
    nll: Tensor
    families: list[str]
    logprobs: Tensor


def load_reference(path: str | Path) -> tuple[nn.Module, Any]:
    """The 16-bit reference model (fp32 in memory, eval mode) and its processor."""
    from transformers import AutoModelForImageTextToText

    from veq.models.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, load_processor(path)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - models have parameters
        return torch.device("cpu")


@torch.no_grad()
def score_batch(model: nn.Module, batch: Batch) -> AnswerScores:
    """Run `model` once over `batch` and score every answer span (see module docstring)."""
    device = _device_of(model)
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    logits = model(**inputs, use_cache=False).logits.float()  # [B, S, V]
    correct: list[bool] = []
    nll: list[float] = []
    logp_all: list[Tensor] = []
    for row, start, end, _ in batch.spans:
        pos = torch.arange(start, end + 1, device=device)
        target = inputs["input_ids"][row, pos]
        logp = F.log_softmax(logits[row, pos - 1], dim=-1)  # [L, V]
        logp_all.append(logp)
        correct.append(bool((logp.argmax(-1) == target).all()))
        nll.append(float(-logp.gather(-1, target[:, None]).sum()))
    return AnswerScores(
        correct=torch.tensor(correct, dtype=torch.bool),
        nll=torch.tensor(nll, dtype=torch.float32),
        families=[f for _, _, _, f in batch.spans],
        logprobs=torch.cat(logp_all).cpu() if logp_all else torch.zeros(0),
    )


def heldout_samples(n: int, seed: int = HELDOUT_SEEDS.start) -> list[Sample]:
    """`n` held-out single-question samples starting at `seed` (families in turn)."""
    if seed in HELDOUT_SEEDS:
        return evaluation_set(n, HELDOUT_SEEDS, seed - HELDOUT_SEEDS.start)
    return evaluation_set(n, range(seed, seed + n))


def evaluate(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Sample] | None = None,
    *,
    n: int = 600,
    seed: int = HELDOUT_SEEDS.start,
    batch_size: int = 64,
) -> EvalResult:
    """Exact-match accuracy and answer NLL of `model` on `samples` (default: `n` held-out
    questions from `seed`, an equal share per family). The model stays in its mode and device;
    call `.eval()` first."""
    samples = list(samples) if samples is not None else heldout_samples(n, seed)
    encoder = Encoder(processor)
    scores = [
        score_batch(model, encoder(samples[i : i + batch_size]))
        for i in range(0, len(samples), batch_size)
    ]
    return summarize(scores)


def summarize(scores: Sequence[AnswerScores]) -> EvalResult:
    """Accuracy per family and overall, and mean answer NLL, over several scored batches."""
    c = torch.cat([s.correct for s in scores])
    families = [f for s in scores for f in s.families]
    per_family, per_family_n = {}, {}
    for fam in FAMILIES:
        idx = [i for i, f in enumerate(families) if f == fam]
        if idx:
            per_family[fam] = float(c[idx].float().mean())
            per_family_n[fam] = len(idx)
    return EvalResult(
        accuracy=float(c.float().mean()),
        per_family=per_family,
        answer_nll=float(torch.cat([s.nll for s in scores]).mean()),
        n=len(families),
        per_family_n=per_family_n,
    )
