"""The two Triton kernels of the fused MoE (launch them through `kernels.moe.op`).

GEMM 1 (`moe_gate_up_kernel`) computes `h = silu(x Ŵ_gateᵀ) · (x Ŵ_upᵀ)` for each assignment with
two accumulators over one shared x tile (the SiLU·mul is the epilogue, the `[T·A, 2I]` gate‖up
product is never written). GEMM 2 (`moe_down_kernel`) computes `w_routed · h Ŵ_downᵀ` per
assignment. Both read the block schedule of `kernels.moe.align`; one launch serves all experts of
a group, each M-block using its own expert's weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._dequant import dequant_tile


@triton.jit
def moe_gate_up_kernel(
    # Pointers
    x_ptr,
    out_ptr,
    q_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    # Dimensions
    N,
    K,
    num_assignments,
    # Strides
    stride_xt,
    stride_xk,
    stride_om,
    stride_on,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_he,
    stride_hk,
    stride_hn,
    stride_se,
    stride_sg,
    stride_sn,
    stride_ze,
    stride_zg,
    stride_zn,
    # Meta-parameters
    TOP_K: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP16_MATH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`out[a, n] = silu(x[a // TOP_K] · Ŵ[e, n]) · (x[a // TOP_K] · Ŵ[e, N + n])`.

    x: [T, H] fp16/bf16; out: [T·A, I] in x's dtype (rows of other groups untouched).
    Weights of the group (E_g experts, fused gate‖up, N = I, K = H): q int32 [E_g, Kp·lo/32, 2I],
    qh int32 [E_g, Kp/32, 2I] (3-bit), s [E_g, ng, 2I], z uint8 [E_g, ng, 2I] (asymmetric).
    sorted_ids: int32 [L] assignment ids a by expert, padded with num_assignments (= T·A);
    block_expert: int32 [L / BLOCK_M]; num_padded: int32 [1].
    Grid: (L / BLOCK_M) · cdiv(I, BLOCK_N) programs, N fastest; fp32 accumulation.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ids_ptr + offs_m)
    mask_m = rows < num_assignments
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q_ptr += expert * stride_qe
    qh_ptr += expert * stride_he
    s_ptr += expert * stride_se
    z_ptr += expert * stride_ze
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + (rows // TOP_K).to(tl.int64)[:, None] * stride_xt
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_rows + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w_gate = dequant_tile(
            q_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K,
            stride_qk, stride_qn, stride_hk, stride_hn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP, HAS_ZERO, FP16_MATH, BLOCK_K, dtype,
        )  # fmt: skip
        w_up = dequant_tile(
            q_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_n + N, mask_n, K,
            stride_qk, stride_qn, stride_hk, stride_hn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP, HAS_ZERO, FP16_MATH, BLOCK_K, dtype,
        )  # fmt: skip
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
        h.to(dtype),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def moe_down_kernel(
    # Pointers
    h_ptr,
    out_ptr,
    topk_weights_ptr,
    q_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    # Dimensions
    N,
    K,
    num_assignments,
    # Strides
    stride_am,
    stride_ak,
    stride_os,
    stride_om,
    stride_on,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_he,
    stride_hk,
    stride_hn,
    stride_se,
    stride_sg,
    stride_sn,
    stride_ze,
    stride_zg,
    stride_zn,
    # Meta-parameters
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP16_MATH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """`out[a, n] = topk_weights[a] · (h[a] · Ŵ[e, n])` for every assignment a of the group.

    h: [T·A, I] fp16/bf16 (GEMM 1's output); topk_weights: fp32 [T·A]. Weights (N = H, K = I):
    q int32 [E_g, Kp·lo/32, H], qh int32 [E_g, Kp/32, H] (3-bit), s [E_g, ng, H],
    z uint8 [E_g, ng, H] (asymmetric). out: [SPLIT_K, T·A, H] (rows of other groups untouched),
    split s holding the K range [s·Ks, (s+1)·Ks); in h's dtype or fp32. Grid:
    ((L / BLOCK_M) · cdiv(H, BLOCK_N), SPLIT_K). The routed weight is applied to the fp32
    accumulator; the sum over splits and the A picks of a token is done by the launcher.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ids_ptr + offs_m)
    mask_m = rows < num_assignments
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q_ptr += expert * stride_qe
    qh_ptr += expert * stride_he
    s_ptr += expert * stride_se
    z_ptr += expert * stride_ze
    dtype = h_ptr.dtype.element_ty
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_am
    k_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(1) * k_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            h_rows + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w = dequant_tile(
            q_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K,
            stride_qk, stride_qn, stride_hk, stride_hn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP, HAS_ZERO, FP16_MATH, BLOCK_K, dtype,
        )  # fmt: skip
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    routed = tl.load(topk_weights_ptr + rows, mask=mask_m, other=0.0)
    acc = acc * routed[:, None]
    out_rows = out_ptr + tl.program_id(1) * stride_os + rows.to(tl.int64)[:, None] * stride_om
    tl.store(
        out_rows + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )
