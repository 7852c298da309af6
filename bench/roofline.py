"""A static roofline of decode: the bytes each GEMM must read per call, and the time that takes.

    python bench/roofline.py [--no-write]

No GPU and no timing: arithmetic over Qwen3-VL-30B-A3B's shapes (`kernels.aot.MODELS`: 48
layers, H = 2048, 32 query and 4 KV heads of 128, E = 128 experts top-8 of I = 768) with
`kernels.layout.kernel_nbytes`
(codes + scales + zeros, group 128, asymmetric). At T tokens the MoE reads the experts that
receive at least one token, E·(1 − (1 − A/E)^T) in expectation under uniform routing; every
call also reads its activations and writes its output (16-bit). Time = bytes / copy bandwidth
at the figures measured on H100 (~3.0 TB/s) and H200 (~4.3 TB/s). A floor, not a measurement:
a kernel at 100 % of copy bandwidth would take exactly this long. `bench/kernels.py` measures
the real thing on a GPU and reports the fraction of copy bandwidth reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, today, write_section  # noqa: E402

# bench/ would shadow the `kernels` package with bench/kernels.py: import it from the repo.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.aot import MODELS  # noqa: E402
from kernels.layout import kernel_nbytes  # noqa: E402

MODEL = next(m for m in MODELS if m.name == "Qwen3-VL-30B-A3B")
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}
GEMMS = {  # name: (N, K)
    **{name: (n, k) for name, n, k in MODEL.dense},
    "moe gate‖up": (2 * MODEL.intermediate, MODEL.hidden),
    "moe down": (MODEL.hidden, MODEL.intermediate),
}


def active_experts(t: int) -> float:
    e = MODEL.experts
    return e * (1 - (1 - MODEL.top_k / e) ** t)


def weight_bytes(n: int, k: int, bits: int) -> int:
    return n * k * 2 if bits == 16 else kernel_nbytes(n, k, bits, 128, symmetric=False)


def call_bytes(gemm: str, t: int, bits: int) -> float:
    n, k = GEMMS[gemm]
    if gemm.startswith("moe"):
        # gate‖up reads x once per pick and writes I per pick; down the reverse.
        picks = t * MODEL.top_k
        io = 2 * picks * (k + (n // 2 if "gate" in gemm else n))
        return active_experts(t) * weight_bytes(n, k, bits) + io
    return weight_bytes(n, k, bits) + 2 * t * (n + k)


def rows(tokens: list[int], widths: list[int]) -> list[list[str]]:
    """One row per (T, GEMM); per width: MB per call, then µs at each bandwidth."""
    out = []
    for t in tokens:
        for gemm in [*GEMMS, f"whole model ({MODEL.layers} layers)"]:
            cells = []
            for bits in widths:
                if gemm in GEMMS:
                    b = call_bytes(gemm, t, bits)
                else:
                    b = MODEL.layers * sum(call_bytes(g, t, bits) for g in GEMMS)
                cells.append(f"{b / 1e6:.2f} · " + " · ".join(
                    f"{b / bw * 1e6:.1f}" for bw in BANDWIDTH.values()))  # fmt: skip
            out.append([str(t), gemm, *cells])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    ap.add_argument("--tokens", default="1,4,16")
    args = ap.parse_args(argv)
    tokens = [int(v) for v in args.tokens.split(",")]
    widths = [16, 8, 4, 3, 2]
    table = markdown_table(
        ["T", "GEMM", *("bf16" if b == 16 else f"W{b}" for b in widths)],
        rows(tokens, widths),
    )
    text = "\n".join([
        f"## Decode roofline, Qwen3-VL-30B-A3B (`bench/roofline.py`, {today()})", "",
        "**A floor computed from shapes, not a measurement**: bytes each call must move "
        "(weights of the experts that receive a token, in expectation under uniform routing, "
        "+ activations in and out), divided by copy bandwidth (H100 ~3.0 TB/s, H200 ~4.3 TB/s). "
        "Group 128, asymmetric (codes + 16-bit scales + 8-bit zeros as the kernels store them). "
        "Each cell: **MB per call · µs floor on H100 · µs floor on H200**. The ratio of two "
        "cells is the most a W-bit kernel can gain over a bf16 one reading at the same "
        "fraction of bandwidth.", "", table,
    ])  # fmt: skip
    print(text)
    if not args.no_write:
        write_section("roofline", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
