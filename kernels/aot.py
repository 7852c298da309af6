"""Ahead-of-time GPU compilation of every kernel variant the launchers can produce, on any host.

    python -m kernels.aot                      # the CI matrix, sm_90 and sm_80; exit 1 on failure
    python -m kernels.aot --full --markdown F  # every variant; a BENCHMARKS-ready table into F

Why: the Triton interpreter (our CPU test path) accepts what a GPU rejects — tile shapes,
shared memory beyond a block's limit (Triton checks it only at the first launch on a device),
register pressure. `triton.compile` with an explicit `GPUTarget` runs the whole pipeline to a
cubin with the `ptxas` shipped in the triton wheel, no driver needed, and reports shared memory;
ptxas' own log gives registers and spill bytes, and the `nvdisasm` beside it the SASS of the
K loop (instructions per weight: what the dequantisation costs on top of the load).

How variants are found: the real launchers (`kernels.dense.op.dense_wxa16`,
`kernels.moe.op.fused_moe`) run on meta tensors of real model shapes inside
`kernels._launch.recording()`, so every tile choice, specialisation and constexpr comes from the
launchers' own argument construction (a new variant cannot escape), and Triton's own binder turns
the recorded arguments into the signature a launch on a GPU would compile. Identical compiles
(same kernel, signature, constexprs, alignment attributes and options) are compiled once.

A variant fails when it does not compile, needs more shared memory than the target's block
limit, or spills registers on the decode path (≤ `tuning.DECODE_ROWS` rows per expert/matrix).
Owns the check; it does not pick tiles (that is `kernels.tuning`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernels import tuning
from kernels._launch import Launch, recording
from kernels.layout import PackedWeight, lo_bits, padded_k
from kernels.moe.weights import ExpertGroup, MoEWeights

ARCHS: dict[str, int] = {"sm_90": 90, "sm_80": 80}


@dataclass(frozen=True)
class ModelShapes:
    """The quantized GEMMs of one architecture: dense linears `(name, N, K)` and its MoE."""

    name: str
    dense: tuple[tuple[str, int, int], ...]
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    layers: int


# From the models' config.json (text model). Kimi-VL-A3B: DeepSeek-V3 attention (MLA, no
# q LoRA), 2 shared experts served as dense linears, a dense first layer.
MODELS: tuple[ModelShapes, ...] = (
    ModelShapes(
        "Qwen3-VL-30B-A3B",
        (("q_proj", 4096, 2048), ("k_proj", 512, 2048), ("v_proj", 512, 2048),
         ("o_proj", 2048, 4096)),
        experts=128, top_k=8, hidden=2048, intermediate=768, layers=48,
    ),
    ModelShapes(
        "Kimi-VL-A3B",
        (("q_proj", 3072, 2048), ("kv_a_proj_with_mqa", 576, 2048), ("kv_b_proj", 4096, 512),
         ("o_proj", 2048, 2048), ("shared.gate_proj", 2816, 2048), ("shared.down_proj", 2048, 2816),
         ("dense.gate_proj", 11264, 2048), ("dense.down_proj", 2048, 11264)),
        experts=64, top_k=6, hidden=2048, intermediate=1408, layers=27,
    ),
)  # fmt: skip
TOKENS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Quant:
    bits: int
    group: int
    symmetric: bool
    dtype: str

    def __str__(self) -> str:
        return f"W{self.bits} g{self.group} {'sym' if self.symmetric else 'asym'} {self.dtype}"


def quant_matrix(full: bool) -> list[Quant]:
    """Full: every bits × group × symmetry × dtype. CI: every bit width and each tile regime at
    the two extremes of what the dequantisation loads per tile (G32 asymmetric bf16, the most
    scale and zero rows; G128 symmetric fp16, the fewest and the fp16 fast path)."""
    if full:
        return [
            Quant(b, g, s, d)
            for b in (2, 3, 4, 8)
            for g in (32, 64, 128)
            for s in (False, True)
            for d in DTYPES
        ]
    return [Quant(b, *q) for b in (2, 3, 4, 8) for q in ((32, False, "bf16"), (128, True, "fp16"))]


def _meta_weight(n: int, k: int, q: Quant, experts: int | None = None) -> PackedWeight:
    lead = () if experts is None else (experts,)
    kp, ng = padded_k(k), k // q.group

    def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*lead, *shape, dtype=dtype, device="meta")

    return PackedWeight(
        qweight=empty(kp * lo_bits(q.bits) // 32, n, dtype=torch.int32),
        qweight_hi=empty(kp // 32, n, dtype=torch.int32) if q.bits == 3 else None,
        scale=empty(ng, n, dtype=DTYPES[q.dtype]),
        zero=None if q.symmetric else empty(ng, n, dtype=torch.uint8),
        bits=q.bits,
        group_size=q.group,
        n=n,
        k=k,
    )


def _launches(model: ModelShapes, q: Quant, t: int) -> Iterator[tuple[str, int, Launch]]:
    """(gemm name, rows per expert or matrix, launch) for one forward of `t` tokens."""
    from kernels.dense.op import dense_wxa16
    from kernels.moe.op import fused_moe

    dtype = DTYPES[q.dtype]
    x = torch.empty(t, model.hidden, dtype=dtype, device="meta")
    for name, n, k in model.dense:
        if k % q.group:
            continue
        with recording() as rec:
            dense_wxa16(torch.empty(t, k, dtype=dtype, device="meta"), _meta_weight(n, k, q))
        for lnch in rec:
            yield name, t, lnch
    e, h, i = model.experts, model.hidden, model.intermediate
    local_of = torch.arange(e + 1, device="meta")
    weights = MoEWeights(
        gate_up=(ExpertGroup(tuple(range(e)), _meta_weight(2 * i, h, q, e), local_of),),
        down=(ExpertGroup(tuple(range(e)), _meta_weight(h, i, q, e), local_of),),
        num_experts=e, hidden=h, intermediate=i,
    )  # fmt: skip
    ids = torch.empty(t, model.top_k, dtype=torch.int64, device="meta")
    with recording() as rec:
        fused_moe(x, ids, torch.empty(t, model.top_k, device="meta"), weights)
    rows = -(-t * model.top_k // e)
    for lnch in rec:
        yield lnch.kernel.__name__.removesuffix("_kernel"), rows, lnch


@dataclass
class Variant:
    """One distinct compile: what it is, where it is used, and what compiling it showed."""

    kernel: str
    arch: str
    quant: str
    config: dict[str, int]
    constexprs: dict[str, Any]
    uses: list[str] = field(default_factory=list)
    decode: bool = False
    grid_min: int = 0  # fewest programs of any of its launches
    estimate: int = 0  # tuning.shared_bytes: the bound the tile choice relies on
    shared: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    loop_instructions: int | None = None  # SASS instructions per thread in the K loop's body
    mma: str | None = None
    seconds: float = 0.0
    error: str | None = None

    def instructions_per_weight(self) -> float | None:
        """SASS instructions the whole program issues per weight it dequantizes and multiplies
        (the K loop's body × threads ÷ weights per K step): the cost a decode kernel pays on
        top of reading the weight."""
        if not self.loop_instructions:
            return None
        weights = self.config["block_k"] * self.config["block_n"]
        weights *= 2 if self.kernel == "moe_gate_up_kernel" else 1
        return self.loop_instructions * 32 * self.config["num_warps"] / weights

    def problems(self, limit: int) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile failed: {self.error}")
        if self.shared is not None and self.shared > limit:
            out.append(f"shared memory {self.shared} B > {limit} B")
        if self.shared is not None and self.shared > self.estimate:
            out.append(f"shared memory {self.shared} B > tuning.shared_bytes {self.estimate} B")
        if self.decode and self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B on the decode path")
        return out


def _bind(lnch: Launch, backend: Any) -> tuple[dict, dict, dict, Any]:
    """Triton's own binder on the recorded arguments: (signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    fn = lnch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*lnch.args, **lnch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, lnch.kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def _new_variant(
    arch: str, q: Quant, lnch: Launch, bound: tuple[dict, dict, dict, Any]
) -> tuple[Variant, dict[str, Any]]:
    """The variant a bound launch compiles to, and its picklable compile job."""
    sig, cexp, attrs, opts = bound
    named = {lnch.kernel.arg_names[path[0]]: val for path, val in cexp.items()}
    cfg = {k: lnch.kwargs[k] for k in ("num_warps", "num_stages")}
    cfg |= {k.lower(): v for k, v in named.items() if k.startswith("BLOCK") or k == "SPLIT_K"}
    kind = lnch.kernel.__name__.removesuffix("_kernel")
    kind = "dense" if kind.startswith("dense") else kind
    est = tuning.shared_bytes(tuning.BlockConfig(**cfg), kind, q.bits, q.group,
                              DTYPES[q.dtype].itemsize)  # fmt: skip
    variant = Variant(kernel=lnch.kernel.__name__, arch=arch, quant=str(q), config=cfg,
                      constexprs=named, grid_min=math.prod(lnch.grid), estimate=est)  # fmt: skip
    job = {"module": lnch.kernel.fn.__module__, "name": lnch.kernel.fn.__name__,
           "signature": sig, "constexprs": cexp, "attrs": attrs, "options": opts.__dict__,
           "arch": arch}  # fmt: skip
    return variant, job


