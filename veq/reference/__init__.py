"""The bundled reference model and its task, ShapesVQA.

Owns the procedurally generated task (`shapes`), its encoding and offline processor (`encode`),
held-out evaluation (`evaluate`) and the method comparison of `veq eval` (`quality`), the
location of the shipped model directory (`MINI_DIR`) and the calibration source `shapes`
(ShapesVQA conversations from the calibration seed range), which the bundled model's recipes use
by default. Its trainer and model-card renderer are development tools outside the package
(`refmodel/` in the repository). Modules import lazily: `import veq.reference` loads no model
code.
"""

from __future__ import annotations

from pathlib import Path

from veq.calib.data import Conversation
from veq.calib.sources import register

MINI_DIR = Path(__file__).with_name("mini")
"""The shipped reference model (a Hugging Face model directory with MODEL_CARD.md)."""

MINI_CALIB = "shapes"
"""The calibration source the bundled model's recipes use unless told otherwise: its own task."""


def mini_available() -> bool:
    """Whether the shipped model directory holds a model (config and weights)."""
    return (MINI_DIR / "config.json").is_file() and any(MINI_DIR.glob("*.safetensors"))


@register(
    "shapes",
    "ShapesVQA, the bundled model's synthetic task: shape images with several questions each, "
    "a quarter of them text-only",
)
def shapes_conversations(n: int, seed: int = 0) -> list[Conversation]:
    from veq.reference.encode import calibration_conversations

    return calibration_conversations(n, seed=seed % 100)


__all__ = ["MINI_CALIB", "MINI_DIR", "mini_available", "shapes_conversations"]
