"""The mathematics of every solver on synthetic data (fresh draws from fixed seeds).

Error measure: relative output error ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration inputs, optionally
token-weighted. Numbers quoted in BENCHMARKS.md come from the same setups (bench/solvers.py).
"""

import logging

import pytest
import torch

from veq.algorithms import (
    awq,
    awq_moe,
    fp_target,
    gptq,
    ma_token_weights,
    mbq,
    rtn,
    veq_ma,
    veq_me,
)
from veq.config import QuantConfig
from veq.experts import ExpertWeights
from veq.format import pack_weight, unpack_weight
from veq.stats import HessianAccumulator, ResidualAccumulator
from veq.testing import two_populations
from veq.tokens import TokenKind

N, K = 96, 256


def rel_err(w, w_hat, x, c=None):
    d = (x @ (w - w_hat).T).pow(2).sum(-1)
    ref = (x @ w.T).pow(2).sum(-1)
    if c is not None:
        d, ref = d * c, ref * c
    return float((d.sum() / ref.sum()).sqrt())


def hessian(x, c=None):
    acc = HessianAccumulator(x.shape[1], dtype=torch.float64)
    acc.add(x, c)
    return acc.hessian()


@pytest.fixture
def layer(make_weight, make_inputs):
    return make_weight(N, K, seed=0), make_inputs(2048, K, seed=1)


def _experts(h, i, seeds):
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        out.append(
            ExpertWeights(
                torch.randn(i, h, generator=g) * 0.05,
                torch.randn(i, h, generator=g) * 0.05,
                torch.randn(h, i, generator=g) * 0.05,
            )
        )
    return out


def _expert_err(e, x, gate_q, up_q, scales):
    out = e.forward(x, gate_q.dequantize() / scales, up_q.dequantize() / scales)
    ref = e.forward(x)
    return float(((out - ref).pow(2).sum() / ref.pow(2).sum()).sqrt())


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_beats_rtn(bits, layer):
    w, x = layer
    cfg = QuantConfig(bits=bits)
    h = hessian(x)
    e_rtn = rel_err(w, rtn(w, cfg).dequantize(), x)
    e_gptq = rel_err(w, gptq(w, h, cfg).dequantize(), x)
    e_ao = rel_err(w, gptq(w, h, cfg, act_order=True).dequantize(), x)
    assert e_gptq < 0.7 * e_rtn
    assert e_ao < 0.7 * e_rtn


def _solver_errors(name, bits, w, x):
    cfg = QuantConfig(bits=bits)
    kinds = torch.full((x.shape[0],), int(TokenKind.VISION))
    kinds[::8] = TokenKind.ANSWER
    is_text = kinds != TokenKind.VISION
    if name == "rtn":
        return rel_err(w, rtn(w, cfg).dequantize(), x)
    if name == "gptq":
        return rel_err(w, gptq(w, hessian(x), cfg).dequantize(), x)
    if name == "gptq-act-order":
        return rel_err(w, gptq(w, hessian(x), cfg, act_order=True).dequantize(), x)
    if name == "awq":
        return rel_err(w, awq([w], x, cfg).effective_weight(), x)
    if name == "mbq":
        return rel_err(w, mbq([w], x, kinds, cfg, vision_weight=0.1).effective_weight(), x)
    if name == "veq-ma":
        return rel_err(w, veq_ma(w, x, is_text, cfg, gamma=20.0).dequantize(), x)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["rtn", "gptq", "gptq-act-order", "awq", "mbq", "veq-ma"])
