"""kernels.layout and kernels.repack: bit layout, byte counts, and agreement with veq's format."""

from __future__ import annotations

import pytest
import torch

from kernels._testing import random_packed
from kernels.layout import (
    PackedWeight,
    dequantize,
    kernel_nbytes,
    pack_codes,
    stack_experts,
    unpack_codes,
)
from kernels.repack import from_codes, from_compressed, unpack_bitstream
from veq.config import QuantConfig
from veq.format.pack import pack_int32, pack_weight, packed_nbytes
from veq.quantizer import quantize_weight

SHAPES = [(8, 32), (7, 96), (5, 100)]  # K=100: per-channel only, padded to 128 in the layout


def _cases() -> list[tuple[int, int | None, bool, tuple[int, int]]]:
    out = []
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for n, k in SHAPES:
                for group in (32, None):
                    if group is None or k % group == 0:
                        out.append((bits, group, sym, (n, k)))
    return out


@pytest.mark.parametrize(("bits", "group", "sym", "shape"), _cases())
def test_pack_roundtrip_and_dequantize_match_veq(bits, group, sym, shape, make_weight):
    n, k = shape
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=sym)
    qw = quantize_weight(make_weight(n, k, seed=bits + k), cfg)
    pw = pack_codes(qw.codes, qw.scale, qw.zero, bits)
    assert pw.group_size == (group or k)
    u = unpack_codes(pw)
    assert torch.equal(u.t() - (1 << (bits - 1)), qw.codes.to(torch.int32))
    # Bit for bit the same dequantization as veq's.
    assert torch.equal(dequantize(pw), qw.dequantize())
    assert pw.nbytes() == kernel_nbytes(n, k, bits, group, sym)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_repack_from_disk_equals_repack_from_codes(bits, sym, make_weight):
    cfg = QuantConfig(bits=bits, group_size=32, symmetric=sym)
    qw = quantize_weight(make_weight(13, 96, seed=bits), cfg)  # N=13: zero points straddle words
    a = from_compressed(pack_weight(qw), bits)
    b = from_codes(qw.codes, qw.scale, qw.zero, bits)
    for name, t in b.tensors().items():
        assert torch.equal(a.tensors()[name], t), name
    assert a.tensors().keys() == b.tensors().keys()


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_unpack_bitstream_inverts_veq_pack_int32(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, 77), generator=g)
    words = pack_int32(codes.to(torch.int8), bits, dim=1)
    assert torch.equal(unpack_bitstream(words, bits, 77) - (1 << (bits - 1)), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_bytes_are_exactly_b_bits_per_weight(bits):
    pw = random_packed(64, 256, bits, 128, symmetric=True)
    assert pw.qweight.numel() * 4 + (0 if pw.qweight_hi is None else pw.qweight_hi.numel() * 4) == (
        64 * 256 * bits // 8
    )
    # Versus disk: only the zero points (1 byte here, b bits there) and weight_shape differ.
    for sym in (True, False):
        cfg = QuantConfig(bits=bits, group_size=128, symmetric=sym)
        ours = kernel_nbytes(64, 256, bits, 128, sym)
        disk = packed_nbytes(64, 256, cfg)
        assert ours - disk == (0 if sym else 64 * 2 - 4 * ((64 * bits + 31) // 32) * 2) - 16


def test_3bit_planes_hold_whole_codes():
    """Code k of column n: low two bits in word k // 16 at 2·(k % 16), third bit at k % 32."""
    codes = torch.arange(64).remainder(8).sub(4).view(1, 64).to(torch.int8)
    pw = pack_codes(codes, torch.ones(1, 1, dtype=torch.float16), None, 3)
    u = codes.to(torch.int64) + 4
    for k in (0, 15, 16, 31, 33, 63):
        lo = (int(pw.qweight[k // 16, 0]) >> (2 * (k % 16))) & 3
        hi = (int(pw.qweight_hi[k // 32, 0]) >> (k % 32)) & 1
        assert lo | hi << 2 == int(u[0, k])


def test_stack_and_expert_views():
    ws = [random_packed(16, 64, 4, 32, False, seed=e) for e in range(3)]
    st = stack_experts(ws)
    assert st.num_experts == 3
    assert torch.equal(dequantize(st)[1], dequantize(ws[1]))
    assert torch.equal(dequantize(st.expert(2)), dequantize(ws[2]))
    with pytest.raises(ValueError, match="group them by bits"):
        stack_experts([ws[0], random_packed(16, 64, 2, 32, False)])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1), None, 5)
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.full((2, 32), 9, dtype=torch.int8), torch.ones(2, 1), None, 4)
    pw = random_packed(8, 64, 4, 32, True)
    with pytest.raises(ValueError, match="qweight has shape"):
        PackedWeight(pw.qweight[:1], None, pw.scale, None, 4, 32, 8, 64)
