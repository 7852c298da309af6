"""Prometheus metrics of one server: request counts, tokens, latencies, batching, memory.

Each app owns its registry (tests build many apps in one process). The engine reports through
an `EngineObserver`; gauges that describe state (queue depth, memory) are refreshed on scrape.
"""

from __future__ import annotations

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.engine import Engine, EngineObserver

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "veq_requests", "HTTP chat requests by outcome", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "veq_prompt_tokens", "Prompt tokens (images included)", registry=r
        )
        self.completion_tokens = Counter("veq_completion_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "veq_finished", "Finished generations by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "veq_time_to_first_token_seconds",
            "Queue + prefill + first sample",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "veq_inter_token_latency_seconds",
            "Time between tokens of a sequence",
            buckets=_LATENCY,
            registry=r,
        )
        self.batch = Histogram(
            "veq_batch_size", "Rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.queue = Gauge("veq_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("veq_running_requests", "Requests being decoded", registry=r)
        self.weight_bytes = Gauge(
            "veq_weight_bytes", "Bytes of the served model's weights", registry=r
        )
        self.kv_bytes = Gauge(
            "veq_kv_cache_bytes", "Bytes of the running batches' KV caches", registry=r
        )
        self.memory = Gauge("veq_memory_bytes", "Process memory", ["kind"], registry=r)

    def observer(self) -> EngineObserver:
        def finish(reason: str, prompt: int, completion: int) -> None:
            self.finished.labels(reason).inc()
            self.prompt_tokens.inc(prompt)
            self.completion_tokens.inc(completion)

        return EngineObserver(
            on_first_token=self.ttft.observe,
            on_token=self.itl.observe,
            on_finish=finish,
            on_step=self.batch.observe,
        )

    def render(self, engine: Engine | None) -> bytes:
        if engine is not None:
            self.queue.set(engine.waiting)
            self.running.set(engine.active)
            self.weight_bytes.set(engine.runner.info.weight_bytes)
            self.kv_bytes.set(engine.kv_bytes())
        for kind, value in memory_stats().items():
            self.memory.labels(kind).set(value)
        return generate_latest(self.registry)


def memory_stats() -> dict[str, int]:
    """Host RSS, and the CUDA allocator's allocated/reserved bytes when a GPU is in use."""
    stats = {"host_rss": psutil.Process().memory_info().rss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["device_allocated"] = torch.cuda.memory_allocated()
        stats["device_reserved"] = torch.cuda.memory_reserved()
    return stats
