"""The full ahead-of-time compile matrix of the kernels, per Triton version, into BENCHMARKS.md.

    python bench/aot.py                                   # this venv's triton
    python bench/aot.py --python /tmp/t36/bin/python      # also another triton (a throwaway venv)
    python bench/aot.py --json a.json --label "3.9, commit abc"   # publish a finished run

Runs `python -m kernels.aot --full` (every bits × group × symmetry × dtype × heuristic tile at
Qwen3-VL-30B-A3B and Kimi-VL-A3B shapes, for sm_90 and sm_80; no GPU needed) with each
interpreter given, or reads finished runs' `--json` reports, and writes their summary tables
(variants, failures, over the shared-memory limit, shared memory and register ranges, spills,
MMA family, fewest programs per regime) as the `aot` section. `make test` runs the smaller CI
matrix of the same check; this is the whole of it (~3,300 compiles, ~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from _report import today, write_section  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))
from kernels.aot import markdown  # noqa: E402


def run_full(python: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        # Exit 1 means problems were found: still a result to publish.
        res = subprocess.run([python, "-m", "kernels.aot", "--full", "--json", str(out)],
                             cwd=REPO, env=env)  # fmt: skip
        if not out.exists():
            raise SystemExit(f"bench/aot.py: {python} -m kernels.aot failed ({res.returncode})")
        return json.loads(out.read_text())


def problems(report: dict) -> int:
    return sum(r["failed"] + r["over_smem"] for r in report["summary"]) + sum(
        1 for v in report["variants"] if v["decode"] and v["spill_bytes"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--python", action="append", default=[], help="interpreter to run it with")
    ap.add_argument("--json", action="append", default=[], type=Path, help="a finished report")
    ap.add_argument("--label", action="append", default=[], help="heading of each --json")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    args = ap.parse_args(argv)
    runs: list[tuple[str, dict]] = []
    for i, path in enumerate(args.json):
        report = json.loads(path.read_text())
        label = args.label[i] if i < len(args.label) else f"triton {report['triton']}"
        runs.append((label, report))
    for py in args.python or ([] if args.json else [sys.executable]):
        report = run_full(py)
        runs.append((f"triton {report['triton']}", report))
    parts = [f"## Ahead-of-time compilation (`bench/aot.py`, {today()})", "",
             "Every variant the launchers produce (`python -m kernels.aot --full`), compiled for "
             "sm_90 and sm_80 on a CPU. Decode = at most 16 rows per expert (MoE) or matrix "
             "(dense). A variant fails when it does not compile, needs more shared memory than "
             "the block limit, or spills on the decode path."]  # fmt: skip
    for label, report in runs:
        n = len(report["variants"])
        parts += ["", f"### {label}: {n} distinct compiles, {problems(report)} problems", "",
                  markdown(report["summary"], report["triton"])]  # fmt: skip
    text = "\n".join(parts)
    print(text)
    if not args.no_write:
        write_section("aot", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
