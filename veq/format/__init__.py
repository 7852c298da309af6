"""On-disk weight format: compressed-tensors `pack-quantized` (docs/design.md §Weight formats)."""

from veq.format.pack import pack_int32, pack_weight, packed_nbytes, unpack_int32, unpack_weight

__all__ = ["pack_int32", "pack_weight", "packed_nbytes", "unpack_int32", "unpack_weight"]
