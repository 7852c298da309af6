"""What the pipeline needs to know about an architecture, as data.

An `Architecture` names, relative to each decoder layer, the linears to quantize grouped by the
input they share (and the operation that produces it, where AWQ folds `1/s`), the MoE block's
router, experts (fused 3-D tensors or a ModuleList of MLPs) and shared experts, how the router
turns hidden states into probabilities and a top-k choice, and which modules stay 16-bit. The
pipeline reads these tables; it has no per-model branches.

Shape legend: T tokens, E experts, A top-k, H hidden, I expert intermediate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from veq.experts import ExpertWeights

#: (router module, hidden [T, H]) -> (probs [T, E] fp32, topk_idx [T, A], topk_weights [T, A])
RoutingFn = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class LinearGroup:
    """Linears reading one input, `prev` the module producing it (None: nothing to fold into).

    `companions` are 16-bit modules reading the same input (a router): when AWQ divides the input
    by `s` their weight columns are multiplied by `s`, so they compute exactly what they did.
    """

    linears: tuple[str, ...]
    prev: str | None
    companions: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoESpec:
    """Where an MoE block keeps its parts, relative to the decoder layer."""

    block: str
    router: str
    experts: str
    layout: Literal["fused", "list"]
    routing: RoutingFn
    shared: str | None = None


@dataclass(frozen=True)
class Architecture:
    """Per-architecture mapping table (see module docstring)."""

    name: str
    model_types: tuple[str, ...]
    text_model: str
    attention: tuple[LinearGroup, ...]
    dense_mlp: tuple[str, str, str]
    mlp_prev: str
    moe: MoESpec
    ignore: tuple[str, ...]
    image_token_attr: str = "image_token_id"
    #: Called after decoder layer i with (layer index, hidden [B, S, H], captured text-model
    #: kwargs) -> hidden; models that inject features between layers (Qwen3-VL's deepstack).
    post_layer: Callable[[int, Tensor, dict[str, Any]], Tensor] | None = None
    notes: str = field(default="", compare=False)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """`root.a.b.0.c` for path "a.b.0.c"; raises a clear error naming the missing part."""
    module = root
    for part in path.split("."):
        child = getattr(module, part, None)
        if child is None:  # absent, or declared None (DeepSeek's q_a_proj without q_lora_rank)
            raise AttributeError(
                f"{type(root).__name__} has no submodule {path!r} (missing {part!r})"
            )
        module = child
    return module


def has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
    except AttributeError:
        return False
    return True


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, module)


class MoEView:
    """Read and write one MoE block's experts uniformly, fused or listed."""

    def __init__(self, layer: nn.Module, spec: MoESpec) -> None:
        self.spec = spec
        self.block = get_module(layer, spec.block)
        self.router = get_module(self.block, spec.router)
        self.experts = get_module(self.block, spec.experts)
        self.shared = get_module(self.block, spec.shared) if spec.shared else None

    @property
    def num_experts(self) -> int:
        if self.spec.layout == "fused":
            return int(self.experts.gate_up_proj.shape[0])
        return len(self.experts)

    def route(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`hidden: [T, H]` -> probs [T, E] fp32, topk_idx [T, A], topk_weights [T, A]."""
        return self.spec.routing(self.router, hidden)

    def expert(self, e: int) -> ExpertWeights:
        """Expert e's weights (views, not copies): gate/up [I, H], down [H, I]."""
        if self.spec.layout == "fused":
            gate_up, down = self.experts.gate_up_proj[e], self.experts.down_proj[e]
            i = gate_up.shape[0] // 2
            return ExpertWeights(gate_up[:i], gate_up[i:], down)
        mlp = self.experts[e]
        return ExpertWeights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)

    @torch.no_grad()
    def set_expert(self, e: int, gate: Tensor, up: Tensor, down: Tensor) -> None:
        """Overwrite expert e's weights in place (dtype of the stored parameters)."""
        cur = self.expert(e)
        cur.gate.copy_(gate)
        cur.up.copy_(up)
        cur.down.copy_(down)

    def expert_names(self, prefix: str, e: int) -> tuple[str, str, str]:
        """Unfused checkpoint names of expert e (`{prefix}.mlp.experts.{e}.gate_proj`, ...)."""
        base = f"{prefix}.{self.spec.block}.{self.spec.experts}.{e}"
        return f"{base}.gate_proj", f"{base}.up_proj", f"{base}.down_proj"


def softmax_router(router: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Qwen-MoE routing: the router's own top-k; probabilities are the softmax over all experts."""
    logits, weights, idx = router(hidden)
    return logits.float().softmax(-1), idx, weights.float()


def sigmoid_router(router: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3 / Kimi K2.5 routing: the router module decides (sigmoid scores, grouped
    top-k, bias correction, scaling); probabilities are the sigmoid affinities."""
    logits, weights, idx = router(hidden)
    return torch.sigmoid(logits.float()), idx, weights.float()


def moegate_router(gate: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Kimi-VL remote-code `MoEGate`: `gate(h [1, T, H]) -> (topk_idx, topk_weight)`;
    probabilities are its scoring function (sigmoid or softmax) of `h @ gate.weightᵀ`."""
    idx, weights = gate(hidden.unsqueeze(0))[:2]
    logits = torch.nn.functional.linear(hidden.float(), gate.weight.float())
    scoring = getattr(gate, "scoring_func", "softmax")
    probs = torch.sigmoid(logits) if scoring == "sigmoid" else logits.softmax(-1)
    return probs, idx.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1).float()
