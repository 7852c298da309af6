"""What a calibration run produced: the quantized weights and the report about them.

Leaf types: `veq.checkpoint` writes and the server reads them without importing the
calibration pipeline or any solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from veq.quantizer import QuantizedWeight


@dataclass
class QuantReport:
    """What a calibration run did, for the CLI summary, the checkpoint and the server."""

    method: str
    recipe: dict[str, Any]
    gamma: float
    gamma_source: str
    beta: float
    bits: dict[str, int] = field(default_factory=dict)
    fallback_experts: list[dict[str, int]] = field(default_factory=list)
    bytes_16bit: int = 0
    bytes_quantized: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    layers: int = 0
    gamma_detail: dict[str, Any] = field(default_factory=dict)
    calib: str = ""
    """The calibration source (`veq.calib.sources` spec), or "" when data-free."""
    scale_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`Recipe.check_scales`: per searched scale ("layer 0 experts gate/up"), the solver's
    output error without it (`plain`) and with it (`scaled`), and whether it was `kept`."""
    tuning: dict[str, Any] = field(default_factory=dict)
    """`Recipe.tune_epochs`: the calibration set's KL to the 16-bit model per position before
    and after scale tuning (`veq.calib.tune`), whether the tuned scales were `kept`, and the
    epochs, learning rate and seconds; empty when not tuned."""

    def summary(self) -> str:
        by_bits: dict[int, int] = {}
        for b in self.bits.values():
            by_bits[b] = by_bits.get(b, 0) + 1
        lines = [
            f"method {self.method}: {self.layers} layers, {self.samples} samples"
            + (f" of {self.calib}" if self.calib else "")
            + f", {self.tokens} tokens, {self.seconds:.1f} s",
            "modules by bits: " + ", ".join(f"{n}×W{b}" for b, n in sorted(by_bits.items())),
            f"weights: {self.bytes_16bit / 2**20:.2f} MiB (16-bit) -> "
            f"{self.bytes_quantized / 2**20:.2f} MiB packed "
            f"({self.bytes_16bit / max(self.bytes_quantized, 1):.2f}x smaller)",
            f"gamma {self.gamma:.3g} ({self.gamma_source}), beta {self.beta:.3g}",
        ]
        if self.scale_checks:
            kept = sum(c["kept"] for c in self.scale_checks.values())
            lines.append(
                f"scale check: {kept} of {len(self.scale_checks)} searched scales lowered the "
                "solver's error and were kept"
            )
        if self.tuning.get("skipped"):
            lines.append(f"scale tuning skipped: {self.tuning['skipped']}")
        elif self.tuning:
            t = self.tuning
            lines.append(
                f"scale tuning: calibration KL {t['kl_before']:.3g} -> {t['kl_after']:.3g} "
                f"({t['epochs']} epochs, {t['seconds']:.1f} s)"
                + ("" if t["kept"] else "; no better, untuned scales kept")
            )
        if self.fallback_experts:
            few = ", ".join(
                f"L{f['layer']}E{f['expert']}({f['tokens']})" for f in self.fallback_experts[:12]
            )
            more = len(self.fallback_experts) - 12
            lines.append(
                f"{len(self.fallback_experts)} experts with too few tokens used the all-token "
                f"fallback: {few}" + (f" and {more} more" if more > 0 else "")
            )
        return "\n".join(lines)


@dataclass
class QuantResult:
    """Quantized weights by full module name (experts unfused), and the report."""

    weights: dict[str, QuantizedWeight]
    report: QuantReport
