"""Solvers: pure functions of (weight, calibration statistics, `QuantConfig`) → quantized weight.

| method  | function                | statistics it needs                                      |
|---------|-------------------------|----------------------------------------------------------|
| rtn     | `rtn`                   | none                                                     |
| gptq    | `gptq`                  | Hessian `2XᵀX/n`                                         |
| awq     | `awq`, `awq_moe`        | inputs X (and mean abs per channel)                      |
| mbq     | `mbq`                   | inputs X and token kinds, vision weight r_l              |
| veq-me  | `veq_me`                | per-expert routed inputs and importance S_i              |
| veq-ma  | `veq_ma` (or `gptq`)    | Hessian weighted by `ma_token_weights` (p^λ · α)         |
| (GPTAQ) | `fp_target`, then `gptq` | also the residual `Σ c (x − x̃) x̃ᵀ` to 16-bit inputs |
"""

from veq.algorithms.awq import AWQResult, awq, awq_quantize, awq_scales, search_clip
from veq.algorithms.gptq import fp_target, gptq, hessian_error
from veq.algorithms.mbq import mbq, mbq_token_weights
from veq.algorithms.rtn import rtn
from veq.algorithms.veq import (
    SharedScaleResult,
    awq_moe,
    expert_importance,
    ma_token_weights,
    shared_scale_search,
    veq_ma,
    veq_me,
)

__all__ = [
    "AWQResult",
    "SharedScaleResult",
    "awq",
    "awq_quantize",
    "awq_scales",
    "awq_moe",
    "expert_importance",
    "fp_target",
    "gptq",
    "hessian_error",
    "ma_token_weights",
    "mbq",
    "mbq_token_weights",
    "rtn",
    "search_clip",
    "shared_scale_search",
    "veq_ma",
    "veq_me",
]
