"""γ: how much more the language-model loss cares about text tokens than vision tokens.

Measured as mean |∂L/∂h| over text tokens ÷ mean |∂L/∂h| over vision tokens at the input of
every decoder layer, with L the SFT loss on answer tokens of the calibration set; γ is the mean
of the per-layer ratios. Reported both with "text" = every non-vision token (the value used) and
with answer tokens only. The same backward pass gives MBQ's per-layer vision weight
r_l = mean |g_vision| / mean |g_answer|, and, at every layer's output, the per-token saliency
`veq`'s gradient-weighted Hessians use (`measure_saliency`). Owns the measurements; where
they run is `veq.calib.placement`'s; the pipeline uses the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from veq.calib.data import CalibSample
from veq.calib.placement import backward_room
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
    """No γ on this device: the backward pass does not fit or failed there, or the samples lack
    vision or answer tokens."""


def measure_gamma(
    model: nn.Module,
    samples: Sequence[CalibSample],
    *,
    device: torch.device | str = "cpu",
    max_samples: int = 32,
) -> GammaResult:
    """One backward pass per sample (at most `max_samples`) on `device`.

    Owns where the pass runs: a model elsewhere (the calibrator keeps it on the host and streams
    layers) visits `device` whole for the measurement when it fits there with the pass's
    activations, and is left as found afterwards, on failure too. Raises GammaUnavailable when
    it does not fit, when the device runs out of memory or fails during the pass, or when the
    samples have no vision or no answer tokens (γ is then undefined).
    """
    # "cuda" names whichever GPU is current; parameters report an index. Compare like with like.
    device = torch.empty(0, device=device).device
    usable = [
        s
        for s in samples[:max_samples]
        if (s.kinds == TokenKind.ANSWER).any() and (s.kinds == TokenKind.VISION).any()
    ]
    if not usable:
        raise GammaUnavailable("γ needs calibration samples with both vision and answer tokens")
    with backward_room(model, usable, device, GammaUnavailable):
        return _measure(model, usable, device)


def _layer_grads(
    model: nn.Module, samples: Sequence[CalibSample], device: torch.device
) -> Iterator[tuple[CalibSample, list[Tensor | None], list[Tensor | None]]]:
    """Per sample, one backward pass of the SFT loss on its answer tokens: the gradients
    `[1, S, H]` at every decoder layer's input and output. The model is already on `device`;
    requires_grad, training mode and hooks are left as found."""
    layers = decoder_layers(model, get_architecture(model))
    n = len(layers)
    grads_in: list[Tensor | None] = [None] * n
    grads_out: list[Tensor | None] = [None] * n

    def keep(store: list[Tensor | None], i: int, h: Tensor) -> None:
        if h.requires_grad:
            h.register_hook(lambda g: store.__setitem__(i, g.detach()))

    def pre_hook(i: int):
        def hook(_: nn.Module, args: tuple, kwargs: dict):
            keep(grads_in, i, args[0] if args else kwargs["hidden_states"])

        return hook

    def post_hook(i: int):
        def hook(_: nn.Module, args: tuple, kwargs: dict, out: object):
            keep(grads_out, i, out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type]

        return hook

    handles = [
        layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    handles += [
        layer.register_forward_hook(post_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            answer = sample.kinds == TokenKind.ANSWER
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
            yield sample, list(grads_in), list(grads_out)
            grads_in[:] = [None] * n
            grads_out[:] = [None] * n
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)


def _measure(model: nn.Module, samples: Sequence[CalibSample], device: torch.device) -> GammaResult:
    """γ from the passes, with the model already on `device`; every sample has vision and
    answer tokens."""
    n = len(decoder_layers(model, get_architecture(model)))
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("text", "vision", "answer")}
    counts = {k: 0 for k in sums}
    for sample, grads, _ in _layer_grads(model, samples, device):
        answer = sample.kinds == TokenKind.ANSWER
        vision = sample.kinds == TokenKind.VISION
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
    mean = {k: sums[k] / max(counts[k], 1) for k in sums}
    valid = mean["vision"] > 0
    per_layer = (mean["text"][valid] / mean["vision"][valid]).tolist()
    gamma = float(sum(per_layer) / len(per_layer))
    gamma_answer = float((mean["answer"][valid] / mean["vision"][valid]).mean())
    ratios = torch.where(
        mean["answer"] > 0, mean["vision"] / mean["answer"].clamp(min=1e-30), torch.ones(n)
    )
    return GammaResult(gamma, gamma_answer, ratios.tolist(), per_layer, len(samples))


def measure_saliency(
    model: nn.Module, samples: Sequence[CalibSample], *, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Per sample, `[L, S]` fp32: how much each token's output of each decoder layer moves
    the SFT loss on the answers, `mean_h (∂L/∂y_{l,t,h})²` (the Fisher diagonal averaged over
    the hidden size), scaled per layer to mean 1 over all tokens of all samples. The output of
    a layer is what its o_proj and down_proj add to, so for them this is the exact per-token
    weight of their output error in a Fisher-weighted objective; for the other linears of the
    layer it stands in. Samples without answer tokens get ones (they carry no loss). Raises
    GammaUnavailable where the pass does not fit, as `measure_gamma`."""
    device = torch.empty(0, device=device).device
    n = len(decoder_layers(model, get_architecture(model)))
    out: list[Tensor | None] = []
    with backward_room(model, samples, device, GammaUnavailable):
        for sample, _, grads in _layer_grads(model, samples, device):
            t = sample.kinds.shape[0]
            rows = [
                g[0].float().pow(2).mean(-1).cpu() if g is not None else torch.zeros(t)
                for g in grads
            ]
            answered = bool((sample.kinds == TokenKind.ANSWER).any())
            out.append(torch.stack(rows) if answered else None)
    kept = [s for s in out if s is not None]
    if not kept:
        return [torch.ones(n, s.kinds.shape[0]) for s in samples]
    mean = torch.cat(kept, dim=1).mean(1, keepdim=True).clamp(min=1e-30)
    return [
        s / mean if s is not None else torch.ones(n, sample.kinds.shape[0])
        for s, sample in zip(out, samples, strict=True)
    ]


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