def test_error_falls_as_bits_rise(name, make_weight, make_inputs):
    w, x = make_weight(64, 128, seed=2), make_inputs(512, 128, seed=3)
    errs = [_solver_errors(name, b, w, x) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 0.02


@pytest.mark.parametrize("shared", ["awq-moe", "veq-me"])
def test_moe_shared_scale_error_falls_as_bits_rise(shared, make_inputs):
    experts = _experts(128, 64, seeds=(5, 6, 7))
    xs = [make_inputs(256, 128, seed=s) for s in (8, 9, 10)]
    errs = []
    for bits in (2, 3, 4, 8):
        cfg = QuantConfig(bits=bits)
        if shared == "awq-moe":
            r = awq_moe(experts, xs, cfg)
        else:
            r = veq_me(experts, xs, torch.tensor([3.0, 1.0, 0.5]), cfg)
        errs.append(_expert_err(experts[0], xs[0], r.gate[0], r.up[0], r.scales))
    assert errs == sorted(errs, reverse=True), errs


@pytest.fixture
def populations(make_weight):
    """Many low-weight 'vision' tokens and few high-weight 'text' tokens of another distribution."""
    x, is_text = two_populations(K, seed=11)
    return make_weight(N, K, seed=0), x, is_text


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_weighted_hessian_lowers_weighted_error(bits, populations):
    w, x, is_text = populations
    gamma = 20.0
    c = ma_token_weights(is_text, gamma)
    cfg = QuantConfig(bits=bits)
    plain = gptq(w, hessian(x), cfg).dequantize()
    weighted = veq_ma(w, x, is_text, cfg, gamma=gamma).dequantize()
    assert rel_err(w, weighted, x, c) < 0.95 * rel_err(w, plain, x, c)
    # The gain is on the text tokens the weights favour.
    assert rel_err(w, weighted, x[is_text]) < rel_err(w, plain, x[is_text])


def test_equal_weights_match_plain_gptq(populations):
    w, x, _ = populations
    cfg = QuantConfig(bits=3)
    plain = gptq(w, hessian(x), cfg)
    # Constant weights (p = 0.37 everywhere, no text tokens): the normalised Hessian is unchanged.
    equal = veq_ma(
        w,
        x,
        torch.zeros(x.shape[0], dtype=torch.bool),
        cfg,
        gamma=20.0,
        router_prob=torch.full((x.shape[0],), 0.37),
    )
    assert (equal.codes == plain.codes).float().mean() > 0.999
    torch.testing.assert_close(equal.dequantize(), plain.dequantize(), rtol=0, atol=1e-3)
    assert rel_err(w, equal.dequantize(), x) == pytest.approx(
        rel_err(w, plain.dequantize(), x), rel=1e-4
    )


def test_ma_token_weights_formula():
    is_text = torch.tensor([True, False, True, False])
    p = torch.tensor([0.5, 0.5, 0.1, 1.0])
    torch.testing.assert_close(
        ma_token_weights(is_text, 10.0, p, lam=1.0), torch.tensor([5.0, 0.5, 1.0, 1.0])
    )
    torch.testing.assert_close(
        ma_token_weights(is_text, 10.0, p, lam=2.0), torch.tensor([2.5, 0.25, 0.1, 1.0])
    )
    torch.testing.assert_close(ma_token_weights(is_text, 4.0), torch.tensor([4.0, 1.0, 4.0, 1.0]))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_awq_beats_rtn_with_outlier_channels(bits, make_weight, make_inputs):
    w, x = make_weight(N, K, seed=0), make_inputs(1024, K, seed=1, outliers=4)
    cfg = QuantConfig(bits=bits)
    e_rtn = rel_err(w, rtn(w, cfg).dequantize(), x)
    res = awq([w], x, cfg, clip=False)
    assert res.ratio > 0
    assert rel_err(w, res.effective_weight(), x) < 0.6 * e_rtn
    # The clip search only ever helps on its own sample.
    assert rel_err(w, awq([w], x, cfg).effective_weight(), x) <= rel_err(
        w, res.effective_weight(), x
    )


def test_awq_shared_scale_over_several_linears(make_weight, make_inputs):
    x = make_inputs(512, K, seed=1, outliers=4)
    ws = [make_weight(64, K, seed=s) for s in (1, 2, 3)]
    res = awq(ws, x, QuantConfig(bits=3))
    assert res.scales.shape == (K,)
    assert len(res.qweights) == 3
    # Normalised to geometric mean one (max · min = 1).
    assert float(res.scales.max() * res.scales.min()) == pytest.approx(1.0, rel=1e-4)
    for i, w in enumerate(ws):
        assert rel_err(w, res.effective_weight(i), x) < rel_err(
            w, rtn(w, QuantConfig(bits=3)).dequantize(), x
        )


def test_veq_me_scale_moves_toward_important_expert(make_inputs):
    """Two experts whose inputs have disjoint salient channels: raising one expert's importance
    moves the shared scale toward its channels and lowers its error."""
    h = 256
    ea, eb = _experts(h, 128, seeds=(1, 2))
    xa = make_inputs(512, h, seed=3)
    xa[:, :8] *= 15
    xb = make_inputs(512, h, seed=4)
    xb[:, 8:16] *= 15
    cfg = QuantConfig(bits=3)

    def run(imp):
        r = veq_me([ea, eb], [xa, xb], torch.tensor(imp), cfg, clip=False)
        tilt = float(r.scales[:8].log().mean() - r.scales[8:16].log().mean())
        return tilt, _expert_err(ea, xa, r.gate[0], r.up[0], r.scales)

    tilt_eq, err_a_eq = run([1.0, 1.0])
    tilt_a, err_a_hot = run([50.0, 1.0])
    tilt_b, _ = run([1.0, 50.0])
    assert tilt_b < tilt_eq < tilt_a
    assert err_a_hot < 0.9 * err_a_eq


def test_veq_me_skips_experts_without_tokens(make_inputs):
    experts = _experts(128, 64, seeds=(1, 2))
    r = veq_me(
        experts,
        [make_inputs(64, 128, seed=1), torch.empty(0, 128)],
        torch.ones(2),
        QuantConfig(bits=4),
    )
    # The idle expert is still quantized (never left in 16 bits or zeroed).
    assert r.gate[1].codes.shape == (64, 128)
    assert r.gate[1].dequantize().abs().sum() > 0
    with pytest.raises(ValueError, match="no expert has both"):
        veq_me(experts, [torch.empty(0, 128)] * 2, torch.ones(2), QuantConfig(bits=4))


def test_mbq_ignores_prompt_tokens(make_weight, make_inputs):
    w = make_weight(N, K, seed=0)
    x = make_inputs(600, K, seed=1)
    kinds = torch.full((600,), int(TokenKind.PROMPT))
    kinds[:100] = TokenKind.ANSWER
    garbage = x.clone()
    garbage[100:] = make_inputs(500, K, seed=99, outliers=8)  # only prompt tokens change
    a = mbq([w], x, kinds, QuantConfig(bits=3), vision_weight=0.1)
    b = mbq([w], garbage, kinds, QuantConfig(bits=3), vision_weight=0.1)
    # AWQ's salience statistic is token-weighted, so prompt tokens move nothing.
    assert torch.equal(a.scales, b.scales)
    with pytest.raises(ValueError, match="needs answer tokens"):
        mbq([w], x, torch.full((600,), int(TokenKind.PROMPT)), QuantConfig(), vision_weight=0.1)


def test_gptq_dead_columns(make_weight, make_inputs):
    w, x = make_weight(32, 128, seed=0), make_inputs(256, 128, seed=1)
    x[:, [3, 50, 127]] = 0.0
    q = gptq(w, hessian(x), QuantConfig(bits=4))
    deq = q.dequantize()
    assert torch.equal(deq[:, [3, 50, 127]], torch.zeros(32, 3))
    assert rel_err(w, deq, x) < rel_err(w, rtn(w, QuantConfig(bits=4)).dequantize(), x)


def test_gptq_raises_damping_on_indefinite_hessian(make_weight, make_inputs, caplog):
    w, x = make_weight(16, 64, seed=0), make_inputs(32, 64, seed=1)
    h = hessian(x)
    h -= 1e-3 * float(h.diagonal().mean()) * torch.eye(64)  # slightly indefinite
    with caplog.at_level(logging.INFO, logger="veq.algorithms.gptq"):
        q = gptq(w, h, QuantConfig(bits=4, group_size=32), damp=1e-5)
    assert "retrying" in caplog.text
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -torch.eye(64), QuantConfig(bits=4, group_size=32))


