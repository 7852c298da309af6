"""Prometheus metrics of one server, and the memory accounting `/admin/stats` reports.

Owns the registry (request counts, tokens, latencies, batching, memory gauges; each app owns
its own, since tests build many apps in one process; the engine reports through an
`EngineObserver`; gauges that describe state are refreshed on scrape), the process memory
probe (`memory_stats`), and the accounting of the served model's memory: where its weight bytes
go and what the packed-size formula predicts for them (`weight_accounting`), and the KV-cache
bytes one token and one full-length sequence take (`kv_cache_geometry`). It does not serve
routes (that is `server.api`) nor measure load (that is `server.loadtest`).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from torch import nn

from kernels.layout import PackedWeight, kernel_nbytes
from server.engine.engine import Engine, EngineObserver
from server.engine.runner import ModelRunner
from veq.config import QuantConfig
from veq.format import packed_nbytes
from veq.nn import QuantLinear, QuantMoEExperts

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
            "veq_kv_cache_bytes", "Bytes reserved for the KV cache (all slots)", registry=r
        )
        self.kv_capacity = Gauge(
            "veq_kv_cache_capacity_tokens", "Token positions the KV slots hold", registry=r
        )
        self.kv_used = Gauge(
            "veq_kv_cache_used_tokens", "Token positions in use by running sequences", registry=r
        )
        self.kv_free_slots = Gauge(
            "veq_kv_cache_free_slots", "KV slots free for new sequences", registry=r
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
            kv = engine.kv_stats()
            self.kv_bytes.set(kv["reserved_bytes"])
            self.kv_capacity.set(kv["capacity_tokens"])
            self.kv_used.set(kv["used_tokens"])
            self.kv_free_slots.set(kv["free_slots"])
        for kind, value in memory_stats().items():
            self.memory.labels(kind).set(value)
        return generate_latest(self.registry)


def _peak_rss() -> int | None:
    """The process's lifetime peak resident set (bytes), where the OS reports one."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def memory_stats() -> dict[str, int]:
    """Host RSS (now and the process's peak), and the CUDA allocator's allocated/reserved bytes
    (now and peak) when a GPU is in use."""
    stats = {"host_rss": psutil.Process().memory_info().rss}
    peak = _peak_rss()
    if peak is not None:
        stats["host_peak_rss"] = peak
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["device_allocated"] = torch.cuda.memory_allocated()
        stats["device_reserved"] = torch.cuda.memory_reserved()
        stats["device_peak_allocated"] = torch.cuda.max_memory_allocated()
        stats["device_peak_reserved"] = torch.cuda.max_memory_reserved()
    return stats


def _config_of(pw: PackedWeight) -> QuantConfig:
    """The QuantConfig a kernel-layout weight was packed from (per-channel: group = K)."""
    return QuantConfig(
        bits=pw.bits,
        group_size=None if pw.group_size == pw.k else pw.group_size,
        symmetric=pw.zero is None,
        scale_dtype="bfloat16" if pw.scale.dtype == torch.bfloat16 else "float16",
    )


def _quantized_parts(model: nn.Module) -> tuple[list[tuple[int, int, QuantConfig]], list]:
    """Every quantized `[N, K]` weight as it is on disk (experts unfused, gate and up apart),
    and the tensors that hold them in memory."""
    weights: list[tuple[int, int, QuantConfig]] = []
    held: list[PackedWeight] = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            pw = module.packed_weight()
            weights.append((pw.n, pw.k, module.cfg))
            held.append(pw)
        elif isinstance(module, QuantMoEExperts):
            moe = module.moe_weights()
            for group in moe.gate_up:  # fused [2I, H] in memory; gate and up [I, H] on disk
                cfg = _config_of(group.weight)
                half = group.weight.n // 2
                weights += [(half, group.weight.k, cfg)] * (2 * len(group.experts))
                held.append(group.weight)
            for group in moe.down:
                cfg = _config_of(group.weight)
                weights += [(group.weight.n, group.weight.k, cfg)] * len(group.experts)
                held.append(group.weight)
    return weights, held


