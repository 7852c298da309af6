"""Quantized modules that serve a quantized model: `QuantLinear` and `QuantMoEExperts`.

Owns the seam between `veq`'s quantized weights and `kernels`: a module is built from
`QuantizedWeight`s at load (`from_quantized`), holds only the kernel-layout integer codes,
scales and zero points as buffers (never a 16-bit copy of the weight), and calls the Triton
kernels or their torch references. It does not decide which modules of a model get swapped
(the checkpoint loader does) nor read files.

Execution path, read from the environment **at every forward call** (so tests and the server
can switch it without rebuilding modules), `VEQ_KERNELS`:
- `auto` (default): Triton kernels for CUDA tensors, the torch reference on CPU.
- `triton`: always the Triton kernels; on CPU tensors this needs `TRITON_INTERPRET=1` set
  before the first kernel import (the interpreter; slow, for tests).
- `reference`: always the torch reference (dequantize transiently, then matmul; fp32 math on
  CPU, the activation dtype on GPU).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kernels.dense.reference import dense_reference
from kernels.layout import PackedWeight, pack_codes
from kernels.moe.reference import fused_moe_reference
from kernels.moe.weights import ExpertGroup, MoEWeights, group_by_bits
from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight

KERNELS_ENV = "VEQ_KERNELS"
_PACKED_FIELDS = ("qweight", "qweight_hi", "scale", "zero")

Path = Literal["triton", "reference"]


def kernel_path(x: Tensor) -> Path:
    """The path a forward on `x` takes under the current `VEQ_KERNELS` (module docstring)."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode == "auto":
        return "triton" if x.is_cuda else "reference"
    if mode == "reference":
        return "reference"
    if mode == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{KERNELS_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 set before the "
                "kernels are imported; use VEQ_KERNELS=auto or reference to serve on CPU"
            )
        return "triton"
    raise ValueError(f"{KERNELS_ENV} must be auto, triton or reference, got {mode!r}")


def _pack(qw: QuantizedWeight) -> PackedWeight:
    return pack_codes(qw.codes, qw.scale, qw.zero, qw.cfg.bits)


class _PackedBuffers:
    """Registers a PackedWeight's tensors as buffers `<prefix>_<field>` and rebuilds it.

    Scales are stored as their int16 bit pattern (`scale.view(torch.int16)`) and viewed back at
    forward: `model.to(torch.bfloat16)` or `.half()` casts every floating buffer and would
    silently re-round fp16 scales; integer buffers only move between devices.
    """

    @staticmethod
    def register(module: nn.Module, prefix: str, pw: PackedWeight) -> dict[str, Any]:
        for name in _PACKED_FIELDS:
            t = getattr(pw, name)
            if t is not None:
                module.register_buffer(
                    f"{prefix}_{name}", t.view(torch.int16) if name == "scale" else t
                )
        return {
            "bits": pw.bits,
            "group_size": pw.group_size,
            "n": pw.n,
            "k": pw.k,
            "scale_dtype": pw.scale.dtype,
        }

    @staticmethod
    def get(module: nn.Module, prefix: str, meta: dict[str, Any]) -> PackedWeight:
        fields = {name: getattr(module, f"{prefix}_{name}", None) for name in _PACKED_FIELDS}
        fields["scale"] = fields["scale"].view(meta["scale_dtype"])
        shape = {key: meta[key] for key in ("bits", "group_size", "n", "k")}
        return PackedWeight(**fields, **shape)


class QuantLinear(nn.Module):
    """`y = x Ŵᵀ + b` with a low-bit weight held in the kernel layout (`kernels.layout`).

    Buffers: `weight_qweight` int32 [Kp·lo/32, N], `weight_qweight_hi` int32 [Kp/32, N] (3-bit),
    `weight_scale` int16 [ng, N] (the bits of the fp16/bf16 scales), `weight_zero` uint8 [ng, N]
    (asymmetric), `bias` [N] in `dtype` (if any).
    """

    def __init__(
        self,
        packed: PackedWeight,
        cfg: QuantConfig,
        bias: Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if packed.num_experts is not None:
            raise ValueError("QuantLinear takes a single weight, not stacked experts")
        self.cfg = cfg
        self.in_features = packed.k
        self.out_features = packed.n
        self.dtype = dtype
        self._view: PackedWeight | None = None
        self._meta = _PackedBuffers.register(self, "weight", packed)
        if bias is not None:
            if tuple(bias.shape) != (packed.n,):
                raise ValueError(f"bias must be [{packed.n}], got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach().to(dtype).clone())
        else:
            self.register_buffer("bias", None)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Tensor | None = None, dtype: torch.dtype = torch.float16
    ) -> QuantLinear:
        """Build from a `QuantizedWeight` `[N, K]` (codes are repacked, values unchanged).

        `dtype` is the activation dtype the model runs in and the dtype the bias is stored in;
        scales keep their own storage dtype (dequantization computes in fp32).
        """
        return cls(_pack(qw), qw.cfg, bias, dtype)

    def packed_weight(self) -> PackedWeight:
        """The weight as a `kernels.layout.PackedWeight` (views of the buffers), built once
        and again only when the buffers were replaced (`.to()`, `load_state_dict`)."""
        if self._view is None or self._view.qweight is not self.weight_qweight:
            self._view = _PackedBuffers.get(self, "weight", self._meta)
        return self._view

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._view = None  # `.to(dtype)` replaces float buffers but keeps the integer ones
        return super()._apply(fn, recurse)

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight buffers (codes, scales, zeros; bias excluded)."""
        return self.packed_weight().nbytes()

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., K] → [..., N] in x.dtype."""
        w = self.packed_weight()
        if kernel_path(x) == "reference":
            return dense_reference(x, w, self.bias)
        from kernels.dense.op import dense_wxa16

        return dense_wxa16(x, w, self.bias)

    def extra_repr(self) -> str:
        g = self.cfg.group_size or "per-channel"
        sym = "sym" if self.cfg.symmetric else "asym"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.cfg.bits}, group={g}, {sym}, bias={self.bias is not None}"
        )


