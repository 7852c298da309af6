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
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """`out [M, N] = x [M, K] @ Ŵᵀ (+ bias [N])`, Ŵ dequantized tile by tile in registers.

    x: [M, K] fp16/bf16/fp32; bias: [N] (HAS_BIAS only). Weight tensors as in `kernels.layout`
    (q: int32 [Kp·lo/32, N], qh: int32 [Kp/32, N], s: [ng, N], z: uint8 [ng, N]).
    out: [M, N] in x's dtype when SPLIT_K == 1; else fp32 partial sums [SPLIT_K, M, N], split
    s holding K range [s·Ks, (s+1)·Ks) (Ks a multiple of BLOCK_K), summed by the launcher.
    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), SPLIT_K), N fastest; fp32 accumulation.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = x_ptr.dtype.element_ty
    k_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        b = dequant_tile(
            q_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, K,
            stride_qk, stride_qn, stride_hk, stride_hn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP, HAS_ZERO, FP16_MATH, BLOCK_K, dtype,
        )  # fmt: skip
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        if pid_k == 0:  # one split adds the bias
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )
