"""Quantization quality on the reference model: the rows of `veq eval`.

Owns comparing methods × bit-widths on a ShapesVQA model: each setting is quantized through
`veq.api.quantize` (the same pipeline and cache as `veq quantize`), loaded, and scored on one
held-out set against the 16-bit model, which is always the first row. Per row: exact-match
accuracy overall and per family, mean answer NLL, KL(16-bit ‖ quantized) over answer positions
(`Σ_v p₁₆(v) (log p₁₆(v) − log p_q(v))`, averaged over positions, in nats), the same-top-1
rate against the 16-bit model over answer positions, flips (questions whose correctness changed,
each way), and the bytes of the linears the recipe quantizes (packed codes + scales + zero
points; 16-bit for the base row).

The held-out set is drawn from `HELDOUT_SEEDS` at an offset (`seed`), so it never overlaps the
training, validation or calibration seed ranges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from veq import api
from veq.recipe import Recipe
from veq.reference import MINI_CALIB
from veq.reference.encode import Batch, Encoder
from veq.reference.evaluate import AnswerScores, heldout_samples, score_batch, summarize
from veq.reference.shapes import FAMILIES, HELDOUT_SEEDS


@dataclass(frozen=True)
class Setting:
    """One quantization to compare: `bits` is the uniform width, or the expert average when
    `mixed_precision` is set (attention and dense linears then use `ceil(bits)`)."""

    method: str
    bits: float
    group_size: int | None = 128
    mixed_precision: bool = False
    symmetric: bool | None = None
    """None: each width's default (`veq.recipe.DEFAULT_SYMMETRIC`)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Further `Recipe` fields (`(("lam", 2.0),)`): the variants a lever comparison runs."""

    @property
    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "gch"
        w = f"mp{self.bits:g}" if self.mixed_precision else f"w{self.bits:g}"
        codes = {None: "", True: "-sym", False: "-asym"}[self.symmetric]
        extra = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.method}-{w}{g}{codes}{extra}"

    def quantize_kwargs(self) -> dict[str, Any]:
        common = {"method": self.method, "group_size": self.group_size, "symmetric": self.symmetric}
        common |= dict(self.options)
        if self.mixed_precision:
            return common | {
                "bits": max(2, math.ceil(self.bits)),
                "mixed_precision": float(self.bits),
            }
        return common | {"bits": int(self.bits)}


