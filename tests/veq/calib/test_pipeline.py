"""End to end on tiny models of every layout: calibrate, save, reload, compare."""

from __future__ import annotations

import re

import pytest
import torch
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)

from veq.calib.pipeline import Calibrator
from veq.checkpoint import load_checkpoint, read_tensors, save_checkpoint
from veq.recipe import METHODS, Recipe
from veq.tokens import TokenKind

LAYOUTS = ["qwen3_vl_moe", "kimi_vl", "kimi_k25"]
EXPERT = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.")


def calibrate(model, samples, method, bits, **recipe):
    recipe = Recipe(method=method, bits=bits, group_size=32, gamma=10.0, **recipe)
    return Calibrator(
        model, samples, recipe, gamma=10.0, gamma_source="given", progress=False
    ).run()


def logits(model, samples):
    with torch.no_grad():
        return [model(**s.inputs, use_cache=False).logits.float() for s in samples]


def answer_kl(ref, other, samples):
    """Mean KL(ref ‖ other) over the positions that predict answer tokens."""
    total, count = 0.0, 0
    for r, o, s in zip(ref, other, samples, strict=True):
        pos = (s.kinds[1:] == TokenKind.ANSWER).nonzero().squeeze(1)
        lr, lo = r[0, pos].log_softmax(-1), o[0, pos].log_softmax(-1)
        total += float((lr.exp() * (lr - lo)).sum())
        count += pos.numel()
    return total / count


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_save_reload(layout, method, bits, tiny_model, calib, processor, tmp_path):
    model = tiny_model(layout)
    samples = calib(layout)
    result = calibrate(model, samples, method, bits)
    assert result.weights, "nothing was quantized"
    assert set(result.report.bits.values()) == {bits}
    out = save_checkpoint(model, result, tmp_path / "ckpt", processor=processor)
    reloaded = load_checkpoint(out)
    for a, b in zip(logits(model, samples), logits(reloaded, samples), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_calibrated_method_closer_to_16bit_than_rtn(layout, tiny_model, calib):
    held_out = calib(layout, n=4, seed=123)
    ref = logits(tiny_model(layout), held_out)
    kl = {}
    for method in METHODS:
        model = tiny_model(layout)
        calibrate(model, calib(layout, n=6), method, 3)
        kl[method] = answer_kl(ref, logits(model, held_out), held_out)
    assert all(kl[m] < kl["rtn"] for m in METHODS if m != "rtn"), kl


@pytest.mark.parametrize("layout", ["kimi_vl", "kimi_k25"])
def test_expert_without_tokens_is_quantized_and_reported(layout, tiny_model, calib, tmp_path):
    model = tiny_model(layout)
    layer = (
        model.language_model.model.layers[1]
        if layout == "kimi_vl"
        else model.model.language_model.layers[1]
    )
    with torch.no_grad():
        layer.mlp.gate.e_score_correction_bias[5] = -1e4  # expert 5 is never chosen
    result = calibrate(model, calib(layout), "veq", 4)
    fallback = {(f["layer"], f["expert"]): f["tokens"] for f in result.report.fallback_experts}
    assert fallback.get((1, 5)) == 0
    names = [n for n in result.weights if ".experts.5." in n]
    assert len(names) == 3
    for n in names:
        w = result.weights[n].dequantize()
        assert torch.isfinite(w).all() and w.abs().sum() > 0
    assert "L1E5(0)" in result.report.summary()


def test_mixed_precision_allocates_by_importance(tiny_model, calib, tmp_path, processor):
    model = tiny_model("qwen3_vl_moe")
    result = calibrate(model, calib("qwen3_vl_moe"), "veq", 4, mixed_precision=3.0)
    expert_bits = [b for n, b in result.report.bits.items() if ".experts." in n]
    assert sorted(set(expert_bits)) == [2, 4]
    assert sum(expert_bits) / len(expert_bits) == pytest.approx(3.0)
    attn = [b for n, b in result.report.bits.items() if "self_attn" in n]
    assert set(attn) == {4}
    out = save_checkpoint(model, result, tmp_path / "mp", processor=processor)
    samples = calib("qwen3_vl_moe")
    for a, b in zip(logits(model, samples), logits(load_checkpoint(out), samples), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["qwen3_vl_moe", "kimi_vl"])
def test_compressed_tensors_decompresses_to_our_weights(layout, tiny_model, calib, tmp_path):
    model = tiny_model(layout)
    result = calibrate(model, calib(layout), "gptq", 3)
    out = save_checkpoint(model, result, tmp_path / "ckpt")
    dense = CompressedTensorsDequantizer(str(out), dtype=torch.float16).validate(read_tensors(out))
    for name, qw in result.weights.items():
        assert torch.equal(dense[f"{name}.weight"], qw.dequantize(torch.float16)), name


def test_kernel_path_matches_reference_path(tiny_model, calib, tmp_path, monkeypatch):
    """The reloaded model through the Triton kernels (the interpreter on CPU) equals the torch
    reference path; fp16 activations, as the kernels run on a GPU. A token whose router picks
    other experts on the two paths (a near tie that fp16 rounding breaks either way) is a
    legitimate difference: such tokens must be rare, every other position close."""
    model = tiny_model("qwen3_vl_moe")
    samples = calib("qwen3_vl_moe", n=2)
    result = calibrate(model, samples, "gptq", 4)
    out = save_checkpoint(model, result, tmp_path / "ckpt")
    reloaded = load_checkpoint(out, dtype=torch.float16)
    picks: list[torch.Tensor] = []
    for name, module in reloaded.named_modules():
        if name.endswith("mlp.gate"):  # the router: (probabilities, weights, expert indices)
            module.register_forward_hook(lambda m, a, out: picks.append(out[-1].sort(-1).values))
    monkeypatch.setenv("VEQ_KERNELS", "reference")
    ref = logits(reloaded, samples[:1])[0]
    ref_picks, picks[:] = list(picks), []
    monkeypatch.setenv("VEQ_KERNELS", "triton")
    tri = logits(reloaded, samples[:1])[0]
    assert torch.isfinite(tri).all()
    flipped = torch.stack([(a != b).any(-1) for a, b in zip(ref_picks, picks, strict=True)])
    same = ~flipped.any(0)
    assert len(ref_picks) == 2 and same.float().mean() > 0.98
    torch.testing.assert_close(tri[0, same], ref[0, same], rtol=2e-2, atol=2e-2)
    assert (tri.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("layout", LAYOUTS)
def test_data_free_rtn_equals_rtn_with_data(layout, tiny_model, calib):
    """RTN at one width reads no data and runs no forward pass, yet rounds every weight exactly
    as the data-driven pass does (RTN ignores the data; only the work differs)."""
    recipe = Recipe(method="rtn", bits=3, group_size=32, gamma=10.0)
    assert recipe.data_free and not Recipe(method="rtn", mixed_precision=3.0).data_free
    model = tiny_model(layout)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    free = Calibrator(model, [], recipe, gamma=10.0, gamma_source="unused", progress=False).run()
    assert not calls and free.report.samples == 0
    with_data = calibrate(tiny_model(layout), calib(layout), "rtn", 3)
    assert set(free.weights) == set(with_data.weights) and free.weights
    for name, qw in free.weights.items():
        other = with_data.weights[name]
        assert torch.equal(qw.codes, other.codes), name
        assert torch.equal(qw.scale, other.scale) and torch.equal(qw.zero, other.zero), name
    assert free.report.bytes_quantized == with_data.report.bytes_quantized


def test_every_method_has_one_strategy():
    from veq.calib.methods import METHOD_CLASSES

    assert set(METHOD_CLASSES) == set(METHODS)


@pytest.mark.parametrize("layout", ["qwen3_vl_moe", "kimi_vl"])
def test_veq_ma_affinity_reaches_routed_experts(layout, tiny_model, calib):
    """c = p^λ·α for routed experts too: λ changes their codes (it changed nothing before)."""
    samples = calib(layout, n=6)
    codes = {}
    for lam in (0.0, 1.0):
        result = calibrate(tiny_model(layout), samples, "veq-ma", 3, lam=lam)
        fallback = {(f["layer"], f["expert"]) for f in result.report.fallback_experts}
        codes[lam] = {
            k: w.codes
            for k, w in result.weights.items()
            if (m := EXPERT.search(k)) and (int(m[1]), int(m[2])) not in fallback
        }
    assert codes[0.0] and codes[0.0].keys() == codes[1.0].keys()
    changed = [k for k in codes[0.0] if not torch.equal(codes[0.0][k], codes[1.0][k])]
    assert len(changed) > len(codes[0.0]) // 2, f"{len(changed)} of {len(codes[0.0])} changed"
    # Down-proj sees the same token weights as gate/up.
    assert any(k.endswith("down_proj") for k in changed)


def test_plain_gptq_ignores_routed_affinity(tiny_model, calib):
    """λ is VEQ-MA's: GPTQ's routed experts weigh their tokens equally whatever λ says."""
    samples = calib("qwen3_vl_moe", n=4)
    a = calibrate(tiny_model("qwen3_vl_moe"), samples, "gptq", 3, lam=0.0)
    b = calibrate(tiny_model("qwen3_vl_moe"), samples, "gptq", 3, lam=1.0)
    assert all(torch.equal(a.weights[k].codes, b.weights[k].codes) for k in a.weights)


def test_capture_restores_the_model_when_the_move_fails(tiny_model, calib, monkeypatch):
    model = tiny_model("qwen3_vl_moe")
    samples = calib("qwen3_vl_moe", n=2)
    recipe = Recipe(method="gptq", bits=4, group_size=32, gamma=10.0)
    calibrator = Calibrator(
        model, samples, recipe, gamma=10.0, gamma_source="given", progress=False
    )
    layers = model.model.language_model.layers
    n_layers = len(layers)
    real_to = torch.nn.Module.to

    def failing_to(self, *args, **kwargs):
        if self is model:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", failing_to)
    calibrator.device = torch.device("meta")  # a move that is attempted, and fails
    with pytest.raises(RuntimeError, match="out of memory"):
        calibrator._capture(layers)
    assert len(model.model.language_model.layers) == n_layers
    assert next(model.parameters()).device.type == "cpu"


def test_veq_saliency_weights_the_hessians(tiny_model, calib):
    """Saliency of ones is the plain `veq`; measured saliency changes the codes of attention and
    of routed experts' gate/up and down; a recipe asking for it without it is refused."""
    from veq.calib.gamma import measure_saliency

    samples = calib("qwen3_vl_moe", n=6)
    measured = measure_saliency(tiny_model("qwen3_vl_moe"), samples)
    ones = [torch.ones_like(s) for s in measured]
    recipe = Recipe(method="veq", bits=3, group_size=32, gamma=10.0, saliency=1.0)

    def run(saliency):
        return Calibrator(
            tiny_model("qwen3_vl_moe"),
            samples,
            recipe,
            gamma=10.0,
            gamma_source="given",
            saliency=saliency,
            progress=False,
        ).run()

    plain = calibrate(tiny_model("qwen3_vl_moe"), samples, "veq", 3)
    with_ones, weighted = run(ones), run(measured)
    assert all(
        torch.equal(plain.weights[k].codes, with_ones.weights[k].codes) for k in plain.weights
    )
    changed = [
        k
        for k in plain.weights
        if not torch.equal(plain.weights[k].codes, weighted.weights[k].codes)
    ]
    assert any("self_attn" in k for k in changed)
    assert any(EXPERT.search(k) and k.endswith("down_proj") for k in changed)
    with pytest.raises(ValueError, match="needs saliency"):
        run(None)


def test_quantize_measures_saliency_when_the_recipe_asks(tiny_model, processor, calib, tmp_path):
    import veq

    model = tiny_model("qwen3_vl_moe")
    q = veq.quantize(
        model,
        processor=processor,
        method="veq",
        bits=3,
        group_size=32,
        gamma=10.0,
        saliency=0.5,
        samples=4,
        calib="shapes",
        out=tmp_path / "q",
        progress=False,
    )
    assert q.report["recipe"]["saliency"] == 0.5 and (tmp_path / "q" / "config.json").exists()


def test_lam_defaults_per_method_and_veq_tempers_gamma():
    """λ left out is written as the method's default (one recipe, one cache key); `veq`'s
    strategy sees γ^τ, VEQ-MA the measured γ."""
    from veq.calib.methods import method_for

    assert Recipe(method="veq").lam == 2.0 and Recipe(method="veq-ma").lam == 1.0
    assert Recipe(method="veq") == Recipe(method="veq", lam=2.0)
    assert Recipe(method="veq", lam=0.5).lam == 0.5
    assert Recipe(method="veq", bits=2).tau == 0.5 and Recipe(method="veq", bits=3).tau == 0.25
    assert Recipe(method="veq", bits=4, mixed_precision=3.0).tau == 0.5  # 2-bit experts
    assert method_for(Recipe(method="veq", bits=2), 9.0, 1.0, [1.0]).gamma == pytest.approx(3.0)
    assert method_for(Recipe(method="veq", tau=1.0), 9.0, 1.0, [1.0]).gamma == 9.0
    assert method_for(Recipe(method="veq-ma"), 9.0, 1.0, [1.0]).gamma == 9.0


def test_range_search_is_off_by_default_and_reaches_the_solver(monkeypatch):
    """Off for every method (min–max ranges, llm-compressor's default observer); asked for, the
    strategy hands it to the GPTQ solver."""
    import veq.calib.methods as methods
    from veq.calib.methods import Statistics, method_for

    assert not any(Recipe(method=m).range_search for m in ("gptq", "veq-ma", "veq"))
    seen = []
    monkeypatch.setattr(methods, "gptq", lambda *a, **kw: seen.append(kw["range_search"]))
    stats = Statistics(hessian=torch.eye(8))
    for method, on in (("veq", True), ("gptq", False), ("veq-ma", True)):
        recipe = Recipe(method=method, range_search=on)
        method_for(recipe, 4.0, 1.0, [1.0]).solve(torch.ones(2, 8), stats, None)
    assert seen == [True, False, True]


def test_gamma_per_layer_weighs_each_layers_text_tokens():
    """With `gamma_per_layer`, `veq` weighs layer l's text tokens by γ_l^τ; without it (and for
    VEQ-MA, the paper's form) every layer uses the model's γ."""
    from veq.calib.methods import Tokens, method_for

    kinds = torch.tensor([TokenKind.PROMPT, TokenKind.VISION, TokenKind.ANSWER], dtype=torch.int8)
    t = Tokens(kinds, affinity=torch.ones(3))
    per_layer = Recipe(method="veq", tau=0.5, lam=1.0, gamma_per_layer=True)
    m = method_for(per_layer, 9.0, 1.0, [1.0, 1.0], layer_gammas=[4.0, 16.0])
    assert m.hessian_weights(t, 0).tolist() == [2.0, 1.0, 2.0]
    assert m.hessian_weights(t, 1).tolist() == [4.0, 1.0, 4.0]
    assert m.expert_importance(None, t, None, 1) == pytest.approx(4.0 * 2 + 1.0 * 1)
    model_wide = method_for(
        per_layer.model_copy(update={"gamma_per_layer": False}),
        9.0,
        1.0,
        [1.0, 1.0],
        layer_gammas=[4.0, 16.0],
    )
    assert model_wide.hessian_weights(t, 1).tolist() == [3.0, 1.0, 3.0]
    paper = method_for(Recipe(method="veq-ma"), 9.0, 1.0, [1.0, 1.0], layer_gammas=[4.0, 16.0])
    assert paper.hessian_weights(t, 1).tolist() == [9.0, 1.0, 9.0]


def test_gamma_per_layer_reaches_the_hessians(tiny_model, calib):
    """Per-layer γ equal to the model's γ changes nothing; another γ at layer 1 changes layer
    1's codes and none of layer 0's, which is calibrated before it."""
    samples = calib("qwen3_vl_moe", n=6)
    recipe = Recipe(method="veq", bits=3, group_size=32, gamma=10.0, gamma_per_layer=True)

    def run(layer_gammas):
        return Calibrator(
            tiny_model("qwen3_vl_moe"),
            samples,
            recipe,
            gamma=10.0,
            gamma_source="measured",
            layer_gammas=layer_gammas,
            progress=False,
        ).run()

    plain = calibrate(tiny_model("qwen3_vl_moe"), samples, "veq", 3)
    same, other = run([10.0, 10.0]), run([10.0, 1000.0])
    assert all(torch.equal(plain.weights[k].codes, same.weights[k].codes) for k in plain.weights)
    changed = {
        k for k in plain.weights if not torch.equal(plain.weights[k].codes, other.weights[k].codes)
    }
    assert changed and all(".layers.1." in k for k in changed)


def test_weighted_search_uses_the_hessians_token_weights():
    """`veq` with `weighted_search` weighs the scale searches' tokens by c = p^λ·γ^τ (text) and
    p^λ (vision), as its Hessians do; without it a routed expert's tokens count once each."""
    from veq.calib.methods import Tokens, method_for

    kinds = torch.tensor([TokenKind.PROMPT, TokenKind.VISION, TokenKind.ANSWER], dtype=torch.int8)
    t = Tokens(kinds, affinity=torch.tensor([0.5, 0.25, 1.0]))
    recipe = Recipe(method="veq", tau=0.5, lam=2.0, weighted_search=True)
    m = method_for(recipe, 16.0, 1.0, [1.0])
    assert m.search_weights(t, 0).tolist() == [1.0, 0.0625, 4.0]
    assert m.search_weights(t, 0).tolist() == m.hessian_weights(t, 0).tolist()
    off = method_for(recipe.model_copy(update={"weighted_search": False}), 16.0, 1.0, [1.0])
    assert off.search_weights(t, 0) is None
    fallback = Tokens(kinds, affinity=torch.tensor([0.5, 0.25, 1.0]), fallback=True)
    assert off.search_weights(fallback, 0).tolist() == [0.5, 0.25, 1.0]


def test_check_scales_folds_only_scales_that_lower_the_solvers_error(tiny_model, calib):
    """With `check_scales`, every searched scale (attention inputs, each expert's up→down, the
    experts' shared gate/up) is judged by the solver's Hessian error with and without it and
    folded only when it lowers it; the norm in front of the experts shows whether it was."""
    samples = calib("qwen3_vl_moe", n=6)
    model = tiny_model("qwen3_vl_moe")
    layers = model.model.language_model.layers
    norms = [layer.post_attention_layernorm.weight.clone() for layer in layers]
    result = calibrate(model, samples, "veq", 3, check_scales=True)
    checks = result.report.scale_checks
    for i, layer in enumerate(layers):
        assert {f"layer {i} self_attn.q_proj", f"layer {i} experts gate/up"} <= set(checks)
        assert any(k.startswith(f"layer {i} expert ") and k.endswith(" down") for k in checks)
        folded = not torch.equal(layer.post_attention_layernorm.weight, norms[i])
        assert folded == checks[f"layer {i} experts gate/up"]["kept"]
    for c in checks.values():
        assert c["kept"] == (c["scaled"] < c["plain"]) and c["plain"] > 0
    assert "scale check:" in result.report.summary()
    assert not calibrate(tiny_model("qwen3_vl_moe"), samples, "veq", 3).report.scale_checks


@pytest.mark.parametrize("layout", ["qwen3_vl_moe", "kimi_vl"])
def test_fp_target_aims_each_layer_at_the_16bit_model(layout, tiny_model, calib):
    """With fp targets every linear is solved towards the 16-bit model's outputs from the
    quantized model's inputs. The first layer's inputs agree in both models, so its codes are
    plain GPTQ's; deeper layers' change, and halfway there the quantized model ends closer to
    the 16-bit one on the samples it was calibrated on (what the objective minimises; the full
    least-squares target fits six samples' noise and is not always closer)."""
    samples = calib(layout, n=6)
    ref = logits(tiny_model(layout), samples)
    weights, kl = {}, {}
    for strength in (0.0, 0.5):
        model = tiny_model(layout)
        weights[strength] = calibrate(model, samples, "gptq", 2, fp_target=strength).weights
        kl[strength] = answer_kl(ref, logits(model, samples), samples)
    plain, aimed = weights[0.0], weights[0.5]
    first = [k for k in plain if ".layers.0." in k]
    deeper = [k for k in plain if ".layers.0." not in k]
    assert first and all(torch.equal(plain[k].codes, aimed[k].codes) for k in first)
    changed = sum(not torch.equal(plain[k].codes, aimed[k].codes) for k in deeper)
    assert changed > len(deeper) // 2, f"{changed} of {len(deeper)} changed"
    assert kl[0.5] < kl[0.0], kl


def test_fp_target_defaults_per_method_and_needs_hessians(tiny_model, calib):
    """`veq` aims halfway by default, the published methods not at all; a method without
    Hessians (AWQ) has nothing to aim with and quantizes exactly as without."""
    assert Recipe(method="veq").fp_target == 0.5
    assert Recipe(method="gptq").fp_target == Recipe(method="veq-ma").fp_target == 0.0
    assert Recipe(method="veq", fp_target=None) == Recipe(method="veq", fp_target=0.5)
    samples = calib("qwen3_vl_moe", n=3)
    a = calibrate(tiny_model("qwen3_vl_moe"), samples, "awq", 3, fp_target=0.0).weights
    b = calibrate(tiny_model("qwen3_vl_moe"), samples, "awq", 3, fp_target=1.0).weights
    assert all(torch.equal(a[k].codes, b[k].codes) for k in a)


def test_true_sequential_collects_the_experts_statistics_after_attention_is_quantized(
    tiny_model, calib
):
    """Attention is quantized from the same statistics either way, so its codes do not move in
    the first layer; the experts' inputs then carry the quantized attention's error, so theirs
    do."""
    samples = calib("qwen3_vl_moe", n=4)
    one = calibrate(tiny_model("qwen3_vl_moe"), samples, "gptq", 3).weights
    seq = calibrate(tiny_model("qwen3_vl_moe"), samples, "gptq", 3, true_sequential=True).weights
    assert one.keys() == seq.keys()
    first = [k for k in one if ".layers.0." in k]
    attention = [k for k in first if ".self_attn." in k]
    experts = [k for k in first if EXPERT.search(k)]
    assert attention and all(torch.equal(one[k].codes, seq[k].codes) for k in attention)
    changed = sum(not torch.equal(one[k].codes, seq[k].codes) for k in experts)
    assert changed > len(experts) // 2, f"{changed} of {len(experts)} changed"


def test_check_scales_with_fp_targets_judges_against_the_16bit_outputs(tiny_model, calib):
    """With fp targets the scale check measures each solve against the full least-squares
    target (the 16-bit model's outputs), not against the weight itself: the recorded errors
    differ from those of the same check without fp targets from the second layer on, and
    agree on the first, where the two models' inputs are the same."""
    samples = calib("qwen3_vl_moe", n=4)

    def checks(strength):
        model = tiny_model("qwen3_vl_moe")
        result = calibrate(model, samples, "veq", 3, check_scales=True, fp_target=strength)
        return result.report.scale_checks

    plain, aimed = checks(0.0), checks(0.5)
    assert plain.keys() == aimed.keys()
    first = [k for k in plain if k.startswith("layer 0 ")]
    deeper = [k for k in plain if not k.startswith("layer 0 ")]
    for k in first:
        assert aimed[k]["plain"] == pytest.approx(plain[k]["plain"], rel=1e-6), k
    assert any(aimed[k]["plain"] != pytest.approx(plain[k]["plain"], rel=1e-3) for k in deeper)
