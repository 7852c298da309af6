"""Block sizes for the low-bit GEMMs: the `BlockConfig` type, a heuristic, optional tables.

Owns *which* tile shape a launch uses, never the kernels themselves. The heuristic looks at
(rows per expert, N, K, bits); a per-device JSON table in `kernels/configs/` (when one exists
for the card, from a tuning run) overrides it. Every config keeps each `tl.dot` dimension at
least 16, which is what GPUs accept, even under the interpreter that would accept less
(DESIGN.md §8).

Table format (`kernels/configs/<device name, spaces→_>.json`):
`{"moe_gate_up|moe_down|dense": {"<bits>:<N>:<K>": {"<M>": {"block_m": 16, ...}}}}`; the entry
with the nearest M (rows per expert for MoE, rows for dense) at or above the query wins, else
the largest.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MIN_DOT = 16
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch parameters of one GEMM launch."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < MIN_DOT or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= {MIN_DOT} (tl.dot on GPUs)")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def interpreted() -> bool:
    """True when Triton runs under its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2_at_least(x: int, lo: int = MIN_DOT, hi: int = 128) -> int:
    p = lo
    while p < x and p < hi:
        p *= 2
    return p


def heuristic(kind: str, m: int, n: int, k: int, bits: int, group_size: int) -> BlockConfig:
    """Default tile for a GEMM of `m` rows (per expert for MoE) × `n` outputs × `k` inputs.

    Decode (small m) is bound by reading weights: a short M tile and a long K tile so each
    program streams many bytes; prefill is bound by math: a wider M tile. Under the interpreter
    (where every program and loop iteration costs ~10 ms) tiles are as large as the shape allows.
    """
    del kind, group_size  # same rule for all kinds until a GPU tuning run says otherwise
    if interpreted():
        return BlockConfig(
            block_m=_pow2_at_least(m, hi=64),
            block_n=_pow2_at_least(n),
            block_k=_pow2_at_least(k),
            num_warps=4,
            num_stages=1,
        )
    if m <= 16:
        return BlockConfig(16, 64, 128 if bits <= 4 else 64, num_warps=4, num_stages=4)
    if m <= 64:
        return BlockConfig(32, 64, 64, num_warps=4, num_stages=4)
    return BlockConfig(64, 128, 64, num_warps=8 if bits == 8 else 4, num_stages=3)


@functools.lru_cache(maxsize=8)
def _table(device_name: str) -> dict:
    path = CONFIG_DIR / (device_name.replace(" ", "_") + ".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def choose(
    kind: str, m: int, n: int, k: int, bits: int, group_size: int, device: torch.device
) -> BlockConfig:
    """The config for a launch: the device table's entry when there is one, else `heuristic`."""
    if device.type == "cuda" and not interpreted():
        entries = _table(torch.cuda.get_device_name(device)).get(kind, {}).get(f"{bits}:{n}:{k}")
        if entries:
            ms = sorted(int(x) for x in entries)
            pick = next((x for x in ms if x >= m), ms[-1])
            return BlockConfig(**entries[str(pick)])
    return heuristic(kind, m, n, k, bits, group_size)
