"""Fused MoE WxA16: x [T, H] through every routed expert's gate‖up and down in two launches.

`align` (sort/pad), `weights` (expert groups by bit width) and `reference` are pure torch;
`op` imports Triton (import it explicitly, after `TRITON_INTERPRET` is settled).
"""
