"""veq: post-training weight quantization for Mixture-of-Experts vision-language models.

The library floor of the project: quantizer, packed format, calibration statistics and solvers
(`veq.algorithms`). It imports `kernels` at most, never `server`.
"""

from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight, dequantize, quantize_weight

__version__ = "0.1.0"

__all__ = ["QuantConfig", "QuantizedWeight", "__version__", "dequantize", "quantize_weight"]