@dataclass
class QualityRow:
    """One row of the table (and of `--json`); fractions in [0, 1], NLL and KL in nats."""

    method: str
    bits: float
    group_size: int | None
    accuracy: float
    per_family: dict[str, float]
    answer_nll: float
    kl: float
    weight_bytes: int
    top1_agreement: float = 1.0
    """Share of answer positions whose argmax token equals the 16-bit model's."""
    flips_lost: int = 0
    """Questions the 16-bit model answers right and this one wrong."""
    flips_gained: int = 0
    """Questions the 16-bit model answers wrong and this one right."""
    mixed_precision: bool = False
    symmetric: bool | None = None
    """Whether the codes were symmetric (at `ceil(bits)` under mixed precision); None: 16-bit."""
    calib_seed: int | None = None
    seconds: float = 0.0
    cached: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    """The setting's further recipe fields (`Setting.options`)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_grid(
    methods: Sequence[str],
    bits: Sequence[int],
    group_size: int | None,
    mixed_precision: Sequence[float] = (),
    symmetric: bool | None = None,
) -> list[Setting]:
    """Every method at every width, then every method at every mixed-precision average."""
    grid = [Setting(m, b, group_size, symmetric=symmetric) for m in methods for b in bits]
    grid += [Setting(m, a, group_size, True, symmetric) for m in methods for a in mixed_precision]
    return grid


def kl_divergence(base: Tensor, other: Tensor) -> Tensor:
    """Per-position KL(base ‖ other) from log-probabilities `[A, V]` fp32 → `[A]`."""
    return (base.exp() * (base - other)).sum(-1)


class QualityRun:
    """Scores the 16-bit model once, then any number of quantized settings against it."""

    def __init__(
        self,
        model: str | Path,
        *,
        samples: int = 600,
        seed: int = 0,
        calib: str = MINI_CALIB,
        calib_samples: int = 128,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        if samples < len(FAMILIES):
            raise ValueError(f"--samples must be at least {len(FAMILIES)} (one per family)")
        if not 0 <= seed <= len(HELDOUT_SEEDS) - samples:
            raise ValueError(
                f"--seed must be in [0, {len(HELDOUT_SEEDS) - samples}] "
                "(an offset into the held-out seed range)"
            )
        self.path = api.resolve_model(model)
        self.device = api.resolve_device(device)
        self.processor = api.load_processor(self.path)
        self.calib, self.calib_samples = calib, calib_samples
        self.cache_dir = cache_dir
        encoder = Encoder(self.processor)
        held = heldout_samples(samples, HELDOUT_SEEDS.start + seed)
        self.batches: list[Batch] = [
            encoder(held[i : i + batch_size]) for i in range(0, len(held), batch_size)
        ]
        base = api.load_model(self.path, self.device).eval()
        self.base_scores = self._score(base)
        del base
        self.base_bytes: int | None = None

    def _score(self, model: nn.Module) -> list[AnswerScores]:
        return [score_batch(model, b) for b in self.batches]

    def _row(
        self, setting: Setting | None, scores: list[AnswerScores], weight_bytes: int, **extra: Any
    ) -> QualityRow:
        result = summarize(scores)
        pairs = list(zip(self.base_scores, scores, strict=True))
        kl = torch.cat([kl_divergence(b.logprobs, s.logprobs) for b, s in pairs])
        same = torch.cat([b.logprobs.argmax(-1) == s.logprobs.argmax(-1) for b, s in pairs])
        was = torch.cat([b.correct for b, _ in pairs])
        now = torch.cat([s.correct for _, s in pairs])
        return QualityRow(
            method=setting.method if setting else "none",
            bits=setting.bits if setting else 16,
            group_size=setting.group_size if setting else None,
            accuracy=result.accuracy,
            per_family=result.per_family,
            answer_nll=result.answer_nll,
            kl=float(kl.mean()),
            weight_bytes=weight_bytes,
            top1_agreement=float(same.float().mean()),
            flips_lost=int((was & ~now).sum()),
            flips_gained=int((~was & now).sum()),
            mixed_precision=bool(setting and setting.mixed_precision),
            options=dict(setting.options) if setting else {},
            **extra,
        )

    def evaluate(self, setting: Setting, calib_seed: int = 0, progress: bool = False) -> QualityRow:
        """Quantize (or take from the cache), load and score one setting."""
        q = api.quantize(
            self.path,
            **setting.quantize_kwargs(),
            calib=self.calib,
            samples=self.calib_samples,
            seed=calib_seed,
            cache_dir=self.cache_dir,
            device=self.device,
            progress=progress,
        )
        self.base_bytes = int(q.report["bytes_16bit"])
        model, _ = api.load(q.path, device=self.device)
        scores = self._score(model.eval())
        del model
        return self._row(
            setting,
            scores,
            int(q.report["bytes_quantized"]),
            calib_seed=calib_seed,
            symmetric=Recipe.model_validate(q.report["recipe"]).symmetric_for(
                max(2, math.ceil(setting.bits))
            ),
            seconds=float(q.report.get("seconds", 0.0)),
            cached=q.cached,
        )

    def base_row(self) -> QualityRow:
        """The 16-bit row; its weight bytes are known once any setting has been quantized."""
        return self._row(None, self.base_scores, self.base_bytes or 0)


def run_quality(
    model: str | Path,
    settings: Sequence[Setting],
    *,
    calib_seeds: Sequence[int] = (0,),
    progress: bool = True,
    **run_options: Any,
) -> list[QualityRow]:
    """The 16-bit row followed by one row per (setting, calibration seed), with a progress bar
    over the settings (quantization itself stays quiet)."""
    from tqdm.auto import tqdm

    run = QualityRun(model, **run_options)
    jobs = [(s, c) for s in settings for c in calib_seeds]
    rows = []
    with tqdm(jobs, desc="veq eval", unit="setting", disable=not progress) as bar:
        for setting, calib_seed in bar:
            bar.set_postfix_str(f"{setting.label} calib {calib_seed}")
            rows.append(run.evaluate(setting, calib_seed))
    return [run.base_row(), *rows]


def quality_table(rows: Sequence[QualityRow]) -> str:
    """A fixed-width text table of `rows`: accuracies in %, NLL and KL in nats, MiB."""
    families = [f for f in FAMILIES if any(f in r.per_family for r in rows)]
    head = ["method", "bits", "group", "calib", "acc%", *families, "nll", "kl", "top1%", "lost"]
    head += ["gained", "MiB"]
    lines = []
    for r in rows:
        bits = f"mp{r.bits:g}" if r.mixed_precision else f"{r.bits:g}"
        lines.append(
            [
                r.method,
                bits,
                str(r.group_size or "-") if r.method != "none" else "-",
                "-" if r.calib_seed is None else str(r.calib_seed),
                f"{100 * r.accuracy:.1f}",
                *(f"{100 * r.per_family[f]:.1f}" if f in r.per_family else "-" for f in families),
                f"{r.answer_nll:.4f}",
                f"{r.kl:.4f}",
                f"{100 * r.top1_agreement:.1f}",
                str(r.flips_lost),
                str(r.flips_gained),
                f"{r.weight_bytes / 2**20:.3f}",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*line) for line in [head, *lines])
