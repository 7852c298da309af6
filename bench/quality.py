"""The quality table: every method at W4/W3/W2 (g128 and g64) and mixed precision, on `mini`.

    python bench/quality.py [--model mini] [--methods rtn,awq,...] [--bits 4,3,2]
                            [--groups 128,64] [--mixed 2.5,3] [--mixed-methods veq]
                            [--codes default|sym,asym] [--calib-seeds 0,1,2] [--samples 600]
                            [--jobs 2] [--section quality|symmetric|levers] [--no-write]
                            [--variants "gptq;veq:tau=1,lam=1;veq"]

Each setting is quantized through `veq.api.quantize` (cached under `--cache-dir`) once per
calibration seed and scored on the same held-out questions against the 16-bit model
(`veq.reference.quality`). RTN uses no calibration data, so it runs once. Rows report the mean
and the spread (min–max) over seeds of exact-match accuracy and KL to the 16-bit model, the
worst family, answer NLL and the bytes of the quantized linears. All rows go to
`bench/results/quality.json`; the table goes to BENCHMARKS.md (section `quality`).
`--jobs N` splits the settings over N processes (one torch thread each). `--codes sym,asym` runs
every setting with symmetric and with asymmetric codes (`default`: each width's default);
`--section symmetric` writes that comparison to its own section. `--variants` replaces
`--methods` with methods carrying further recipe fields (`method:field=value,...`, e.g.
`veq:tau=1,lam=1`, the paper's ME+MA without veq's own changes), for the lever comparison
(`--section levers`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# The repository first: bench/kernels.py would otherwise shadow the `kernels` package.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _report import device_name, markdown_table, today, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"

_run: Any = None  # the worker process's QualityRun


def _init(options: dict[str, Any]) -> None:
    import torch

    from veq.reference.quality import QualityRun

    torch.set_num_threads(1)
    global _run
    _run = QualityRun(**options)


def _evaluate(job: tuple[Any, int]) -> dict[str, Any]:
    setting, seed = job
    return _run.evaluate(setting, seed).as_dict()


def _base() -> dict[str, Any]:
    return _run.base_row().as_dict()


def _spread(values: list[float], scale: float = 1.0, spec: str = ".1f") -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:{spec}}"
    lo, hi = min(values) * scale, max(values) * scale
    return f"{mean:{spec}} ({lo:{spec}}–{hi:{spec}})"


def parse_variant(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """`veq:tau=1,act_order=false` → ("veq", (("tau", 1.0), ("act_order", False)))."""
    method, _, rest = text.partition(":")
    options = []
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, str):
            try:
                parsed = float(value)
            except ValueError:
                pass
        options.append((key.strip(), parsed))
    return method.strip(), tuple(options)


def _name(method: str, options: dict[str, Any]) -> str:
    if not options:
        return method
    shown = (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())
    return f"{method} ({', '.join(shown)})"


def summarize(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One table row per (method and options, bits, group, mixed): means and min–max over
    seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        options = json.dumps(r.get("options", {}), sort_keys=True)
        key = (r["method"], options, r["bits"], r["group_size"], r["mixed_precision"])
        groups.setdefault(key + (r["symmetric"],), []).append(r)
    out = []
    for (method, options, bits, group, mixed, symmetric), rs in groups.items():
        method = _name(method, json.loads(options))
        acc = [r["accuracy"] for r in rs]
        fams = rs[0]["per_family"]
        worst = min(fams, key=lambda f: statistics.fmean(r["per_family"][f] for r in rs))
        worst_acc = statistics.fmean(r["per_family"][worst] for r in rs)
        out.append(
            [
                method,
                f"mp{bits:g}" if mixed else f"{bits:g}",
                str(group) if group else "-",
                {None: "default", True: "sym", False: "asym"}[symmetric],
                str(len(rs)),
                _spread(acc, 100),
                f"{worst} {100 * worst_acc:.1f}",
                f"{statistics.fmean(r['answer_nll'] for r in rs):.4f}",
                _spread([r["kl"] for r in rs], 1, ".2g"),  # 4e-05 at W4 to 0.02 at W2
                _spread([r["top1_agreement"] for r in rs], 100),
                f"{statistics.fmean(r['flips_lost'] for r in rs):.1f} / "
                f"{statistics.fmean(r['flips_gained'] for r in rs):.1f}",
                f"{rs[0]['weight_bytes'] / 2**20:.3f}",
            ]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--methods", default="rtn,awq,gptq,mbq,veq-me,veq-ma,veq")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--groups", default="128,64")
    ap.add_argument("--mixed", default="2.5,3", help="mixed-precision averages ('' for none)")
    ap.add_argument("--mixed-methods", default="veq")
    ap.add_argument("--calib-seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=600, help="held-out questions")
    ap.add_argument("--seed", type=int, default=1000, help="held-out offset")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/veq-bench-quality"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--codes", default="default", help="comma list of default, sym, asym")
    ap.add_argument("--section", choices=("quality", "symmetric", "levers"), default="quality")
    ap.add_argument("--variants", default=None, help="';'-separated method:field=value,...")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from veq.reference.quality import Setting

    seeds = [int(s) for s in args.calib_seeds.split(",")]
    groups = [None if g == "channel" else int(g) for g in args.groups.split(",")]
    codes = [{"default": None, "sym": True, "asym": False}[c] for c in args.codes.split(",")]
    variants = (
        [parse_variant(v) for v in args.variants.split(";")]
        if args.variants
        else [(m, ()) for m in args.methods.split(",")]
    )
    settings = [
        Setting(m, int(b), g, symmetric=c, options=o)
        for c in codes
        for g in groups
        for b in args.bits.split(",")
        for m, o in variants
    ]
    mixed = [float(a) for a in args.mixed.split(",") if a]
    mixed_methods = args.mixed_methods.split(",")
    settings += [
        Setting(m, a, groups[0], True, c) for c in codes for a in mixed for m in mixed_methods
    ]
    jobs = [(s, c) for s in settings for c in (seeds[:1] if s.method == "rtn" else seeds)]
    options = {
        "model": args.model,
        "samples": args.samples,
        "seed": args.seed,
        "calib_samples": args.calib_samples,
        "cache_dir": args.cache_dir,
        "device": "cpu",
    }
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(options,)) as pool:
        for i, row in enumerate(pool.map(_evaluate, jobs), 1):
            rows.append(row)
            print(
                f"[{i}/{len(jobs)} {time.perf_counter() - t0:6.0f} s] "
                f"{_name(row['method'], row['options'])} "
                f"{'mp' if row['mixed_precision'] else 'w'}{row['bits']:g} g{row['group_size']} "
                f"{ {None: '', True: 'sym ', False: 'asym '}[row['symmetric']] }"
                f"calib {row['calib_seed']}: acc {100 * row['accuracy']:.1f} kl {row['kl']:.4f}",
                flush=True,
            )
        base = pool.submit(_base).result()
    rows.insert(0, base)

    header = ["method", "bits", "group", "codes", "seeds", "accuracy %", "worst family %"]
    header += ["answer NLL"]
    header += ["KL to 16-bit", "same top-1 %", "flips lost / gained", "quantized MiB"]
    table = markdown_table(header, summarize(rows))
    print(table)
    fam = ", ".join(f"{k} {100 * v:.1f}" for k, v in base["per_family"].items())
    title = {
        "quality": "Quality on the reference model",
        "symmetric": "Symmetric codes against zero points on the reference model",
        "levers": "Quality levers of `veq` on the reference model",
    }[args.section]
    body = (
        f"## {title} (`bench/quality.py --section {args.section}`, {today()})\n\n"
        f"**{device_name('cpu')}**, model `{args.model}`, {args.samples} held-out questions "
        f"(offset {args.seed}), calibration: the `shapes` source, {args.calib_samples} samples, "
        f"seeds {args.calib_seeds} (RTN uses none: one run). Accuracy and KL are the mean and, in "
        "brackets, the min–max over seeds; KL(16-bit ‖ quantized) is per answer position in nats; "
        "'quantized MiB' counts the quantized linears only (codes + scales + zero points). "
        f"16-bit: {100 * base['accuracy']:.1f} % ({fam}); its linears take "
        f"{base['weight_bytes'] / 2**20:.3f} MiB. {len(jobs)} quantizations in "
        f"{(time.perf_counter() - t0) / 60:.0f} min with {args.jobs} processes (quantizations "
        f"found in the cache are not redone). Command: `python bench/quality.py "
        f"{' '.join(sys.argv[1:])}`.\n\n{table}\n"
    )
    if not args.no_write:
        results = RESULTS.with_name(f"{args.section}.json")
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps(rows, indent=1) + "\n")
        write_section(args.section, body)
        print("wrote BENCHMARKS.md and", results)


if __name__ == "__main__":
    main()
