"""Dense WxA16 GEMM (attention projections, shared experts, dense MLPs).

`kernels.dense.reference` is pure torch; `kernels.dense.op` imports Triton: import it explicitly.
"""
