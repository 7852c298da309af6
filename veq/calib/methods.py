"""One strategy per quantization method: what the layer loop asks of it, and nothing else.

The loop (`veq.calib.pipeline`) captures inputs, collects statistics, solves and propagates; it
never looks at a method's name. A method says whether it needs GPTQ Hessians (`hessian`) or
AWQ-family scale searches (`search`), which per-token weights those statistics use, how much
each expert matters in the shared scale search, and which solver quantizes a weight. Adding a
method is one class here and its name in `veq.recipe.METHODS`.

Token weights see a `Tokens` view: the tokens' kinds and, for experts, each token's router
affinity `p` for the expert being calibrated. Experts with enough routed tokens see only those;
fallback experts (too few routed tokens) see every token, weighted by `p` as a soft membership
(docs/design.md §2.6), which every method applies.

Shape legend: T tokens, N out-features, K in-features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from veq.algorithms import (
    awq_quantize,
    fp_target,
    gptq,
    ma_token_weights,
    mbq_token_weights,
    rtn,
)
from veq.config import QuantConfig
from veq.quantizer import QuantizedWeight
from veq.recipe import Recipe
from veq.tokens import TokenKind


@dataclass(frozen=True)
class Tokens:
    """The tokens a statistic is collected over: `kinds: [T]` int8 (`TokenKind`); `affinity:
    [T]` fp32, the router's softmax probability (over all experts, before top-k) of each token for
    the expert being calibrated, None for dense modules; `fallback`: the expert had too few routed
    tokens and sees every token, `affinity` acting as membership."""

    kinds: Tensor
    affinity: Tensor | None = None
    fallback: bool = False
    saliency: Tensor | None = None
    """`[T]` fp32, mean 1 over the calibration set: how much the answers' loss moves with the
    layer's output at each token (`veq.calib.gamma.measure_saliency`); None unless measured."""

    @property
    def membership(self) -> Tensor | None:
        """Per-token weights every method applies: `affinity` for a fallback expert, else none."""
        return self.affinity if self.fallback else None

    def select(self, idx: Tensor) -> Tokens:
        a = self.affinity[idx] if self.affinity is not None else None
        s = self.saliency[idx] if self.saliency is not None else None
        return Tokens(self.kinds[idx], a, self.fallback, s)


@dataclass(frozen=True)
class Statistics:
    """What a solver gets for one weight: the Hessian of its inputs (`[K, K]` fp64 or None),
    sampled inputs `x: [T, K]` with their token weights `c: [T]` (or None) for AWQ-family
    losses, and the residual `[K, K]` of the 16-bit model's inputs against the quantized
    model's (`ResidualAccumulator`; None unless `Recipe.fp_target`)."""

    hessian: Tensor | None = None
    x: Tensor | None = None
    c: Tensor | None = None
    residual: Tensor | None = None


class Method:
    """Round-to-nearest: no statistics, no data (`Recipe.data_free`)."""

    name: ClassVar[str] = "rtn"
    hessian: ClassVar[bool] = False
    search: ClassVar[bool] = False

    def __init__(
        self,
        recipe: Recipe,
        gamma: float,
        beta: float,
        vision_ratios: Sequence[float],
        layer_gammas: Sequence[float] | None = None,
    ) -> None:
        """`layer_gammas`: the measured text/vision ratio of each decoder layer (None when γ
        was given, not measured); only `veq` with `recipe.gamma_per_layer` reads them."""
        self.recipe = recipe
        self.gamma, self.beta = float(gamma), float(beta)
        self.vision_ratios = list(vision_ratios)
        self.layer_gammas = list(layer_gammas) if layer_gammas else None

    def modality_weight(self, layer: int) -> float:
        """α of text tokens at decoder layer `layer` (vision tokens weigh 1)."""
        return self.gamma

    @property
    def needs_stats(self) -> bool:
        return self.hessian or self.search

    @classmethod
    def needs_saliency(cls, recipe: Recipe) -> bool:
        """Whether calibrating `recipe` with this method needs per-token gradient saliency."""
        return False

    def hessian_weights(self, t: Tokens, layer: int) -> Tensor | None:
        """c_j of the Hessian `Σ_j c_j x_j x_jᵀ` at decoder layer `layer` (None: every token
        1)."""
        return t.membership

    def search_weights(self, t: Tokens, layer: int) -> Tensor | None:
        """c_t of the AWQ-family output loss `Σ_t c_t ‖(W − Q(W)) x_t‖²` (None: every token 1)."""
        return t.membership

    def expert_importance(
        self, routed_importance: float | None, t: Tokens, c: Tensor | None, layer: int
    ) -> float:
        """S_i of one expert of decoder layer `layer` in the shared scale search: its
        (weighted) token count. `routed_importance` is VEQ's S_i of a routed expert (None for
        fallback and shared experts); `c` the search weights of the expert's tokens."""
        return float(c.sum()) if c is not None else float(t.kinds.shape[0])

    def solve(self, weight: Tensor, st: Statistics | None, cfg: QuantConfig) -> QuantizedWeight:
        """Quantize `weight: [N, K]`."""
        return rtn(weight, cfg)


class GPTQ(Method):
    """GPTQ on the (membership-weighted) Hessian of each weight's inputs; with
    `recipe.fp_target`, towards the weight that gives the 16-bit model's outputs (GPTAQ)."""

    name = "gptq"
    hessian = True

    def solve(self, weight: Tensor, st: Statistics | None, cfg: QuantConfig) -> QuantizedWeight:
        if st is None or st.hessian is None:
            return rtn(weight, cfg)
        if st.residual is not None and self.recipe.fp_target:
            weight = fp_target(
                weight,
                st.hessian,
                st.residual,
                strength=self.recipe.fp_target,
                damp=self.recipe.damp,
            )
        return gptq(
            weight,
            st.hessian,
            cfg,
            act_order=self.recipe.act_order,
            damp=self.recipe.damp,
            range_search=self.recipe.range_search,
        )


