"""End-to-end scale tuning: the loss, the scale gradient, and tuning a calibrated tiny model."""

from __future__ import annotations

import pytest
import torch

from veq.calib import placement
from veq.calib.pipeline import Calibrator
from veq.calib.tune import (
    Targets,
    TuneUnavailable,
    _ScaledCodes,
    coarse_kl,
    teacher_targets,
    tune_scales,
)
from veq.config import QuantConfig
from veq.models import get_architecture, weight_views
from veq.quantizer import dequantize, quantize_weight
from veq.recipe import Recipe

LAYOUTS = ["qwen3_vl_moe", "kimi_vl", "kimi_k25"]


def _targets(teacher: torch.Tensor, k: int) -> Targets:
    logp = teacher.log_softmax(-1)
    ids = logp.topk(k, -1).indices
    rest = logp.scatter(-1, ids, -torch.inf).logsumexp(-1)
    return Targets(torch.arange(teacher.shape[0]), ids, logp.gather(-1, ids), rest)


def test_coarse_kl_is_the_kl_of_the_coarsening():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    p, q = teacher.log_softmax(-1), student.log_softmax(-1)
    full = float((p.exp() * (p - q)).sum())
    # One token outside the top k: the coarsening loses nothing.
    assert float(coarse_kl(student, _targets(teacher, 49))) == pytest.approx(full, rel=1e-4)
    # Fewer tokens: a coarsening never has more divergence than the full distributions.
    coarse = float(coarse_kl(student, _targets(teacher, 5)))
    assert 0 < coarse < full
    assert float(coarse_kl(teacher, _targets(teacher, 5))) == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_gradient_matches_autograd_through_the_dequantization(symmetric):
    g = torch.Generator().manual_seed(1)
    qw = quantize_weight(
        torch.randn(6, 64, generator=g), QuantConfig(bits=3, group_size=32, symmetric=symmetric)
    )
    upstream = torch.randn(6, 64, generator=g)
    s1 = qw.scale.float().clone().requires_grad_(True)
    (_ScaledCodes.apply(s1, qw.codes, qw.zero, torch.float32) * upstream).sum().backward()
    s2 = qw.scale.float().clone().requires_grad_(True)
    q = qw.codes.float().reshape(6, 2, 32)
    if qw.zero is not None:
        q = q - qw.zero.float().unsqueeze(-1)
    ((q * s2.unsqueeze(-1)).reshape(6, 64) * upstream).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    torch.testing.assert_close(
        _ScaledCodes.apply(s1, qw.codes, qw.zero, torch.float32),
        dequantize(qw.codes, qw.scale, qw.zero),
    )


def _calibrated(tiny_model, calib, layout: str, **recipe):
    model = tiny_model(layout)
    samples = calib(layout, n=4)
    targets = teacher_targets(model, samples)
    r = Recipe(method="gptq", bits=2, group_size=32, gamma=10.0, **recipe)
    result = Calibrator(model, samples, r, gamma=10.0, gamma_source="given", progress=False).run()
    return model, samples, targets, result


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_views_are_the_pipelines_weights_in_the_models_storage(layout, tiny_model, calib):
    model, _, _, result = _calibrated(tiny_model, calib, layout)
    views = weight_views(model, get_architecture(model))
    assert set(views) == set(result.weights)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name, qw in result.weights.items():
        assert views[name].untyped_storage().data_ptr() in storages
        # The layer loop left each weight dequantized in the model, where the view reads it.
        torch.testing.assert_close(views[name], qw.dequantize(views[name].dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tuning_lowers_the_calibration_kl_and_keeps_every_code(layout, tiny_model, calib):
    model, samples, targets, result = _calibrated(tiny_model, calib, layout)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    tuned = tune_scales(model, result, samples, targets, epochs=3, lr=0.01, progress=False)
    t = tuned.report.tuning
    assert t["kept"] and t["kl_after"] < 0.95 * t["kl_before"], t
    assert set(tuned.weights) == set(result.weights)
    changed = 0
    for name, qw in tuned.weights.items():
        old = result.weights[name]
        assert torch.equal(qw.codes, old.codes)
        assert (qw.zero is None and old.zero is None) or torch.equal(qw.zero, old.zero)
        assert qw.scale.dtype == old.scale.dtype and bool((qw.scale > 0).all())
        changed += not torch.equal(qw.scale, old.scale)
    # Experts no calibration token reaches get no gradient; every other weight moves.
    assert changed > 0.75 * len(tuned.weights)
    # The model now computes with the tuned weights: what the checkpoint will hold.
    views = weight_views(model, get_architecture(model))
    for name, qw in tuned.weights.items():
        torch.testing.assert_close(views[name], qw.dequantize(views[name].dtype))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires


def test_tuning_that_does_not_help_keeps_the_untuned_scales(tiny_model, calib):
    model, samples, targets, result = _calibrated(tiny_model, calib, "qwen3_vl_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # A step this large overshoots: the calibration KL rises, and nothing may change.
    tuned = tune_scales(model, result, samples, targets, epochs=1, lr=1.0, progress=False)
    assert not tuned.report.tuning["kept"]
    assert tuned.weights is result.weights
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_tuning_that_does_not_fit_raises_and_leaves_the_model(tiny_model, calib, monkeypatch):
    model, samples, targets, result = _calibrated(tiny_model, calib, "qwen3_vl_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(placement, "free_bytes", lambda device: 0)
    with pytest.raises(TuneUnavailable, match="does not fit for a backward pass on cpu"):
        tune_scales(model, result, samples, targets, epochs=1, lr=0.01, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_defaults_tune_veq_at_two_bits_in_coarse_groups_only():
    assert Recipe(method="veq", bits=2).tune_epochs == 2
    assert Recipe(method="veq", bits=2, group_size=None).tune_epochs == 2
    assert Recipe(method="veq", bits=2, group_size=64).tune_epochs == 0
    assert Recipe(method="veq", bits=2, group_size="128") == Recipe(method="veq", bits=2)
    assert Recipe(method="veq", bits=2, group_size=64, tune_epochs=2).tune_epochs == 2
    assert Recipe(method="veq", bits=3).tune_epochs == 0
    assert Recipe(method="veq", bits=4, mixed_precision=2.5).tune_epochs == 2
    assert Recipe(method="gptq", bits=2).tune_epochs == 0
    assert Recipe(method="veq", bits=2, tune_epochs=0).tune_epochs == 0
    # Leaving the default out and naming it give one recipe, one cache key.
    assert Recipe(method="veq", bits=2) == Recipe(method="veq", bits=2, tune_epochs=2)
    # RTN with tuning trains on the calibration set: it is no longer data-free.
    assert Recipe(method="rtn").data_free and not Recipe(method="rtn", tune_epochs=1).data_free
