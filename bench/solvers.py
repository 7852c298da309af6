"""Solver cost on Qwen3-VL-30B-A3B shapes, and solver quality on synthetic layers.

    python bench/solvers.py [--tokens 1024] [--devices cpu,cuda] [--no-write]

Part 1 times each solver on one expert's gate_up [1536, 2048] and down [2048, 768] and one
attention projection [4096, 2048] (random weights, correlated synthetic inputs), on the CPU
always and on CUDA when present, and extrapolates the full-model calibration time:
48 layers × (128 experts × (gate_up + down) + attention), attention ≈ 2.25 × the [4096, 2048]
projection (q 8M + k 1M + v 1M + o 8M parameters = 2.25 × 8M). Statistic accumulation is timed
separately (the Hessian of T tokens); forward passes of the model are not included.

Part 2 is the error table of the solver tests (bits 4, 3, 2), so the numbers quoted for the
mathematics come from committed code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import device_name, markdown_table, timeit, today, write_section  # noqa: E402

from veq.algorithms import (  # noqa: E402
    awq,
    gptq,
    ma_token_weights,
    mbq,
    rtn,
    veq_ma,
    veq_me,
)
from veq.config import QuantConfig  # noqa: E402
from veq.experts import ExpertWeights  # noqa: E402
from veq.stats import HessianAccumulator  # noqa: E402
from veq.testing import correlated_inputs, random_weight, two_populations  # noqa: E402
from veq.tokens import TokenKind  # noqa: E402

SHAPES = {"gate_up": (1536, 2048), "down": (2048, 768), "attn": (4096, 2048)}
LAYERS, EXPERTS, ATTN_FACTOR = 48, 128, 2.25
ME_EXPERTS = 8  # VEQ-ME's shared search is per layer; time it over 8 experts, report per expert


def _hessian(x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1], device=x.device)
    acc.add(x, c)
    return acc.hessian()


def _time_shape(device: str, n: int, k: int, tokens: int, cfg: QuantConfig) -> dict[str, float]:
    w = random_weight(n, k, seed=0).to(device)
    x = correlated_inputs(tokens, k, seed=1).to(device)
    kinds = torch.full((tokens,), int(TokenKind.VISION), device=device)
    kinds[::4] = TokenKind.ANSWER
    is_text = kinds != TokenKind.VISION
    h = _hessian(x)
    runs = {
        "hessian (stats)": lambda: _hessian(x),
        "rtn": lambda: rtn(w, cfg),
        "gptq": lambda: gptq(w, h, cfg),
        "gptq act-order": lambda: gptq(w, h, cfg, act_order=True),
        "awq (+clip)": lambda: awq([w], x, cfg),
        "mbq (+clip)": lambda: mbq([w], x, kinds, cfg, vision_weight=0.1),
        "veq-ma": lambda: veq_ma(w, x, is_text, cfg, gamma=20.0),
    }
    out = {}
    for name, fn in runs.items():
        out[name] = timeit(fn, device)
        print(f"  {device} [{n}, {k}] {name:16s} {out[name]:8.3f} s", flush=True)
    return out


def time_solvers(device: str, tokens: int) -> dict[str, dict[str, float]]:
    """Seconds per solver per shape: {solver: {shape: s}}."""
    cfg = QuantConfig(bits=4, group_size=128)
    out: dict[str, dict[str, float]] = {}
    for shape, (n, k) in SHAPES.items():
        for name, t in _time_shape(device, n, k, tokens, cfg).items():
            out.setdefault(name, {})[shape] = t
    # VEQ-ME: one shared gate/up search across ME_EXPERTS experts, amortised per expert.
    i, hid = SHAPES["down"][1], SHAPES["gate_up"][1]
    experts = [
        ExpertWeights(
            random_weight(i, hid, seed=3 * e).to(device),
            random_weight(i, hid, seed=3 * e + 1).to(device),
            random_weight(hid, i, seed=3 * e + 2).to(device),
        )
        for e in range(ME_EXPERTS)
    ]
    xs = [correlated_inputs(tokens, hid, seed=10 + e).to(device) for e in range(ME_EXPERTS)]
    imp = torch.linspace(1.0, 4.0, ME_EXPERTS)
    t = timeit(lambda: veq_me(experts, xs, imp, cfg), device) / ME_EXPERTS
    out["veq-me (+clip)"] = {**out["awq (+clip)"], "gate_up": t}
    print(f"  {device} gate_up  veq-me per expert {t:8.3f} s", flush=True)
    return out


def full_model_hours(times: dict[str, float], hessian: dict[str, float], needs_h: bool) -> float:
    per = {s: times[s] + (hessian[s] if needs_h else 0.0) for s in SHAPES}
    layer = EXPERTS * (per["gate_up"] + per["down"]) + ATTN_FACTOR * per["attn"]
    return LAYERS * layer / 3600


def error_tables() -> tuple[str, str]:
    """Relative output error ‖(W − Ŵ)X‖/‖WX‖ on the setups of tests/veq/algorithms."""
    n, k = 96, 256
    w = random_weight(n, k, seed=0)
    x = correlated_inputs(2048, k, seed=1)
    xo = correlated_inputs(1024, k, seed=1, outliers=4)
    xp, is_text = two_populations(k, seed=11)
    c = ma_token_weights(is_text, 20.0)

    def err(w_hat: torch.Tensor, xs: torch.Tensor, cw: torch.Tensor | None = None) -> float:
        d = (xs @ (w - w_hat).T).pow(2).sum(-1)
        ref = (xs @ w.T).pow(2).sum(-1)
        if cw is not None:
            d, ref = d * cw, ref * cw
        return float((d.sum() / ref.sum()).sqrt())

    rows_a, rows_b = [], []
    for bits in (4, 3, 2):
        cfg = QuantConfig(bits=bits)
        h = _hessian(x)
        rows_a.append(
            [
                f"W{bits} g128",
                f"{err(rtn(w, cfg).dequantize(), x):.4f}",
                f"{err(gptq(w, h, cfg).dequantize(), x):.4f}",
                f"{err(gptq(w, h, cfg, act_order=True).dequantize(), x):.4f}",
                f"{err(rtn(w, cfg).dequantize(), xo):.4f}",
                f"{err(awq([w], xo, cfg).effective_weight(), xo):.4f}",
            ]
        )
        plain = gptq(w, _hessian(xp.double()).float(), cfg).dequantize()
        ma = veq_ma(w, xp, is_text, cfg, gamma=20.0).dequantize()
        r = rtn(w, cfg).dequantize()
        rows_b.append(
            [f"W{bits} g128"]
            + [f"{err(m, xp, c):.4f}" for m in (r, plain, ma)]
            + [f"{err(m, xp[is_text]):.4f}" for m in (r, plain, ma)]
        )
    table_a = markdown_table(
        ["bits", "RTN", "GPTQ", "GPTQ act-order", "RTN (4 outlier ch.)", "AWQ (4 outlier ch.)"],
        rows_a,
    )
    table_b = markdown_table(
        [
            "bits",
            "weighted: RTN",
            "weighted: GPTQ",
            "weighted: VEQ-MA",
            "text: RTN",
            "text: GPTQ",
            "text: VEQ-MA",
        ],
        rows_b,
    )
    return table_a, table_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens per weight")
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda skipped if absent")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    args = ap.parse_args()

    sections = []
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("CUDA not available: CPU only")
            continue
        print(f"timing solvers on {device_name(device)}")
        times = time_solvers(device, args.tokens)
        hessian = times["hessian (stats)"]
        rows = []
        for name, per in times.items():
            needs_h = name in ("gptq", "gptq act-order")
            est = (
                ""
                if name == "hessian (stats)"
                else f"{full_model_hours(per, hessian, needs_h):.1f}"
            )
            rows.append([name] + [f"{per[s]:.3f}" for s in SHAPES] + [est])
        table = markdown_table(
            [
                "solver (W4 g128)",
                "gate_up [1536, 2048] s",
                "down [2048, 768] s",
                "attn [4096, 2048] s",
                "full model est. h",
            ],
            rows,
        )
        sections.append(
            f"**{device_name(device)}**, {args.tokens} calibration tokens per weight\n\n{table}"
        )
        print(table)

    table_a, table_b = error_tables()
    print(table_a, table_b, sep="\n\n")
    body = (
        f"## Solvers (`bench/solvers.py`, {today()})\n\n"
        "Time per weight for one Qwen3-VL-30B-A3B expert and attention projection, and the "
        "full-model estimate 48 × (128 × (gate_up + down) + 2.25 × attn), solver time only "
        "(GPTQ rows include accumulating the Hessian; VEQ-MA accumulates its weighted one itself; "
        "VEQ-ME is one shared search over 8 experts, per expert, with AWQ for down and attention). "
        "Forward passes through the model are extra.\n\n"
        + "\n\n".join(sections)
        + "\n\nRelative output error ‖(W − Ŵ)X‖/‖WX‖ on the synthetic layers of the solver tests "
        "([96, 256] weight, correlated inputs; AWQ columns with 4 outlier channels):\n\n"
        + table_a
        + "\n\nTwo token populations (3000 'vision' tokens weight 1, 200 'text' tokens of another "
        "distribution weight γ = 20): error weighted by c_j, and on the text tokens alone:\n\n"
        + table_b
        + "\n"
    )
    if not args.no_write:
        write_section("solvers", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
