"""What a load test asks a server besides chat: is it ready, what does it serve, what memory.

Owns `BenchError` (a user-facing failure: unreachable server, refused key, server not ready,
model not served), `probe` (`/ready`, `/v1/models` and, with the admin key, `/admin/stats`,
turned into a `Target`: the setting's label and quantization), and `StatsSampler`, which polls
`/admin/stats` during a load and keeps every sample and the peak of each memory figure.
It does not generate load (`load.py`) nor start servers (`spawn.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

#: Memory figures whose peaks a sampler keeps: `/admin/stats` `memory` keys, and the KV cache.
PEAK_KEYS = (
    "host_rss",
    "device_allocated",
    "device_reserved",
    "kv_cache_bytes",
)


class BenchError(Exception):
    """A load test cannot go on; the message is one line and says what to do."""


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200] or r.reason_phrase


def _get(url: str, path: str, key: str | None, timeout: float = 10.0) -> httpx.Response:
    try:
        return httpx.get(f"{url}{path}", headers=_bearer(key), timeout=timeout)
    except httpx.ConnectError:
        raise BenchError(f"cannot reach {url}: is a veq server running there?") from None
    except httpx.TimeoutException:
        raise BenchError(f"{url}{path} did not answer within {timeout:.0f} s") from None
    except httpx.HTTPError as exc:
        raise BenchError(f"{url}{path} failed: {type(exc).__name__}: {exc}") from None


@dataclass
class Target:
    """One server under test: where, which model, and what quantization it serves."""

    url: str
    model: str
    card: dict[str, Any]  # the /v1/models entry's `veq` block
    stats: dict[str, Any] | None  # /admin/stats, None without the admin key
    label: str = ""

    @property
    def bits(self) -> int | None:
        b = (self.stats or {}).get("bits", self.card.get("bits"))
        return None if b is None else int(b)

    def describe(self) -> str:
        """A short label from what the server says: `W4 rtn g128`, `16-bit (float32)`."""
        bits = self.bits
        if bits is None:
            return self.model
        if bits == 16:
            dtype = (self.stats or {}).get("dtype")
            return f"16-bit ({dtype})" if dtype else "16-bit"
        group = (self.stats or {}).get("group_size", self.card.get("group_size"))
        method = (self.stats or {}).get("method") or self.card.get("method") or "?"
        return f"W{bits} {method} " + (f"g{group}" if group else "per-channel")


def probe(url: str, api_key: str | None, admin_key: str | None, model: str | None) -> Target:
    """Check that `url` serves `model` (default: its first) and read its quantization.

    Raises BenchError (one line) when the server is unreachable, not ready, refuses a key or
    does not serve `model`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BenchError(f"not an http(s) URL: {url!r} (e.g. http://127.0.0.1:8000)")
    ready = _get(url, "/ready", None)
    if ready.status_code != 200:
        raise BenchError(f"{url} is not ready ({ready.status_code}): {_message(ready)}")
    listed = _get(url, "/v1/models", api_key)
    if listed.status_code in (401, 403):
        raise BenchError(f"{url} refused the API key ({listed.status_code}); pass --api-key")
    if listed.status_code != 200:
        raise BenchError(f"{url}/v1/models answered {listed.status_code}: {_message(listed)}")
    try:
        cards = {c["id"]: c for c in listed.json()["data"]}
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{url}/v1/models is not an OpenAI model list") from None
    if not cards:
        raise BenchError(f"{url} serves no model")
    name = model or next(iter(cards))
    if name not in cards:
        raise BenchError(f"{url} does not serve {name!r}; it serves {sorted(cards)}")
    stats = fetch_stats(url, admin_key) if admin_key else None
    target = Target(url, name, cards[name].get("veq") or {}, stats)
    target.label = target.describe()
    return target


def fetch_stats(url: str, admin_key: str) -> dict[str, Any]:
    """`GET /admin/stats`; BenchError when the key is refused or admin is disabled."""
    r = _get(url, "/admin/stats", admin_key)
    if r.status_code in (401, 403):
        raise BenchError(
            f"{url}/admin/stats refused the admin key ({r.status_code}): {_message(r)}"
        )
    if r.status_code != 200:
        raise BenchError(f"{url}/admin/stats answered {r.status_code}: {_message(r)}")
    return r.json()


@dataclass
class StatsSampler:
    """Polls `/admin/stats` every `interval` seconds while a load runs.

    `samples` holds `{t, memory..., kv_cache_bytes, running, waiting}` per poll (t in seconds
    from the sampler's start); `peaks` the largest value seen of each of `PEAK_KEYS`. Failed
    polls are counted, never raised: a busy server must not stop the load test.
    """

    url: str
    admin_key: str
    interval: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    last: dict[str, Any] | None = None
    _t0: float = field(default_factory=time.perf_counter)

    def _record(self, stats: dict[str, Any]) -> None:
        self.last = stats
        row: dict[str, Any] = {"t": round(time.perf_counter() - self._t0, 3)}
        row.update(stats.get("memory") or {})
        row["kv_cache_bytes"] = stats.get("kv_cache_bytes", 0)
        engine = stats.get("engine") or {}
        row["running"], row["waiting"] = engine.get("running"), engine.get("waiting")
        self.samples.append(row)
        for key in PEAK_KEYS:
            if isinstance(row.get(key), int):
                self.peaks[key] = max(self.peaks.get(key, 0), row[key])

    def sample_now(self) -> dict[str, Any] | None:
        """One synchronous poll (before and after the load); None if it failed."""
        try:
            stats = fetch_stats(self.url, self.admin_key)
        except BenchError:
            self.failures += 1
            return None
        self._record(stats)
        return stats

    async def run(self) -> None:
        """Poll until cancelled."""
        async with httpx.AsyncClient(
            base_url=self.url, headers=_bearer(self.admin_key), timeout=10.0
        ) as client:
            while True:
                try:
                    r = await client.get("/admin/stats")
                    if r.status_code == 200:
                        self._record(r.json())
                    else:
                        self.failures += 1
                except (httpx.HTTPError, ValueError):
                    self.failures += 1
                await asyncio.sleep(self.interval)
