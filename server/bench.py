"""The load tester's core: concurrent image+text chat clients against a running server.

`run_load(LoadConfig)` keeps `concurrency` clients busy for a number of requests or a duration,
streaming, with a mix of image sizes and prompt lengths drawn from a seed, and measures each
request's time to first token and latency; `LoadReport` turns them into req/s, output tok/s,
percentiles and errors by status. Used by `bench/serve.py` (and the `veq bench` command).
It only speaks HTTP: nothing here imports the engine or a model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

_WORDS = (
    "what colour shape where count left right top bottom image object the is are how many".split()
)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    concurrency: int = 4
    requests: int | None = 32  # total; None: run for `duration` seconds
    duration: float | None = None
    max_tokens: int = 32
    stream: bool = True
    seed: int = 0
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    image_sizes: tuple[int, ...] = (64, 96, 128, 160)
    image_fraction: float = 0.8
    prompt_words: tuple[int, int] = (3, 24)
    timeout: float = 300.0


@dataclass
class RequestResult:
    status: int
    ttft: float | None
    latency: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}


@dataclass
class LoadReport:
    config: LoadConfig
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        errors: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                errors[str(r.status)] = errors.get(str(r.status), 0) + 1
        wall = max(self.wall_s, 1e-9)
        out_tokens = sum(r.completion_tokens for r in ok)
        return {
            "concurrency": self.config.concurrency,
            "requests": len(self.results),
            "ok": len(ok),
            "errors": errors,
            "wall_s": self.wall_s,
            "req_per_s": len(ok) / wall,
            "output_tok_per_s": out_tokens / wall,
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "completion_tokens": out_tokens,
            "ttft_s": _percentiles([r.ttft for r in ok if r.ttft is not None]),
            "latency_s": _percentiles([r.latency for r in ok]),
            "interrupted": self.interrupted,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "summary": self.summary(),
            "results": [asdict(r) for r in self.results],
        }


def _image_url(rng: random.Random, size: int) -> str:
    pixels = np.zeros((size, size, 3), np.uint8)
    for _ in range(rng.randint(1, 4)):
        x, y, w = rng.randrange(size), rng.randrange(size), rng.randint(size // 8, size // 3)
        pixels[y : y + w, x : x + w] = [rng.randrange(256) for _ in range(3)]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_messages(cfg: LoadConfig, index: int) -> list[dict[str, Any]]:
    """Request `index`'s messages: deterministic from (seed, index)."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*cfg.prompt_words)))
    content: list[dict[str, Any]] = []
    if rng.random() < cfg.image_fraction:
        url = _image_url(rng, rng.choice(cfg.image_sizes))
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": words + "?"})
    return [{"role": "user", "content": content}]


async def _one(client: httpx.AsyncClient, cfg: LoadConfig, model: str, index: int) -> RequestResult:
    body = {
        "model": model,
        "messages": make_messages(cfg, index),
        "max_tokens": cfg.max_tokens,
        "temperature": 0.7,
        "seed": cfg.seed + index,
        "stream": cfg.stream,
    }
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft = None
    try:
        if not cfg.stream:
            r = await client.post("/v1/chat/completions", json=body)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                return RequestResult(r.status_code, None, latency, error=r.text[:200])
            usage = r.json()["usage"]
            return RequestResult(
                200, latency, latency, usage["prompt_tokens"], usage["completion_tokens"]
            )
        usage = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return RequestResult(
                    r.status_code, None, time.perf_counter() - t0, error=text[:200]
                )
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
        latency = time.perf_counter() - t0
        if usage is None:
            return RequestResult(200, ttft, latency, error="stream ended without usage")
        return RequestResult(
            200, ttft or latency, latency, usage["prompt_tokens"], usage["completion_tokens"]
        )
    except httpx.HTTPError as exc:
        return RequestResult(0, None, time.perf_counter() - t0, error=type(exc).__name__)


async def run_load(
    cfg: LoadConfig, on_result: Callable[[RequestResult], None] | None = None
) -> LoadReport:
    """Run the load; Ctrl-C (task cancellation) returns the partial report marked interrupted."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    report = LoadReport(cfg)
    limits = httpx.Limits(max_connections=cfg.concurrency + 2)
    async with httpx.AsyncClient(
        base_url=cfg.url, headers=headers, timeout=cfg.timeout, limits=limits
    ) as client:
        model = cfg.model
        if model is None:
            listed = await client.get("/v1/models")
            listed.raise_for_status()
            model = listed.json()["data"][0]["id"]
        counter = iter(range(10**12))
        start = time.perf_counter()
        deadline = start + cfg.duration if cfg.duration else None

        async def worker() -> None:
            while True:
                index = next(counter)
                if cfg.requests is not None and index >= cfg.requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                result = await _one(client, cfg, model, index)
                report.results.append(result)
                if on_result is not None:
                    on_result(result)

        try:
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        except asyncio.CancelledError:
            report.interrupted = True
        report.wall_s = time.perf_counter() - start
    return report
