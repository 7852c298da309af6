"""The engine's own decode throughput, in-process: tokens/s at batch 1/4/16/64.

    python bench/decode.py [--batches 1,4,16,64] [--tokens 64] [--bits 16,4] [--repeats 3]
                           [--modes dynamic,fixed,graphs] [--device cpu|cuda]
                           [--tree DIR --label NAME] [--threads 2] [--no-write]

`B` requests (24-token text prompts, greedy, `ignore_eos`, `--tokens` each) are submitted to
one `server.engine.Engine` at once, with no HTTP in between; *decode tok/s* counts the tokens
produced after the last row's first token, over the time from that token to the last one, so
prefill is left out. The best of `--repeats` runs is kept (this machine is shared). `--modes`
compares decode paths in one run: `dynamic` (the default engine), `fixed` (fixed-shape steps,
run eagerly) and `graphs` (`--cuda-graphs`, CUDA only; the GPU check runs it). `--tree`
imports `server` and `veq` from another checkout (a `git worktree` of an older commit) so that
one script measures the engine before and after a change on the same machine; the bundled
model is loaded from `veq/reference/mini` of this checkout either way. Results accumulate in
`bench/results/decode.json` by label, and the BENCHMARKS.md section `decode` shows every label
side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "decode.json"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--bits", default="16,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", default=None, help="import the engine from this checkout")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--modes", default="dynamic", help="dynamic, fixed, graphs")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the BENCHMARKS section")
    return ap.parse_args()


ARGS = _args()
# The engine under test first; this directory for `_report` (bench/kernels.py would otherwise
# shadow the `kernels` package, so the tree goes in front of it).
sys.path[:0] = [str(Path(ARGS.tree).resolve() if ARGS.tree else ROOT), str(HERE)]

import torch  # noqa: E402
from _report import device_name, markdown_table, today, write_section  # noqa: E402

from server.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from server.engine.runner import ModelInfo, ModelRunner  # noqa: E402

MINI = ROOT / "veq" / "reference" / "mini"


def _load(bits: int):
    import veq
    from veq.api import load_model, load_processor

    device = torch.device(ARGS.device)
    if bits == 16:
        return load_model(MINI, device), load_processor(MINI)
    q = veq.quantize(str(MINI), bits=bits, method="rtn", device=ARGS.device, progress=False)
    return veq.load(q.path, device=ARGS.device)


MODES = {"dynamic": {}, "fixed": {"fixed_shapes": True}, "graphs": {"cuda_graphs": True}}


def _engine(runner, batch: int, mode: str) -> Engine:
    """An engine with room for `batch` rows; the KV knobs only where the engine has them."""
    kwargs = {"max_batch": batch, "max_queue": batch + 1, **MODES[mode]}
    accepted = inspect.signature(Engine.__init__).parameters
    if "max_model_len" in accepted:
        kwargs["max_model_len"] = 256
    missing = [k for k in MODES[mode] if k not in accepted]
    if missing:
        raise SystemExit(f"this engine has no {', '.join(missing)} (mode {mode})")
    return Engine(runner, **kwargs)


async def _run(engine: Engine, processor, batch: int, tokens: int) -> float:
    stamps: list[list[float]] = [[] for _ in range(batch)]

    async def one(i: int) -> None:
        text = " ".join(
            ["what", "colour", "is", "the", "circle", "left"][(i + j) % 6] for j in range(20)
        )
        ids = torch.tensor([processor.tokenizer(text, add_special_tokens=False)["input_ids"][:24]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        async for event in engine.generate(GenerationRequest(inputs, params)):
            stamps[i].extend([time.perf_counter()] * len(event.token_ids))

    await asyncio.gather(*(one(i) for i in range(batch)))
    joined = max(s[0] for s in stamps)
    after = sum(1 for s in stamps for t in s if t > joined)
    return after / (max(s[-1] for s in stamps) - joined)


def main() -> None:
    if ARGS.render:
        write_section("decode", render(json.loads(RESULTS.read_text())))
        return
    torch.set_num_threads(ARGS.threads)
    batches = [int(b) for b in ARGS.batches.split(",")]
    modes = ARGS.modes.split(",")
    measured: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    for bits in (int(b) for b in ARGS.bits.split(",")):
        # Loading and quantizing run OpenMP teams; on a short-lived thread they end with it
        # instead of slowing the engine thread down (docs/design.md §7).
        with ThreadPoolExecutor(1) as setup:
            model, processor = setup.submit(_load, bits).result()
        runner = ModelRunner(model, processor, ModelInfo("mini", "rtn", bits, 128, 0))
        for batch in batches:
            for mode in modes:  # side by side, so that the machine's drift hits them alike
                best = 0.0
                for _ in range(ARGS.repeats):
                    engine = _engine(runner, batch, mode)
                    engine.start()
                    try:
                        best = max(best, asyncio.run(_run(engine, processor, batch, ARGS.tokens)))
                    finally:
                        engine.stop()
                measured[mode][f"W{bits} B{batch}"] = best
                print(
                    f"{_label(mode)}: W{bits} batch {batch:3d}: {best:8.1f} decode tok/s",
                    flush=True,
                )

    if ARGS.no_write:
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for mode in modes:
        results[_label(mode)] = {
            "date": today(),
            "device": device_name(ARGS.device),
            "tokens/s": measured[mode],
        }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    write_section("decode", render(results))


def render(results: dict[str, dict]) -> str:
    """The section: one column per label, then each later label ÷ the first."""
    labels = list(results)
    keys = sorted({k for r in results.values() for k in r["tokens/s"]}, key=_order)
    header = ["weights, batch"]
    header += [f"{label} ({r['date']}, {r.get('device', '?')})" for label, r in results.items()]
    header += [f"{label} ÷ {labels[0]}" for label in labels[1:]]
    rows = []
    for key in keys:
        values = [results[label]["tokens/s"].get(key) for label in labels]
        ratios = [_ratio(v, values[0]) for v in values[1:]]
        rows.append([key, *(_cell(v) for v in values), *ratios])
    table = markdown_table(header, rows)
    print(table)
    return (
        f"## Engine decode throughput in-process (`bench/decode.py`, {today()})\n\n"
        f"{ARGS.threads} threads, the bundled `mini` (16-bit, "
        "and RTN W4 from each checkout's own `veq.quantize`): B requests of 24-token text "
        f"prompts decode {ARGS.tokens} greedy `ignore_eos` tokens together in one engine, no "
        f"HTTP; decode tokens/s after the last row's first token, best of {ARGS.repeats}. "
        "Columns are checkouts (and decode modes), measured one after another on this machine "
        "(`python bench/decode.py --tree DIR --label NAME`; `--render` rewrites this section "
        "from `bench/results/decode.json`). *fixed*: the fixed-shape step CUDA graphs capture, "
        "run eagerly (padding rows and full gathers: the CPU pays for them, a GPU replays them "
        "as one launch).\n\n"
        f"{table}\n"
    )


def _label(mode: str) -> str:
    suffix = "" if mode == "dynamic" else f", {mode}"
    return f"{ARGS.label}{suffix}" + ("" if ARGS.device == "cpu" else f", {ARGS.device}")


def _order(key: str) -> tuple[int, int]:
    bits, batch = key.split()
    return (-int(bits[1:]), int(batch[1:]))


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value and base else "–"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