class QuantMoEExperts(nn.Module):
    """Drop-in for transformers' fused experts (Qwen3-VL-MoE `Qwen3VLMoeTextExperts`).

    `forward(hidden_states [T, H], top_k_index int64 [T, A], top_k_weights [T, A]) → [T, H]`
    computes `Σ_j w_j · down_e(silu(gate_e x) · up_e x)`. Experts may differ in bit width (mixed
    precision): they are grouped by bits, separately for gate‖up and for down, and each group
    is one kernel launch per GEMM. Within a group, group size, symmetry and scale dtype must
    match. Buffers per group j: `gate_up_<j>_{qweight,qweight_hi,scale,zero}` (fused
    `[E_j, ..., 2I]`, gate rows first) and `down_<j>_*` (`[E_j, ..., H]`), plus the
    non-persistent int64 `<prefix>_local_of [E + 1]` global→local expert maps.
    """

    def __init__(
        self,
        gate_up: list[ExpertGroup],
        down: list[ExpertGroup],
        cfgs: list[QuantConfig],
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        probe = MoEWeights(
            tuple(gate_up),
            tuple(down),
            num_experts=len(cfgs),
            hidden=gate_up[0].weight.k,
            intermediate=gate_up[0].weight.n // 2,
        )  # validates shapes and coverage
        self.num_experts = probe.num_experts
        self.hidden_dim = probe.hidden
        self.intermediate_dim = probe.intermediate
        self.cfgs = cfgs
        self.dtype = dtype
        self._view: MoEWeights | None = None
        self._groups: dict[str, list[tuple[str, tuple[int, ...], dict[str, Any]]]] = {}
        for kind, groups in (("gate_up", gate_up), ("down", down)):
            self._groups[kind] = []
            for j, g in enumerate(groups):
                prefix = f"{kind}_{j}"
                meta = _PackedBuffers.register(self, prefix, g.weight)
                self.register_buffer(f"{prefix}_local_of", g.local_of, persistent=False)
                self._groups[kind].append((prefix, g.experts, meta))

    @classmethod
    def from_quantized(
        cls,
        gate: list[QuantizedWeight],
        up: list[QuantizedWeight],
        down: list[QuantizedWeight],
        dtype: torch.dtype = torch.float16,
    ) -> QuantMoEExperts:
        """Build from per-expert weights (index = expert id): gate/up `[I, H]`, down `[H, I]`.

        Gate and up of one expert must share their QuantConfig (they are fused into one
        `[2I, H]` weight); down may use other bits than gate/up.
        """
        if not (len(gate) == len(up) == len(down)) or not gate:
            raise ValueError(f"got {len(gate)} gate, {len(up)} up, {len(down)} down experts")
        fused = []
        for e, (g, u) in enumerate(zip(gate, up, strict=True)):
            if g.cfg != u.cfg or g.shape != u.shape:
                raise ValueError(
                    f"expert {e}: gate {g.shape} {g.cfg} and up {u.shape} {u.cfg} must match "
                    "(they are fused into one weight)"
                )
            zero = None if g.zero is None else torch.cat([g.zero, u.zero])  # type: ignore[list-item]
            fused.append(
                pack_codes(
                    torch.cat([g.codes, u.codes]), torch.cat([g.scale, u.scale]), zero, g.cfg.bits
                )
            )
        downs = [_pack(d) for d in down]
        return cls(group_by_bits(fused), group_by_bits(downs), [g.cfg for g in gate], dtype)

    def moe_weights(self) -> MoEWeights:
        """The experts as a `kernels.moe.weights.MoEWeights` (views of the buffers), built once
        and again only after the buffers move (`_apply`), as vLLM prepares kernel arguments
        once after loading rather than every forward. Rebuilt when the buffers were replaced."""
        first = getattr(self, f"{self._groups['gate_up'][0][0]}_qweight")  # replaced: rebuild
        if self._view is None or self._view.gate_up[0].weight.qweight is not first:
            self._view = self._build_moe_weights()
        return self._view

    def _apply(self, fn: Any, recurse: bool = True) -> QuantMoEExperts:
        self._view = None  # `.to(dtype)` replaces float buffers but keeps the integer ones
        return super()._apply(fn, recurse)

    def _build_moe_weights(self) -> MoEWeights:
        groups = {
            kind: tuple(
                ExpertGroup(
                    experts,
                    _PackedBuffers.get(self, prefix, meta),
                    getattr(self, f"{prefix}_local_of"),
                )
                for prefix, experts, meta in entries
            )
            for kind, entries in self._groups.items()
        }
        return MoEWeights(
            groups["gate_up"],
            groups["down"],
            num_experts=self.num_experts,
            hidden=self.hidden_dim,
            intermediate=self.intermediate_dim,
        )

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight buffers (codes, scales, zeros; index maps excluded)."""
        return self.moe_weights().nbytes()

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states: [T, H]; top_k_index: int [T, A]; top_k_weights: [T, A] → [T, H]."""
        w = self.moe_weights()
        if kernel_path(hidden_states) == "reference":
            return fused_moe_reference(hidden_states, top_k_index, top_k_weights, w)
        from kernels.moe.op import fused_moe

        return fused_moe(hidden_states, top_k_index, top_k_weights, w)

    def extra_repr(self) -> str:
        bits = sorted({c.bits for c in self.cfgs})
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}, bits={bits}"
        )
