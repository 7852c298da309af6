"""γ: measured from gradients, or a fallback with a reason."""

from __future__ import annotations

import math

import pytest

from veq.calib import gamma as gamma_mod
from veq.calib.gamma import GammaUnavailable, measure_gamma, resolve_gamma


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


def test_too_big_falls_back_with_reason(tiny_model, calib, monkeypatch, caplog):
    monkeypatch.setattr(gamma_mod, "_fits", lambda model, device: False)
    g, source, ratios, _ = resolve_gamma(
        tiny_model("qwen3_vl_moe"), calib("qwen3_vl_moe"), "auto", 17.0, "cpu"
    )
    assert g == 17.0 and ratios is None
    assert source.startswith("fallback") and "too large" in source
    assert "using --gamma 17" in caplog.text


def test_given_gamma_is_used_as_is(tiny_model, calib):
    assert resolve_gamma(tiny_model("qwen3_vl_moe"), calib("qwen3_vl_moe"), 5.5, 20.0, "cpu")[
        :2
    ] == (
        5.5,
        "given",
    )
