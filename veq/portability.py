"""Which servers load which quantized checkpoints, and why not.

Owns the portability table (docs/design.md §4.3): per target server, which schemes of a veq
checkpoint it loads, with the one-line reason when it does not. `veq export --for TARGET` refuses
what its target cannot load with that reason, and README's table is this one rendered
(`markdown_table`); a test holds the two together. The reasons come from reading the targets'
compressed-tensors MoE code (vLLM 0.33.0, SGLang 0.5.23, transformers 5); what the GPU check
script (`bench/gpu_check.sh`) serves in vLLM is the part measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The vLLM release read for this table, the first we know loads asymmetric int4 MoE weights
#: (Marlin MoE with zero points, vLLM PR #44025, merged 2026-05-29).
VLLM_ASYM_MOE = "0.33"

TARGETS: dict[str, str] = {
    "veq": "veq",
    "vllm": f"vLLM {VLLM_ASYM_MOE}",
    "vllm-old": "vLLM before #44025",
    "sglang": "SGLang 0.5.23",
    "transformers": "transformers 5",
}

_MIXED = "mixed: every expert of a layer is sized from expert 0's scheme"
_WIDTHS = (
    "{bits}-bit MoE: Marlin and Triton take 4 or 8 bits (the optional Humming backend is untested)"
)
_WIDTHS_SGLANG = "{bits}-bit MoE: 4 or 8 bits only"
_ASYM8 = "asymmetric int8 MoE: no default backend (the optional Humming backend is untested)"
_ASYM4_OLD = "asymmetric int4 MoE: symmetric only before PR #44025"
_SGLANG_ASYM = "asymmetric MoE: zero points are laid out wrongly at load (fix not merged)"
_SGLANG_MIXED = "mixed: one scheme per MoE layer, read from expert 0"
_TRANSFORMERS = "use `veq.load`: compressed-tensors there fills nn.Linear, not fused experts"


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint's `quantization_config` asks of a loader."""

    widths: tuple[int, ...]
    """Distinct weight widths, widest first."""
    symmetric: bool
    """Every group symmetric."""
    asymmetric_widths: tuple[int, ...] = ()
    """Widths stored with zero points."""

    @property
    def mixed(self) -> bool:
        return len(self.widths) > 1

    @property
    def label(self) -> str:
        widths = "/".join(f"W{b}" for b in self.widths)
        if self.mixed:
            return f"mixed {widths}"
        return f"{widths} {'sym' if self.symmetric else 'asym'}"

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> Scheme:
        """From a compressed-tensors `quantization_config` dict."""
        weights = [g["weights"] for g in qc.get("config_groups", {}).values()]
        if not weights:
            raise ValueError("quantization_config has no config groups")
        widths = tuple(sorted({int(w["num_bits"]) for w in weights}, reverse=True))
        asym = tuple(
            sorted({int(w["num_bits"]) for w in weights if not w["symmetric"]}, reverse=True)
        )
        return cls(widths, not asym, asym)

    @classmethod
    def from_directory(cls, directory: str | Path) -> Scheme:
        config = json.loads((Path(directory) / "config.json").read_text())
        if "quantization_config" not in config:
            raise ValueError(f"{Path(directory).name} has no quantization_config")
        return cls.from_config(config["quantization_config"])


def why_not(target: str, scheme: Scheme) -> str | None:
    """None when `target` loads `scheme`, else the reason it does not (one line)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if target == "veq":
        return None
    if target == "transformers":
        return _TRANSFORMERS
    narrow = [b for b in scheme.widths if b not in (4, 8)]
    if target == "sglang":
        if scheme.mixed:
            return _SGLANG_MIXED
        if narrow:
            return _WIDTHS_SGLANG.format(bits=narrow[0])
        return None if scheme.symmetric else _SGLANG_ASYM
    if scheme.mixed:
        return _MIXED
    if narrow:
        return _WIDTHS.format(bits=narrow[0])
    if 8 in scheme.asymmetric_widths:
        return _ASYM8
    if target == "vllm-old" and 4 in scheme.asymmetric_widths:
        return _ASYM4_OLD
    return None


#: The rows of README's table: the schemes `veq quantize` writes.
ROWS: tuple[Scheme, ...] = (
    Scheme((2,), True),
    Scheme((2,), False, (2,)),
    Scheme((3,), False, (3,)),
    Scheme((4,), True),
    Scheme((4,), False, (4,)),
    Scheme((8,), True),
    Scheme((8,), False, (8,)),
    Scheme((4, 2), False, (4, 2)),
    Scheme((8, 4), True),
)


def markdown_table() -> str:
    """README's portability table: scheme × target, "yes" or "no: reason"."""
    head = "| checkpoint | " + " | ".join(TARGETS.values()) + " |"
    lines = [head, "|" + "---|" * (len(TARGETS) + 1)]
    for scheme in ROWS:
        cells = []
        for target in TARGETS:
            reason = why_not(target, scheme)
            cells.append("yes" if reason is None else f"no: {reason}")
        lines.append(f"| {scheme.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
