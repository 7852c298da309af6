"""The load test's report: numbers per setting, as JSON and as Markdown.

Owns the derived memory figures (`memory_summary`: weight bytes as the server reports them
against the packed-size formula, ratios to fp16 and to the run's 16-bit setting, sampled peaks
of device or host memory, and the KV-cache room the savings free at the model's max length)
and the two text files (`report.json`, `report.md`), written atomically so that an interrupted
run never leaves half a file. The figure is `figure.py`'s.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import veq
from server.loadtest.load import LoadConfig
from server.loadtest.session import BenchResult, SettingResult

MiB = 2**20


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _baseline(result: BenchResult) -> SettingResult | None:
    """The run's 16-bit setting with stats, if any (the memory comparisons' reference)."""
    for s in result.settings:
        if s.target.bits == 16 and s.stats is not None:
            return s
    return None


def memory_summary(s: SettingResult, base: SettingResult | None) -> dict[str, Any]:
    """One setting's memory figures (None where the server did not say: no admin key)."""
    stats = s.stats or {}
    w = stats.get("weights") or {}
    kv = stats.get("kv_cache") or {}
    weight = stats.get("weight_bytes", s.target.card.get("weight_bytes"))
    peaks = dict(s.sampler.peaks) if s.sampler else {}
    per_seq = kv.get("bytes_per_sequence")
    quant_params, quant_bytes = w.get("quantized_params"), w.get("quantized_bytes")
    saved_fp16 = None if quant_params is None else 2 * quant_params - quant_bytes
    base_weight = (base.stats or {}).get("weight_bytes") if base is not None else None
    saved_base = None if base_weight is None or weight is None else base_weight - weight
    return {
        "weight_bytes": weight,
        "formula_bytes": w.get("formula_bytes"),
        "formula_ratio": w.get("formula_ratio"),
        "quantized_bytes": quant_bytes,
        "quantized_formula_bytes": w.get("quantized_formula_bytes"),
        "quantized_kernel_formula_bytes": w.get("quantized_kernel_formula_bytes"),
        "quantized_params": quant_params,
        "quantized_matrices": w.get("quantized_matrices"),
        "other_bytes": w.get("other_bytes"),
        "params": w.get("params"),
        "fp16_bytes": w.get("fp16_bytes"),
        "ratio_to_fp16": w.get("ratio_to_fp16"),
        "ratio_to_16bit_setting": _div(weight, base_weight),
        "device": stats.get("device"),
        "dtype": stats.get("dtype"),
        "peak_host_rss": peaks.get("host_rss"),
        "peak_device_allocated": peaks.get("device_allocated"),
        "peak_device_reserved": peaks.get("device_reserved"),
        "peak_kv_cache_bytes": peaks.get("kv_cache_bytes"),
        "server_lifetime_peaks": {
            k: v for k, v in (stats.get("memory") or {}).items() if "peak" in k
        },
        "samples": len(s.sampler.samples) if s.sampler else 0,
        "kv_bytes_per_token": kv.get("bytes_per_token"),
        "max_model_len": kv.get("max_model_len"),
        "kv_bytes_per_sequence": per_seq,
        "saved_vs_fp16_bytes": saved_fp16,
        "extra_sequences_vs_fp16": _div(saved_fp16, per_seq),
        "saved_vs_16bit_setting_bytes": saved_base,
        "extra_sequences_vs_16bit_setting": _div(saved_base, per_seq),
    }


def build_report(result: BenchResult) -> dict[str, Any]:
    """The whole report as one JSON-able dict."""
    base = _baseline(result)
    opts = result.options
    return {
        "veq_version": veq.__version__,
        "created": dt.datetime.fromtimestamp(result.started).isoformat(timespec="seconds"),
        "command": opts.command,
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "interrupted": result.interrupted,
        "failed": result.failed,
        "baseline": base.target.label if base else None,
        "load": {
            "concurrency": opts.concurrency,
            "requests": opts.requests,
            "duration_s": None if opts.requests is not None else opts.duration,
            "max_tokens": opts.max_tokens,
            "stream": opts.stream,
            "seed": opts.seed,
            "warmup": opts.warmup,
        },
        "settings": [
            {
                "label": s.target.label,
                "url": s.target.url,
                "model": s.target.model,
                "spawned": s.spawned,
                "quantization": s.target.card,
                "throughput": s.load.summary(),
                "memory": memory_summary(s, base),
                "samples": s.sampler.samples if s.sampler else [],
                "results": s.load.as_dict()["results"],
            }
            for s in result.settings
        ],
    }


