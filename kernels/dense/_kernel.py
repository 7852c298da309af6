"""The Triton dense WxA16 GEMM kernel (launch it through `kernels.dense.op`)."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._dequant import dequant_tile


@triton.jit
def dense_wxa16_kernel(
    # Pointers
    x_ptr,
    out_ptr,
    bias_ptr,
    q_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    # Dimensions
    M,
    N,
    K,
    # Strides
    stride_xm,
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
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`out [M, N] = x [M, K] @ Ŵᵀ (+ bias [N])`, Ŵ dequantized tile by tile in registers.

    x: [M, K] fp16/bf16/fp32; out: [M, N] in x's dtype; bias: [N] (HAS_BIAS only).
    Weight tensors as in `kernels.layout` (q: int32 [Kp·lo/32, N], qh: int32 [Kp/32, N],
    s: [ng, N], z: uint8 [ng, N]). Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N) programs, N fastest.
    fp32 accumulation; one `tl.dot` per K tile.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = dequant_tile(
            q_ptr, qh_ptr, s_ptr, z_ptr,
            k0, offs_k, offs_n, mask_k, mask_n,
            stride_qk, stride_qn, stride_hk, stride_hn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP, SCALE_PER_TILE, HAS_ZERO,
        ).to(dtype)  # fmt: skip
        acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(dtype),
        mask=mask_m[:, None] & mask_n[None, :],
    )
