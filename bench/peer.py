"""veq against Hugging Face's own server on the same machine, model and load.

    python bench/peer.py [--servers veq-w4,veq-w16,transformers,transformers-llm]
                         [--concurrency 1,4,16]
                         [--passes 5] [--requests-per-client 4] [--max-tokens 64]
                         [--workloads images,text,decode] [--threads 1] [--no-write]

Each server runs alone, one after the other, as a child process serving the bundled `mini`:

- `veq-w4`: `veq serve` at the served default (4-bit; RTN, since speed does not depend on how
  the codes were found), `veq-w16`: `veq serve --bits 16` (the same bf16 weights as the peer),
- `transformers`: `transformers serve --continuous-batching` through `bench/hf_serve.py`
  (the stock command with the processor class registered). It does not batch vision-language
  models at all: every request, text too, runs alone (`generate`), as its log says.
- `transformers-llm`: the same command on `mini`'s language half saved as the causal LM it is
  (`bench/hf_serve.py --text-only`, checked logit for logit against the whole model), which
  its continuous batching does run; text workloads only.

The same load generator (`server.loadtest`, streaming chat over HTTP, bodies encoded before the
clock starts) drives each at each concurrency, `--passes` times; the table gives the median
pass. Workloads: `images` and `text` are the model's own one-word answers (prefill-bound), with
a 64–160 px image in every request or none; `decode` is text prompts whose answers are exactly
`--max-tokens` long on every server, each asked its own way: vLLM's `ignore_eos` for veq, a
`generation_config` whose end token never comes for transformers (`tokens/req` checks it).
Writes BENCHMARKS.md section `peer`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _report import device_name, markdown_table, today, write_section  # noqa: E402

from server.loadtest import (  # noqa: E402
    LoadConfig,
    ServeSpec,
    SpawnedServer,
    free_port,
    run_load,
    spawn_process,
    spawn_server,
)

#: name → (fraction of requests with an image, fixed-length answers)
WORKLOADS = {"images": (1.0, False), "text": (0.0, False), "decode": (0.0, True)}
LABELS = {
    "images": "one word, image+text",
    "text": "one word, text",
    "decode": "{n} tokens, text",
}


def _fixed_length(server: str, max_tokens: int) -> dict[str, Any]:
    """The request fields that make `server` generate exactly `max_tokens` tokens."""
    if server.startswith("veq"):
        return {"ignore_eos": True}
    # An end token that never comes: `eos_token_id` is the one field its continuous batching
    # takes per request (`min_new_tokens` is fixed by whichever request started the batcher).
    config = {"max_new_tokens": max_tokens, "eos_token_id": -1, "do_sample": True}
    return {"generation_config": json.dumps(config)}


PEERS = ("transformers", "transformers-llm")
TEXT_ONLY = ("transformers-llm",)


def _spawn(server: str, args: argparse.Namespace, workdir: Path):
    """A context manager yielding the running `server`."""
    log = workdir / f"{server}.log"
    if server.startswith("veq"):
        spec = ServeSpec(
            model="mini",
            bits=16 if server == "veq-w16" else 4,
            method="rtn",
            group_size=128,
            cache_dir=args.cache_dir or str(workdir / "cache"),
            device="cpu",
            threads=args.threads,
            max_batch=32,
            max_queue=256,
        )
        return spawn_server(spec, log)
    from veq.api import resolve_model

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "hf_serve.py")]
    cmd += [str(resolve_model("mini")), "--threads", str(args.threads)]
    cmd += ["--continuous-batching", "--device", "cpu", "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    if server in TEXT_ONLY:
        cmd += ["--text-only", str(workdir / "text-only")]
    return spawn_process(cmd, port, log, name="transformers serve", ready_path="/v1/models")


def _median_pass(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of `summaries` (one per pass), each the median over the passes."""
    med = statistics.median
    out: dict[str, Any] = {
        k: med(s[k] for s in summaries) for k in ("req_per_s", "output_tok_per_s")
    }
    for key in ("ttft_s", "latency_s"):
        out[key] = {p: med(s[key][p] for s in summaries) for p in ("p50", "p95", "p99")}
    out["errors"] = sum(s["failed"] for s in summaries)
    out["tokens_per_request"] = sum(s["completion_tokens"] for s in summaries) / max(
        sum(s["ok"] for s in summaries), 1
    )
    return out