def _mib(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v / MiB:.{digits}f}"


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _ms(p: dict[str, float | None]) -> str:
    return " / ".join("–" if p[k] is None else f"{1000 * p[k]:.0f}" for k in ("p50", "p95", "p99"))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_markdown(report: dict[str, Any], figure: str | None = "report.png") -> str:
    """report.md: the throughput table, the memory table, what each column means."""
    load = report["load"]
    mix = LoadConfig("http://unused")  # the request mix (defaults; `veq bench` keeps them)
    amount = (
        f"{load['requests']} requests"
        if load["requests"] is not None
        else f"{load['duration_s']:g} s"
    )
    lines = [
        "# veq load test",
        "",
        f"{report['created']} · veq {report['veq_version']} · `{report['command']}`",
        "",
        f"Concurrency {load['concurrency']}, {amount} per setting, max_tokens "
        f"{load['max_tokens']}, {'streaming' if load['stream'] else 'non-streaming'}, seed "
        f"{load['seed']}, {load['warmup']} warm-up requests; chat requests "
        f"({100 * mix.image_fraction:.0f} % with a {min(mix.image_sizes)}–"
        f"{max(mix.image_sizes)} px image, {mix.prompt_words[0]}–{mix.prompt_words[1]} words).",
        "",
    ]
    if report["interrupted"]:
        lines += ["**Interrupted (Ctrl-C): partial results.**", ""]
    if report["failed"]:
        lines += [f"**Stopped by an error:** {report['failed']}", ""]
    if figure:
        lines += [f"![memory and throughput per setting]({figure})", ""]
    rows = []
    for s in report["settings"]:
        t = s["throughput"]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(t["errors"].items())) or "0"
        rows.append(
            [
                s["label"],
                f"{t['ok']}/{t['requests']}" + (" (interrupted)" if t["interrupted"] else ""),
                errors,
                f"{t['req_per_s']:.2f}",
                f"{t['output_tok_per_s']:.1f}",
                f"{t['completion_tokens']}",
                _ms(t["ttft_s"]),
                _ms(t["latency_s"]),
            ]
        )
    lines += [
        "## Throughput",
        "",
        _table(
            [
                "setting",
                "ok/sent",
                "errors",
                "req/s",
                "output tok/s",
                "output tokens",
                "TTFT p50/p95/p99 ms",
                "latency p50/p95/p99 ms",
            ],
            rows,
        ),
        "",
    ]
    rows = []
    for s in report["settings"]:
        m = s["memory"]
        on_gpu = m["peak_device_allocated"] is not None
        process = (
            f"{_mib(m['peak_device_allocated'], 1)} / {_mib(m['peak_device_reserved'], 1)} (GPU)"
            if on_gpu
            else f"{_mib(m['peak_host_rss'], 1)} (RSS)"
        )
        rows.append(
            [
                s["label"],
                _mib(m["weight_bytes"]),
                _mib(m["formula_bytes"]),
                _num(m["formula_ratio"], ".4f"),
                _num(m["ratio_to_fp16"], ".3f"),
                _num(m["ratio_to_16bit_setting"], ".3f"),
                process,
                _num(m["kv_bytes_per_token"], ",d"),
                _mib(m["kv_bytes_per_sequence"]),
                _mib(m["saved_vs_16bit_setting_bytes"]),
                _num(m["extra_sequences_vs_16bit_setting"], ".1f"),
                _mib(m["saved_vs_fp16_bytes"]),
                _num(m["extra_sequences_vs_fp16"], ".1f"),
            ]
        )
    max_len = {s["memory"]["max_model_len"] for s in report["settings"]} - {None}
    at = f" at max_model_len {', '.join(map(str, sorted(max_len)))}" if max_len else ""
    lines += [
        "## Memory",
        "",
        _table(
            [
                "setting",
                "weights MiB (server)",
                "formula MiB",
                "server ÷ formula",
                "÷ fp16",
                "÷ 16-bit setting",
                "peak process MiB",
                "KV bytes/token",
                f"KV MiB/sequence{at}",
                "saved vs 16-bit setting MiB",
                "= extra sequences",
                "saved vs fp16 MiB",
                "= extra sequences",
            ],
            rows,
        ),
        "",
        "- **weights (server)**: the bytes of every parameter and persistent buffer of the served "
        "model, packed codes, scales and zero points included (`/admin/stats` `weight_bytes`).",
        "- **formula**: `veq.format.packed_nbytes` (the compressed-tensors `pack-quantized` size) "
        "summed over the quantized matrices, plus the bytes of the parts that stay unquantized. "
        "In memory the kernels keep no 16-byte `weight_shape` per matrix and, for asymmetric "
        "codes, one byte per zero point instead of b bits, so the ratio sits within a few "
        "percent of 1 (just below for symmetric codes, the 4- and 8-bit default); the "
        "kernel-layout formula (`quantized_kernel_formula_bytes` in report.json) matches "
        "exactly.",
        "- **÷ fp16**: against the same model with every floating-point weight in 16 bits. On CPU "
        "the server keeps unquantized parts in fp32 (and serves `--bits 16` as fp32), which this "
        "ratio and the 16-bit setting's size show.",
        "- **peak process**: the largest value sampled from `/admin/stats` during the load: the "
        "CUDA allocator's allocated / reserved bytes on a GPU, the server process's resident set "
        "on CPU.",
        "- **saved … = extra sequences**: the weight bytes saved ÷ the KV-cache bytes of one "
        "sequence at the server's max_model_len: how many more full-length sequences that memory "
        "holds. *vs fp16* counts only the quantized matrices (16-bit bytes − packed bytes).",
    ]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_report(result: BenchResult, figure: bool = True) -> dict[str, Any]:
    """Write report.json, report.md (and report.png) into the run's output directory."""
    from server.loadtest.figure import draw

    out = result.options.out
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    _atomic_write(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    drawn = False
    if figure and report["settings"]:
        drawn = draw(report, out / "report.png")
    md = render_markdown(report, "report.png" if drawn else None)
    _atomic_write(out / "report.md", md.encode())
    return report
