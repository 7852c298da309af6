"""GPTQ (Frantar et al., 2022): column-by-column rounding with second-order error feedback.

A pure function of (weight, Hessian, settings). Where the Hessian comes from, plain `2XᵀX/n` or
VEQ-MA's modality/affinity-weighted one, is the caller's business: that is the only difference
between GPTQ and VEQ-MA.

Shape legend: N out-features, K in-features, G group size.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight, best_clip, compute_qparams

log = logging.getLogger(__name__)


def inverse_cholesky(
    hessian: Tensor, damp: float = 0.01, max_retries: int = 6
) -> tuple[Tensor, float]:
    """Upper Cholesky factor of `(H + λI)⁻¹`, λ = damp · mean(diag H).

    When H + λI is not positive definite (too few tokens, collinear inputs), the damping grows
    tenfold and the factorisation is retried, up to `max_retries` times.

    Returns:
        [K, K] upper-triangular fp32 factor, and the relative damping that succeeded.
    """
    mean_diag = float(hessian.diagonal().mean())
    tried: list[float] = []
    for _ in range(max_retries):
        tried.append(damp)
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp = max(damp * 10, 1e-4)
        log.info("Hessian not positive definite at damping %.3g; retrying at %.3g", tried[-1], damp)
    raise ValueError(
        f"Hessian is not positive definite even with damping {tried[-1]:.3g}·mean(diag H); "
        "calibrate with more (or more varied) tokens"
    )


def hessian_clip(weight: Tensor, hessian: Tensor, cfg: QuantConfig) -> Tensor:
    """Per-(row, group) range shrink minimising the group's rounding error as the Hessian sees
    it, `Δw_g H_gg Δw_gᵀ` with `H_gg` the group's diagonal block: AWQ's clip search on the
    statistics GPTQ already holds. `weight: [N, K]`, `hessian: [K, K]`; returns `[N, ng]` fp32.

    Min–max ranges put a 2-bit grid's four levels at the group's extremes, where few weights
    are; shrinking the range trades clipping those few for finer steps everywhere else."""
    k = weight.shape[1]
    g = cfg.group_for(k)
    ng = k // g
    blocks = torch.stack([hessian[j : j + g, j : j + g] for j in range(0, k, g)]).float()

    def group_error(r0: int, w: Tensor, wq: Tensor) -> Tensor:
        delta = (wq - w).reshape(-1, ng, g)  # [n, ng, g]
        return torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)

    return best_clip(weight, cfg, group_error)


def hessian_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """`tr((W − Ŵ) H (W − Ŵ)ᵀ)`, GPTQ's objective: the squared output error over the inputs
    whose (unnormalised or normalised) Hessian `H: [K, K]` is; `weight, quantized: [N, K]`."""
    delta = (quantized.double() - weight.double()).to(hessian.device)
    return float(torch.einsum("nk,kl,nl->", delta, hessian.double(), delta))


def fp_target(
    weight: Tensor, hessian: Tensor, residual: Tensor, *, strength: float = 1.0, damp: float = 0.01
) -> Tensor:
    """The weight GPTQ should approach when its inputs are the quantized model's `x̃` but its
    outputs should be the full-precision model's `W x` (asymmetric calibration, GPTAQ).

    `min_Q Σ_j c_j ‖W x_j − Q x̃_j‖²` is `min_Q ‖(Q − W*) x̃‖²` with the least-squares target
    `W* = W + W D H⁻¹` (`H = 2Σ c x̃ x̃ᵀ/Σc`, `D = 2Σ c (x − x̃) x̃ᵀ/Σc`), so GPTQ on `W*` with `H`
    solves it. `strength` ∈ [0, 1] moves only that far towards `W*`: `D` and `H⁻¹` come from a
    few hundred tokens and the full correction can fit their noise. `H` is damped by λ =
    damp · mean diag H (raised if singular; `gptq` takes the mean after setting dead channels'
    zero diagonals to 1, which this does not need: their residual columns are zero too). When
    the two models' inputs agree (`D = 0`, the first layer) this is `W` exactly.

    Args:
        weight: [N, K]; hessian, residual: [K, K] (`HessianAccumulator`, `ResidualAccumulator`).

    Returns:
        [N, K] float32.
    """
    if residual.shape != hessian.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and Hessian {tuple(hessian.shape)}")
    w = weight.detach().float()
    if strength == 0:
        return w.clone()
    upper, _ = inverse_cholesky(hessian.detach().float(), damp)  # (H + λI)⁻¹ = Uᵀ U
    correction = (w @ residual.float().to(w.device)) @ upper.T @ upper
    return w + strength * correction


def gptq(
    weight: Tensor,
    hessian: Tensor,
    cfg: QuantConfig,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    range_search: bool = False,
) -> QuantizedWeight:
    """Quantize `weight` to minimise `(W - Ŵ) H (W - Ŵ)ᵀ`.

    Args:
        weight: [N, K] float weight.
        hessian: [K, K] `2 Σ c_j x_j x_jᵀ / Σ c_j` of the calibration inputs (`HessianAccumulator`).
        cfg: bits, group size, symmetry.
        block_size: columns per lazy batch update (128 in the paper).
        damp: relative damping, λ = damp · mean(diag H); raised automatically if H is singular.
        act_order: process columns by decreasing Hessian diagonal. Groups stay *static* (scales
            from the original columns, in their original order), so the kernel needs no g_idx.
        range_search: each group's range from `hessian_clip` instead of its min and max.

    Returns:
        The quantized weight in the original column order.

    Columns whose inputs were always zero ("dead") get zero weight and cost nothing.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight [N, K] and hessian [K, K] do not match: {tuple(weight.shape)}, "
            f"{tuple(hessian.shape)}"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("Hessian contains NaN or Inf")
    n, k = weight.shape
    g = cfg.group_for(k)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; fix the checkpoint before quantizing")

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Per-channel scales and act-order's static groups are fixed before any error feedback.
    static = act_order or g == k
    if not static and block_size % g:
        raise ValueError(f"block_size {block_size} must be a multiple of the group size {g}")
    if static:
        clip = hessian_clip(w, h, cfg) if range_search else None
        scale, zero = compute_qparams(w, cfg, clip)
    else:
        scale = torch.empty(n, k // g, dtype=cfg.torch_scale_dtype, device=w.device)
        zero = None if cfg.symmetric else torch.empty(n, k // g, dtype=torch.int8, device=w.device)

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv, _ = inverse_cholesky(h, damp)
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    order = perm.tolist() if perm is not None else range(k)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            grp = col // g
            if not static and col % g == 0:
                # Groups are contiguous here (no permutation) and never straddle a block.
                wg = w1[:, i : i + g]
                clip = (
                    hessian_clip(wg, h[col : col + g, col : col + g], cfg) if range_search else None
                )
                s, z = compute_qparams(wg, cfg, clip)
                scale[:, grp] = s[:, 0]
                if zero is not None:
                    zero[:, grp] = z[:, 0]
            sc = scale[:, grp].float()
            zc = zero[:, grp].float() if zero is not None else 0.0
            col_w = w1[:, i]
            q = torch.round(col_w / sc + zc).clamp(cfg.qmin, cfg.qmax)
            codes[:, col] = q.to(torch.int8)
            e = (col_w - (q - zc) * sc) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    return QuantizedWeight(codes, scale, zero, cfg)
