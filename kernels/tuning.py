"""Block sizes for the low-bit GEMMs: the `BlockConfig` type, a heuristic, optional tables.

Owns *which* tile shape a launch uses and what it costs in shared memory, never the kernels
themselves. The heuristic looks at (kind, rows per expert, N, K, bits, group, activation dtype,
how many matrices share the grid) and the target GPU (SM count, shared memory per block); a
per-device JSON table in `kernels/configs/` (when one exists for the card, from a tuning run)
overrides it. Every config keeps each `tl.dot` dimension at least 16, which is what GPUs accept
even where the interpreter would accept less, and no config is returned whose shared memory
(`shared_bytes`, an upper bound checked against real compiles by `kernels.aot`) exceeds the
target's block limit.

Table format (`kernels/configs/<device name, spaces→_>.json`):
`{"moe_gate_up|moe_down|dense": {"<bits>:<N>:<K>": {"<M>": {"block_m": 16, ...}}}}` (N = I for
gate‖up, the columns of its output); the entry
with the nearest M (rows per expert for MoE, rows for dense) at or above the query wins, else
the largest.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

MIN_DOT = 16
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DECODE_ROWS = 16  # rows per expert (MoE) or per matrix (dense) at or below which a GEMM decodes
MIN_PROGRAM_BYTES = 4096  # decode grids stop growing when a program would read fewer code bytes
KINDS = ("dense", "moe_gate_up", "moe_down")


@dataclass(frozen=True)
class Target:
    """What the tile choice needs to know about a GPU."""

    name: str
    sms: int  # streaming multiprocessors
    smem_per_block: int  # bytes one block may use (the opt-in maximum)


# H100/H200 SXM (sm_90) and A100 (sm_80): the limits Triton checks at first launch.
TARGETS: dict[str, Target] = {
    "sm_90": Target("sm_90", 132, 232_448),
    "sm_80": Target("sm_80", 108, 166_912),
}
_target: ContextVar[Target] = ContextVar("kernels_tuning_target", default=TARGETS["sm_90"])


@contextmanager
def targeting(target: Target) -> Iterator[None]:
    """Choose tiles for `target` when the launch device is not a CUDA device (AOT checks)."""
    token = _target.set(target)
    try:
        yield
    finally:
        _target.reset(token)


@functools.lru_cache(maxsize=16)
def _cuda_target(index: int) -> Target:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 0
    if not smem:  # older torch: Triton's driver knows the opt-in limit
        import triton

        smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Target(f"sm_{p.major}{p.minor}", p.multi_processor_count, int(smem))


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def target_of(device: torch.device) -> Target:
    """The GPU a launch on `device` runs on: queried for CUDA, else the `targeting` one."""
    return _cuda_target(_cuda_index(device)) if device.type == "cuda" else _target.get()


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape and launch parameters of one GEMM launch.

    split_k: programs sharing one output tile along K (fp32 partial sums reduced by the
    launcher); 1 for `moe_gate_up`, whose SiLU·mul epilogue needs the whole sum.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < MIN_DOT or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= {MIN_DOT} (tl.dot on GPUs)")
        if self.split_k < 1 or self.num_stages < 1 or self.num_warps < 1:
            raise ValueError(f"split_k, num_stages and num_warps must be >= 1: {self}")

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


def shared_bytes(cfg: BlockConfig, kind: str, bits: int, group: int, act_bytes: int) -> int:
    """Upper bound of the shared memory one program of `cfg` needs (bytes).

    Triton's pipeliner keeps `num_stages - 1` copies in flight of every global load of the K
    loop (activation tile, packed words, scale and zero rows), and the dequantized weight tile
    passes through shared memory once on its way to the tensor cores (the layout change to the
    dot operand), as does the activation tile at a single stage. gate‖up loads two weight
    tiles. `kernels.aot` checks this bound against the compiler's figure for every variant.
    """
    weights = 2 if kind == "moe_gate_up" else 1
    groups = max(1, cfg.block_k // group)
    per_stage = cfg.block_m * cfg.block_k * act_bytes + weights * cfg.block_n * (
        cfg.block_k * bits // 8 + groups * (2 + 1)  # packed codes; a scale and a zero per group
    )
    in_flight = max(1, cfg.num_stages - 1) * per_stage
    operands = (weights * cfg.block_n + cfg.block_m) * cfg.block_k * act_bytes
    epilogue = cfg.block_m * cfg.block_n * 4  # the accumulator's layout change before the store
    return in_flight + max(operands, epilogue)


def _fit(
    cfg: BlockConfig, kind: str, bits: int, group: int, act_bytes: int, limit: int
) -> BlockConfig:
    """`cfg` with fewer stages, then a shorter K tile, then a narrower N tile, until it fits
    in `limit` bytes."""
    while shared_bytes(cfg, kind, bits, group, act_bytes) > limit:
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_k > 32:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.block_n > 32:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        else:
            raise ValueError(f"no tile fits {limit} B of shared memory for {kind} W{bits}: {cfg}")
    return cfg


def _heavy(kind: str, bits: int) -> bool:
    """8-bit tiles, and 3-bit gate‖up (two tiles of two bit planes): the ones that spill at the
    K tile (decode) or warp count (prefill) the other widths use."""
    return bits == 8 or (bits == 3 and kind == "moe_gate_up")


def _decode_warps(kind: str, bits: int, cfg: BlockConfig) -> int:
    """Warps of a decode program: 8 when 4 would hold more than 64 unpacked codes per thread
    (3-bit counts its two planes; gate‖up its two tiles), as fewer spill on sm_90; never more
    than the tile's 8-column MMA slices (a [16, 16] tile uses 2)."""
    codes = (2 if kind == "moe_gate_up" else 1) * cfg.block_k * cfg.block_n
    planes = 1.5 if bits == 3 else 1.0
    return min(cfg.block_n // 8, 8 if codes * planes > 64 * 32 * 4 else 4)


def heuristic(
    kind: str,
    m: int,
    n: int,
    k: int,
    bits: int,
    group_size: int,
    act_dtype: torch.dtype = torch.float16,
    target: Target | None = None,
    batches: int = 1,
) -> BlockConfig:
    """Default tile for a GEMM of `m` rows (per expert for MoE) × `n` outputs × `k` inputs.

    `n` counts the grid's output columns (I for gate‖up, whose programs read a gate and an up
    tile); `batches` matrices share the grid (the active experts of an MoE launch).

    Decode (m ≤ DECODE_ROWS) is bound by reading weights. K tiles of 128 codes (64 at 8 bits
    and for 3-bit gate‖up) keep the unpacked tile small enough not to spill, with deeper
    pipelines at 2/3 bits, whose K steps carry fewer bytes. N tiles shrink to 32, then K
    splits (dense and down only), then N tiles go to 16, until the grid covers the SMs four
    times (four programs fit on an SM by registers) or a program would read fewer than
    MIN_PROGRAM_BYTES of codes. Prefill is bound by math: wider M and N tiles. Every choice is
    then fitted to the target's shared memory.
    Under the interpreter (where every program and loop iteration costs ~10 ms) tiles are as
    large as the shape allows. The AOT check (`python -m kernels.aot`) compiles what this
    returns for sm_90 and sm_80 and fails on spills or shared memory over the limit.
    """
    return _heuristic(kind, m, n, k, bits, group_size, act_dtype, target or _target.get(),
                      batches, interpreted())  # fmt: skip


@functools.lru_cache(maxsize=4096)  # the same few shapes every step: decide once
def _heuristic(
    kind: str,
    m: int,
    n: int,
    k: int,
    bits: int,
    group_size: int,
    act_dtype: torch.dtype,
    target: Target,
    batches: int,
    interpret: bool,
) -> BlockConfig:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if interpret:
        return BlockConfig(
            block_m=_pow2_at_least(m, hi=64),
            block_n=_pow2_at_least(n),
            block_k=_pow2_at_least(k, lo=32),
            num_warps=4,
            num_stages=1,
        )
    act_bytes = act_dtype.itemsize
    if m <= DECODE_ROWS:
        stages = 6 if bits <= 3 else 4  # fewer bytes per K step: more steps in flight
        cfg = BlockConfig(16, 64, 64 if _heavy(kind, bits) else 128, num_warps=4,
                          num_stages=stages)  # fmt: skip
        code_bytes = (2 if kind == "moe_gate_up" else 1) * batches * n * k * bits // 8

        def programs(c: BlockConfig) -> int:
            return batches * -(-n // c.block_n) * c.split_k

        def worth(c: BlockConfig) -> bool:  # enough programs yet, or each would read too little
            return programs(c) >= 4 * target.sms or code_bytes < MIN_PROGRAM_BYTES * programs(c)

        # Narrower N tiles down to 32 (128-byte rows of words), then K splits, then N = 16.
        # Splits write fp32 partials [split, m, n]: keep them under a quarter of the codes read.
        while not worth(cfg) and cfg.block_n > 32:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        while (kind != "moe_gate_up" and not worth(cfg) and k >= 2 * cfg.split_k * cfg.block_k
               and 2 * cfg.split_k * m * n * 4 * 4 <= code_bytes):  # fmt: skip
            cfg = replace(cfg, split_k=2 * cfg.split_k)
        if not worth(cfg):  # [16, 16] output tiles spill at 128-code K tiles on sm_80/90
            cfg = replace(cfg, block_n=MIN_DOT, block_k=min(cfg.block_k, 64))
        cfg = replace(cfg, num_warps=_decode_warps(kind, bits, cfg))
    else:
        warps = 8 if _heavy(kind, bits) else 4
        if m <= 64:
            cfg = BlockConfig(32, 64, 64, num_warps=warps, num_stages=4)
        else:
            wide = kind != "moe_gate_up"  # gate‖up holds two accumulators
            cfg = BlockConfig(64, 128 if wide else 64, 64, num_warps=warps, num_stages=3)
    return _fit(cfg, kind, bits, group_size, act_bytes, target.smem_per_block)


@functools.lru_cache(maxsize=8)
def _table(device_name: str) -> dict:
    path = CONFIG_DIR / (device_name.replace(" ", "_") + ".json")
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def choose(
    kind: str,
    m: int,
    n: int,
    k: int,
    bits: int,
    group_size: int,
    act_dtype: torch.dtype,
    device: torch.device,
    batches: int = 1,
) -> BlockConfig:
    """The config for a launch: the device table's entry when there is one (refused when it
    would not fit the device's shared memory), else `heuristic` for the device's target."""
    target = target_of(device)
    if device.type == "cuda" and not interpreted():
        entries = _table(_device_name(_cuda_index(device))).get(kind, {}).get(f"{bits}:{n}:{k}")
        if entries:
            ms = sorted(int(x) for x in entries)
            pick = next((x for x in ms if x >= m), ms[-1])
            cfg = BlockConfig(**entries[str(pick)])
            act_bytes = act_dtype.itemsize
            if shared_bytes(cfg, kind, bits, group_size, act_bytes) <= target.smem_per_block:
                return cfg
    return heuristic(kind, m, n, k, bits, group_size, act_dtype, target, batches)
