"""The load itself: concurrent image+text chat clients against one running server.

Owns `LoadConfig` (what to send and how hard), the deterministic request mix (`make_messages`:
image sizes and prompt lengths drawn from a seed), one request's measurement (`RequestResult`:
status, time to first token, latency, token counts) and `run_load`, which keeps `concurrency`
async httpx clients busy for a request count or a duration, and `LoadReport`, which turns the
results into req/s, output tok/s, percentiles and errors by status.

`run_load` fills a `LoadReport` the caller may own, result by result, so that an interrupted
run (Ctrl-C, whichever way asyncio delivers it) leaves the caller the partial measurements.
It speaks only HTTP: nothing here imports the engine or a model; spawning servers, sampling
`/admin/stats` and writing reports live in the sibling modules.
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

#: `errors` key of requests that got no HTTP answer (connection refused, reset, timeout).
NO_RESPONSE = "no_response"


@dataclass(frozen=True)
class LoadConfig:
    """One load: `requests` in total, or as many as fit in `duration` seconds."""

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
    # vLLM's fixed-length mode: every request generates exactly `max_tokens` (decode-bound).
    ignore_eos: bool = False
    # Fields merged into every body: another server's own extensions (its way of ignoring EOS).
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.requests is None and self.duration is None:
            raise ValueError("give a request count or a duration")
        if self.requests is not None and self.requests < 0:
            raise ValueError(f"requests must be non-negative, got {self.requests}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be positive, got {self.duration}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


@dataclass
class RequestResult:
    """One request: HTTP status (0: no answer), seconds to the first content token and to the
    end, and the usage the server reported."""

    status: int
    ttft: float | None
    latency: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    has_image: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 of `values` (None when empty)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}


@dataclass
class LoadReport:
    """The results of one load, in completion order; `wall_s` from the first request sent to
    the last one finished (or to the interruption)."""

    config: LoadConfig
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    started: float | None = None  # perf_counter at the first request
    interrupted: bool = False

    def elapsed(self) -> float:
        """`wall_s` once finished; while running (or after an interruption), time so far."""
        if self.wall_s > 0 or self.started is None:
            return self.wall_s
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        errors: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                key = str(r.status) if r.status else NO_RESPONSE
                errors[key] = errors.get(key, 0) + 1
        wall = max(self.elapsed(), 1e-9)
        out_tokens = sum(r.completion_tokens for r in ok)
        return {
            "concurrency": self.config.concurrency,
            "stream": self.config.stream,
            "requests": len(self.results),
            "ok": len(ok),
            "failed": len(self.results) - len(ok),
            "errors": errors,
            "wall_s": self.elapsed(),
            "req_per_s": len(ok) / wall,
            "output_tok_per_s": out_tokens / wall,
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "completion_tokens": out_tokens,
            "with_image": sum(r.has_image for r in self.results),
            "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
            "latency_s": percentiles([r.latency for r in ok]),
            "interrupted": self.interrupted,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config) | {"api_key": None},
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


def _error_text(body: bytes | str) -> str:
    """The OpenAI error message of a body, else its first 200 characters."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        return str(json.loads(text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return text[:200]


#: Bodies built ahead of a duration run, reused in turn (a count run builds exactly its own).
DURATION_POOL = 256


def request_body(cfg: LoadConfig, model: str, index: int) -> dict[str, Any]:
    """Request `index`'s JSON body: deterministic from (seed, index)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": make_messages(cfg, index),
        "max_tokens": cfg.max_tokens,
        "temperature": 0.7,
        "seed": cfg.seed + index,
        "stream": cfg.stream,
    }
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body | cfg.extra_body


async def _one(client: httpx.AsyncClient, cfg: LoadConfig, body: dict[str, Any]) -> RequestResult:
    has_image = any(p["type"] == "image_url" for p in body["messages"][0]["content"])
    t0 = time.perf_counter()
    ttft = None

    def result(status: int, **kw: Any) -> RequestResult:
        latency = time.perf_counter() - t0
        return RequestResult(status, kw.pop("ttft", None), latency, has_image=has_image, **kw)

    try:
        if not cfg.stream:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return result(r.status_code, error=_error_text(r.content))
            usage = r.json().get("usage") or {}
            latency = time.perf_counter() - t0
            return result(
                200,
                ttft=latency,
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                error=None if usage else "response without usage",
            )
        usage = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return result(r.status_code, error=_error_text(await r.aread()))
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return result(200, ttft=ttft, error=_error_text(json.dumps(chunk)))
                choices = chunk.get("choices") or []
                if ttft is None and any(c.get("delta", {}).get("content") for c in choices):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if usage is None:
            return result(200, ttft=ttft, error="stream ended without usage")
        latency = time.perf_counter() - t0
        return result(
            200,
            ttft=ttft if ttft is not None else latency,
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
        )
    except httpx.HTTPError as exc:
        return result(0, error=type(exc).__name__)
    except ValueError as exc:  # a malformed body or SSE line
        return result(200, ttft=ttft, error=f"malformed response: {exc}"[:200])


async def first_model(client: httpx.AsyncClient) -> str:
    """The id of the first model `GET /v1/models` lists."""
    listed = await client.get("/v1/models")
    listed.raise_for_status()
    return str(listed.json()["data"][0]["id"])


async def run_load(
    cfg: LoadConfig,
    report: LoadReport | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LoadReport:
    """Run the load, appending each finished request to `report` (a new one if None).

    Interruption (task cancellation, or KeyboardInterrupt raised out of the event loop) leaves
    `report` holding every request finished so far, its `wall_s` set; requests in flight are
    dropped. The caller marks it `interrupted`.
    """
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    report = report if report is not None else LoadReport(cfg)
    limits = httpx.Limits(max_connections=cfg.concurrency + 2)
    async with httpx.AsyncClient(
        base_url=cfg.url, headers=headers, timeout=cfg.timeout, limits=limits
    ) as client:
        model = cfg.model or await first_model(client)
        # Encoding images is the client's work, not the server's: done before the clock starts
        # (as vLLM's benchmark does), so the load generator does not compete with the server
        # for the CPU while it is being measured.
        bodies = [
            request_body(cfg, model, i)
            for i in range(cfg.requests if cfg.requests is not None else DURATION_POOL)
        ]
        counter = iter(range(10**12))
        report.started = start = time.perf_counter()
        deadline = start + cfg.duration if cfg.duration else None

        async def worker() -> None:
            while True:
                index = next(counter)
                if cfg.requests is not None and index >= cfg.requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                result = await _one(client, cfg, bodies[index % len(bodies)])
                report.results.append(result)
                if on_result is not None:
                    on_result(result)

        try:
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        finally:
            report.wall_s = time.perf_counter() - start
    return report
