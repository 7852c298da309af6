"""Typed settings for weight quantization.

Owns `QuantConfig`, the one description of *how* a weight is quantized (bits, grouping,
symmetry, scale dtype) that the quantizer, the packers and every solver take. It deliberately
says nothing about *which* modules are quantized or with which method: that is a recipe's job.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)

_SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_bits(v: int) -> int:
    if v not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {v}")
    return v


def check_group_size(v: int | None) -> int | None:
    if v is not None and v not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {SUPPORTED_GROUP_SIZES} or None (per-channel), got {v}"
        )
    return v


#: Validated field types shared by every settings object that names bits or a group size.
Bits = Annotated[int, AfterValidator(check_bits)]
GroupSize = Annotated[int | None, AfterValidator(check_group_size)]


class QuantConfig(BaseModel):
    """How one weight matrix `[N, K]` is quantized: groups of `group_size` along K."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Bits = Field(4, description="Bits per weight code: one of 2, 3, 4, 8.")
    group_size: GroupSize = Field(
        128, description="Input features per scale: 32, 64 or 128; None means one per row."
    )
    symmetric: bool = Field(
        False, description="Symmetric codes (zero point 0); asymmetric stores a zero per group."
    )
    scale_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Storage dtype of scales; codes are computed against it."
    )

    @property
    def qmin(self) -> int:
        """Smallest signed code, -2^(b-1) (compressed-tensors' convention)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest signed code, 2^(b-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def group_for(self, in_features: int) -> int:
        """The effective group size for a weight with `in_features` columns.

        Raises ValueError when K is not a multiple of the group size.
        """
        if self.group_size is None:
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"in_features {in_features} is not divisible by group_size {self.group_size}; "
                "choose a group size that divides it or use per-channel (group_size=None)"
            )
        return self.group_size
