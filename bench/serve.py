"""Serving throughput and latency of one model at 16, 4 and 3 bits, at concurrency 1/4/16.

    python bench/serve.py [--model mini] [--bits 16,4,3] [--concurrency 1,4,16]
                          [--requests-per-client 6] [--max-tokens 32] [--method rtn] [--no-write]

Each setting starts its own `veq serve` process (quantized checkpoints come from the cache; RTN
by default because serving speed does not depend on the method), warms it up, then runs the
load tester (`server.loadtest`) with streaming image+text requests. Reports req/s, output tok/s,
TTFT and latency p50/p95/p99, the weight bytes the server reports, and the batching gain
(output tok/s at the highest concurrency ÷ at concurrency 1), for natural answers (they end
at the model's end token) and fixed-length ones (vLLM's `ignore_eos`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import device_name, markdown_table, today, write_section  # noqa: E402

from server.loadtest import LoadConfig, ServeSpec, run_load, spawn_server  # noqa: E402
from server.loadtest.probe import fetch_stats  # noqa: E402

#: (name, ignore_eos): answers as the model ends them, and fixed-length answers.
WORKLOADS = (("natural", False), ("fixed", True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--bits", default="16,4,3")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--group-size", default="128")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="server intra-op threads (the load generator shares this machine)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    cache = args.cache_dir or tempfile.mkdtemp(prefix="veq-bench-")
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, gains = [], []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = ServeSpec(
            model=args.model,
            bits=bits,
            method=args.method,
            group_size=None if args.group_size == "channel" else int(args.group_size),
            cache_dir=cache,
            device=args.device,
            threads=args.threads,
            max_batch=32,
            max_queue=256,
        )
        with spawn_server(spec, Path(cache) / f"serve-{bits}.log") as server:
            url = server.url
            stats = fetch_stats(url, server.admin_key)
            asyncio.run(
                run_load(LoadConfig(url, concurrency=2, requests=4, max_tokens=4))
            )  # warm-up
            for workload, ignore_eos in WORKLOADS:
                per_level = {}
                for c in levels:
                    cfg = LoadConfig(
                        url,
                        concurrency=c,
                        requests=c * args.requests_per_client,
                        max_tokens=args.max_tokens,
                        ignore_eos=ignore_eos,
                        seed=c,
                    )
                    s = asyncio.run(run_load(cfg)).summary()
                    per_level[c] = s
                    print(
                        f"W{bits} {workload} c={c:3d}: {s['req_per_s']:.2f} req/s "
                        f"{s['output_tok_per_s']:.1f} tok/s ttft p50 {s['ttft_s']['p50']:.3f} s "
                        f"errors {s['errors']}",
                        flush=True,
                    )
                    rows.append(
                        [
                            "16 (unquantized)" if bits == 16 else f"{bits} ({args.method})",
                            workload,
                            str(c),
                            f"{s['req_per_s']:.2f}",
                            f"{s['output_tok_per_s']:.1f}",
                            "/".join(f"{s['ttft_s'][p]:.3f}" for p in ("p50", "p95", "p99")),
                            "/".join(f"{s['latency_s'][p]:.3f}" for p in ("p50", "p95", "p99")),
                            f"{stats['weight_bytes'] / 2**20:.2f}",
                            str(sum(s["errors"].values())),
                        ]
                    )
                lo, hi = per_level[min(levels)], per_level[max(levels)]
                gain = hi["output_tok_per_s"] / max(lo["output_tok_per_s"], 1e-9)
                gains.append((bits, workload, gain))
    table = markdown_table(
        [
            "bits",
            "answers",
            "concurrency",
            "req/s",
            "output tok/s",
            "TTFT p50/p95/p99 s",
            "latency p50/p95/p99 s",
            "weight MiB",
            "errors",
        ],
        rows,
    )
    gain_line = "; ".join(f"W{b} {w}: {g:.1f}x" for b, w, g in gains)
    print(table)
    print("batching gain (output tok/s, highest ÷ lowest concurrency):", gain_line)
    body = (
        f"## Serving (`bench/serve.py`, {today()})\n\n"
        f"**{device_name('cuda' if args.device == 'cuda' else 'cpu')}**, model `{args.model}`, "
        f"streaming image+text requests (80 % with a 64–160 px image), max_tokens "
        f"{args.max_tokens}, {args.requests_per_client} requests per client, bodies encoded "
        "before the clock starts. Answers: *natural* ends at the model's end token (`mini` "
        "answers in one word, so this measures prefill); *fixed* sends vLLM's `ignore_eos` so "
        f"every request generates {args.max_tokens} tokens (decode). One `veq serve` "
        f"process per setting with `--threads {args.threads}` (the load generator runs on the "
        f"same machine).\n\n{table}\n\nBatching gain, output tok/s at concurrency "
        f"{max(levels)} ÷ concurrency {min(levels)}: {gain_line}.\n"
    )
    if not args.no_write:
        write_section("serve", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