class AWQ(Method):
    """AWQ: activation-aware scales searched per linear group (and per expert), then clipping."""

    name = "awq"
    search = True

    def solve(self, weight: Tensor, st: Statistics | None, cfg: QuantConfig) -> QuantizedWeight:
        if st is None or st.x is None:
            return rtn(weight, cfg)
        return awq_quantize(weight, st.x, cfg, token_weights=st.c, clip=self.recipe.clip)


class MBQ(AWQ):
    """MBQ: AWQ whose loss weighs each token by its modality's gradient ratio per layer."""

    name = "mbq"

    def search_weights(self, t: Tokens, layer: int) -> Tensor | None:
        c = mbq_token_weights(t.kinds, self.vision_ratios[layer])
        return c if t.membership is None else c * t.membership


class VEQME(AWQ):
    """VEQ-ME: AWQ whose shared expert scale weighs experts by S_i = γ·N_i^text + β·N_i^vis."""

    name = "veq-me"

    def expert_importance(
        self, routed_importance: float | None, t: Tokens, c: Tensor | None, layer: int
    ) -> float:
        if routed_importance is not None:
            return routed_importance
        w = t.membership if t.membership is not None else torch.ones(t.kinds.shape[0])
        w = w.to(t.kinds.device)
        text = t.kinds != TokenKind.VISION
        return float(self.modality_weight(layer) * w[text].sum() + self.beta * w[~text].sum())


class VEQMA(GPTQ):
    """VEQ-MA: GPTQ on Hessians weighted by c_j = p_j^λ · α_j (α = γ on text, 1 on vision), for
    every expert, routed or fallback. p is the router's softmax probability before top-k: the
    affinity the router assigns, defined for every (token, expert) pair, so routed and fallback
    experts weigh tokens on one scale (the renormalised top-k weight exists for routed tokens
    only). Dense modules (attention) have p = 1."""

    name = "veq-ma"

    def hessian_weights(self, t: Tokens, layer: int) -> Tensor | None:
        is_text = t.kinds != TokenKind.VISION
        assert self.recipe.lam is not None  # written by the recipe's validator
        return ma_token_weights(is_text, self.modality_weight(layer), t.affinity, self.recipe.lam)


#: The least saliency a token counts with (saliency has mean 1 over the calibration set).
SALIENCY_FLOOR = 0.01


class VEQ(VEQMA, VEQME):
    """VEQ: VEQ-ME's expert-weighted scale search, then VEQ-MA's weighted GPTQ, and beyond the
    paper: the modality weight tempered to γ^τ (`recipe.tau`), the router probability squared
    by default (λ = 2), optionally γ measured per decoder layer instead of one per model
    (`recipe.gamma_per_layer`), and optionally each token's gradient saliency to the power
    `recipe.saliency` in the Hessian (a Fisher-weighted objective: a token whose layer output
    the answers' loss does not feel costs nothing to get wrong)."""

    name = "veq"
    hessian = True
    search = True

    def __init__(
        self,
        recipe: Recipe,
        gamma: float,
        beta: float,
        vision_ratios: Sequence[float],
        layer_gammas: Sequence[float] | None = None,
    ) -> None:
        # The modality weight tempered, in the Hessians and in the expert importance alike.
        assert recipe.tau is not None  # written by the recipe's validator
        super().__init__(recipe, float(gamma) ** recipe.tau, beta, vision_ratios, layer_gammas)

    def modality_weight(self, layer: int) -> float:
        # Per layer (MBQ's granularity) when asked for and measured; else the model's γ.
        if self.recipe.gamma_per_layer and self.layer_gammas is not None:
            assert self.recipe.tau is not None
            return float(self.layer_gammas[layer]) ** self.recipe.tau
        return self.gamma

    @classmethod
    def needs_saliency(cls, recipe: Recipe) -> bool:
        return recipe.saliency > 0

    def search_weights(self, t: Tokens, layer: int) -> Tensor | None:
        # One objective for both stages when asked: the search then scales channels for the
        # tokens the Hessians favour (high router affinity, text), not for every routed token.
        if self.recipe.weighted_search:
            return VEQMA.hessian_weights(self, t, layer)
        return super().search_weights(t, layer)

    def hessian_weights(self, t: Tokens, layer: int) -> Tensor | None:
        c = super().hessian_weights(t, layer)
        if not self.needs_saliency(self.recipe) or t.saliency is None:
            return c
        # A floor: tokens past the last answer have no gradient at all, and an expert routed
        # only such tokens still needs a Hessian (they count as 1 % of an average token).
        s = t.saliency.to(t.kinds.device).clamp(min=SALIENCY_FLOOR).pow(self.recipe.saliency)
        return s if c is None else c * s


METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (Method, GPTQ, AWQ, MBQ, VEQME, VEQMA, VEQ)
}


def method_for(
    recipe: Recipe,
    gamma: float,
    beta: float,
    vision_ratios: Sequence[float],
    layer_gammas: Sequence[float] | None = None,
) -> Method:
    """The strategy of `recipe.method`."""
    return METHOD_CLASSES[recipe.method](recipe, gamma, beta, vision_ratios, layer_gammas)
