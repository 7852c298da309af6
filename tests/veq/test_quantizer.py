import pytest
import torch
from pydantic import ValidationError

from veq.config import QuantConfig
from veq.quantizer import compute_qparams, dequantize, quantize, quantize_weight

CONFIGS = [
    QuantConfig(bits=b, group_size=g, symmetric=s)
    for b in (2, 3, 4, 8)
    for g in (32, 64, 128, None)
    for s in (False, True)
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_codes_in_range_and_error_within_half_step(cfg, make_weight):
    w = make_weight(48, 256, seed=cfg.bits)
    qw = quantize_weight(w, cfg)
    g = qw.group_size
    assert g == (cfg.group_size or 256)
    assert qw.codes.dtype == torch.int8 and qw.scale.dtype == torch.float16
    assert qw.codes.min() >= cfg.qmin and qw.codes.max() <= cfg.qmax
    if cfg.symmetric:
        assert qw.zero is None
    else:
        assert qw.zero.dtype == torch.int8
    # min/max scales cover the range, so rounding never clips more than half a step (plus the
    # fp16 rounding of the scale itself).
    step = qw.scale.float().repeat_interleave(g, dim=1)
    err = (qw.dequantize() - w).abs()
    assert (err <= 0.5 * step * 1.01 + 1e-7).all()


def test_asymmetric_beats_symmetric_on_shifted_weights(make_weight):
    w = make_weight(32, 128, seed=3) + 0.04
    asym = quantize_weight(w, QuantConfig(bits=3, symmetric=False)).dequantize()
    sym = quantize_weight(w, QuantConfig(bits=3, symmetric=True)).dequantize()
    assert (asym - w).norm() < (sym - w).norm()


def test_zero_group_dequantizes_to_zero():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    qw = quantize_weight(w, QuantConfig(bits=4, group_size=32))
    assert torch.equal(qw.dequantize()[1:], torch.zeros(3, 64))


def test_bfloat16_scales_are_honoured(make_weight):
    w = make_weight(16, 128, seed=1)
    qw = quantize_weight(w, QuantConfig(bits=4, scale_dtype="bfloat16"))
    assert qw.scale.dtype == torch.bfloat16
    # Codes were computed against the stored (rounded) scale: re-quantizing reproduces them.
    assert torch.equal(quantize(w, qw.scale, qw.zero, qw.cfg), qw.codes)


def test_dequantize_in_storage_dtype_equals_fp32_rounded(make_weight):
    w = make_weight(8, 128, seed=2)
    qw = quantize_weight(w, QuantConfig(bits=8))
    fp16 = dequantize(qw.codes, qw.scale, qw.zero, torch.float16)
    assert torch.equal(fp16, qw.dequantize().half())


def test_clip_ratio_shrinks_the_range(make_weight):
    w = make_weight(8, 128, seed=4)
    cfg = QuantConfig(bits=4)
    full, _ = compute_qparams(w, cfg)
    clipped, _ = compute_qparams(w, cfg, clip_ratio=0.5)
    torch.testing.assert_close(clipped.float(), full.float() * 0.5, rtol=2e-3, atol=0)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(ValidationError, match="bits must be one of"):
        QuantConfig(bits=bits)


def test_unsupported_group_rejected():
    with pytest.raises(ValidationError, match="group_size"):
        QuantConfig(group_size=48)


def test_indivisible_k_rejected(make_weight):
    with pytest.raises(ValueError, match="not divisible by group_size 128"):
        quantize_weight(make_weight(4, 96, seed=0), QuantConfig(group_size=128))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_rejected(bad, make_weight):
    w = make_weight(4, 128, seed=0)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(w, QuantConfig())


def test_config_is_immutable_and_strict():
    cfg = QuantConfig()
    with pytest.raises(ValidationError):
        cfg.bits = 3
    with pytest.raises(ValidationError, match="extra"):
        QuantConfig(bitz=3)
