"""Round-to-nearest: the baseline every other solver must beat."""

from __future__ import annotations

from torch import Tensor

from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight, quantize_weight


def rtn(weight: Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Quantize `weight: [N, K]` with min/max scales per group and no calibration data."""
    return quantize_weight(weight, cfg)
