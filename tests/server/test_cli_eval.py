"""`veq eval` on the bundled model: the JSON rows, their consistency, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from server.cli import main
from veq.reference import MINI_DIR, mini_available
from veq.reference.quality import Setting, kl_divergence, settings_grid

needs_mini = pytest.mark.skipif(not mini_available(), reason=f"no reference model in {MINI_DIR}")
KEYS = {
    "method",
    "bits",
    "group_size",
    "accuracy",
    "per_family",
    "answer_nll",
    "kl",
    "weight_bytes",
    "top1_agreement",
    "flips_lost",
    "flips_gained",
}


def test_kl_matches_torch():
    torch.manual_seed(0)
    p = torch.randn(5, 11).log_softmax(-1)
    q = torch.randn(5, 11).log_softmax(-1)
    expected = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected)
    assert torch.all(kl_divergence(p, p).abs() < 1e-6)


def test_settings_grid_and_mixed_precision_widths():
    grid = settings_grid(["rtn", "veq"], [4, 2], 64, [2.5])
    assert [s.label for s in grid] == [
        "rtn-w4g64",
        "rtn-w2g64",
        "veq-w4g64",
        "veq-w2g64",
        "rtn-mp2.5g64",
        "veq-mp2.5g64",
    ]
    assert Setting("veq", 2.5, 128, True).quantize_kwargs() == {
        "method": "veq",
        "bits": 3,
        "mixed_precision": 2.5,
        "group_size": 128,
        "symmetric": None,
    }
    assert Setting("veq", 4, 128, symmetric=True).label == "veq-w4g128-sym"
    assert Setting("veq", 4, 128, symmetric=False).quantize_kwargs()["symmetric"] is False


@needs_mini
def test_eval_writes_consistent_rows(tmp_path, capsys):
    from veq.reference.encode import write_calibration_jsonl
    from veq.reference.evaluate import evaluate, heldout_samples, load_reference

    calib = write_calibration_jsonl(tmp_path / "calib", 4)
    out = tmp_path / "rows.json"
    argv = ["eval", "--model", "mini", "--methods", "rtn,gptq", "--bits", "8,2"]
    argv += ["--samples", "48", "--seed", "7", "--calib", str(calib), "--calib-samples", "4"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:5] == ["method", "bits", "group", "calib", "acc%"]

    rows = json.loads(out.read_text())
    assert [(r["method"], r["bits"]) for r in rows] == [
        ("none", 16),
        ("rtn", 8),
        ("rtn", 2),
        ("gptq", 8),
        ("gptq", 2),
    ]
    assert all(KEYS <= set(r) for r in rows)
    base, *quant = rows
    assert base["kl"] == 0 and base["group_size"] is None
    assert base["top1_agreement"] == 1.0 and base["flips_lost"] == base["flips_gained"] == 0
    # The 16-bit row is the model card's evaluation of the same held-out questions.
    model, processor = load_reference(MINI_DIR)
    expected = evaluate(model, processor, heldout_samples(48, 300_000_007))
    assert base["accuracy"] == pytest.approx(expected.accuracy)
    assert base["answer_nll"] == pytest.approx(expected.answer_nll, rel=1e-4)
    for r in quant:
        assert r["group_size"] == 128 and r["kl"] > 0
        assert set(r["per_family"]) == set(base["per_family"])
        # Flips account for every change of accuracy, question by question.
        n = 48
        assert round(n * (r["accuracy"] - base["accuracy"])) == r["flips_gained"] - r["flips_lost"]
        assert 0 < r["top1_agreement"] <= 1
    w = {(r["method"], r["bits"]): r["weight_bytes"] for r in rows}
    # Packed codes plus fp16 scales and int zero points per 128 columns: a bit under 16/b ×.
    assert 1.8 < w["none", 16] / w["rtn", 8] < 2.0
    assert 6.0 < w["none", 16] / w["rtn", 2] < 8.0 and w["gptq", 2] == w["rtn", 2]
    # 8-bit rounding barely moves the answer distribution; 2-bit moves it by far more.
    assert quant[1]["kl"] > 10 * quant[0]["kl"]
    assert quant[1]["top1_agreement"] < quant[0]["top1_agreement"]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse rejects the flag itself
        return int(exc.code)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "rtn,nope"], "unknown method"),
        (["--bits", "5"], "bits must be among"),
        (["--seed", "-1"], "--seed must be in"),
        (["--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_eval_bad_input_is_one_line(argv, message, capsys):
    assert _exit_code(["eval", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.splitlines()[-1] and "Traceback" not in err