def enumerate_variants(
    archs: Iterable[str],
    quants: Iterable[Quant],
    models: Iterable[ModelShapes] = MODELS,
    tokens: Iterable[int] = TOKENS,
) -> tuple[list[Variant], list[dict[str, Any]]]:
    """Distinct compiles over archs × models × quantizations × token counts.

    Returns the variants and, parallel to them, the picklable compile jobs.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    grid = list(itertools.product(quants, models, tokens))
    variants: dict[tuple, Variant] = {}
    jobs: dict[tuple, dict[str, Any]] = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", ARCHS[arch], 32))
        with tuning.targeting(tuning.TARGETS[arch]):
            for q, model, t in grid:
                for gemm, rows, lnch in _launches(model, q, t):
                    bound = _bind(lnch, backend)
                    key = (arch, lnch.kernel.__name__, *map(str, bound))
                    if key not in variants:
                        variants[key], jobs[key] = _new_variant(arch, q, lnch, bound)
                    v = variants[key]
                    v.uses.append(f"{model.name}:{gemm}@T{t}")
                    v.decode |= rows <= tuning.DECODE_ROWS
                    v.grid_min = min(v.grid_min, math.prod(lnch.grid))
    return list(variants.values()), list(jobs.values())


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/")


def loop_instructions(cubin: bytes) -> int | None:
    """Instructions in the largest loop body of a cubin (a label up to a branch back to it),
    from the `nvdisasm` shipped beside the wheel's ptxas; None when it is not there."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = Path(get_ptxas(90).path).with_name("nvdisasm")
    if not nvdisasm.is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True)
    lines = res.stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best = None
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i:
            body = sum(1 for x in lines[labels[m.group(1)] : i + 1] if _INSTRUCTION.match(x))
            best = max(best or 0, body)
    return best


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one job for its arch; shared memory, registers, spills, MMA family (or error)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True
    fn = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src, target=GPUTarget("cuda", ARCHS[job["arch"]], 32), options=job["options"]
            )
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a finding, not a crash
        first = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {first[0] if first else ''}"[:300],
                "seconds": time.perf_counter() - start}  # fmt: skip
    text = log.getvalue()
    regs = _PTXAS.search(text)
    spills = _SPILL.findall(text)
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return {
        "shared": int(compiled.metadata.shared),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": sum(int(a) + int(b) for a, b in spills),
        "loop_instructions": loop_instructions(compiled.asm["cubin"]),
        "mma": mma,
        "seconds": time.perf_counter() - start,
    }


