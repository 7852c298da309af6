"""The report writer on synthetic measurements: the GPU branch (allocator figures instead of
RSS), the derived memory numbers, and a run without admin stats. No server, no GPU needed."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from server.loadtest.load import LoadConfig, LoadReport, RequestResult
from server.loadtest.probe import StatsSampler, Target
from server.loadtest.report import write_report
from server.loadtest.session import BenchOptions, BenchResult, SettingResult

MiB = 2**20


def _stats(bits: int, weight: int, quant_params: int, quant_bytes: int) -> dict:
    return {
        "bits": bits,
        "method": None if bits == 16 else "veq",
        "group_size": None if bits == 16 else 128,
        "weight_bytes": weight,
        "device": "cuda",
        "dtype": "bfloat16",
        "weights": {
            "bytes": weight,
            "quantized_bytes": quant_bytes,
            "quantized_params": quant_params,
            "formula_bytes": weight - 1000 if bits != 16 else weight,
            "formula_ratio": weight / (weight - 1000) if bits != 16 else 1.0,
            "fp16_bytes": 2 * 60 * MiB,
            "ratio_to_fp16": weight / (2 * 60 * MiB),
        },
        "kv_cache": {"bytes_per_token": 4096, "max_model_len": 1024, "bytes_per_sequence": 4 * MiB},
        "memory": {"host_rss": 900 * MiB, "device_allocated": 1, "device_peak_allocated": 7},
    }


def _setting(label: str, stats: dict | None, peaks: dict, tokens: int) -> SettingResult:
    cfg = LoadConfig("http://x", requests=2)
    load = LoadReport(cfg, [RequestResult(200, 0.1, 0.2, 10, tokens)] * 2, wall_s=1.0)
    sampler = None
    if stats is not None:
        sampler = StatsSampler("http://x", "k")
        sampler.peaks = peaks
        sampler.samples = [{"t": 0.0, **peaks}]
    card = {"bits": stats["bits"] if stats else 4, "weight_bytes": 123}
    return SettingResult(Target("http://x", "m", card, stats, label), load, sampler, stats)


def test_gpu_report_uses_allocator_figures_and_derives_kv_room(tmp_path):
    w16 = 2 * 60 * MiB
    base = _setting(
        "16-bit (bfloat16)",
        _stats(16, w16, 0, 0),
        {"device_allocated": 130 * MiB, "device_reserved": 140 * MiB, "host_rss": 900 * MiB},
        5,
    )
    q4 = _setting(
        "W4 veq g128",
        _stats(4, 40 * MiB, 50 * MiB, 28 * MiB),
        {"device_allocated": 50 * MiB, "device_reserved": 64 * MiB, "host_rss": 900 * MiB},
        7,
    )
    result = BenchResult(BenchOptions(out=tmp_path, requests=2), [base, q4])
    report = write_report(result)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    m = report["settings"][1]["memory"]
    assert m["ratio_to_16bit_setting"] == pytest.approx(40 / 120)
    assert m["saved_vs_16bit_setting_bytes"] == 80 * MiB
    assert m["extra_sequences_vs_16bit_setting"] == pytest.approx(20.0)  # 80 MiB / 4 MiB
    assert m["saved_vs_fp16_bytes"] == 2 * 50 * MiB - 28 * MiB
    assert m["extra_sequences_vs_fp16"] == pytest.approx(18.0)
    assert m["peak_device_allocated"] == 50 * MiB
    assert m["server_lifetime_peaks"] == {"device_peak_allocated": 7}
    md = (tmp_path / "report.md").read_text()
    assert "| W4 veq g128 | 40.00 |" in md and "50.0 / 64.0 (GPU)" in md
    assert "(RSS)" not in md
    assert report["settings"][0]["throughput"]["completion_tokens"] == 10
    assert matplotlib.image.imread(tmp_path / "report.png").shape[2] in (3, 4)


def test_report_without_admin_stats_says_so_and_still_draws(tmp_path):
    result = BenchResult(BenchOptions(out=tmp_path, requests=2), [_setting("W4", None, {}, 3)])
    result.interrupted = True
    report = write_report(result)
    m = report["settings"][0]["memory"]
    assert m["weight_bytes"] == 123 and m["formula_bytes"] is None and m["samples"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "Interrupted (Ctrl-C)" in md and "| W4 | 0.00 | – |" in md
    assert (tmp_path / "report.png").stat().st_size > 0
