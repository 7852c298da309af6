"""End-to-end scale tuning: the quantized model's scales trained towards the 16-bit model.

The layer loop chooses every code one layer at a time, against that layer's own output error.
This stage keeps every code and zero point and trains only the scales (one per row and group:
the 16-bit numbers the checkpoint stores anyway) by gradient descent on the KL divergence from
the 16-bit model's next-token distributions to the quantized model's over the calibration set,
as EfficientQAT's end-to-end stage (E2E-QP) trains the same parameters. The format does not
change: a tuned checkpoint loads wherever an untuned one does.

The 16-bit model's distributions are kept as their top-k tokens and the total of the rest
(`Targets`): the KL of that (k+1)-way coarsening is exact, and it costs k numbers per position
instead of the vocabulary. Positions are those that predict answer tokens: what a user reads,
and what the 16-bit model is sure of (on the prompt's own text it is not, and matching its
uncertainty there did not carry over to held-out answers on `mini`).

Shape legend: P positions, k top tokens, V vocabulary, N out-features, K in-features, ng groups.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from veq.calib.data import CalibSample
from veq.calib.placement import backward_room
from veq.calib.report import QuantResult
from veq.models import get_architecture, weight_views
from veq.quantizer import QuantizedWeight, dequantize
from veq.tokens import TokenKind

log = logging.getLogger(__name__)

#: Top tokens kept of the 16-bit model's distribution at each position.
TOP_K = 64
#: Samples per optimizer step.
BATCH = 4


class TuneUnavailable(RuntimeError):
    """No scale tuning on this device: the backward pass does not fit or failed there."""


@dataclass(frozen=True)
class Targets:
    """The 16-bit model's next-token distributions on one sample: at `positions: [P]` long (the
    prediction made at position t, of token t + 1), the top-k token ids `ids: [P, k]` long, their
    log-probabilities `logp: [P, k]` fp32 and the log of the remaining mass `logp_rest: [P]`."""

    positions: Tensor
    ids: Tensor
    logp: Tensor
    logp_rest: Tensor


def answer_positions(kinds: Tensor) -> Tensor:
    """`[P]` long: the positions whose next token is an answer token (`kinds: [S]`)."""
    return (kinds[1:] == TokenKind.ANSWER).nonzero().squeeze(1)


def _coarse(logp: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """`logp: [P, V]` log-probabilities → those of `ids: [P, k]` and of everything else `[P]`."""
    return logp.gather(-1, ids), logp.scatter(-1, ids, -math.inf).logsumexp(-1)


def _logits(model: nn.Module, sample: CalibSample, device: torch.device, **params: Any) -> Tensor:
    """`[S, V]` logits of one sample, with `params` in place of the model's own tensors."""
    inputs = {k: v.to(device) for k, v in sample.inputs.items()}
    out = functional_call(model, params, args=(), kwargs={**inputs, "use_cache": False})
    return out.logits[0]


@torch.no_grad()
def teacher_targets(
    model: nn.Module,
    samples: Sequence[CalibSample],
    *,
    device: torch.device | str = "cpu",
    top_k: int = TOP_K,
) -> list[Targets]:
    """The 16-bit `model`'s `Targets` on every sample (kept on the host). Run before the layer
    loop overwrites the weights."""
    device = torch.empty(0, device=device).device
    out = []
    with backward_room(model, samples, device, TuneUnavailable):
        for s in samples:
            pos = answer_positions(s.kinds).to(device)
            logp = _logits(model, s, device)[pos].float().log_softmax(-1)
            # One token always stays outside the top k, so the rest's mass is never empty.
            ids = logp.topk(min(top_k, logp.shape[-1] - 1), dim=-1).indices
            top, rest = _coarse(logp, ids)
            out.append(Targets(pos.cpu(), ids.cpu(), top.cpu(), rest.cpu()))
    return out