def test_gptq_act_order_uses_static_groups(layer):
    w, x = layer
    cfg = QuantConfig(bits=3, group_size=64)
    q = gptq(w, hessian(x), cfg, act_order=True)
    # Static groups: the scales are the min/max scales of the original columns, in order, so the
    # result packs and dequantizes like any other weight (no g_idx needed).
    torch.testing.assert_close(q.scale, rtn(w, cfg).scale)
    back = unpack_weight(pack_weight(q), cfg)
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, None])
def test_gptq_every_grouping(group, symmetric, layer):
    w, x = layer
    cfg = QuantConfig(bits=4, group_size=group, symmetric=symmetric)
    q = gptq(w, hessian(x), cfg)
    assert q.codes.min() >= cfg.qmin and q.codes.max() <= cfg.qmax
    assert rel_err(w, q.dequantize(), x) < rel_err(w, rtn(w, cfg).dequantize(), x)


def test_gptq_rejects_mismatched_hessian(make_weight):
    with pytest.raises(ValueError, match="do not match"):
        gptq(make_weight(8, 64, seed=0), torch.eye(32), QuantConfig())


@pytest.mark.parametrize("bits", [2, 3])
def test_hessian_clip_never_raises_the_groups_error_and_lowers_it_at_low_bits(bits, layer):
    from veq.algorithms.gptq import hessian_clip
    from veq.quantizer import fake_quantize

    w, x = layer
    h = hessian(x).float()
    cfg = QuantConfig(bits=bits, group_size=64, symmetric=False)
    ratio = hessian_clip(w, h, cfg)
    assert ratio.shape == (N, K // 64) and (ratio <= 1).all() and (ratio > 0.5).all()

    def group_errors(wq):  # Δw_g H_gg Δw_gᵀ per (row, group), written out
        out = torch.zeros(N, K // 64)
        for j in range(K // 64):
            d = (wq - w)[:, 64 * j : 64 * (j + 1)]
            out[:, j] = ((d @ h[64 * j : 64 * (j + 1), 64 * j : 64 * (j + 1)]) * d).sum(-1)
        return out

    clipped = group_errors(fake_quantize(w, cfg, clip_ratio=ratio))
    minmax = group_errors(fake_quantize(w, cfg))
    assert (clipped <= minmax * (1 + 1e-5)).all()  # ratio 1 (min–max) is on the grid
    assert clipped.sum() < 0.9 * minmax.sum()
    assert (ratio < 1).float().mean() > 0.5  # most 2/3-bit groups want a narrower range


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_range_search_lowers_the_output_error_at_2_bits(act_order, layer):
    w, x = layer
    cfg = QuantConfig(bits=2, group_size=64, symmetric=False)
    h = hessian(x)
    plain = gptq(w, h, cfg, act_order=act_order)
    searched = gptq(w, h, cfg, act_order=act_order, range_search=True)
    assert not torch.equal(searched.scale, plain.scale)
    assert rel_err(w, searched.dequantize(), x) < 0.95 * rel_err(w, plain.dequantize(), x)
    back = unpack_weight(pack_weight(searched), cfg)  # still a plain static-group weight
    assert torch.equal(back.dequantize(), searched.dequantize())


def _asymmetric(make_weight, make_inputs):
    """A weight, the 16-bit model's inputs x and the quantized model's x̃ (x plus drift)."""
    w = make_weight(N, K, seed=5)
    x = make_inputs(1024, K, seed=6)
    x_q = x + 0.2 * make_inputs(1024, K, seed=7)
    r = ResidualAccumulator(K)
    r.add(x, x_q)
    return w, x, x_q, hessian(x_q), r.residual()


def test_fp_target_is_the_least_squares_weight(make_weight, make_inputs):
    """Full strength, no damping to speak of: the weight whose outputs on x̃ best match W x."""
    w, x, x_q, h, r = _asymmetric(make_weight, make_inputs)
    target = fp_target(w, h, r, damp=1e-8)
    lstsq = torch.linalg.lstsq(x_q.double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(target.double(), lstsq, rtol=1e-4, atol=1e-5)
    # Partial strength moves part of the way; no drift (the first layer) moves nowhere.
    half = fp_target(w, h, r, strength=0.5, damp=1e-8)
    torch.testing.assert_close(half, (w + target) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fp_target(w, h, torch.zeros_like(r)), w.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual"):
        fp_target(w, h, r[:-1])


@pytest.mark.parametrize("bits", [3, 2])
def test_gptq_on_the_fp_target_lowers_the_error_against_the_16bit_outputs(
    bits, make_weight, make_inputs
):
    """GPTQ on `fp_target` leaves less error in `Q x̃ − W x` (what the next layer sees) than
    GPTQ on W itself, which only minimises `(Q − W) x̃`."""
    w, x, x_q, h, r = _asymmetric(make_weight, make_inputs)
    cfg = QuantConfig(bits=bits)

    def err(q):
        return float((x_q @ q.dequantize().T - x @ w.T).pow(2).sum())

    plain = gptq(w, h, cfg, act_order=True)
    aimed = gptq(fp_target(w, h, r), h, cfg, act_order=True)
    assert err(aimed) < 0.9 * err(plain)
