"""The engine's own decode throughput, in-process: tokens/s at batch 1/4/16/64.

    python bench/decode.py [--batches 1,4,16,64] [--tokens 64] [--bits 16,4] [--repeats 3]
                           [--tree DIR --label NAME] [--threads 2] [--no-write]

`B` requests (24-token text prompts, greedy, `ignore_eos`, `--tokens` each) are submitted to
one `server.engine.Engine` at once, with no HTTP in between; *decode tok/s* counts the tokens
produced after the last row's first token, over the time from that token to the last one, so
prefill is left out. The best of `--repeats` runs is kept (this machine is shared). `--tree`
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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
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

    if bits == 16:
        return load_model(MINI, torch.device("cpu")), load_processor(MINI)
    q = veq.quantize(str(MINI), bits=bits, method="rtn", device="cpu", progress=False)
    return veq.load(q.path, device="cpu")


def _engine(runner, batch: int) -> Engine:
    """An engine with room for `batch` rows; the KV knobs only where the engine has them."""
    kwargs = {"max_batch": batch, "max_queue": batch + 1}
    accepted = inspect.signature(Engine.__init__).parameters
    if "max_model_len" in accepted:
        kwargs["max_model_len"] = 256
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
    torch.set_num_threads(ARGS.threads)
    batches = [int(b) for b in ARGS.batches.split(",")]
    measured: dict[str, float] = {}
    for bits in (int(b) for b in ARGS.bits.split(",")):
        model, processor = _load(bits)
        runner = ModelRunner(model, processor, ModelInfo("mini", "rtn", bits, 128, 0))
        for batch in batches:
            best = 0.0
            for _ in range(ARGS.repeats):
                engine = _engine(runner, batch)
                engine.start()
                try:
                    best = max(best, asyncio.run(_run(engine, processor, batch, ARGS.tokens)))
                finally:
                    engine.stop()
            measured[f"W{bits} B{batch}"] = best
            print(f"{ARGS.label}: W{bits} batch {batch:3d}: {best:8.1f} decode tok/s", flush=True)

    if ARGS.no_write:
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[ARGS.label] = {"date": today(), "tokens/s": measured}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    labels = list(results)
    keys = sorted({k for r in results.values() for k in r["tokens/s"]}, key=_order)
    rows = [[k, *(_cell(results[label]["tokens/s"].get(k)) for label in labels)] for k in keys]
    if len(labels) >= 2:
        first, last = labels[0], labels[-1]
        for row, key in zip(rows, keys, strict=True):
            a, b = results[first]["tokens/s"].get(key), results[last]["tokens/s"].get(key)
            row.append(f"{b / a:.2f}×" if a and b else "–")
    header = ["weights, batch", *(f"{label} ({results[label]['date']})" for label in labels)]
    if len(labels) >= 2:
        header.append(f"{labels[-1]} ÷ {labels[0]}")
    table = markdown_table(header, rows)
    print(table)
    body = (
        f"## Engine decode throughput in-process (`bench/decode.py`, {today()})\n\n"
        f"**{device_name('cpu')}**, {ARGS.threads} threads, the bundled `mini` (16-bit, and RTN "
        f"W4 from each checkout's own `veq.quantize`): B requests of 24-token text prompts decode "
        f"{ARGS.tokens} greedy `ignore_eos` tokens together in one engine, no HTTP; decode "
        f"tokens/s after the last row's first token, best of {ARGS.repeats}. Columns are "
        "checkouts, measured one after another on this machine "
        "(`python bench/decode.py --tree DIR --label NAME`).\n\n"
        f"{table}\n"
    )
    write_section("decode", body)
    print("wrote BENCHMARKS.md")


def _order(key: str) -> tuple[int, int]:
    bits, batch = key.split()
    return (-int(bits[1:]), int(batch[1:]))


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