def coarse_kl(logits: Tensor, t: Targets) -> Tensor:
    """`Σ_P KL(p ‖ q)` of the (k+1)-way coarsenings: p the 16-bit model's (`t`), q from
    `logits: [P, V]` (at `t.positions` already)."""
    q_top, q_rest = _coarse(logits.float().log_softmax(-1), t.ids)
    p_top, p_rest = t.logp.exp(), t.logp_rest.exp()
    return (p_top * (t.logp - q_top)).sum() + (p_rest * (t.logp_rest - q_rest)).sum()


class _ScaledCodes(torch.autograd.Function):
    """`(q − z)·s` in `dtype`, differentiable in the scale `s: [N, ng]` fp32 only. The backward
    recomputes `q − z` from the int8 codes rather than keeping an fp32 copy of every weight."""

    @staticmethod
    def forward(
        ctx: Any, scale: Tensor, codes: Tensor, zero: Tensor | None, dtype: torch.dtype
    ) -> Tensor:
        ctx.save_for_backward(codes, zero)
        ctx.groups = scale.shape[-1]
        return dequantize(codes, scale, zero, dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        codes, zero = ctx.saved_tensors
        n, k = codes.shape
        q = codes.float().reshape(n, ctx.groups, k // ctx.groups)
        if zero is not None:
            q = q - zero.float().unsqueeze(-1)
        return (grad.float().reshape(q.shape) * q).sum(-1), None, None, None


@dataclass
class _Slot:
    """Where one quantized weight lives: parameter `param` of the model, at `size`, `stride`
    and `offset` (elements from the parameter's first) — a whole linear's weight, or one
    expert's slice of a fused tensor."""

    param: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _slots(model: nn.Module, names: Sequence[str]) -> dict[str, _Slot]:
    views = weight_views(model, get_architecture(model))
    missing = [n for n in names if n not in views]
    if missing:
        raise ValueError(f"{len(missing)} quantized weights are not in the model: {missing[:3]}")
    params = {p.untyped_storage().data_ptr(): (n, p) for n, p in model.named_parameters()}
    slots = {}
    for name in names:
        v = views[name]
        pname, p = params[v.untyped_storage().data_ptr()]
        slots[name] = _Slot(
            pname, tuple(v.shape), v.stride(), v.storage_offset() - p.storage_offset()
        )
    return slots


class _Tuner:
    """The trainable scales of every quantized weight (`s = s₀·m`, the multiplier `m: [N, ng]`
    fp32 starting at 1, so one learning rate suits scales of every magnitude) and the model's
    parameters rebuilt from them, on `device`."""

    def __init__(
        self, model: nn.Module, weights: dict[str, QuantizedWeight], device: torch.device
    ) -> None:
        self.model = model
        self.weights = {n: qw.to(device) for n, qw in weights.items()}
        self.slots = _slots(model, list(weights))
        self.mult = {
            n: torch.ones(qw.scale.shape, device=device, requires_grad=True)
            for n, qw in self.weights.items()
        }
        self.params = dict(model.named_parameters())

    def scales(self, name: str) -> Tensor:
        return self.weights[name].scale.float() * self.mult[name]

    def overrides(self) -> dict[str, Tensor]:
        """The parameters holding quantized weights, rebuilt from the current scales."""
        out: dict[str, Tensor] = {}
        for name, slot in self.slots.items():
            if slot.param not in out:
                out[slot.param] = self.params[slot.param].detach().clone()
            qw = self.weights[name]
            full = out[slot.param]
            w = _ScaledCodes.apply(self.scales(name), qw.codes, qw.zero, full.dtype)
            full.as_strided(slot.size, slot.stride, slot.offset).copy_(w)
        return out

    def stored(self) -> dict[str, QuantizedWeight]:
        """The tuned weights as the checkpoint stores them (scales in the scale dtype), on the
        host."""
        out = {}
        for name, qw in self.weights.items():
            sdt = qw.cfg.torch_scale_dtype
            scale = self.scales(name).detach().clamp(min=torch.finfo(sdt).smallest_normal)
            out[name] = QuantizedWeight(qw.codes, scale.to(sdt), qw.zero, qw.cfg).to("cpu")
        return out


def _mean_kl(
    model: nn.Module,
    samples: Sequence[CalibSample],
    targets: Sequence[Targets],
    tuner: _Tuner,
    device: torch.device,
) -> float:
    """KL per position over the calibration set with `tuner`'s weights in the model."""
    with torch.no_grad():
        params = tuner.overrides()
        total = sum(
            float(
                coarse_kl(
                    _logits(model, s, device, **params)[t.positions.to(device)], _to(t, device)
                )
            )
            for s, t in zip(samples, targets, strict=True)
        )
    return total / max(sum(int(t.positions.numel()) for t in targets), 1)


def _to(t: Targets, device: torch.device) -> Targets:
    """`t` on `device`."""
    return Targets(*(x.to(device) for x in (t.positions, t.ids, t.logp, t.logp_rest)))


def tune_scales(
    model: nn.Module,
    result: QuantResult,
    samples: Sequence[CalibSample],
    targets: Sequence[Targets],
    *,
    epochs: int,
    lr: float,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> QuantResult:
    """`result` with every scale trained for `epochs` passes over `samples` (Adam, `lr` on the
    multiplier of each scale, `BATCH` samples a step), and the model's weights rewritten from
    them. `model` holds `result`'s dequantized weights (the layer loop leaves them there);
    `targets` are the 16-bit model's (`teacher_targets`). When tuning does not lower the
    calibration set's KL, `result` is returned as it was. Raises TuneUnavailable when the
    backward pass does not fit on `device`."""
    device = torch.empty(0, device=device).device
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    # Per quantized weight on the device: its int8 codes, the rebuilt copy and its gradient in
    # the model's dtype; per scale, the multiplier, its gradient and Adam's two moments (fp32).
    width = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    extra = sum(
        (1 + 2 * width) * qw.codes.numel() + 16 * qw.scale.numel() for qw in result.weights.values()
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with backward_room(model, samples, device, TuneUnavailable, extra_bytes=extra):
            tuner = _Tuner(model, result.weights, device)
            before = _mean_kl(model, samples, targets, tuner, device)
            opt = torch.optim.Adam(tuner.mult.values(), lr=lr)
            steps = epochs * math.ceil(len(samples) / BATCH)
            bar = tqdm(total=steps, desc="tune scales", unit="step", disable=not progress)
            try:
                for _ in range(epochs):
                    order = torch.randperm(len(samples), generator=gen).tolist()
                    for b in range(0, len(order), BATCH):
                        batch = order[b : b + BATCH]
                        params = tuner.overrides()
                        n_pos = max(sum(int(targets[i].positions.numel()) for i in batch), 1)
                        loss = 0.0
                        for i in batch:
                            t = _to(targets[i], device)
                            logits = _logits(model, samples[i], device, **params)[t.positions]
                            kl = coarse_kl(logits, t) / n_pos
                            kl.backward(retain_graph=True)  # the rebuilt weights serve the batch
                            loss += float(kl.detach())
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        bar.set_postfix(kl=f"{loss:.3g}", refresh=False)
                        bar.update(1)
            finally:
                bar.close()
            tuned = tuner.stored()
            after = _mean_kl(model, samples, targets, _Tuner(model, tuned, device), device)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    report = result.report
    report.tuning = {
        "epochs": epochs,
        "lr": lr,
        "kl_before": before,
        "kl_after": after,
        "kept": after < before,
        "seconds": time.perf_counter() - t0,
    }
    log.info("scale tuning: calibration KL %.3g -> %.3g", before, after)
    if not after < before:
        return result
    views = weight_views(model, get_architecture(model))
    with torch.no_grad():
        for name, qw in tuned.items():
            views[name].copy_(qw.dequantize(views[name].dtype))
    return QuantResult(tuned, report)
