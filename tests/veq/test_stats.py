import pytest
import torch

from veq.stats import ActivationStats, HessianAccumulator, ResidualAccumulator


def test_hessian_is_gptq_convention(make_inputs):
    x = make_inputs(300, 64, seed=0)
    acc = HessianAccumulator(64)
    acc.add(x)
    torch.testing.assert_close(acc.hessian(), 2 * x.T @ x / 300, rtol=1e-5, atol=1e-5)
    assert acc.tokens == 300


def test_weighted_hessian_matches_explicit_sum(make_inputs):
    x = make_inputs(200, 32, seed=1)
    c = torch.rand(200, generator=torch.Generator().manual_seed(1)) * 5
    acc = HessianAccumulator(32, dtype=torch.float64)
    acc.add(x, c)
    expected = 2 * sum(c[j] * torch.outer(x[j], x[j]) for j in range(200)) / c.sum()
    torch.testing.assert_close(acc.hessian(), expected.float(), rtol=1e-5, atol=1e-5)


def test_batches_and_merge_equal_one_pass(make_inputs):
    x = make_inputs(256, 48, seed=2)
    c = torch.rand(256, generator=torch.Generator().manual_seed(2))
    whole = HessianAccumulator(48)
    whole.add(x, c)
    a, b = HessianAccumulator(48), HessianAccumulator(48)
    a.add(x[:100].reshape(4, 25, 48), c[:100].reshape(4, 25))  # [B, S, K] batches flatten
    b.add(x[100:], c[100:])
    a.merge(b)
    assert a.tokens == 256
    torch.testing.assert_close(a.hessian(), whole.hessian(), rtol=1e-5, atol=1e-6)


def test_hessian_rejects_bad_input(make_inputs):
    acc = HessianAccumulator(16)
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.hessian()
    with pytest.raises(ValueError, match="16 features"):
        acc.add(torch.ones(3, 8))
    with pytest.raises(ValueError, match="non-negative"):
        acc.add(torch.ones(3, 16), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="3 tokens"):
        acc.add(torch.ones(3, 16), torch.ones(2))
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(16, dtype=torch.float16)


def test_activation_stats_weighted_mean(make_inputs):
    x = make_inputs(120, 24, seed=3)
    c = torch.rand(120, generator=torch.Generator().manual_seed(3))
    s = ActivationStats(24)
    s.add(x[:50], c[:50])
    t = ActivationStats(24)
    t.add(x[50:], c[50:])
    s.merge(t)
    expected = (c[:, None] * x.abs()).sum(0) / c.sum()
    torch.testing.assert_close(s.mean_abs(), expected, rtol=1e-5, atol=1e-6)
    plain = ActivationStats(24)
    plain.add(x)
    torch.testing.assert_close(plain.mean_abs(), x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_residual_matches_explicit_sum_and_hessians_normalisation(make_inputs):
    x_q = make_inputs(200, 24, seed=3)
    x_fp = x_q + 0.3 * make_inputs(200, 24, seed=4)
    c = torch.rand(200, generator=torch.Generator().manual_seed(3)) * 4
    acc = ResidualAccumulator(24)
    acc.add(x_fp[:50], x_q[:50], c[:50])
    acc.add(x_fp[50:].reshape(3, 50, 24), x_q[50:].reshape(3, 50, 24), c[50:].reshape(3, 50))
    expected = 2 * sum(c[j] * torch.outer(x_fp[j] - x_q[j], x_q[j]) for j in range(200)) / c.sum()
    torch.testing.assert_close(acc.residual(), expected.float(), rtol=1e-5, atol=1e-5)
    same = ResidualAccumulator(24)
    same.add(x_q, x_q)
    assert torch.count_nonzero(same.residual()) == 0


def test_residual_rejects_bad_input(make_inputs):
    acc = ResidualAccumulator(16)
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.residual()
    with pytest.raises(ValueError, match="unpaired"):
        acc.add(make_inputs(10, 16, seed=0), make_inputs(12, 16, seed=1))
    with pytest.raises(ValueError, match="16 features"):
        acc.add(make_inputs(10, 8, seed=0), make_inputs(10, 8, seed=1))
