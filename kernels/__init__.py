"""kernels: pure tensor ops (Triton low-bit GEMMs and their torch references).

The bottom floor: no nn.Modules, and it imports neither `veq` nor `server`. Importing `kernels`
imports nothing heavy: the Triton modules (`kernels.dense.op`, `kernels.moe.op`) are imported
explicitly by whoever launches them, after `TRITON_INTERPRET` is settled (the interpreter
must be switched on before any `@triton.jit` decoration).

Shape legend: T tokens, E experts, A top-k, H hidden, I expert intermediate, K in-features,
N out-features, G group size, ng = K / G groups, b bits.

Modules:
- `kernels.layout`: `PackedWeight`, the kernel-side storage layout (planar int32 words holding
  whole codes, `[K-words, N]`, N contiguous) with its torch pack/unpack/dequantize and byte count.
- `kernels.repack`: on-disk compressed-tensors tensors or signed codes → `PackedWeight`.
- `kernels.dense`: WxA16 GEMM `x [M, K] @ Ŵᵀ` (`op` Triton launcher, `reference` torch).
- `kernels.moe`: fused MoE WxA16 (`align` sort/pad step, `op` launcher, `reference` torch,
  `weights` the per-bit-width expert groups of one layer).
- `kernels.tuning`: `BlockConfig`, the GPU `Target` (SMs, shared memory per block), the
  block-size heuristic with its shared-memory bound (+ optional per-device tables).
- `kernels._launch`: the seam every launcher launches through (recorded by `kernels.aot`).
- `kernels.aot`: `python -m kernels.aot`, every variant the launchers produce compiled for
  sm_90 and sm_80 without a GPU (shared memory, registers, spills, MMA family).
- `kernels._testing`: random packed weights and error metrics shared by tests and the bench.
"""
