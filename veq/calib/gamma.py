"""γ: how much more the language-model loss cares about text tokens than vision tokens.

Measured as mean |∂L/∂h| over text tokens ÷ mean |∂L/∂h| over vision tokens at the input of
every decoder layer, with L the SFT loss on answer tokens of the calibration set; γ is the mean
of the per-layer ratios. Reported both with "text" = every non-vision token (the value used) and
with answer tokens only. The same backward pass gives MBQ's per-layer vision weight
r_l = mean |g_vision| / mean |g_answer|. Owns the measurement only; the pipeline uses the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil
import torch
from torch import Tensor, nn

from veq.calib.data import CalibSample
from veq.models import decoder_layers, get_architecture
from veq.tokens import TokenKind

log = logging.getLogger(__name__)


@dataclass
class GammaResult:
    gamma: float
    gamma_answer: float
    vision_ratios: list[float]
    per_layer: list[float] = field(default_factory=list)
    samples: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "gamma_text": self.gamma,
            "gamma_answer": self.gamma_answer,
            "per_layer": self.per_layer,
            "mbq_vision_ratios": self.vision_ratios,
            "samples": self.samples,
        }


class GammaUnavailable(RuntimeError):
    """The model is too large for one backward pass on this device."""


def _fits(model: nn.Module, device: torch.device) -> bool:
    need = sum(p.numel() * p.element_size() for p in model.parameters()) * 1.5
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < free
    return need < psutil.virtual_memory().available


def measure_gamma(
    model: nn.Module,
    samples: Sequence[CalibSample],
    *,
    device: torch.device | str = "cpu",
    max_samples: int = 32,
) -> GammaResult:
    """One backward pass per sample (at most `max_samples`); the model must fit on `device`.

    Raises GammaUnavailable when it does not, or when the samples have no vision or no answer
    tokens (γ is then undefined).
    """
    device = torch.device(device)
    if not _fits(model, device):
        raise GammaUnavailable("the model is too large for a backward pass on this device")
    arch = get_architecture(model)
    layers = decoder_layers(model, arch)
    n = len(layers)
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("text", "vision", "answer")}
    counts = {k: 0 for k in sums}
    grads: list[Tensor | None] = [None] * n

    def make_hook(i: int):
        def hook(_: nn.Module, args: tuple, kwargs: dict):
            h = args[0] if args else kwargs["hidden_states"]
            if h.requires_grad:
                h.register_hook(lambda g: grads.__setitem__(i, g.detach()))
            return None

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    embed = model.get_input_embeddings()
    embed_handle = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    used = 0
    try:
        for sample in samples[:max_samples]:
            kinds = sample.kinds
            answer = kinds == TokenKind.ANSWER
            vision = kinds == TokenKind.VISION
            if not answer.any() or not vision.any():
                continue
            inputs = {k: v.to(device) for k, v in sample.inputs.items()}
            ids = inputs["input_ids"]
            labels = torch.where(answer.to(device).unsqueeze(0), ids, torch.full_like(ids, -100))
            with torch.enable_grad():
                logits = model(**inputs, use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    labels[:, 1:].reshape(-1),
                    ignore_index=-100,
                )
                loss.backward()
            for i, g in enumerate(grads):
                if g is None:
                    continue
                mag = g[0].abs().mean(-1).double().cpu()
                sums["text"][i] += mag[~vision].sum()
                sums["vision"][i] += mag[vision].sum()
                sums["answer"][i] += mag[answer].sum()
            counts["text"] += int((~vision).sum())
            counts["vision"] += int(vision.sum())
            counts["answer"] += int(answer.sum())
            grads[:] = [None] * n
            used += 1
    finally:
        for h in handles:
            h.remove()
        embed_handle.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    if used == 0:
        raise GammaUnavailable("γ needs calibration samples with both vision and answer tokens")
    mean = {k: sums[k] / max(counts[k], 1) for k in sums}
    valid = mean["vision"] > 0
    per_layer = (mean["text"][valid] / mean["vision"][valid]).tolist()
    gamma = float(sum(per_layer) / len(per_layer))
    gamma_answer = float((mean["answer"][valid] / mean["vision"][valid]).mean())
    ratios = torch.where(
        mean["answer"] > 0, mean["vision"] / mean["answer"].clamp(min=1e-30), torch.ones(n)
    )
    return GammaResult(gamma, gamma_answer, ratios.tolist(), per_layer, used)


def resolve_gamma(
    model: nn.Module,
    samples: Sequence[CalibSample],
    gamma: float | str,
    fallback: float,
    device: torch.device | str,
) -> tuple[float, str, list[float] | None, dict[str, object]]:
    """(γ, where it came from, MBQ vision ratios or None, detail for the report)."""
    if gamma != "auto":
        return float(gamma), "given", None, {}
    try:
        res = measure_gamma(model, samples, device=device)
    except GammaUnavailable as exc:
        log.warning("gamma auto: %s; using --gamma %.3g instead", exc, fallback)
        return fallback, f"fallback ({exc})", None, {}
    return res.gamma, "measured", res.vision_ratios, res.as_dict()