def run(variants: list[Variant], jobs: list[dict[str, Any]], workers: int) -> None:
    """Compile every job (in `workers` processes), filling in the variants' results."""
    done = 0
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for v, res in zip(variants, pool.map(compile_job, jobs, chunksize=1), strict=True):
            for k, val in res.items():
                setattr(v, k, val)
            done += 1
            if done % 10 == 0 or done == len(jobs):
                rate = (time.perf_counter() - start) / done
                print(f"\r[aot] {done}/{len(jobs)} compiled, ETA {rate * (len(jobs) - done):.0f} s",
                      end="", file=sys.stderr, flush=True)  # fmt: skip
    print(file=sys.stderr)


def _span(values: list[float | None]) -> tuple[float, float] | None:
    got = [v for v in values if v is not None]
    return (min(got), max(got)) if got else None


def summary(variants: list[Variant]) -> list[dict[str, Any]]:
    """One row per (arch, kernel, regime): counts, shared-memory and register ranges, spills."""
    rows: dict[tuple[str, str, str], list[Variant]] = {}
    for v in variants:
        rows.setdefault((v.arch, v.kernel, "decode" if v.decode else "prefill"), []).append(v)
    out = []
    for (arch, kernel, regime), vs in sorted(rows.items()):
        ok = [v for v in vs if v.error is None]
        limit = tuning.TARGETS[arch].smem_per_block
        out.append({
            "arch": arch, "kernel": kernel, "regime": regime, "variants": len(vs),
            "failed": len(vs) - len(ok),
            "over_smem": sum(1 for v in ok if v.shared and v.shared > limit),
            "smem_kb": (min(v.shared for v in ok) / 1024, max(v.shared for v in ok) / 1024)
            if ok else None,
            "registers": (min(v.registers or 0 for v in ok), max(v.registers or 0 for v in ok))
            if ok else None,
            "spilling": sum(1 for v in ok if v.spill_bytes),
            "max_spill": max((v.spill_bytes or 0 for v in ok), default=0),
            "instr_per_weight": _span([v.instructions_per_weight() for v in ok]),
            "mma": ",".join(sorted({v.mma or "?" for v in ok})),
            "min_programs": min(v.grid_min for v in vs),
        })  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]], triton_version: str) -> str:
    limits = ", ".join(f"{a} {t.smem_per_block:,} B" for a, t in tuning.TARGETS.items())
    head = (
        f"Triton {triton_version}. Shared-memory limits per block: {limits}.\n\n"
        "| arch | kernel | regime | variants | failed | over smem | smem KB | registers | "
        "spilling (max B) | instr/weight | MMA | fewest programs |\n" + "|---" * 12 + "|\n"
    )
    lines = []
    for r in rows:
        smem = "-" if r["smem_kb"] is None else f"{r['smem_kb'][0]:.0f}–{r['smem_kb'][1]:.0f}"
        regs = "-" if r["registers"] is None else f"{r['registers'][0]}–{r['registers'][1]}"
        ipw = r.get("instr_per_weight")
        ipw = "-" if ipw is None else f"{ipw[0]:.1f}–{ipw[1]:.1f}"
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {r['regime']} | {r['variants']} | {r['failed']} | "
            f"{r['over_smem']} | {smem} | {regs} | {r['spilling']} ({r['max_spill']}) | {ipw} | "
            f"{r['mma']} | {r['min_programs']} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated: sm_90,sm_80")
    p.add_argument("--full", action="store_true", help="every bits × group × sym × dtype")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, help="write every variant and the summary here")
    p.add_argument("--markdown", type=Path, help="write the summary table here")
    p.add_argument("--limit", type=int, default=0, help="compile only the first N (debugging)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernels.aot: unset TRITON_INTERPRET (it compiles for a GPU)", file=sys.stderr)
        return 2
    import triton

    archs = [s.strip() for s in a.arch.split(",") if s.strip()]
    if unknown := [x for x in archs if x not in ARCHS]:
        print(f"kernels.aot: unknown arch {unknown}; choose from {list(ARCHS)}", file=sys.stderr)
        return 2
    variants, jobs = enumerate_variants(archs, quant_matrix(a.full))
    if a.limit:
        variants, jobs = variants[: a.limit], jobs[: a.limit]
    print(f"[aot] triton {triton.__version__}: {len(jobs)} distinct compiles", file=sys.stderr)
    run(variants, jobs, a.workers)
    rows = summary(variants)
    table = markdown(rows, triton.__version__)
    print(table)
    bad = []
    for v in variants:
        for prob in v.problems(tuning.TARGETS[v.arch].smem_per_block):
            bad.append(f"{v.arch} {v.kernel} {v.quant} {v.config}: {prob} (e.g. {v.uses[0]})")
    if a.json:
        a.json.write_text(json.dumps(
            {"triton": triton.__version__, "summary": rows,
             "variants": [asdict(v) for v in variants]}, indent=1, default=str))  # fmt: skip
    if a.markdown:
        a.markdown.write_text(table)
    for line in bad[:40]:
        print("FAIL", line)
    if len(bad) > 40:
        print(f"... and {len(bad) - 40} more")
    print(f"[aot] {len(variants)} variants, {len(bad)} problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
