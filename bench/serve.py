"""Serving throughput and latency of one model at 16, 4 and 3 bits, at concurrency 1/4/16.

    python bench/serve.py [--model mini] [--bits 16,4,3] [--concurrency 1,4,16]
                          [--requests-per-client 6] [--max-tokens 32] [--method rtn] [--no-write]

Each setting starts its own `veq serve` process (quantized checkpoints come from the cache; RTN
by default because serving speed does not depend on the method), warms it up, then runs the
load tester (`server.bench`) with streaming image+text requests. Reports req/s, output tok/s,
TTFT and latency p50/p95/p99, the weight bytes the server reports, and the batching gain
(output tok/s at the highest concurrency ÷ at concurrency 1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import device_name, markdown_table, today, write_section  # noqa: E402

from server.bench import LoadConfig, run_load  # noqa: E402

ADMIN = "bench-admin"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str, bits: int, method: str, group: str, cache: str, device: str, threads: int
) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [
        str(Path(sys.executable).with_name("veq")),
        "serve",
        "--model",
        model,
        "--bits",
        str(bits),
        "--method",
        method,
        "--group-size",
        group,
        "--port",
        str(port),
        "--admin-key",
        ADMIN,
        "--device",
        device,
        "--max-batch",
        "32",
        "--max-queue",
        "256",
        "--threads",
        str(threads),
    ]
    log = open(Path(cache) / f"serve-{bits}.log", "w")  # noqa: SIM115 (kept open for the child)
    proc = subprocess.Popen(cmd, env={**os.environ, "VEQ_CACHE_DIR": cache}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"veq serve exited; see {log.name}")
        try:
            r = httpx.get(f"{url}/ready", timeout=2)
            if r.status_code == 200:
                return proc, url
            if "failed to load" in r.text:
                proc.terminate()
                raise RuntimeError(r.json()["error"]["message"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server not ready")


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
        proc, url = start_server(
            args.model, bits, args.method, args.group_size, cache, args.device, args.threads
        )
        try:
            stats = httpx.get(
                f"{url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}
            ).json()
            asyncio.run(
                run_load(LoadConfig(url, concurrency=2, requests=4, max_tokens=4))
            )  # warm-up
            per_level = {}
            for c in levels:
                cfg = LoadConfig(
                    url,
                    concurrency=c,
                    requests=c * args.requests_per_client,
                    max_tokens=args.max_tokens,
                    seed=c,
                )
                s = asyncio.run(run_load(cfg)).summary()
                per_level[c] = s
                print(
                    f"W{bits} c={c:3d}: {s['req_per_s']:.2f} req/s "
                    f"{s['output_tok_per_s']:.1f} tok/s ttft p50 {s['ttft_s']['p50']:.3f} s "
                    f"errors {s['errors']}",
                    flush=True,
                )
                rows.append(
                    [
                        "16 (unquantized)" if bits == 16 else f"{bits} ({args.method})",
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
            gains.append((bits, hi["output_tok_per_s"] / max(lo["output_tok_per_s"], 1e-9)))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    table = markdown_table(
        [
            "bits",
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
    gain_line = ", ".join(f"W{b}: {g:.1f}x" for b, g in gains)
    print(table)
    print("batching gain (output tok/s, highest ÷ lowest concurrency):", gain_line)
    body = (
        f"## Serving (`bench/serve.py`, {today()})\n\n"
        f"**{device_name('cuda' if args.device == 'cuda' else 'cpu')}**, model `{args.model}`, "
        f"streaming image+text requests (80 % with a 64–160 px image), max_tokens "
        f"{args.max_tokens}, {args.requests_per_client} requests per client; one `veq serve` "
        f"process per setting with `--threads {args.threads}` (the load generator runs on the "
        f"same machine).\n\n{table}\n\nBatching gain, output tok/s at concurrency "
        f"{max(levels)} ÷ concurrency {min(levels)}: {gain_line}.\n"
    )
    if not args.no_write:
        write_section("serve", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
