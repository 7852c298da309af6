"""veq: post-training weight quantization for Mixture-of-Experts vision-language models.

The library floor of the project: quantizer, packed format, calibration statistics, solvers
(`veq.algorithms`), the calibration pipeline (`veq.calib`), checkpoints, and the Python API
`veq.quantize(...)` / `veq.load(...)`. It imports `kernels` at most, never `server`.
"""

from typing import Any

from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight, dequantize, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "QuantizedWeight",
    "__version__",
    "dequantize",
    "load",
    "quantize",
    "quantize_weight",
]


def __getattr__(name: str) -> Any:
    # The API pulls in transformers; keep `import veq` light for kernels-only users.
    if name in ("quantize", "load"):
        from veq import api

        return getattr(api, name)
    raise AttributeError(f"module 'veq' has no attribute {name!r}")
