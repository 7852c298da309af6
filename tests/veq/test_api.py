"""`veq.quantize` / `veq.load` and the `veq quantize` command on a model directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import veq
from veq import api
from veq.calib import gamma as gamma_mod
from veq.calib import placement
from veq.checkpoint import MANIFEST, atomic_directory, read_tensors, verify


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_model, processor):
    path = tmp_path_factory.mktemp("models") / "tiny-qwen3-vl-moe"
    tiny_model("qwen3_vl_moe").save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_quantize_caches_and_loads(qwen_dir, tmp_path, calib):
    cache = tmp_path / "cache"
    kw = dict(
        bits=4, samples=3, gamma=10.0, cache_dir=cache, group_size=32, progress=False, device="cpu"
    )
    first = veq.quantize(qwen_dir, method="gptq", **kw)
    assert not first.cached and verify(first.path)
    assert first.path.parent == cache and "gptq-w4g32" in first.path.name
    again = veq.quantize(qwen_dir, method="gptq", **kw)
    assert again.cached and again.path == first.path
    other = veq.quantize(qwen_dir, method="rtn", **kw)
    assert other.path != first.path
    model, processor = veq.load(first.path, device="cpu")
    assert type(model.model.language_model.layers[0].mlp.experts).__name__ == "QuantMoEExperts"
    sample = calib("qwen3_vl_moe")[0]
    with torch.no_grad():
        assert torch.isfinite(model(**sample.inputs).logits).all()
    config = json.loads((first.path / "config.json").read_text())
    assert config["quantization_config"]["veq"]["method"] == "gptq"


def test_truncated_shard_is_detected_and_rebuilt(qwen_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    kw = dict(
        method="rtn",
        bits=3,
        samples=2,
        gamma=10.0,
        cache_dir=cache,
        group_size=32,
        progress=False,
        device="cpu",
    )
    first = veq.quantize(qwen_dir, **kw)
    shard = first.path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert not verify(first.path)
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        veq.load(first.path)
    rebuilt = veq.quantize(qwen_dir, **kw)
    assert not rebuilt.cached and rebuilt.path == first.path and verify(rebuilt.path)
    assert "rebuilding" in caplog.text


def test_gamma_auto_is_measured_or_falls_back_with_its_reason(
    qwen_dir, tmp_path, monkeypatch, tiny_model, calib
):
    kw = dict(
        method="gptq", bits=4, samples=3, gamma="auto", group_size=32, progress=False, device="cpu"
    )
    monkeypatch.setattr(api, "_MEMO", OrderedDict())  # γ is memoized per process
    measured = veq.quantize(qwen_dir, out=tmp_path / "measured", **kw).report
    direct = gamma_mod.measure_gamma(tiny_model("qwen3_vl_moe"), calib("qwen3_vl_moe", n=3))
    assert measured["gamma_source"] == "measured"
    assert measured["gamma"] == pytest.approx(direct.gamma, rel=1e-6)
    # The same run where the backward pass does not fit: calibrated with the default γ, and the
    # report says why.
    monkeypatch.setattr(api, "_MEMO", OrderedDict())
    monkeypatch.setattr(placement, "free_bytes", lambda device: 0)
    fallback = veq.quantize(qwen_dir, out=tmp_path / "fallback", **kw).report
    assert fallback["gamma"] == 20.0 and fallback["gamma_detail"] == {}
    assert fallback["gamma_source"].startswith(
        "fallback (the model does not fit for a backward pass on cpu"
    )


def test_interrupted_write_leaves_nothing(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert _entries(tmp_path) == []


def _veq_cli(*args: str, **kw) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("veq")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


@pytest.mark.e2e
def test_cli_quantize_summary_and_export(qwen_dir, tmp_path):
    cache = tmp_path / "cache"
    proc = _veq_cli(
        "quantize",
        "--model",
        str(qwen_dir),
        "--method",
        "veq-ma",
        "--bits",
        "3",
        "--samples",
        "3",
        "--gamma",
        "8",
        "--group-size",
        "32",
        "--cache-dir",
        str(cache),
        "--quiet",
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "modules by bits" in out and "×W3" in out and "gamma 8" in out
    (entry,) = _entries(cache)
    proc = _veq_cli("export", "--model", str(cache / entry), "--out", str(tmp_path / "exported"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert verify(tmp_path / "exported") and (tmp_path / "exported" / MANIFEST).exists()
    for target in ("vllm", "sglang"):
        proc = _veq_cli(
            "export",
            "--model",
            str(cache / entry),
            "--for",
            target,
            "--out",
            str(tmp_path / target),
        )
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
        assert "3-bit" in err and not (tmp_path / target).exists()


def _quantize_cli(model: Path, cache: Path, *flags: str) -> dict:
    proc = _veq_cli(
        "quantize", "--model", str(model), "--method", "rtn", "--group-size", "32",
        "--cache-dir", str(cache), "--quiet", *flags,
    )  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    path = Path(out.splitlines()[0].removeprefix("checkpoint: ").removesuffix(" (from cache)"))
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    return {"path": path, "weights": qc["config_groups"]["group_0"]["weights"]}


@pytest.mark.e2e
def test_cli_symmetry_flags_and_export_for_a_target(qwen_dir, tmp_path):
    cache = tmp_path / "cache"
    w8 = _quantize_cli(qwen_dir, cache, "--bits", "8")
    assert w8["weights"]["symmetric"] is True and "-sym" in w8["path"].name
    w8a = _quantize_cli(qwen_dir, cache, "--bits", "8", "--asymmetric")
    assert w8a["weights"]["symmetric"] is False and w8a["path"] != w8["path"]
    for bits in ("2", "3", "4"):
        assert _quantize_cli(qwen_dir, cache, "--bits", bits, "--symmetric")["weights"]["symmetric"]
    exported = {}
    for name, ckpt in (("sym", w8["path"]), ("asym", w8a["path"])):
        for target in ("vllm", "sglang"):
            out_dir = tmp_path / f"{name}-{target}"
            proc = _veq_cli("export", "--model", str(ckpt), "--for", target, "--out", str(out_dir))
            out, err = proc.communicate(timeout=120)
            exported[name, target] = (proc.returncode, err.strip(), verify(out_dir))
    assert exported["sym", "vllm"] == (0, "", True) and exported["sym", "sglang"] == (0, "", True)
    for target in ("vllm", "sglang"):
        rc, err, made = exported["asym", target]
        assert rc == 2 and not made and len(err.splitlines()) == 1 and "asymmetric" in err


@pytest.mark.e2e
def test_cli_bad_input_is_one_line(tmp_path):
    proc = _veq_cli("quantize", "--model", str(tmp_path / "nope"), "--bits", "4")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and err.startswith("veq: error:")


@pytest.mark.e2e
def test_sigint_mid_run_leaves_no_cache_entry(qwen_dir, tmp_path):
    cache = tmp_path / "cache"
    proc = _veq_cli(
        "quantize",
        "--model",
        str(qwen_dir),
        "--method",
        "awq",
        "--bits",
        "4",
        "--samples",
        "48",
        "--gamma",
        "8",
        "--group-size",
        "32",
        "--cache-dir",
        str(cache),
    )
    deadline = time.time() + 240
    seen = ""
    # Wait until calibration is under way: the progress bar's first render, which ends in "\r"
    # (reading whole lines would wait for the bar's last one, when the work is done).
    while time.time() < deadline and "quantize awq" not in seen:
        char = proc.stderr.read(1)
        if not char:
            break
        seen += char
    assert "quantize awq" in seen, seen
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert [e for e in _entries(cache) if not e.startswith(".")] == []
    assert _entries(cache) == []  # and no temporary directory either


def test_veq_at_two_bits_tunes_its_scales_or_says_why_not(qwen_dir, tmp_path, monkeypatch):
    kw = dict(method="veq", bits=2, samples=4, gamma=10.0, group_size=None, progress=False)
    monkeypatch.setattr(api, "_MEMO", OrderedDict())
    tuned = veq.quantize(qwen_dir, out=tmp_path / "tuned", device="cpu", **kw)
    assert tuned.report["recipe"]["tune_epochs"] == 2  # veq's default at 2 bits per channel
    t = tuned.report["tuning"]
    assert t["epochs"] == 2 and t["kl_after"] < t["kl_before"] and t["kept"]
    # The checkpoint holds the tuned scales: it differs from the same recipe untuned.
    untuned = veq.quantize(qwen_dir, out=tmp_path / "untuned", device="cpu", tune_epochs=0, **kw)
    assert untuned.report["tuning"] == {}
    a, b = read_tensors(tuned.path), read_tensors(untuned.path)
    scales = [k for k in a if k.endswith("weight_scale")]
    assert scales and sum(not torch.equal(a[k], b[k]) for k in scales) > len(scales) / 2
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("weight_packed"))
    # Where the backward pass does not fit, the checkpoint is still written, untuned, and the
    # report says why.
    monkeypatch.setattr(api, "_MEMO", OrderedDict())
    monkeypatch.setattr(placement, "free_bytes", lambda device: 0)
    skipped = veq.quantize(qwen_dir, out=tmp_path / "skipped", device="cpu", **kw)
    assert verify(skipped.path)
    assert skipped.report["tuning"]["skipped"].startswith("the model does not fit")
    assert all(torch.equal(read_tensors(skipped.path)[k], b[k]) for k in scales)
