"""bench/roofline.py and bench/aot.py end to end on a CPU (neither needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module


def test_roofline_reads_what_the_active_experts_hold(monkeypatch, capsys):
    roofline = _load("roofline", monkeypatch)
    assert roofline.main(["--no-write", "--tokens", "1,16"]) == 0
    out = capsys.readouterr().out
    # T = 1: 8 experts × gate‖up [1536, 2048] in bf16, plus x in and h out for 8 picks.
    bf16 = 8 * 1536 * 2048 * 2 + 2 * 8 * (2048 + 768)
    row = next(line for line in out.splitlines() if line.startswith("| 1 | moe gate‖up |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mb, h100, h200 = (float(v) for v in cells[2].split(" · "))
    assert mb == pytest.approx(bf16 / 1e6, abs=0.01)
    assert h100 == pytest.approx(bf16 / 3.0e12 * 1e6, abs=0.1)
    assert h200 == pytest.approx(bf16 / 4.3e12 * 1e6, abs=0.1)
    w4 = float(cells[4].split(" · ")[0])  # columns: bf16, W8, W4, W3, W2
    assert 3.7 < mb / w4 < 3.9  # 4-bit codes + g128 scales and zeros
    # More tokens reach more experts: 16 tokens × 8 picks of 128 reach ~82 in expectation.
    row16 = next(line for line in out.splitlines() if line.startswith("| 16 | moe gate‖up |"))
    mb16 = float(row16.strip("|").split("|")[2].split(" · ")[0])
    assert mb16 / mb == pytest.approx(roofline.active_experts(16) / 8, rel=0.01)
    assert "not a measurement" in out


def test_aot_publishes_finished_reports(monkeypatch, capsys, tmp_path):
    aot = _load("aot", monkeypatch)
    written = {}
    monkeypatch.setattr(aot, "write_section", lambda name, text: written.update({name: text}))
    row = {"arch": "sm_90", "kernel": "moe_gate_up_kernel", "regime": "decode", "variants": 2,
           "failed": 0, "over_smem": 1, "smem_kb": (40.0, 300.0), "registers": (96, 128),
           "spilling": 0, "max_spill": 0, "instr_per_weight": (9.5, 12.0), "mma": "mma.sync",
           "min_programs": 384}  # fmt: skip
    variants = [{"decode": True, "spill_bytes": 12}, {"decode": False, "spill_bytes": 0}]
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"triton": "3.9.0", "summary": [row], "variants": variants}))
    assert aot.main(["--json", str(report), "--label", "after"]) == 0
    text = written["aot"]
    assert "### after: 2 distinct compiles, 2 problems" in text  # 1 over smem + 1 decode spill
    assert "| sm_90 | moe_gate_up_kernel | decode | 2 | 0 | 1 | 40–300 | 96–128 |" in text
    assert "9.5–12.0" in text and text.strip() == capsys.readouterr().out.strip()


@pytest.mark.slow
@pytest.mark.e2e
def test_gpu_answer_serves_one_answer_on_its_cpu_twin(monkeypatch, tmp_path):
    """The last step of bench/gpu_check.sh, on the CPU: `veq serve --model mini` (VEQ W4) in a
    child process, one image+text chat request, the answer names the circle's colour."""
    answer = _load("gpu_answer", monkeypatch)
    out = tmp_path / "answer.json"
    args = ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--log", str(tmp_path / "serve.log"), "--ready-timeout", "600"]  # fmt: skip
    assert answer.main(args) == 0
    result = json.loads(out.read_text())
    assert result["status"] == 200
    assert "red" in result["response"]["choices"][0]["message"]["content"].lower()
    assert result["stats"]["weights"]  # /admin/stats answered with the admin key
