"""kernels.aot: every variant the launchers produce compiles for sm_90 and sm_80, fits the
block's shared memory and does not spill on the decode path (GPU truth without a GPU).

Runs in subprocesses: the compiler needs Triton's JIT, which the rest of the suite replaces
with its interpreter (TRITON_INTERPRET=1 is set before `kernels` is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_enumeration_follows_the_launchers():
    """Variants come from the launchers' own tile choice: change the heuristic, and the
    enumerated configs change with it (a hand-written list would not)."""
    code = textwrap.dedent("""
        import json
        from kernels import aot, tuning
        q = [aot.Quant(3, 32, False, "bf16")]
        before, _ = aot.enumerate_variants(["sm_80"], q, tokens=(1, 4096))
        tuning.heuristic = lambda *a, **k: tuning.BlockConfig(32, 32, 64, 4, 2)
        after, jobs = aot.enumerate_variants(["sm_80"], q, tokens=(1, 4096))
        print(json.dumps({"before": [(v.kernel, v.config, v.decode) for v in before],
                          "after": [(v.kernel, v.config) for v in after],
                          "signature": jobs[0]["signature"]}))
    """)
    res = _run(["-c", code], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.splitlines()[-1])
    kernels = {k for k, _, _ in got["before"]}
    assert kernels == {"dense_wxa16_kernel", "moe_gate_up_kernel", "moe_down_kernel"}
    assert {d for _, _, d in got["before"]} == {True, False}  # decode and prefill regimes
    forced = {"num_warps": 4, "num_stages": 2, "block_m": 32, "block_n": 32, "block_k": 64}
    for kernel, cfg in got["after"]:
        assert {k: v for k, v in cfg.items() if k != "split_k"} == forced, (kernel, cfg)
    assert got["signature"]["q_ptr"] == "*i32" and got["signature"]["x_ptr"] == "*bf16"


@pytest.mark.slow
def test_every_heuristic_variant_compiles_fits_and_does_not_spill(tmp_path):
    """The CI matrix (`python -m kernels.aot`): 0 failures, 0 over the shared-memory limit,
    0 spill bytes on the decode path, and tuning's shared-memory bound holds everywhere."""
    out = tmp_path / "aot.json"
    res = _run(["-m", "kernels.aot", "--json", str(out)], timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    variants = report["variants"]
    limits = {"sm_90": 232_448, "sm_80": 166_912}
    assert {v["arch"] for v in variants} == set(limits)
    assert {v["quant"].split()[0] for v in variants} == {"W2", "W3", "W4", "W8"}
    for v in variants:
        assert v["error"] is None, v
        assert 0 < v["shared"] <= min(limits[v["arch"]], v["estimate"]), v
        assert v["registers"] and v["registers"] <= 255, v
        assert not (v["decode"] and v["spill_bytes"]), v
        assert v["mma"] in ("mma.sync", "wgmma"), v  # tensor cores, never an FMA fallback
