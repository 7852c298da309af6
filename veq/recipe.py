"""A quantization recipe: which method, at which precision, with which calibration knobs.

Owns the user-facing choices of `veq quantize` / `veq.quantize` and their validation; the
recipe's JSON (with the calibration fingerprint) keys the cache. `QuantConfig` describes one
weight; a recipe describes a whole model.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from veq.config import Bits, GroupSize, QuantConfig

#: Symmetric codes by default where a zero point buys little and costs portability: vLLM's MoE
#: kernels load no asymmetric int8 at all, SGLang no asymmetric MoE weights, and vLLM before
#: PR #44025 no asymmetric int4 MoE (docs/design.md §4.3). At W4 g128 on the bundled model the
#: zero points lower GPTQ's KL from 4.9e-5 to 3.6e-5 nats and leave accuracy where it is (78.1
#: against 78.0 %, the 16-bit model's 78.0 %; BENCHMARKS "Symmetric codes"): not worth three
#: loaders that refuse them. At 2 and 3 bits, which only veq serves, they are kept.
DEFAULT_SYMMETRIC: dict[int, bool] = {2: False, 3: False, 4: True, 8: True}

#: λ when a recipe does not name it: VEQ-MA as the paper writes it (p¹); `veq` squares the
#: router probability, the factor by which an expert's output error reaches the layer output
#: enters the squared error twice (BENCHMARKS "Quality levers").
DEFAULT_LAM: dict[str, float] = {"veq": 2.0}
#: `veq`'s modality temper τ per width (α = γ^τ): on `mini` (1,000 held-out questions, 3
#: calibration seeds) text-weighted Hessians keep W2 from GPTQ's collapses (KL 0.0024 at
#: τ = 0.5 against 0.011 at 0.25 and GPTQ's 0.030), while at W3 they cost (1.6e-4 at τ = 0.25,
#: 2.3e-4 at 0.5, 3.6e-4 at the paper's τ = 1; GPTQ 1.9e-4). BENCHMARKS "Quality levers".
DEFAULT_TAU: dict[int, float] = {2: 0.5, 3: 0.25, 4: 0.25, 8: 0.25}
#: `veq`'s fp-target strength (GPTAQ's asymmetric calibration, halfway to the least-squares
#: target); `gptq` and `veq-ma` stay the published methods (0). BENCHMARKS "Quality levers".
DEFAULT_FP_TARGET: dict[str, float] = {"veq": 0.5}
#: `veq`'s end-to-end scale-tuning epochs per width (`Recipe.tune_epochs`; other methods: 0),
#: for groups of `TUNE_MIN_GROUP` columns or more. On `mini` (1,000 held-out questions, 3
#: calibration seeds) two epochs lower W2 g128's KL from 4.3e-3 to 3.0e-3 but raise W3 g128's
#: from 1.5e-4 to 1.9e-4: the 128 samples are too few to tune on where the error is that small
#: (BENCHMARKS "Quality levers").
DEFAULT_TUNE_EPOCHS: dict[int, int] = {2: 2}
#: Smaller groups are not tuned by default: g64 has twice g128's scales to fit to the same
#: samples, and on `mini` tuning raised W2 g64's KL on every seed (3.2e-3 to 3.7e-3).
TUNE_MIN_GROUP = 128

Method = Literal["rtn", "awq", "gptq", "mbq", "veq-me", "veq-ma", "veq"]
METHODS: tuple[str, ...] = ("rtn", "awq", "gptq", "mbq", "veq-me", "veq-ma", "veq")


class Recipe(BaseModel):
    """Everything that decides the quantized weights, given a model and calibration data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field("veq", description="Quantization method.")
    bits: Bits = Field(4, description="Weight bits (2, 3, 4, 8) of every quantized linear.")
    group_size: GroupSize = Field(128, description="32, 64, 128, or None for per-channel.")
    symmetric: bool | None = Field(
        None,
        description="Symmetric codes (no zero points) or asymmetric (a zero point per group); "
        "None: each width's default (`DEFAULT_SYMMETRIC`).",
    )
    scale_dtype: Literal["float16", "bfloat16"] = Field(
        "float16",
        description="Storage dtype of scales: the model's serving dtype, so that a server "
        "that keeps scales in it (vLLM copies them into the model dtype) rounds nothing again.",
    )
    mixed_precision: float | None = Field(
        None,
        description="Average expert bits; hot experts (by importance S_i) get more. "
        "Attention, dense and shared-expert linears keep `bits`.",
    )
    gamma: float | Literal["auto"] = Field(
        "auto", description="Text/vision sensitivity ratio γ, or 'auto' to measure it."
    )
    gamma_fallback: float = Field(
        20.0, gt=0, description="γ used when 'auto' cannot run a backward pass on this machine."
    )
    lam: float | None = Field(
        None,
        ge=0,
        description="Exponent λ on router probabilities in VEQ-MA's token weights p^λ·α; "
        "default: 1 for veq-ma (the paper's form), 2 for veq.",
    )
    tau: float | None = Field(
        None,
        ge=0,
        description="veq only: the modality weight is tempered to γ^τ (text tokens' Hessian "
        "weight and expert importance); 1 is the paper's γ, 0 ignores modality; default per "
        "width (DEFAULT_TAU: 0.5 at 2 bits, 0.25 above).",
    )
    saliency: float = Field(
        0.0,
        ge=0,
        description="veq only: exponent τ of each token's gradient saliency (the loss's "
        "sensitivity to the layer's output at that token) in its Hessian weights; 0: off.",
    )
    gamma_per_layer: bool = Field(
        False,
        description="veq only: each decoder layer's text tokens weigh that layer's measured "
        "γ_l^τ (MBQ's granularity) instead of the model's mean γ^τ; needs gamma 'auto'.",
    )
    weighted_search: bool = Field(
        True,
        description="veq only: the AWQ-family scale searches (each expert's up→down scale and "
        "the gate/up scale shared by the experts) weigh tokens by the same c = p^λ·α as the "
        "Hessians (off: every routed token once, as VEQ-ME does); on by default after "
        "BENCHMARKS 'Quality levers'.",
    )
    check_scales: bool = Field(
        False,
        description="Methods with both scale searches and Hessians (veq): a searched scale is "
        "folded only if the method's own solver, on the full Hessians of the weights it "
        "scales, leaves less output error with it than without (the search itself judges "
        "scales by round-to-nearest on a token sample); off: on the reference model it "
        "raised the KL at every width (BENCHMARKS 'Quality levers').",
    )
    act_order: bool = Field(
        True,
        description="GPTQ-family column order by decreasing Hessian diagonal, with static groups "
        "(scales fixed before error feedback, so kernels need no g_idx); llm-compressor's default.",
    )
    range_search: bool = Field(
        False,
        description="GPTQ family: each group's range shrunk to minimise its rounding error under "
        "the Hessian (AWQ's clip search on GPTQ's statistics) instead of min–max; off by "
        "default (on the reference model it helps gptq and costs veq: BENCHMARKS 'Quality "
        "levers').",
    )
    fp_target: float | None = Field(
        None,
        ge=0,
        le=1,
        description="GPTQ family: asymmetric calibration (GPTAQ): each linear aims at the "
        "16-bit model's outputs from the quantized model's inputs, moving this far (0: plain "
        "GPTQ, 1: the full least-squares target) towards the weight that would give them; "
        "the 16-bit model runs beside the quantized one during calibration. Default per "
        "method (DEFAULT_FP_TARGET: 0.5 for veq, 0 for the rest).",
    )
    true_sequential: bool = Field(
        False,
        description="Within each decoder layer, quantize attention first and collect the "
        "statistics of what reads its output (MLP, experts) after, so that they see the "
        "quantized attention's error (GPTQModel's true_sequential, which splits finer: q/k/v, "
        "o, gate/up, down); one more pass per layer.",
    )
    tune_epochs: int | None = Field(
        None,
        ge=0,
        description="End-to-end scale tuning after the layer loop: passes over the calibration "
        "set training every scale (codes and zero points fixed) towards the 16-bit model's "
        "next-token distributions on the answers (EfficientQAT's E2E-QP); 0: off. Default: "
        "2 for veq at 2 bits in groups of 128 or more (or per channel), else 0 "
        "(DEFAULT_TUNE_EPOCHS, TUNE_MIN_GROUP).",
    )
    tune_lr: float = Field(
        2e-3, gt=0, le=1, description="Adam learning rate of scale tuning, relative to each scale."
    )
    damp: float = Field(0.01, gt=0, description="GPTQ relative damping.")
    min_expert_tokens: int = Field(
        16, ge=1, description="Experts routed fewer calibration tokens use the all-token fallback."
    )
    awq_grid: int = Field(20, ge=2, description="Candidate exponents of the AWQ scale search.")
    clip: bool = Field(True, description="AWQ-family per-group clip search.")
    max_search_tokens: int = Field(
        2048, ge=64, description="Tokens per linear kept for AWQ-family losses."
    )

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float | str) -> float | str:
        if v != "auto" and (not math.isfinite(float(v)) or float(v) <= 0):
            raise ValueError(f"gamma must be 'auto' or a positive number, got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _resolve_method_defaults(cls, data: Any) -> Any:
        # Written out, as symmetric is, so that leaving λ, τ or the fp target out and naming
        # its default give the same recipe and cache key. τ follows the narrowest width written.
        if not isinstance(data, dict):
            return data
        method = data.get("method", "veq")
        if data.get("lam") is None:
            data = {**data, "lam": DEFAULT_LAM.get(method, 1.0)}
        if data.get("fp_target") is None:
            data = {**data, "fp_target": DEFAULT_FP_TARGET.get(method, 0.0)}
        narrowest = int(data.get("bits", 4))
        mixed = data.get("mixed_precision")
        if mixed is not None:  # the expert widths `widths` brackets the average by
            narrowest = 2 if float(mixed) <= 4 else min(narrowest, 4)
        if data.get("tau") is None:
            data = {**data, "tau": DEFAULT_TAU.get(narrowest, 0.25)}
        if data.get("tune_epochs") is None:
            group = data.get("group_size", cls.model_fields["group_size"].default)
            try:  # as the field will read it ("128" is 128); a bad value is the field's error
                coarse = group is None or int(group) >= TUNE_MIN_GROUP
            except (TypeError, ValueError):
                coarse = False
            epochs = DEFAULT_TUNE_EPOCHS.get(narrowest, 0) if method == "veq" and coarse else 0
            data = {**data, "tune_epochs": epochs}
        return data

    @model_validator(mode="before")
    @classmethod
    def _resolve_symmetric(cls, data: Any) -> Any:
        # One width: the default is written out, so that leaving it out and naming it give the
        # same recipe (and cache key). Mixed precision keeps None: each width its default.
        if isinstance(data, dict) and data.get("symmetric") is None:
            if data.get("mixed_precision") is None:
                bits = data.get("bits", 4)
                if bits in DEFAULT_SYMMETRIC:
                    data = {**data, "symmetric": DEFAULT_SYMMETRIC[bits]}
        return data

    @model_validator(mode="after")
    def _mixed(self) -> Recipe:
        if self.mixed_precision is not None and not 2.0 <= self.mixed_precision <= 8.0:
            raise ValueError(f"mixed_precision must be in [2, 8], got {self.mixed_precision}")
        return self

    def symmetric_for(self, bits: int) -> bool:
        """Whether `bits`-wide weights get symmetric codes: the explicit choice, else the
        width's default."""
        return DEFAULT_SYMMETRIC[bits] if self.symmetric is None else self.symmetric

    def quant_config(self, bits: int | None = None) -> QuantConfig:
        bits = self.bits if bits is None else bits
        return QuantConfig(
            bits=bits,
            group_size=self.group_size,
            symmetric=self.symmetric_for(bits),
            scale_dtype=self.scale_dtype,
        )

    @property
    def data_free(self) -> bool:
        """RTN at one width rounds each weight alone: no calibration data, no γ (mixed
        precision still needs the routing statistics that rank experts, scale tuning the
        samples it trains on)."""
        return self.method == "rtn" and self.mixed_precision is None and not self.tune_epochs

    @property
    def label(self) -> str:
        """Short human name, e.g. `veq-ma-w3g128` or `veq-mp2.5g128`."""
        g = f"g{self.group_size}" if self.group_size else "gch"
        bits = f"mp{self.mixed_precision:g}" if self.mixed_precision else f"w{self.bits}"
        sym = "-sym" if all(self.symmetric_for(b) for b in self.widths) else ""
        return f"{self.method}-{bits}{g}{sym}"

    @property
    def widths(self) -> tuple[int, ...]:
        """Every weight width the recipe writes: `bits`, and under mixed precision the two
        expert widths `allocate_expert_bits` chooses between."""
        if self.mixed_precision is None:
            return (self.bits,)
        experts = (2, 4) if self.mixed_precision <= 4 else (4, 8)
        return tuple(sorted({self.bits, *experts}))


def allocate_expert_bits(importance: list[float], average: float) -> list[int]:
    """Expert-importance mixed precision under an average-bit budget.

    Rule: the budget is bracketed by two widths, (2, 4) for averages up to 4 and (4, 8) above;
    the `round(E·(avg − lo)/(hi − lo))` most important experts get `hi`, the rest `lo`, so the
    mean over experts equals the budget up to rounding (hot experts 4-bit, cold 2-bit, mean 3).
    Ties are broken by expert index (lower first).
    """
    e = len(importance)
    lo, hi = (2, 4) if average <= 4 else (4, 8)
    n_hi = round(e * (average - lo) / (hi - lo))
    order = sorted(range(e), key=lambda i: (-importance[i], i))
    bits = [lo] * e
    for i in order[:n_hi]:
        bits[i] = hi
    return bits
