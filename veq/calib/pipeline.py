"""The layer-by-layer calibration pipeline: statistics → solvers → quantized weights.

Runs the decoder one layer at a time (only that layer on the calibration device, the rest where
it was). Per layer: pass 1 runs the original layer over every calibration sample with hooks on
(per-group Hessians weighted as the method asks, inputs kept for AWQ-family searches, the MoE
block's inputs for routing); then AWQ-family scales are searched and folded into the previous
operation (the function is unchanged in full precision); then every linear is quantized and its
dequantized weights written back; pass 2 runs the *quantized* layer to produce the next layer's
inputs. With fp targets (`Recipe.fp_target`) a pass 0 first runs the 16-bit layer on the
16-bit model's own hidden states, kept beside the quantized model's, so that each Hessian comes
with its residual against the 16-bit model's inputs. With `Recipe.true_sequential` pass 1 and
the two phases run once for attention and again for what reads its output. It knows no method
by name: what differs between methods (token weights, expert importance, solver) is the
strategy of `veq.calib.methods`. It does not save anything
(`veq.checkpoint` does) and knows architectures only through `veq.models` tables.

Shape legend: T tokens, S sequence, E experts, H hidden, I expert intermediate, K in-features.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from veq.algorithms import (
    awq_scales,
    expert_importance,
    fp_target,
    hessian_error,
    shared_scale_search,
)
from veq.calib.data import CalibSample
from veq.calib.methods import Statistics, Tokens, method_for
from veq.calib.report import QuantReport, QuantResult
from veq.config import QuantConfig
from veq.experts import ExpertWeights
from veq.format import packed_nbytes
from veq.models import (
    Architecture,
    LinearGroup,
    MoEView,
    decoder_layers,
    get_architecture,
    get_module,
    is_moe_layer,
    layer_linears,
)
from veq.models.capture import LayerInputs, capture_layer_inputs
from veq.models.capture import to_device as _to
from veq.quantizer import QuantizedWeight
from veq.recipe import Recipe, allocate_expert_bits
from veq.stats import ActivationStats, HessianAccumulator, ResidualAccumulator
from veq.tokens import TokenKind

log = logging.getLogger(__name__)


#: `Calibrator._fp_pass`'s key for the MoE block's inputs.
_MOE = "<moe block>"


def _subsample(n: int, cap: int, device: torch.device | str) -> Tensor:
    """Evenly spaced indices of at most `cap` of `n` tokens."""
    if n <= cap:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, cap, device=device).round().long()


class _Capture:
    """Every sample's inputs to the current decoder layer (layer 0's at first), and the text
    model's kwargs for `post_layer`."""

    def __init__(self, inputs: list[LayerInputs]) -> None:
        self.hidden = [c.hidden for c in inputs]
        self.kwargs = [c.kwargs for c in inputs]
        self.text_kwargs = [c.text_kwargs for c in inputs]
        # The 16-bit model's own hidden states at the current layer, for `Recipe.fp_target`
        # (`hidden` are the quantized model's from layer 1 on).
        self.fp_hidden: list[Tensor] | None = None


def capture_inputs(
    model: nn.Module, arch: Architecture, samples: Sequence[CalibSample], device: torch.device
) -> _Capture:
    """Run each sample through the model up to decoder layer 0 and keep its inputs (on CPU)."""
    return _Capture(
        [capture_layer_inputs(model, arch, _to(sample.inputs, device), "cpu") for sample in samples]
    )


class _GroupStats:
    """Statistics of one linear group's shared input over all samples of a layer."""

    def __init__(
        self, k: int, hessian: bool, scale: bool, residual: bool, cap: int, device: torch.device
    ) -> None:
        self.hessian = (
            HessianAccumulator(k, dtype=torch.float64, device=device) if hessian else None
        )
        self.residual = ResidualAccumulator(k, device=device) if residual else None
        self.act = ActivationStats(k, device=device) if scale else None
        self.cap = cap
        self.xs: list[Tensor] = []
        self.cs: list[Tensor | None] = []

    def add(
        self,
        x: Tensor,
        h_weights: Tensor | None,
        s_weights: Tensor | None,
        per_sample: int,
        x_fp: Tensor | None = None,
    ) -> None:
        """`x: [T, K]` the quantized model's inputs; `x_fp: [T, K]` the 16-bit model's at the
        same tokens (needed when the residual is kept)."""
        if self.hessian is not None:
            self.hessian.add(x, h_weights)
        if self.residual is not None:
            if x_fp is None:
                raise ValueError("the residual needs the 16-bit model's inputs")
            self.residual.add(x_fp, x, h_weights)
        if self.act is not None:
            self.act.add(x, s_weights)
            idx = _subsample(x.shape[0], per_sample, x.device)
            self.xs.append(x[idx].float())
            self.cs.append(s_weights[idx] if s_weights is not None else None)

    def sample(self) -> tuple[Tensor | None, Tensor | None]:
        if not self.xs:
            return None, None
        x = torch.cat(self.xs)
        c = None if any(c is None for c in self.cs) else torch.cat(self.cs)  # type: ignore[arg-type]
        return x, c


