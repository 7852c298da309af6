"""γ: measured from gradients where the model fits, or a fallback with a reason.

No GPU here: "meta" stands in for the calibration device where the model has to be moved, and
the device-memory query is patched to say whether the pass fits.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from veq.calib import gamma as gamma_mod
from veq.calib import placement
from veq.calib.gamma import GammaUnavailable, measure_gamma, resolve_gamma
from veq.tokens import TokenKind

CPU = torch.device("cpu")


@pytest.fixture
def samples(calib):
    """Calibration samples that all have vision and answer tokens (all take part in γ)."""
    found = [s for s in calib("qwen3_vl_moe", n=4) if (s.kinds == TokenKind.VISION).any()]
    assert len(found) >= 2
    return found


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize("layout", ["qwen3_vl_moe", "kimi_vl"])
def test_measured_gamma_is_finite_positive(layout, tiny_model, calib):
    model = tiny_model(layout)
    res = measure_gamma(model, calib(layout, n=4))
    layers = len(res.vision_ratios)
    assert res.samples >= 1 and layers >= 2
    assert math.isfinite(res.gamma) and res.gamma > 0
    assert math.isfinite(res.gamma_answer) and res.gamma_answer > 0
    assert all(math.isfinite(r) and r >= 0 for r in res.vision_ratios)
    # Parameters are left as they were (no grads kept, requires_grad restored).
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_gamma_needs_vision_and_answer_tokens(tiny_model, calib):
    text_only = [s for s in calib("qwen3_vl_moe", n=4) if not (s.kinds == 0).any()]
    with pytest.raises(GammaUnavailable, match="both vision and answer"):
        measure_gamma(tiny_model("qwen3_vl_moe"), text_only)


def test_need_counts_only_what_the_device_lacks(tiny_model, samples):
    here = tiny_model("qwen3_vl_moe")
    elsewhere = tiny_model("qwen3_vl_moe").to("meta")
    model_bytes = sum(t.numel() * t.element_size() for t in _tensors(here))
    activations = placement.backward_bytes(here, samples)
    assert activations > 0
    assert placement.need_bytes(here, samples, CPU) == activations
    assert placement.need_bytes(elsewhere, samples, CPU) == activations + model_bytes
    # The longest sample sets the activation estimate.
    shortest = min(samples, key=lambda s: s.inputs["input_ids"].shape[-1])
    assert placement.backward_bytes(here, [shortest]) < activations


def test_gamma_is_measured_when_the_pass_just_fits(tiny_model, samples, monkeypatch):
    model = tiny_model("qwen3_vl_moe")
    direct = measure_gamma(model, samples)
    need = placement.need_bytes(model, samples, CPU)
    monkeypatch.setattr(placement, "free_bytes", lambda device: need)
    assert measure_gamma(model, samples).as_dict() == direct.as_dict()
    monkeypatch.setattr(placement, "free_bytes", lambda device: need - 1)
    with pytest.raises(GammaUnavailable, match="does not fit for a backward pass on cpu"):
        measure_gamma(model, samples)


def test_model_that_does_not_fit_falls_back_and_stays_put(tiny_model, samples, monkeypatch, caplog):
    # On "meta" the model has no values: any attempt to move it to the CPU would raise.
    model = tiny_model("qwen3_vl_moe").to("meta")
    need = placement.need_bytes(model, samples, CPU)
    monkeypatch.setattr(placement, "free_bytes", lambda device: need - 1)
    g, source, ratios, detail = resolve_gamma(model, samples, "auto", 17.0, "cpu")
    assert (g, ratios, detail) == (17.0, None, {})
    assert source.startswith("fallback (the model does not fit for a backward pass on cpu")
    assert "GB needed" in source
    assert "using --gamma 17" in caplog.text
    assert {t.device.type for t in _tensors(model)} == {"meta"}


def test_placed_moves_the_model_and_puts_the_same_tensors_back(tiny_model):
    model = tiny_model("qwen3_vl_moe")
    before = _tensors(model)
    with placement.placed(model, torch.device("meta")):
        assert {t.device.type for t in _tensors(model)} == {"meta"}
        assert all(p.requires_grad for p in model.parameters())
    after = _tensors(model)
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError), placement.placed(model, torch.device("meta")):
        raise ValueError
    assert all(a is b for a, b in zip(_tensors(model), before, strict=True))


def test_out_of_memory_in_the_pass_falls_back_and_restores_the_model(
    tiny_model, samples, monkeypatch, caplog
):
    model = tiny_model("qwen3_vl_moe")
    before = _tensors(model)
    monkeypatch.setattr(placement, "free_bytes", lambda device: 1 << 62)
    seen: list[set[str]] = []
    copies: list[weakref.ref] = []

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        seen.append({t.device.type for t in _tensors(model)})
        copies.append(weakref.ref(module.weight))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore advice")

    handle = model.get_input_embeddings().register_forward_pre_hook(out_of_memory)
    gc.disable()  # the device copies must go when the fallback is returned, not at some gc
    try:
        g, source, ratios, _ = resolve_gamma(model, samples, "auto", 17.0, "meta")
        assert copies[0]() is None
    finally:
        gc.enable()
        handle.remove()
    assert seen == [{"meta"}]  # the pass ran with the whole model on the device
    assert (g, ratios) == (17.0, None)
    assert source == (
        "fallback (OutOfMemoryError on meta during the backward pass: "
        "CUDA out of memory. Tried to allocate 2.00 GiB.)"
    )
    assert "using --gamma 17" in caplog.text
    # Left as found: the same tensors on the host, requires_grad as before, no gradients...
    assert all(a is b for a, b in zip(_tensors(model), before, strict=True))
    assert {t.device.type for t in before} == {"cpu"}
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # ...and the same values: γ matches a fresh copy's exactly.
    assert (
        measure_gamma(model, samples).as_dict()
        == measure_gamma(tiny_model("qwen3_vl_moe"), samples).as_dict()
    )


def test_cuda_free_memory_includes_the_allocator_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 << 30, 140 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 7 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 << 30)
    assert placement.free_bytes(torch.device("cuda", 0)) == 14 << 30


def test_given_gamma_is_used_as_is(tiny_model, calib):
    assert resolve_gamma(tiny_model("qwen3_vl_moe"), calib("qwen3_vl_moe"), 5.5, 20.0, "cpu")[
        :2
    ] == (
        5.5,
        "given",
    )


def _designed_grads(samples, layers: int, hidden: int = 8):
    """Gradients with set magnitudes, per layer l: 1/(l+1) on vision tokens, 6 on answer
    tokens, 3 on the other text tokens (sign alternating along the hidden size)."""
    sign = torch.tensor([(-1.0) ** h for h in range(hidden)])

    def fake(model, batch, device):
        for sample in batch:
            mag = torch.full(sample.kinds.shape, 3.0)
            mag[sample.kinds == TokenKind.ANSWER] = 6.0
            vision = sample.kinds == TokenKind.VISION
            grads = []
            for layer in range(layers):
                m = mag.clone()
                m[vision] = 1.0 / (layer + 1)
                grads.append((m[:, None] * sign)[None])
            yield sample, grads, [2 * g for g in grads]

    return fake


def test_gamma_is_the_layer_mean_of_text_over_vision_gradient_magnitudes(
    tiny_model, samples, monkeypatch
):
    """Known answer: with gradient magnitudes set per token kind, γ, γ on answers and MBQ's
    vision ratios are what their definitions give."""
    model = tiny_model("qwen3_vl_moe")
    layers = len(gamma_mod.decoder_layers(model, gamma_mod.get_architecture(model)))
    monkeypatch.setattr(gamma_mod, "_layer_grads", _designed_grads(samples, layers))
    kinds = torch.cat([s.kinds for s in samples])
    answer, vision = kinds == TokenKind.ANSWER, kinds == TokenKind.VISION
    text_mean = float((3.0 * (~answer & ~vision).sum() + 6.0 * answer.sum()) / (~vision).sum())
    res = measure_gamma(model, samples)
    expected = [text_mean * (layer + 1) for layer in range(layers)]
    assert res.per_layer == pytest.approx(expected)
    assert res.gamma == pytest.approx(sum(expected) / layers)
    assert res.gamma_answer == pytest.approx(
        sum(6.0 * (layer + 1) for layer in range(layers)) / layers
    )
    assert res.vision_ratios == pytest.approx([1 / (6.0 * (layer + 1)) for layer in range(layers)])


def test_saliency_is_the_squared_output_gradient_scaled_to_mean_one(
    tiny_model, samples, monkeypatch
):
    model = tiny_model("qwen3_vl_moe")
    layers = len(gamma_mod.decoder_layers(model, gamma_mod.get_architecture(model)))
    monkeypatch.setattr(gamma_mod, "_layer_grads", _designed_grads(samples, layers))
    got = gamma_mod.measure_saliency(model, samples)
    kinds = torch.cat([s.kinds for s in samples])
    for layer in range(layers):
        raw = torch.full(kinds.shape, 36.0)  # (2·3)²
        raw[kinds == TokenKind.ANSWER] = 144.0  # (2·6)²
        raw[kinds == TokenKind.VISION] = (2.0 / (layer + 1)) ** 2
        want = raw / raw.mean()
        torch.testing.assert_close(torch.cat([s[layer] for s in got]), want)


def test_saliency_of_the_last_layer_is_nonzero_exactly_before_answer_tokens(tiny_model, samples):
    """On the real model: after the last layer a token's output reaches only its own logits,
    which the loss reads where the next token is an answer token."""
    got = gamma_mod.measure_saliency(tiny_model("qwen3_vl_moe"), samples)
    for sample, sal in zip(samples, got, strict=True):
        feeds_answer = torch.zeros_like(sample.kinds, dtype=torch.bool)
        feeds_answer[:-1] = sample.kinds[1:] == TokenKind.ANSWER
        assert (sal[-1][feeds_answer] > 0).all()
        assert (sal[-1][~feeds_answer] == 0).all()
        assert (sal >= 0).all() and sal.shape[1] == sample.kinds.shape[0]