def _measure(server: SpawnedServer, name: str, args: argparse.Namespace) -> dict[tuple, dict]:
    url = server.url
    for fraction in (0.0,) if name in TEXT_ONLY else (1.0, 0.0):  # warm every path
        warm = LoadConfig(url, concurrency=2, requests=4, max_tokens=4, image_fraction=fraction)
        asyncio.run(run_load(warm))
    results = {}
    for workload in args.workloads.split(","):
        fraction, fixed = WORKLOADS[workload]
        if fraction > 0 and name in TEXT_ONLY:
            continue
        for c in (int(x) for x in args.concurrency.split(",")):
            passes = []
            for p in range(args.passes):
                cfg = LoadConfig(
                    url,
                    concurrency=c,
                    requests=c * args.requests_per_client,
                    max_tokens=args.max_tokens,
                    image_fraction=fraction,
                    extra_body=_fixed_length(name, args.max_tokens) if fixed else {},
                    seed=100 * c + p,
                )
                passes.append(asyncio.run(run_load(cfg)).summary())
            m = results[(workload, c)] = _median_pass(passes)
            print(
                f"{name:12s} {workload:7s} c={c:3d}: {m['req_per_s']:7.2f} req/s "
                f"{m['output_tok_per_s']:8.1f} tok/s  ttft p50 {m['ttft_s']['p50']:.3f} s  "
                f"{m['tokens_per_request']:.1f} tok/req  errors {m['errors']}",
                flush=True,
            )
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{1000 * seconds:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--servers", default="veq-w4,veq-w16,transformers,transformers-llm")
    ap.add_argument("--workloads", default="images,text,decode")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each server")
    ap.add_argument("--cache-dir", default=None, help="veq's quantization cache")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    servers = args.servers.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="veq-peer-"))

    measured: dict[str, dict[tuple, dict]] = {}
    for name in servers:
        with _spawn(name, args, workdir) as server:
            measured[name] = _measure(server, name, args)

    rows = []
    for (workload, c), _ in measured[servers[0]].items():
        for name in servers:
            m = measured[name].get((workload, c))
            if m is None:
                continue
            rows.append(
                [
                    LABELS[workload].format(n=args.max_tokens),
                    str(c),
                    name,
                    f"{m['req_per_s']:.2f}",
                    f"{m['output_tok_per_s']:.1f}",
                    f"{m['tokens_per_request']:.1f}",
                    "/".join(_ms(m["ttft_s"][p]) for p in ("p50", "p95")),
                    "/".join(_ms(m["latency_s"][p]) for p in ("p50", "p95", "p99")),
                    str(m["errors"]),
                ]
            )
    header = ["workload", "concurrency", "server", "req/s", "output tok/s", "tokens/req"]
    header += ["TTFT p50/p95 ms", "latency p50/p95/p99 ms", "errors"]
    table = markdown_table(header, rows)
    ratio_rows = []
    for name in (s for s in servers if s not in PEERS):
        for peer in (s for s in servers if s in PEERS):
            for key, m in measured[name].items():
                p = measured[peer].get(key)
                if p is None:
                    continue
                ratio_rows.append(
                    [
                        LABELS[key[0]].format(n=args.max_tokens),
                        str(key[1]),
                        f"{name} ÷ {peer}",
                        _ratio(m["req_per_s"], p["req_per_s"]),
                        _ratio(m["output_tok_per_s"], p["output_tok_per_s"]),
                        _ratio(m["ttft_s"]["p50"], p["ttft_s"]["p50"]),
                    ]
                )
    ratios = markdown_table(
        ["workload", "concurrency", "servers", "req/s", "output tok/s", "TTFT p50"], ratio_rows
    )
    print(table)
    print(ratios)
    body = (
        f"## Against `transformers serve --continuous-batching` (`bench/peer.py`, {today()})\n\n"
        f"**{device_name('cpu')}**, the bundled `mini` on every server, each alone with "
        f"{args.threads} intra-op thread(s) while the load generator shares the machine; "
        f"streaming chat, {args.requests_per_client} requests per client, median of "
        f"{args.passes} passes. `veq-w4`: `veq serve` at the served 4 bits; `veq-w16`: the same "
        "bf16 weights the peer serves; `transformers`: `transformers serve "
        "--continuous-batching` through `bench/hf_serve.py`, which runs a vision-language model "
        "one request at a time (its continuous batching takes text-only models only); "
        "`transformers-llm`: the same command on `mini`'s language half saved as a "
        "`Qwen3MoeForCausalLM` (`--text-only`, identical logits), which it does batch. *One "
        f"word*: the model's own answers (prefill-bound; compare req/s); *{args.max_tokens} "
        "tokens*: answers of exactly that length on every server (`ignore_eos` for veq, "
        "an unreachable `eos_token_id` for transformers; *tokens/req* checks it). Command: "
        f"`python bench/peer.py {' '.join(sys.argv[1:])}`.\n\n{table}\n\n"
        "veq ÷ peer at the same load (above 1× for req/s and tok/s, below 1× for TTFT favour "
        f"veq):\n\n{ratios}\n"
    )
    if not args.no_write:
        write_section("peer", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
