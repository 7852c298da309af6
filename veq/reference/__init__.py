"""The bundled reference model and its task, ShapesVQA.

Owns the procedurally generated task (`shapes`), its encoding and offline processor (`encode`),
training (`train`), evaluation (`evaluate`) and the model card (`card`), and the location of the
shipped model directory (`MINI_DIR`). Modules import lazily: `import veq.reference` loads no
model code. Calibration conversations for `veq.calib` come from
`veq.reference.encode.calibration_conversations(n, seed)`.
"""

from __future__ import annotations

from pathlib import Path

MINI_DIR = Path(__file__).with_name("mini")
"""The shipped reference model (a Hugging Face model directory with MODEL_CARD.md)."""


def mini_available() -> bool:
    """Whether the shipped model directory holds a model (config and weights)."""
    return (MINI_DIR / "config.json").is_file() and any(MINI_DIR.glob("*.safetensors"))


__all__ = ["MINI_DIR", "mini_available"]