class Calibrator:
    """Quantizes one model with one recipe; `run()` does the work."""

    def __init__(
        self,
        model: nn.Module,
        samples: Sequence[CalibSample],
        recipe: Recipe,
        *,
        gamma: float,
        gamma_source: str,
        vision_ratios: Sequence[float] | None = None,
        layer_gammas: Sequence[float] | None = None,
        saliency: Sequence[Tensor] | None = None,
        device: torch.device | str = "cpu",
        progress: bool = True,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> None:
        """`on_layer(done, total)` is called after each decoder layer (job progress). A
        data-free recipe (`Recipe.data_free`) takes no samples and runs no forward pass.
        `saliency`: per sample `[L, S]` (`veq.calib.gamma.measure_saliency`), for methods
        whose token weights use it; `layer_gammas`: γ of each decoder layer when measured
        (`GammaResult.per_layer`)."""
        if not samples and not recipe.data_free:
            raise ValueError("calibration needs at least one sample")
        self.model = model
        self.arch = get_architecture(model)
        self.samples = list(samples)
        self.recipe = recipe
        self.gamma = float(gamma)
        self.device = torch.device(device)
        self.progress = progress
        self.on_layer = on_layer
        layers = decoder_layers(model, self.arch)
        self.vision_ratios = (
            list(vision_ratios) if vision_ratios else [1.0 / self.gamma] * len(layers)
        )
        kinds = torch.cat([s.kinds for s in self.samples]) if self.samples else torch.zeros(0)
        n_vis = int((kinds == TokenKind.VISION).sum())
        n_text = int(kinds.numel() - n_vis)
        self.beta = n_text / n_vis if n_vis else 0.0
        self.report = QuantReport(
            method=recipe.method,
            recipe=recipe.model_dump(),
            gamma=self.gamma,
            gamma_source=gamma_source,
            beta=self.beta,
            samples=len(self.samples),
            tokens=int(kinds.numel()),
            layers=len(layers),
        )
        self.weights: dict[str, QuantizedWeight] = {}
        self.dtype = next(model.parameters()).dtype
        if layer_gammas is not None and len(layer_gammas) != len(layers):
            layer_gammas = None  # a layer without vision gradients has no ratio of its own
        if recipe.gamma_per_layer and layer_gammas is None:
            log.warning("gamma per layer needs γ measured at every layer; using γ %.3g", gamma)
        self.method = method_for(recipe, self.gamma, self.beta, self.vision_ratios, layer_gammas)
        if self.method.needs_saliency(recipe) and saliency is None:
            raise ValueError(f"{recipe.label} with saliency {recipe.saliency} needs saliency")
        self.saliency = list(saliency) if saliency is not None else None

    # -- the loop ------------------------------------------------------------------------

    @torch.no_grad()
    def run(self) -> QuantResult:
        t0 = time.perf_counter()
        layers = decoder_layers(self.model, self.arch)
        self.model.eval()
        cap = None if self.recipe.data_free else self._capture(layers)
        if cap is not None and self._fp_targets:
            cap.fp_hidden = list(cap.hidden)
        bar = tqdm(
            total=len(layers),
            desc=f"quantize {self.recipe.label}",
            unit="layer",
            disable=not self.progress,
        )
        prefix = f"{self.arch.text_model}.layers"
        try:
            for i, layer in enumerate(layers):
                home = next(layer.parameters()).device
                layer.to(self.device)
                if cap is None:
                    self._round_layer(i, layer, f"{prefix}.{i}")
                else:
                    self._quantize_layer(i, layer, f"{prefix}.{i}", cap)
                    cap.hidden = self._propagate(i, layer, cap)
                layer.to(home)
                bar.update(1)
                if self.on_layer is not None:
                    self.on_layer(i + 1, len(layers))
        finally:
            bar.close()
        self.report.seconds = time.perf_counter() - t0
        return QuantResult(self.weights, self.report)

    def _capture(self, layers: nn.ModuleList) -> _Capture:
        """Layer-0 inputs: everything but the decoder layers visits the device for it."""
        text = get_module(self.model, self.arch.text_model)
        home = next(self.model.parameters()).device

        def move(device: torch.device) -> None:
            saved, text.layers = text.layers, nn.ModuleList()
            try:
                self.model.to(device)
            finally:
                text.layers = saved

        # A failure anywhere (an OOM halfway through the move included) leaves the model
        # whole and where it was.
        try:
            move(self.device)
            return capture_inputs(self.model, self.arch, self.samples, self.device)
        finally:
            if home != self.device:
                move(home)

    @torch.no_grad()
    def _run_layer(self, layer: nn.Module, cap: _Capture, s: int, fp: bool = False) -> Tensor:
        """Layer output `[1, S, H]` of sample s from the quantized model's hidden states (or,
        with `fp`, the 16-bit model's)."""
        if fp and cap.fp_hidden is None:
            raise RuntimeError("the 16-bit model's hidden states are kept only with fp targets")
        hidden = cap.fp_hidden[s] if fp else cap.hidden[s]
        out = layer(hidden.to(self.device), **_to(cap.kwargs[s], self.device))
        return out[0] if isinstance(out, tuple) else out

    def _next_hidden(self, i: int, out: Tensor, cap: _Capture, s: int) -> Tensor:
        """Layer i's output as layer i + 1's input (on the host)."""
        if self.arch.post_layer is not None:
            out = self.arch.post_layer(i, out, _to(cap.text_kwargs[s], self.device))
        return out.cpu()

    @torch.no_grad()
    def _propagate(self, i: int, layer: nn.Module, cap: _Capture) -> list[Tensor]:
        return [
            self._next_hidden(i, self._run_layer(layer, cap, s), cap, s)
            for s in range(len(self.samples))
        ]

    @property
    def _fp_targets(self) -> bool:
        """`recipe.fp_target`, for a method whose solver has Hessians to apply it with."""
        return bool(self.recipe.fp_target) and self.method.hessian

    # -- one layer -----------------------------------------------------------------------

    def _quantize_layer(self, i: int, layer: nn.Module, prefix: str, cap: _Capture) -> None:
        groups = layer_linears(layer, self.arch)
        moe = MoEView(layer, self.arch.moe) if is_moe_layer(layer, self.arch) else None
        fp = self._fp_pass(i, layer, cap, groups, moe) if cap.fp_hidden is not None else None
        kinds = torch.cat([s.kinds for s in self.samples]).to(self.device)
        saliency = (
            torch.cat([s[i] for s in self.saliency]).to(self.device)
            if self.saliency is not None
            else None
        )
        for stage, stage_moe in self._stages(groups, moe):
            stats, moe_x = self._collect(i, layer, cap, stage, stage_moe, fp)
            moe_plan = (
                self._plan_moe(
                    i,
                    stage_moe,
                    moe_x,
                    torch.cat(fp[_MOE]) if fp is not None else None,
                    kinds,
                    saliency,
                )
                if stage_moe is not None and moe_x is not None
                else None
            )

            # Phase A: AWQ-family scales, folded into full-precision weights (function unchanged).
            scales: dict[str, Tensor] = {}
            if self.method.search:
                for g in stage:
                    s = self._search_group(i, layer, g, stats.get(g.linears[0]))
                    if s is not None:
                        scales[g.linears[0]] = s
                if moe_plan is not None:
                    self._search_moe(moe_plan)

            # Phase B: quantize every linear, write the dequantized weights back.
            with torch.no_grad():
                for g in stage:
                    st = stats.get(g.linears[0])
                    for path in g.linears:
                        self._quantize_linear(layer, prefix, path, st, scales.get(g.linears[0]))
                if moe_plan is not None:
                    self._quantize_moe(moe_plan, prefix)

    def _stages(
        self, groups: list[LinearGroup], moe: MoEView | None
    ) -> list[tuple[list[LinearGroup], MoEView | None]]:
        """The layer's groups (and MoE block) in the order they are quantized; each stage's
        statistics are collected after the stages before it were. `recipe.true_sequential`:
        attention first, then what reads its output (MLP, experts, shared expert), so that
        those see the quantized attention's error; otherwise one stage."""
        if not self.recipe.true_sequential:
            return [(groups, moe)]
        attention = {p for g in self.arch.attention for p in g.linears}
        first = [g for g in groups if g.linears[0] in attention]
        return [(first, None), ([g for g in groups if g not in first], moe)]

    @torch.no_grad()
    def _fp_pass(
        self,
        i: int,
        layer: nn.Module,
        cap: _Capture,
        groups: list[LinearGroup],
        moe: MoEView | None,
    ) -> dict[str, list[Tensor]]:
        """Every sample through the still 16-bit layer from the 16-bit model's hidden states:
        per group (key: its first linear; the MoE block: `_MOE`) the inputs of each sample
        `[S, K]`, on the host (the device holds one layer, not a layer's every input), for the
        residuals against the quantized model's; its outputs become
        `cap.fp_hidden` (the scales folded later leave them unchanged: folding is exact)."""
        store: dict[str, list[Tensor]] = {}

        def keep(key: str) -> Callable[[nn.Module, tuple], None]:
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                store.setdefault(key, []).append(x.detach().cpu())

            return hook

        handles = [
            get_module(layer, g.linears[0]).register_forward_pre_hook(keep(g.linears[0]))
            for g in groups
        ]
        if moe is not None:
            handles.append(moe.block.register_forward_pre_hook(keep(_MOE)))
        try:
            nxt = [
                self._next_hidden(i, self._run_layer(layer, cap, s, fp=True), cap, s)
                for s in range(len(self.samples))
            ]
        finally:
            for h in handles:
                h.remove()
        cap.fp_hidden = nxt
        return store

    @torch.no_grad()
    def _collect(
        self,
        i: int,
        layer: nn.Module,
        cap: _Capture,
        groups: list[LinearGroup],
        moe: MoEView | None,
        fp: dict[str, list[Tensor]] | None,
    ) -> tuple[dict[str, _GroupStats], Tensor | None]:
        """One pass of the quantized model's hidden states through the layer as it now is:
        the statistics of each of `groups`' inputs (keyed by its first linear), paired with the
        16-bit model's inputs `fp` when given, and the MoE block's inputs `[T, H]` (None without
        `moe`)."""
        method = self.method
        per_sample = max(1, self.recipe.max_search_tokens // len(self.samples))
        stats: dict[str, _GroupStats] = {}
        moe_inputs: list[Tensor] = []
        current: dict[str, Any] = {}

        def group_hook(key: str) -> Callable[[nn.Module, tuple], None]:
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                t = Tokens(current["kinds"], saliency=current.get("saliency"))
                st = stats.setdefault(key, self._new_stats(x.shape[1]))
                st.add(
                    x,
                    method.hessian_weights(t, i),
                    method.search_weights(t, i),
                    per_sample,
                    fp[key][current["sample"]] if fp is not None else None,
                )

            return hook

        handles = []
        if method.needs_stats:
            for g in groups:
                module = get_module(layer, g.linears[0])
                handles.append(module.register_forward_pre_hook(group_hook(g.linears[0])))
        if moe is not None:

            def moe_hook(module: nn.Module, args: tuple) -> None:
                moe_inputs.append(args[0].reshape(-1, args[0].shape[-1]).detach())

            handles.append(moe.block.register_forward_pre_hook(moe_hook))
        try:
            for s, sample in enumerate(self.samples):
                current["sample"] = s
                current["kinds"] = sample.kinds.to(self.device)
                if self.saliency is not None:
                    current["saliency"] = self.saliency[s][i].to(self.device)
                self._run_layer(layer, cap, s)
        finally:
            for h in handles:
                h.remove()
        return stats, torch.cat(moe_inputs) if moe is not None else None

    def _round_layer(self, i: int, layer: nn.Module, prefix: str) -> None:
        """Data-free RTN: every linear and every expert rounded alone, no forward pass (at 30 B
        the capture and per-layer forwards would cost more than the rounding)."""
        for g in layer_linears(layer, self.arch):
            for path in g.linears:
                self._quantize_linear(layer, prefix, path, None, None)
        if is_moe_layer(layer, self.arch):
            moe = MoEView(layer, self.arch.moe)
            cfg = self.recipe.quant_config()
            for e in range(moe.num_experts):
                ew = moe.expert(e)
                solved = [self.method.solve(w, None, cfg) for w in (ew.gate, ew.up, ew.down)]
                self._write_expert(moe, prefix, e, solved)
            self._quantize_shared(moe, prefix, None)

    # -- dense groups --------------------------------------------------------------------

    def _foldable(self, layer: nn.Module, g: LinearGroup, k: int) -> nn.Module | None:
        if g.prev is None:
            return None
        prev = get_module(layer, g.prev)
        weight = getattr(prev, "weight", None)
        if weight is None:
            return None
        if isinstance(prev, nn.Linear):
            return prev if prev.out_features == k else None
        return prev if weight.ndim == 1 and weight.shape[0] == k else None

    @torch.no_grad()
    def _fold(self, prev: nn.Module, consumers: Sequence[nn.Module], s: Tensor) -> None:
        """Divide `prev`'s output by s, multiply consumers' input columns by s (exact in fp)."""
        s = s.to(prev.weight.device)
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.unsqueeze(1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        for m in consumers:
            m.weight.mul_(s.to(m.weight.device, m.weight.dtype))

    def _search_group(
        self, i: int, layer: nn.Module, g: LinearGroup, st: _GroupStats | None
    ) -> Tensor | None:
        if st is None:
            return None
        x, c = st.sample()
        if x is None:
            return None
        prev = self._foldable(layer, g, x.shape[1])
        if prev is None:
            return None
        linears = [get_module(layer, p) for p in g.linears]
        cfg = self.recipe.quant_config()
        s, _ = awq_scales(
            [m.weight for m in linears],
            x,
            cfg,
            token_weights=c,
            act_mean=st.act.mean_abs() if st.act is not None else None,
            grid=self.recipe.awq_grid,
        )
        if not self._scale_pays(
            f"layer {i} {g.linears[0]}", [(m.weight, st) for m in linears], s, cfg
        ):
            return None
        companions = [get_module(layer, p) for p in g.companions]
        self._fold(prev, linears + companions, s)
        return s

    def _quantize_linear(
        self, layer: nn.Module, prefix: str, path: str, st: _GroupStats | None, s: Tensor | None
    ) -> None:
        module = get_module(layer, path)
        cfg = self.recipe.quant_config()
        qw = self._solve(module.weight, st, s, cfg)
        module.weight.copy_(qw.dequantize(module.weight.dtype))
        self._record(f"{prefix}.{path}", qw)

    def _solve(
        self, weight: Tensor, st: _GroupStats | None, s: Tensor | None, cfg: QuantConfig
    ) -> QuantizedWeight:
        """The method's solver on `st`, seen through the folded scales `s: [K]` (if any)."""
        if st is None:
            return self.method.solve(weight, None, cfg)
        h, r = _second_moments(st, s)
        x, c = st.sample()
        if s is not None and x is not None:
            x = x / s
        return self.method.solve(weight, Statistics(h, x, c, r), cfg)

    @property
    def _checks_scales(self) -> bool:
        """`recipe.check_scales`, for a method whose solver has Hessians to check with."""
        return self.recipe.check_scales and self.method.hessian

    def _scale_pays(
        self,
        what: str,
        weights: Sequence[tuple[Tensor, _GroupStats | None]],
        s: Tensor,
        cfg: QuantConfig,
    ) -> bool:
        """Whether folding the searched scale `s: [K]` into the inputs of `weights` (each
        `[N, K]` before the fold, with its inputs' statistics before the fold) lowers the total
        output error the method's own solver leaves on the full Hessians; always true unless
        `_checks_scales`. The search picks `s` by round-to-nearest's error on a token sample;
        the solver that follows (GPTQ) may do better without it, which is then what this says.
        With fp targets the error is against the 16-bit model's outputs, `‖W x − Q x̃‖²`: up to
        a constant the same either way, the distance from the full least-squares target."""
        if not self._checks_scales:
            return True
        plain = scaled = 0.0
        for weight, st in weights:
            if st is None or st.hessian is None:
                continue
            # Unnormalised (Σ c_j x_j x_jᵀ): weights with more token mass count more.
            h = 2.0 * st.hessian.sum.float()
            w = weight.float()
            q = self._solve(weight, st, None, cfg).dequantize()
            plain += hessian_error(self._aim(w, st, None), q, h)
            ws = (w * s.to(w)).to(weight.dtype)
            hs = h / torch.outer(s, s).to(h)
            qs = self._solve(ws, st, s, cfg).dequantize()
            scaled += hessian_error(self._aim(ws.float(), st, s), qs, hs)
        pays = scaled < plain
        self.report.scale_checks[what] = {"plain": plain, "scaled": scaled, "kept": pays}
        return pays

    def _aim(self, w: Tensor, st: _GroupStats, s: Tensor | None) -> Tensor:
        """The weight `w: [N, K]` (inputs seen through the folded scale `s`) would have to be
        to give the 16-bit model's outputs from the quantized model's inputs: the full
        least-squares fp target; `w` itself without fp targets."""
        h, r = _second_moments(st, s)
        if h is None or r is None:
            return w
        return fp_target(w, h, r, damp=self.recipe.damp)

    def _record(self, name: str, qw: QuantizedWeight) -> None:
        # Results live on the host: the device holds one layer at a time, never the model.
        self.weights[name] = QuantizedWeight(
            qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu() if qw.zero is not None else None, qw.cfg
        )
        n, k = qw.shape
        self.report.bits[name] = qw.cfg.bits
        self.report.bytes_16bit += 2 * n * k
        self.report.bytes_quantized += packed_nbytes(n, k, qw.cfg)

    # -- MoE -----------------------------------------------------------------------------

    def _plan_moe(
        self,
        layer_idx: int,
        moe: MoEView,
        x: Tensor,
        x_fp: Tensor | None,
        kinds: Tensor,
        saliency: Tensor | None,
    ) -> _MoEPlan:
        """`x: [T, H]` the block's inputs in the quantized model, which route the tokens;
        `x_fp: [T, H]` the 16-bit model's at the same tokens (fp targets only)."""
        probs, idx, _ = moe.route(x.to(self.device))
        is_text = kinds != TokenKind.VISION
        e_count = moe.num_experts
        members: list[_Member] = []
        n_text = torch.zeros(e_count)
        n_vis = torch.zeros(e_count)
        for e in range(e_count):
            routed = (idx == e).any(-1)
            n = int(routed.sum())
            n_text[e] = float((routed & is_text).sum())
            n_vis[e] = float((routed & ~is_text).sum())
            if n >= self.recipe.min_expert_tokens:
                members.append(_Member(e, routed.nonzero().squeeze(1), n))
            else:
                # Too few routed tokens for a usable Hessian: every token, weighted by its
                # router probability for this expert (docs/design.md §Our defaults); reported.
                members.append(_Member(e, None, n))
                self.report.fallback_experts.append({"layer": layer_idx, "expert": e, "tokens": n})
        # The method's modality weight (`veq` tempers γ), not necessarily the measured γ.
        alpha = self.method.modality_weight(layer_idx)
        importance = expert_importance(n_text, n_vis, alpha, self.beta)
        if self.recipe.mixed_precision is not None:
            bits = allocate_expert_bits(importance.tolist(), self.recipe.mixed_precision)
        else:
            bits = [self.recipe.bits] * e_count
        return _MoEPlan(
            layer_idx,
            moe,
            x.to(self.device),
            kinds,
            probs,
            members,
            importance,
            bits,
            saliency,
            x_fp=x_fp.to(self.device) if x_fp is not None else None,
        )

    def _member_tokens(self, plan: _MoEPlan, m: _Member) -> tuple[Tensor, Tokens]:
        """Expert m's inputs `[T_m, H]` and their tokens: kinds and router affinity for m."""
        affinity = plan.probs[:, m.expert].float()
        every = Tokens(plan.kinds, affinity, fallback=m.tokens is None, saliency=plan.saliency)
        if m.tokens is None:
            return plan.x, every
        return plan.x[m.tokens], every.select(m.tokens)

    @staticmethod
    def _member_fp(plan: _MoEPlan, m: _Member) -> Tensor | None:
        """The 16-bit model's inputs `[T_m, H]` at expert m's tokens (None without fp targets)."""
        if plan.x_fp is None or m.tokens is None:
            return plan.x_fp
        return plan.x_fp[m.tokens]

    def _search_moe(self, plan: _MoEPlan) -> None:
        """Per-expert up→down scales, then the gate/up scale shared by all experts (and shared
        experts), folded into the norm with the router compensated."""
        layer = plan.moe
        cap = self.recipe.max_search_tokens
        cfg = self.recipe.quant_config()
        with torch.no_grad():
            for m in plan.members:
                x, t = self._member_tokens(plan, m)
                idx = _subsample(x.shape[0], cap, x.device)
                ew = layer.expert(m.expert)
                h = _expert_hidden(ew, x[idx])
                c = self.method.search_weights(t.select(idx), plan.layer)
                if c is not None and float(c.sum()) <= 0:
                    continue  # no token this method counts (MBQ: prompt-only expert)
                s2, _ = awq_scales([ew.down], h, cfg, token_weights=c, grid=self.recipe.awq_grid)
                if self._checks_scales:
                    # down's statistics over all the expert's tokens, as its solve will see them
                    xf = self._member_fp(plan, m)
                    hf = _expert_hidden(ew, xf) if xf is not None else None
                    down = [(ew.down, self._stats_for(_expert_hidden(ew, x), t, plan.layer, hf))]
                    if not self._scale_pays(
                        f"layer {plan.layer} expert {m.expert} down", down, s2, cfg
                    ):
                        continue
                ew.up.div_(s2.unsqueeze(1).to(ew.up.dtype))
                ew.down.mul_(s2.to(ew.down.dtype))

        experts, inputs, weights, importance = [], [], [], []
        for m in plan.members:
            x, t = self._member_tokens(plan, m)
            idx = _subsample(x.shape[0], cap, x.device)
            experts.append(layer.expert(m.expert))
            inputs.append(x[idx])
            c = self.method.search_weights(t.select(idx), plan.layer)
            weights.append(c)
            routed = float(plan.importance[m.expert]) if m.tokens is not None else None
            importance.append(self.method.expert_importance(routed, t, c, plan.layer))
        if layer.shared is not None:
            idx = _subsample(plan.x.shape[0], cap, plan.x.device)
            sh = layer.shared
            experts.append(
                ExpertWeights(sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
            )
            inputs.append(plan.x[idx])
            c = self.method.search_weights(plan.tokens().select(idx), plan.layer)
            weights.append(c)
            importance.append(self.method.expert_importance(None, plan.tokens(), c, plan.layer))
        s1, _ = shared_scale_search(
            experts,
            inputs,
            torch.tensor(importance),
            cfg,
            token_weights=weights,
            grid=self.recipe.awq_grid,
        )
        if self._checks_scales:
            gate_up = []
            for m in plan.members:
                x, t = self._member_tokens(plan, m)
                st = self._stats_for(x, t, plan.layer, self._member_fp(plan, m))
                ew = layer.expert(m.expert)
                gate_up += [(ew.gate, st), (ew.up, st)]
            if layer.shared is not None:
                st = self._stats_for(plan.x, plan.tokens(), plan.layer, plan.x_fp)
                gate_up += [(layer.shared.gate_proj.weight, st), (layer.shared.up_proj.weight, st)]
            if not self._scale_pays(f"layer {plan.layer} experts gate/up", gate_up, s1, cfg):
                return
        plan.scale = s1
        norm = get_module(self._layer_of(plan), self.arch.mlp_prev)
        with torch.no_grad():
            norm.weight.div_(s1.to(norm.weight.device, norm.weight.dtype))
            layer.router.weight.mul_(s1.to(layer.router.weight.device, layer.router.weight.dtype))
            for ew in experts:
                ew.gate.mul_(s1.to(ew.gate.dtype))
                ew.up.mul_(s1.to(ew.up.dtype))

    def _layer_of(self, plan: _MoEPlan) -> nn.Module:
        return decoder_layers(self.model, self.arch)[plan.layer]

    def _quantize_moe(self, plan: _MoEPlan, prefix: str) -> None:
        moe = plan.moe
        s1 = plan.scale
        for m in plan.members:
            x, t = self._member_tokens(plan, m)
            xf = self._member_fp(plan, m)
            if s1 is not None:
                x = x / s1
                xf = xf / s1 if xf is not None else None
            cfg = self.recipe.quant_config(plan.bits[m.expert])
            ew = moe.expert(m.expert)
            gate_up_st = self._stats_for(x, t, plan.layer, xf)
            qg = self._solve(ew.gate, gate_up_st, None, cfg)
            qu = self._solve(ew.up, gate_up_st, None, cfg)
            # down's inputs through the (folded, still full-precision) gate/up of this expert,
            # weighted per token as gate/up's inputs are; the 16-bit model's through the same.
            h = _expert_hidden(ew, x)
            hf = _expert_hidden(ew, xf) if xf is not None else None
            qd = self._solve(ew.down, self._stats_for(h, t, plan.layer, hf), None, cfg)
            self._write_expert(moe, prefix, m.expert, [qg, qu, qd])
        if moe.shared is not None:
            x, xf = plan.x, plan.x_fp
            if s1 is not None:
                x = x / s1
                xf = xf / s1 if xf is not None else None
            self._quantize_shared(moe, prefix, self._stats_for(x, plan.tokens(), plan.layer, xf))

    def _write_expert(
        self, moe: MoEView, prefix: str, e: int, solved: Sequence[QuantizedWeight]
    ) -> None:
        """Expert e's quantized gate, up, down: dequantized into the model, recorded."""
        ew = moe.expert(e)
        weights = (ew.gate, ew.up, ew.down)
        moe.set_expert(e, *(q.dequantize(w.dtype) for q, w in zip(solved, weights, strict=True)))
        for name, qw in zip(moe.expert_names(prefix, e), solved, strict=True):
            self._record(name, qw)

    def _quantize_shared(self, moe: MoEView, prefix: str, st: _GroupStats | None) -> None:
        """The shared expert's gate and up (its down is a dense group of the layer)."""
        if moe.shared is None:
            return
        base = f"{prefix}.{self.arch.moe.block}.{self.arch.moe.shared}"
        for name in ("gate_proj", "up_proj"):
            module = getattr(moe.shared, name)
            qw = self._solve(module.weight, st, None, self.recipe.quant_config())
            module.weight.copy_(qw.dequantize(module.weight.dtype))
            self._record(f"{base}.{name}", qw)

    def _new_stats(self, k: int) -> _GroupStats:
        return _GroupStats(
            k,
            self.method.hessian,
            self.method.search,
            self._fp_targets,
            self.recipe.max_search_tokens,
            self.device,
        )

    def _stats_for(
        self, x: Tensor, t: Tokens, layer: int, x_fp: Tensor | None = None
    ) -> _GroupStats | None:
        """Statistics of already-collected inputs `x: [T, K]` (experts, shared experts), with
        the 16-bit model's `x_fp: [T, K]` at the same tokens when fp targets are on."""
        if not self.method.needs_stats:
            return None
        st = self._new_stats(x.shape[1])
        st.add(
            x.float(),
            self.method.hessian_weights(t, layer),
            self.method.search_weights(t, layer),
            self.recipe.max_search_tokens,
            x_fp.float() if x_fp is not None else None,
        )
        return st


def _second_moments(st: _GroupStats, s: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The Hessian and fp-target residual `[K, K]` of `st` (None where not kept), seen through
    the folded scale `s: [K]` (inputs divided by s: both scale by 1 / (s sᵀ))."""
    h = st.hessian.hessian() if st.hessian is not None else None
    r = st.residual.residual() if st.residual is not None else None
    if s is not None:
        ss = torch.outer(s, s)
        h = h / ss.to(h) if h is not None else None
        r = r / ss.to(r) if r is not None else None
    return h, r


def _expert_hidden(ew: ExpertWeights, x: Tensor) -> Tensor:
    """`silu(x Gᵀ) ⊙ (x Uᵀ)`: an expert's down-proj inputs `[T, I]` fp32 from `x: [T, H]`."""
    x = x.float()
    return F.silu(x @ ew.gate.float().T) * (x @ ew.up.float().T)


@dataclass
class _Member:
    """One expert's calibration tokens: routed indices, or None for the all-token fallback
    (weighted by router affinity)."""

    expert: int
    tokens: Tensor | None
    routed: int


@dataclass
class _MoEPlan:
    layer: int
    moe: MoEView
    x: Tensor
    kinds: Tensor
    probs: Tensor
    members: list[_Member]
    importance: Tensor
    bits: list[int]
    saliency: Tensor | None = None
    scale: Tensor | None = None
    x_fp: Tensor | None = None

    def tokens(self) -> Tokens:
        """Every token of the block (shared experts): kinds and saliency, no affinity."""
        return Tokens(self.kinds, saliency=self.saliency)
