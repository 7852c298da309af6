"""`veq bench` against real servers on loopback: the report's numbers, its files, the memory
truth (weight bytes against the packed-size formula and against an independent count from the
model's config), Ctrl-C, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import matplotlib.image
import pytest
from transformers import AutoConfig

from server.cli import main
from server.loadtest import LoadConfig, make_messages, run_load, spawn_server

pytestmark = pytest.mark.e2e

API_KEY, ADMIN_KEY = "test-key", "admin-key"
KEYS = ["--api-key", API_KEY, "--admin-key", ADMIN_KEY]


def _veq() -> list[str]:
    exe = Path(sys.executable).with_name("veq")
    return [str(exe)] if exe.exists() else [shutil.which("veq") or "veq"]


def _counter(url: str, name: str) -> float:
    """A Prometheus counter's value from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def _expected_quantized_params(model_dir: Path) -> int:
    """Attention q/k/v/o and every expert's gate/up/down, counted from the config alone."""
    c = AutoConfig.from_pretrained(model_dir).text_config
    h, heads, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attention = 2 * h * heads * hd + 2 * h * kv * hd
    experts = c.num_experts * 3 * h * c.moe_intermediate_size
    return c.num_hidden_layers * (attention + experts)


def test_compare_report_adds_up(server_factory, tiny_dir, tmp_path):
    w16 = server_factory(bits=16)
    w4 = server_factory(bits=4)  # group size 32 (make_settings)
    before = {
        s.url: (
            _counter(s.url, "veq_completion_tokens_total"),
            _counter(s.url, "veq_prompt_tokens_total"),
        )
        for s in (w16, w4)
    }
    out = tmp_path / "report"
    args = ["bench", "--compare", w16.url, w4.url, *KEYS, "--requests", "12"]
    args += ["--concurrency", "3", "--max-tokens", "6", "--warmup", "0", "--no-progress"]
    args += ["--sample-interval", "0.2", "--out", str(out)]
    assert main(args) == 0

    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    png = matplotlib.image.imread(out / "report.png")
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 500
    assert "![memory and throughput per setting](report.png)" in md
    assert not report["interrupted"] and report["failed"] is None
    a, b = report["settings"]
    assert (a["label"], b["label"]) == ("16-bit (float32)", "W4 rtn g32")
    assert report["baseline"] == "16-bit (float32)"
    for label in (a["label"], b["label"]):
        assert f"| {label} |" in md

    # Requests and tokens add up, client side and against the server's own counters.
    cfg = LoadConfig("http://unused", seed=0)
    with_image = sum(
        any(p["type"] == "image_url" for p in make_messages(cfg, i)[0]["content"])
        for i in range(12)
    )
    for s, live in ((a, w16), (b, w4)):
        t, results = s["throughput"], s["results"]
        assert t["requests"] == len(results) == 12
        assert t["ok"] + t["failed"] == 12 and t["ok"] == 12 and t["errors"] == {}
        assert t["completion_tokens"] == sum(r["completion_tokens"] for r in results) > 0
        assert t["prompt_tokens"] == sum(r["prompt_tokens"] for r in results)
        assert all(1 <= r["completion_tokens"] <= 6 for r in results)
        assert t["with_image"] == with_image
        completion, prompt = before[live.url]
        assert (
            _counter(live.url, "veq_completion_tokens_total") - completion == t["completion_tokens"]
        )
        assert _counter(live.url, "veq_prompt_tokens_total") - prompt == t["prompt_tokens"]
        assert t["req_per_s"] == pytest.approx(12 / t["wall_s"])
        assert t["output_tok_per_s"] == pytest.approx(t["completion_tokens"] / t["wall_s"])
        assert all(r["ttft"] <= r["latency"] for r in results)
        ttft, latency = t["ttft_s"], t["latency_s"]
        assert 0 < ttft["p50"] <= ttft["p95"] <= ttft["p99"] <= latency["p99"]
        assert s["memory"]["samples"] >= 2 and s["memory"]["peak_host_rss"] > 0
        assert s["memory"]["peak_host_rss"] == max(x["host_rss"] for x in s["samples"])

    # Memory truth. 16-bit on CPU is fp32: 4 bytes a parameter, nothing quantized.
    m16, m4 = a["memory"], b["memory"]
    params = m16["params"]
    assert m16["weight_bytes"] == 4 * params == m16["formula_bytes"]
    assert m16["quantized_params"] == 0 and m16["ratio_to_fp16"] == pytest.approx(2.0)
    # 4-bit: the quantized matrices are exactly attention + experts, counted from the config.
    q = _expected_quantized_params(tiny_dir)
    assert m4["quantized_params"] == q and m4["params"] == params
    # Symmetric W4 (the default): just under the packed-size formula on disk, which also counts
    # each linear's 16-byte `weight_shape`; exactly the kernel-layout formula.
    assert 0.98 < m4["formula_ratio"] < 1.0
    assert m4["weight_bytes"] == m4["quantized_bytes"] + m4["other_bytes"]
    assert m4["quantized_bytes"] == m4["quantized_kernel_formula_bytes"]
    assert (
        0.98 * m4["quantized_formula_bytes"] < m4["quantized_bytes"] < m4["quantized_formula_bytes"]
    )
    # Below the 16-bit setting by the expected ratio: 0.5 byte a code + a 16-bit scale per
    # 32-column group (symmetric: no zero points), the rest fp32 (computed here, not by the
    # server).
    per_param = 0.5 + 2 / 32
    expected = (4 * (params - q) + per_param * q) / (4 * params)
    assert m4["ratio_to_16bit_setting"] == pytest.approx(m4["weight_bytes"] / m16["weight_bytes"])
    assert m4["ratio_to_16bit_setting"] == pytest.approx(expected, rel=0.05)
    assert m4["ratio_to_16bit_setting"] < 0.8

    # KV cache: the formula per token matches a real prefill's cache; the extra sequences are
    # the savings over the KV bytes of one max-length sequence.
    runner = w4.state.engine.runner
    inputs = dict(runner.processor(text=["how many shapes are there"], return_tensors="pt"))
    pre = runner.prefill([inputs])[0]
    length = pre.keys[0].shape[2]
    real = sum(k.nbytes + v.nbytes for k, v in zip(pre.keys, pre.values, strict=True)) / length
    assert m4["kv_bytes_per_token"] == real
    assert m4["max_model_len"] == 512
    assert m4["kv_bytes_per_sequence"] == 512 * real
    saved = m16["weight_bytes"] - m4["weight_bytes"]
    assert m4["saved_vs_16bit_setting_bytes"] == saved
    assert m4["extra_sequences_vs_16bit_setting"] == pytest.approx(saved / (512 * real))
    assert m4["saved_vs_fp16_bytes"] == 2 * q - m4["quantized_bytes"] > 0


