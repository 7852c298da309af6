"""Our packing against the compressed-tensors library's own `PackedQuantizationCompressor`."""

import math

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from veq.config import QuantConfig
from veq.format import pack_int32, pack_weight, packed_nbytes, unpack_int32, unpack_weight
from veq.quantizer import quantize_weight

BITS = (2, 3, 4, 8)


def _scheme(cfg: QuantConfig) -> QuantizationScheme:
    grouped = cfg.group_size is not None
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=cfg.bits,
            type="int",
            symmetric=cfg.symmetric,
            strategy="group" if grouped else "channel",
            group_size=cfg.group_size,
        ),
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", [1, 7, 32, 33, 100, 257])
def test_pack_unpack_exact_every_length(bits, length):
    g = torch.Generator().manual_seed(bits * 1000 + length)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(lo, hi, (5, length), generator=g, dtype=torch.int8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, math.ceil(length * bits / 32))
    assert torch.equal(unpack_int32(packed, bits, length), codes)
    # Along dim 0 (zero points) and for stacked experts.
    assert torch.equal(unpack_int32(pack_int32(codes.T, bits, 0), bits, length, 0), codes.T)
    stacked = codes.reshape(1, 5, length).repeat(3, 1, 1)
    assert torch.equal(unpack_int32(pack_int32(stacked, bits), bits, length), stacked)


def test_bitstream_layout_by_hand():
    # 3-bit codes 0..7 in offset-binary are -4..3; element i occupies bits [3i, 3i+3).
    codes = (torch.arange(32) % 8 - 4).to(torch.int8).reshape(1, 32)
    words = pack_int32(codes, 3)[0].tolist()
    stream = sum((w & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(words))
    assert [(stream >> (3 * i)) & 7 for i in range(32)] == [i % 8 for i in range(32)]
    # Element 10 straddles words 0 and 1 (bits 30..32).
    assert len(words) == 3


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 37, 64])
def test_weight_roundtrip_exact(bits, group, symmetric, n, make_weight):
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    qw = quantize_weight(make_weight(n, 256, seed=n + bits), cfg)
    tensors = pack_weight(qw)
    back = unpack_weight(tensors, cfg)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale)
    assert (back.zero is None) == symmetric
    if not symmetric:
        assert torch.equal(back.zero, qw.zero)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert nbytes == packed_nbytes(n, 256, cfg)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("bits", BITS)
def test_matches_compressed_tensors(bits, group, symmetric, make_weight):
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    n, k = 45, 256  # ragged N: zero points straddle words along N
    qw = quantize_weight(make_weight(n, k, seed=bits * 7 + symmetric), cfg)
    ours = pack_weight(qw)
    scheme = _scheme(cfg)

    # Their compress, given our dequantized weight and our scales/zeros, reproduces our words.
    state = {"weight": qw.dequantize(), "weight_scale": qw.scale}
    if not symmetric:
        state["weight_zero_point"] = qw.zero
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert torch.equal(theirs["weight_packed"], ours["weight_packed"])
    assert torch.equal(theirs["weight_shape"], ours["weight_shape"])
    if symmetric:
        assert "weight_zero_point" not in theirs
    else:
        assert torch.equal(theirs["weight_zero_point"], ours["weight_zero_point"])

    # Their decompress of our tensors gives exactly our dequantization in the scale dtype.
    dense = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert dense.dtype == torch.float16
    assert torch.equal(dense, qw.dequantize(torch.float16))


def test_unpack_rejects_wrong_word_count():
    packed = pack_int32(torch.zeros(2, 64, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int32(packed, 4, 100)


def test_unpack_weight_reports_missing_tensors(make_weight):
    cfg = QuantConfig(bits=4)
    tensors = pack_weight(quantize_weight(make_weight(8, 128, seed=0), cfg))
    del tensors["weight_zero_point"]
    with pytest.raises(ValueError, match="weight_zero_point"):
        unpack_weight(tensors, cfg)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of the signed 2-bit range"):
        pack_int32(torch.tensor([[2]], dtype=torch.int8), 2)


def test_packed_size_formula_values():
    # 4-bit g128 asym [2048, 768]: 2048·96 words + 2048·6 fp16 scales + 256·6 zero words + shape.
    cfg = QuantConfig(bits=4, group_size=128)
    assert packed_nbytes(2048, 768, cfg) == 4 * 2048 * 96 + 2 * 2048 * 6 + 4 * 256 * 6 + 16
    # 3-bit: 768 codes take exactly 72 words.
    cfg3 = QuantConfig(bits=3, group_size=128, symmetric=True)
    assert packed_nbytes(2048, 768, cfg3) == 4 * 2048 * 72 + 2 * 2048 * 6 + 16
