"""Decode stalls while long prompts arrive, with and without chunked prefill.

    python bench/prefill_stall.py [--streams 4] [--long 4] [--prompt-tokens 3750]
                                  [--step-tokens none,256,512] [--bits 4] [--no-write]

The bundled model (`veq quantize` defaults, from the cache) runs in the engine on this machine.
`--streams` requests decode `ignore_eos` answers; once each has produced 16 tokens, `--long`
prompts of `--prompt-tokens` tokens arrive at once. Over the window from their arrival until the
last of them has its first token, every gap between two tokens of a decoding stream is recorded:
the table gives their median and the largest, against the median gap of steady decoding before
the prompts arrived (the target: the largest within 5× of it), for each `--step-tokens` setting
(`none`: each prompt prefilled whole at admission; N: prompts longer than N prefilled N positions
a step, between decode steps), side by side in one run. Writes BENCHMARKS.md section
`prefill-stall`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The repository first: bench/kernels.py would otherwise shadow the `kernels` package.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from _report import device_name, markdown_table, today, write_section  # noqa: E402

from server.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from server.engine.engine import EngineObserver  # noqa: E402
from server.engine.runner import ModelInfo, ModelRunner  # noqa: E402


def _prompt(processor, tokens: int, seed: int) -> dict:
    """A text prompt of exactly `tokens` ids (random byte-level text, then the chat frame)."""
    gen = torch.Generator().manual_seed(seed)
    words = ["shape", "circle", "red", "square", "blue", "count", "the", "left", "green"]
    idx = torch.randint(len(words), (tokens,), generator=gen).tolist()
    text = " ".join(words[i] for i in idx)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


async def _scenario(engine: Engine, processor, args, engine_gaps: list[float]) -> dict[str, float]:
    stamps: list[list[float]] = [[] for _ in range(args.streams)]
    arrived: dict[str, float] = {}

    async def stream(i: int) -> None:
        inputs = _prompt(processor, 24, 100 + i)
        params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
        async for event in engine.generate(GenerationRequest(inputs, params)):
            if event.token_ids:
                stamps[i].append(time.perf_counter())
            if "done" in arrived:
                break

    # Tokenized before the clock, as the load generator encodes its bodies: tokenizing 3,750
    # tokens on this event loop would hold up the streams' timestamps, not the engine.
    long_inputs = [_prompt(processor, args.prompt_tokens, j) for j in range(args.long)]

    async def long_prompt(j: int) -> None:
        inputs = long_inputs[j]
        params = SamplingParams(max_tokens=1, temperature=0)
        async for _ in engine.generate(GenerationRequest(inputs, params)):
            pass

    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    while min(len(s) for s in stamps) < 40:
        await asyncio.sleep(0.005)
    arrived["start"] = time.perf_counter()
    engine_gaps.clear()
    await asyncio.gather(*(long_prompt(j) for j in range(args.long)))
    arrived["end"] = time.perf_counter()
    engine_window = list(engine_gaps)
    await asyncio.sleep(0.2)  # a few more decode steps after the last prefill
    arrived["done"] = time.perf_counter()
    await asyncio.gather(*tasks)
    pairs = [(a, b) for s in stamps for a, b in zip(s[8:], s[9:], strict=False)]
    steady = [b - a for a, b in pairs if b < arrived["start"]]
    window = [b - a for a, b in pairs if b >= arrived["start"] and a <= arrived["end"]]
    return {
        "steady_ms": 1000 * statistics.median(steady),
        "median_ms": 1000 * statistics.median(window),
        "max_ms": 1000 * max(window),
        "ratio": max(window) / statistics.median(steady),
        "engine_max_ms": 1000 * max(engine_window),
        "prefill_s": arrived["end"] - arrived["start"],
        "gaps": len(window),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=3750)
    ap.add_argument("--decode-tokens", type=int, default=4000)
    ap.add_argument("--step-tokens", default="none,256,512")
    ap.add_argument("--bits", type=int, default=4, help="4 (the served default) or 16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import veq
    from veq.api import load_model, load_processor, resolve_model

    def load():
        if args.bits == 16:
            path = resolve_model("mini")
            return load_model(path, torch.device("cpu")), load_processor(path)
        q = veq.quantize("mini", bits=args.bits, device="cpu", progress=False)
        return veq.load(q.path, device="cpu")

    # Quantizing runs OpenMP teams; on a short-lived thread they end with it instead of
    # slowing the engine thread down (docs/design.md §7).
    with ThreadPoolExecutor(1) as setup:
        model, processor = setup.submit(load).result()
    settings = [None if s == "none" else int(s) for s in args.step_tokens.split(",")]
    rows = []
    for step in settings:
        runner = ModelRunner(model, processor, ModelInfo("mini", "veq", args.bits, 128, 0))
        gaps: list[float] = []  # the engine's own inter-token times (no client in between)
        observer = EngineObserver(on_token=gaps.append)
        engine = Engine(
            runner, max_batch=16, max_model_len=4096, max_step_tokens=step, observer=observer
        )
        engine.start()
        try:
            r = asyncio.run(_scenario(engine, processor, args, gaps))
        finally:
            engine.stop()
        label = "whole prompts" if step is None else f"chunks of {step}"
        print(f"{label}: {r}", flush=True)
        rows.append(
            [
                label,
                f"{r['steady_ms']:.1f}",
                f"{r['median_ms']:.1f}",
                f"{r['max_ms']:.0f}",
                f"{r['ratio']:.1f}×",
                f"{r['engine_max_ms']:.0f}",
                f"{r['prefill_s']:.2f}",
                str(r["gaps"]),
            ]
        )
    header = ["prefill", "steady gap ms", "median gap ms, window", "largest gap ms"]
    header += ["largest ÷ steady", "largest in the engine ms"]
    header += ["4 prompts' prefill s", "gaps"]
    table = markdown_table(header, rows)
    print(table)
    body = (
        f"## Decode stalls under long prompts (`bench/prefill_stall.py`, {today()})\n\n"
        f"**{device_name('cpu')}**, the engine in-process with `mini` "
        f"({'16-bit' if args.bits == 16 else f'W{args.bits} veq, the served default'}): "
        f"{args.streams} streams decode while {args.long} prompts of {args.prompt_tokens} "
        "tokens arrive at once. 'Steady': the median gap between a stream's consecutive tokens "
        "before they arrive; 'window': gaps from their arrival until the last of them has its "
        "first token. Settings run one after another in "
        f"one process. Command: `python bench/prefill_stall.py {' '.join(sys.argv[1:])}`.\n\n"
        f"{table}\n"
    )
    if not args.no_write:
        write_section("prefill-stall", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