def test_ignore_eos_gives_fixed_length_answers(live, tmp_path):
    """`--ignore-eos`: every request generates exactly --max-tokens, as the report counts."""
    out = tmp_path / "fixed"
    args = ["bench", "--url", live.url, *KEYS, "--requests", "6", "--concurrency", "3"]
    args += ["--max-tokens", "5", "--ignore-eos", "--warmup", "0", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    (s,) = json.loads((out / "report.json").read_text())["settings"]
    assert s["throughput"]["ok"] == 6 and s["throughput"]["completion_tokens"] == 30


def test_interrupt_writes_partial_report(live, tmp_path, monkeypatch):
    """KeyboardInterrupt raised inside the load (as asyncio delivers Ctrl-C on 3.10)."""
    import server.loadtest.load as load

    real_one, done = load._one, []

    async def one(*args, **kwargs):
        result = await real_one(*args, **kwargs)
        done.append(result)
        if len(done) == 6:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(load, "_one", one)
    out = tmp_path / "partial"
    args = ["bench", "--url", live.url, *KEYS, "--requests", "40", "--concurrency", "2"]
    args += ["--max-tokens", "4", "--warmup", "0", "--no-progress", "--out", str(out)]
    assert main(args) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"]
    (s,) = report["settings"]
    assert s["throughput"]["interrupted"] and s["throughput"]["requests"] == 5
    assert s["throughput"]["wall_s"] > 0 and s["memory"]["weight_bytes"] > 0
    assert "Interrupted (Ctrl-C): partial results" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 0


def test_sigint_to_the_command_writes_partial_report(live, tmp_path):
    """A real Ctrl-C (SIGINT) to a running `veq bench`: exit 130 and a partial report."""
    out = tmp_path / "sigint"
    cmd = [*_veq(), "bench", "--url", live.url, *KEYS, "--requests", "100000"]
    cmd += ["--concurrency", "2", "--max-tokens", "4", "--warmup", "0", "--out", str(out)]
    served = live.state.metrics.completion_tokens
    start = served._value.get()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while served._value.get() < start + 8 and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "partial report in" in stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and report["settings"][0]["throughput"]["ok"] >= 1
    assert (out / "report.md").exists() and (out / "report.png").exists()


def test_unreachable_url_is_one_line_and_nonzero(tmp_path, port):
    out = tmp_path / "nothing"
    res = subprocess.run(
        [*_veq(), "bench", "--url", f"http://127.0.0.1:{port()}", "--requests", "2"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("veq: error: cannot reach http://127.0.0.1:")
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1"),
        (["--duration", "-1"], "--duration must be positive"),
        (["--url", "ftp://example.org"], "not an http(s) URL"),
        (["--compare", "http://127.0.0.1:1"], "--compare takes two or more URLs"),
    ],
)
def test_bad_values_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("veq: error:") and message in err and "\n" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--spawn", "bits=5"],
        ["--spawn", "size=4"],
        ["--requests", "3", "--duration", "2"],
        ["--url", "http://a", "--spawn", "bits=4"],
        ["--concurrency", "many"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--api-key", "wrong"], "refused the API key (401)"),
        (["--api-key", API_KEY, "--admin-key", "wrong"], "refused the admin key (401)"),
        (["--api-key", API_KEY, "--model", "nope"], "does not serve 'nope'"),
    ],
)
def test_server_refusals_are_one_line_errors(live, extra, message, tmp_path, capsys):
    args = ["bench", "--url", live.url, *extra, "--requests", "1", "--out", str(tmp_path / "r")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("veq: error:") and message in err and "\n" not in err


def test_failing_requests_are_reported_and_exit_nonzero(live, tmp_path, capsys, monkeypatch):
    """Every request rejected by the server (here: max_tokens over its limit) → report, exit 1."""
    out = tmp_path / "bad"
    args = ["bench", "--url", live.url, *KEYS, "--requests", "4", "--concurrency", "2"]
    args += ["--max-tokens", "100000", "--warmup", "0", "--no-progress", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("veq: error: every request to W4 rtn g32 failed (HTTP 400")
    report = json.loads((out / "report.json").read_text())
    assert report["settings"][0]["throughput"]["errors"] == {"400": 4}


@pytest.mark.slow
def test_spawn_starts_and_stops_one_server_per_setting(tiny_dir, tmp_path, monkeypatch):
    import server.loadtest.spawn as spawn

    started: list[subprocess.Popen] = []
    real_popen = spawn.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(spawn.subprocess, "Popen", popen)
    monkeypatch.setenv("VEQ_SAMPLES", "2")
    monkeypatch.setenv("VEQ_GAMMA", "10")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "spawn"
    args = ["bench", "--spawn", "bits=16,4", "--model", str(tiny_dir), "--group-size", "32"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--threads", "1"]
    args += ["--requests", "4", "--concurrency", "2", "--max-tokens", "4", "--no-progress"]
    args += ["--ready-timeout", "240", "--out", str(out)]
    assert main(args) == 0
    assert len(started) == 2
    assert all(p.poll() is not None for p in started)  # stopped, not left running
    assert all(p.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM) for p in started)
    report = json.loads((out / "report.json").read_text())
    labels = [s["label"] for s in report["settings"]]
    assert labels == ["16-bit (float32)", "W4 rtn g32"]
    assert all(s["spawned"] and s["throughput"]["ok"] == 4 for s in report["settings"])
    m4 = report["settings"][1]["memory"]
    assert m4["quantized_params"] == _expected_quantized_params(tiny_dir)
    assert 0.98 < m4["formula_ratio"] < 1.0 and m4["ratio_to_16bit_setting"] < 0.8
    logs = sorted(p.name for p in out.glob("serve-*.log"))
    assert logs == ["serve-0-w16.log", "serve-1-w4.log"]
    assert "Traceback" not in "".join(p.read_text() for p in out.glob("serve-*.log"))


def test_bench_serve_script_reuses_the_spawner():
    """bench/serve.py imports and starts its servers through `server.loadtest.spawn`."""
    path = Path(__file__).parents[2] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.spawn_server is spawn_server and module.run_load is run_load