def _weight_accounting(model: nn.Module) -> dict[str, Any]:
    weights, held = _quantized_parts(model)
    quant_storages = {
        t.untyped_storage().data_ptr() for pw in held for t in pw.tensors().values() if t.numel()
    }
    quant_bytes = sum(pw.nbytes() for pw in held)
    other_bytes = other_float_params = other_int_bytes = 0
    seen: set[int] = set()
    tensors = [t for _, t in model.named_parameters()]
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        tensors += [b for n, b in module.named_buffers(recurse=False) if n not in skip]
    for t in tensors:
        if t is None or id(t) in seen or not t.numel():
            continue
        seen.add(id(t))
        if t.untyped_storage().data_ptr() in quant_storages:
            continue
        other_bytes += t.numel() * t.element_size()
        if t.is_floating_point():
            other_float_params += t.numel()
        else:
            other_int_bytes += t.numel() * t.element_size()
    quant_params = sum(n * k for n, k, _ in weights)
    formula = sum(packed_nbytes(n, k, cfg) for n, k, cfg in weights)
    kernel_formula = sum(
        kernel_nbytes(n, k, cfg.bits, cfg.group_size, cfg.symmetric, cfg.torch_scale_dtype.itemsize)
        for n, k, cfg in weights
    )
    total = quant_bytes + other_bytes
    expected = formula + other_bytes
    fp16 = 2 * (quant_params + other_float_params) + other_int_bytes
    return {
        "bytes": total,
        "quantized_bytes": quant_bytes,
        "quantized_params": quant_params,
        "quantized_matrices": len(weights),
        "quantized_formula_bytes": formula,
        "quantized_kernel_formula_bytes": kernel_formula,
        "other_bytes": other_bytes,
        "formula_bytes": expected,
        "formula_ratio": total / expected if expected else None,
        "params": quant_params + other_float_params,
        "fp16_bytes": fp16,
        "ratio_to_fp16": total / fp16 if fp16 else None,
    }


_ACCOUNTS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def weight_accounting(model: nn.Module) -> dict[str, Any]:
    """Where the model's weight bytes go, and what the packed-size formula predicts for them.

    `bytes` = `quantized_bytes` (the packed codes, scales and zero points the quantized modules
    hold) + `other_bytes` (every other parameter and persistent buffer: the 16-bit parts, biases).
    `formula_bytes` = `quantized_formula_bytes` (`veq.format.packed_nbytes` summed over the
    quantized matrices as they are on disk: experts unfused, gate and up apart) + `other_bytes`;
    `formula_ratio` = bytes ÷ formula_bytes. In memory zero points take a byte each instead of
    b bits (the kernel layout), which `quantized_kernel_formula_bytes` predicts exactly.
    `fp16_bytes` is the same model with every floating-point weight in 16 bits. Computed once
    per loaded model (cached while it lives).
    """
    cached = _ACCOUNTS.get(model)
    if cached is None:
        cached = _ACCOUNTS[model] = _weight_accounting(model)
    return dict(cached)


def kv_cache_geometry(runner: ModelRunner, max_model_len: int) -> dict[str, Any]:
    """KV-cache bytes per token and per sequence of `max_model_len` tokens
    (`ModelRunner.kv_geometry`: layers × key/value heads × (key + value head dim) × the
    activation dtype's size; the engine keeps the cache in the model's dtype)."""
    g = runner.kv_geometry()
    return {
        "bytes_per_token": g.bytes_per_token,
        "max_model_len": max_model_len,
        "bytes_per_sequence": g.bytes_per_token * max_model_len,
        "dtype": str(g.dtype).removeprefix("torch."),
        "layers": g.layers,
        "kv_heads": g.heads,
        "head_dim_k": g.dk,
        "head_dim_v": g.dv,
    }
