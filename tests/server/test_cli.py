"""The `veq` console script as a user runs it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main

SUBCOMMANDS = ["quantize", "export", "eval", "models", "serve", "bench"]


def _veq() -> list[str]:
    exe = Path(sys.executable).with_name("veq")
    return [str(exe)] if exe.exists() else [shutil.which("veq") or "veq"]


def test_console_script_lists_subcommands():
    out = subprocess.run([*_veq(), "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: veq {name}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("veq 0.")


def test_bad_flag_value_is_one_line_and_nonzero():
    res = subprocess.run(
        [*_veq(), "quantize", "--bits", "5"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 2
    assert "invalid choice: 5" in res.stderr
    assert "Traceback" not in res.stderr


def test_negative_tune_epochs_is_one_line_and_nonzero(capsys):
    assert main(["quantize", "--tune-epochs", "-1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "greater than or equal to 0" in err


def test_out_of_range_fp_target_is_one_line_and_nonzero(capsys):
    assert main(["quantize", "--fp-target", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("veq: error:") and "less than or equal to 1" in err
    assert len(err.splitlines()) == 1


def test_group_size_parsing():
    parser = build_parser()
    assert parser.parse_args(["quantize", "--group-size", "channel"]).group_size is None
    assert parser.parse_args(["quantize", "--group-size", "64"]).group_size == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--group-size", "48"])


def test_quantize_passes_lam_and_the_models_own_calibration_source(monkeypatch, capsys):
    import veq.api

    seen = {}

    class Done:
        def summary(self) -> str:
            return "done"

    def fake_quantize(model, **kwargs):
        seen.update(kwargs, model=model)
        return Done()

    monkeypatch.setattr(veq.api, "quantize", fake_quantize)
    assert main(["quantize", "--method", "veq-ma", "--lam", "0.5", "--quiet"]) == 0
    assert seen["lam"] == 0.5 and seen["method"] == "veq-ma" and seen["model"] == "mini"
    assert seen["calib"] is None  # veq.api.default_calib picks shapes for mini
    assert seen["range_search"] is False  # off unless asked for
    assert capsys.readouterr().out.strip() == "done"
    assert main(["quantize", "--method", "gptq", "--range-search", "--quiet"]) == 0
    assert seen["range_search"] is True and seen["method"] == "gptq"
    assert seen["gamma_per_layer"] is False
    assert main(["quantize", "--gamma-per-layer", "--quiet"]) == 0
    assert seen["gamma_per_layer"] is True and seen["weighted_search"] is True
    assert main(["quantize", "--no-weighted-search", "--quiet"]) == 0
    assert seen["weighted_search"] is False and seen["check_scales"] is False
    assert main(["quantize", "--check-scales", "--quiet"]) == 0
    assert seen["check_scales"] is True and seen["fp_target"] is None  # the method's default
    assert main(["quantize", "--fp-target", "0.25", "--quiet"]) == 0
    assert seen["fp_target"] == 0.25 and seen["true_sequential"] is False
    assert main(["quantize", "--true-sequential", "--quiet"]) == 0
    assert seen["true_sequential"] is True
    assert seen["tune_epochs"] is None and seen["tune_lr"] == 2e-3  # the width's default
    assert main(["quantize", "--tune-epochs", "3", "--tune-lr", "0.01", "--quiet"]) == 0
    assert seen["tune_epochs"] == 3 and seen["tune_lr"] == 0.01


def test_models_lists_bundled(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["name", "parameters", "path"]
    assert out.splitlines()[1].startswith("mini")
