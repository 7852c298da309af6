"""Fused MoE W8/W4/W3/W2 kernels against a bf16 grouped matmul, per MoE layer.

    python bench/kernels.py [--no-write] [--models qwen3-vl-30b,kimi-vl] [--tokens 1,4,16]

On a GPU: (1) correctness of every variant (fused MoE W{8,4,3,2} × group 32/64/128 × sym/asym
at decode and prefill sizes, a mixed-precision layer, the dense kernel at M = 1 and 300)
against the fp32 torch reference on the same packed weights, in bf16; the run exits non-zero
if any is out of tolerance. (2) The device's copy bandwidth
(`dst.copy_(src)` of 1 GiB, read + write bytes). (3) Per MoE layer, T ∈ {1, 4, 16, 64, 256, 1024}
tokens of Qwen3-VL-30B-A3B (E=128, A=8, H=2048, I=768) and Kimi-VL-A3B (E=64, A=6, H=2048,
I=1408): the bf16 baseline (`torch._grouped_mm` when this torch has it, else a loop over
experts) and our kernels (group 128, asymmetric), each timed as CUDA-graph replays (eager if a
capture fails) so launch overhead of the small align ops is not counted twice. "bytes" is what
a variant must read at least: the weights of the experts that received tokens (codes, scales,
zeros) plus x and the output; GB/s = bytes / time, against the measured copy bandwidth.

On CPU it runs the torch reference path only (our serving path there) at small T and says so.
Needs only torch + triton (no pydantic, no veq): weights are random words in the kernel layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only the correctness smoke uses it

from _report import device_name, markdown_table, today, write_section  # noqa: E402

from kernels._testing import (  # noqa: E402
    TOLERANCES,
    random_activations,
    random_packed_words,
    random_routing,
    rel_errors,
)
from kernels.dense.reference import dense_reference  # noqa: E402
from kernels.layout import kernel_nbytes  # noqa: E402
from kernels.moe.reference import fused_moe_reference  # noqa: E402
from kernels.moe.weights import MoEWeights  # noqa: E402

BITS = (8, 4, 3, 2)
GROUP = 128


@dataclass(frozen=True)
class Model:
    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int


MODELS = {
    "qwen3-vl-30b": Model("Qwen3-VL-30B-A3B", 128, 8, 2048, 768),
    "kimi-vl": Model("Kimi-VL-A3B", 64, 6, 2048, 1408),
}


def moe_weights(
    m: Model, bits: int | list[int], sym: bool, device: str, group: int = GROUP
) -> MoEWeights:
    """Random packed experts; `bits` a list gives per-expert widths (mixed precision)."""
    per = bits if isinstance(bits, list) else [bits] * m.experts
    dt = torch.bfloat16
    gate_up = [random_packed_words(2 * m.inter, m.hidden, b, group, sym, seed=e, scale_dtype=dt,
                                   device=device) for e, b in enumerate(per)]  # fmt: skip
    down = [random_packed_words(m.hidden, m.inter, b, group, sym, seed=10_000 + e,
                                scale_dtype=dt, device=device)
            for e, b in enumerate(per)]  # fmt: skip
    return MoEWeights.from_experts(gate_up, down)


def expert_bytes(m: Model, bits: int | None) -> int:
    """Bytes of one expert's gate‖up + down (bits None: bf16)."""
    if bits is None:
        return 2 * 3 * m.hidden * m.inter
    return kernel_nbytes(2 * m.inter, m.hidden, bits, GROUP, False) + kernel_nbytes(
        m.hidden, m.inter, bits, GROUP, False
    )


def grouped_bf16(w13: Tensor, w2: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The bf16 baseline: tokens sorted by expert, `torch._grouped_mm` for both GEMMs (the
    transformers `grouped_mm` experts path), else a per-expert loop.

    w13: [E, 2I, H] and w2: [E, H, I], 16-bit (fp32 on CPU)."""
    e, two_i, _ = w13.shape
    inter = two_i // 2

    def grouped(x: Tensor, ids: Tensor, wts: Tensor) -> Tensor:
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat)
        counts = torch.zeros(e, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[order // k]
        gu = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        y = y * wts.reshape(-1)[order, None].to(y.dtype)
        out = torch.empty_like(y).index_copy_(0, order, y)
        return out.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

    def loop(x: Tensor, ids: Tensor, wts: Tensor) -> Tensor:
        out = torch.zeros(x.shape[0], w13.shape[2], dtype=torch.float32, device=x.device)
        for ex in torch.unique(ids).tolist():
            tok, pick = torch.nonzero(ids == ex, as_tuple=True)
            gu = x[tok] @ w13[ex].t()
            y = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]) @ w2[ex].t()
            out.index_add_(0, tok, y.float() * wts[tok, pick, None].float())
        return out.to(x.dtype)

    return grouped if hasattr(torch, "_grouped_mm") and w13.is_cuda else loop


def copy_bandwidth(device: str) -> float:
    """Bytes/s of `dst.copy_(src)` for 1 GiB (read + write counted)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * n * 10 / (start.elapsed_time(end) / 1e3)


def time_call(fn: Callable[[], Tensor], device: str, iters: int = 20) -> tuple[float, str]:
    """Seconds per call and how it was timed: CUDA-graph replays, else eager events, else wall."""
    if not device.startswith("cuda"):
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, "wall"
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on the capture stream (allocator, autotune)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters, "graph"
    except Exception:  # noqa: BLE001 - e.g. the baseline's host-synchronising fallback loop
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters, "eager"


def correctness(device: str, models: list[Model]) -> tuple[list[list[str]], bool]:
    """Every variant against the fp32 reference on the same packed weights, in bf16 on a GPU.

    The first model: every bits × group × symmetry at T = 1 (decode tiles, split-K) and
    T = 2048 (prefill tiles: wgmma on sm_90), plus a mixed-precision layer; the others at
    group 128. The dense kernel: every bits × {g32, g128} × symmetry at M = 1 and 300."""
    from kernels.dense.op import dense_wxa16
    from kernels.moe.op import fused_moe

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float16
    tol_max, tol_rms = TOLERANCES[dtype]
    rows, ok = [], True

    def check(layer: str, kernel: str, name: str, t: int, out: Tensor, ref: Tensor) -> None:
        nonlocal ok
        mx, rms = rel_errors(out, ref)
        good = mx <= tol_max and rms <= tol_rms and bool(torch.isfinite(out).all())
        ok &= good
        rows.append([layer, kernel, name, str(t), f"{mx:.1e}", f"{rms:.1e}",
                     "ok" if good else "FAIL"])  # fmt: skip

    for i, m in enumerate(models):
        groups = (32, 64, 128) if i == 0 else (GROUP,)
        for t in (1, 2048) if i == 0 else (4,):
            ids, wts = random_routing(t, m.top_k, m.experts, seed=t)
            ids, wts = ids.to(device), wts.to(device)
            x = random_activations(t, m.hidden, seed=t, dtype=dtype, device=device)
            variants: list[tuple[str, int | list[int], bool, int]] = [
                (f"W{b} g{g} {'sym' if s else 'asym'}", b, s, g)
                for b in BITS for g in groups for s in (False, True)
            ]  # fmt: skip
            mixed = [4 if e % 4 == 0 else 2 for e in range(m.experts)]
            variants.append(("mixed W4/W2 (hot/cold) g128", mixed, False, GROUP))
            for name, bits, sym, group in variants:
                w = moe_weights(m, bits, sym, device, group)
                ref = fused_moe_reference(x, ids, wts, w, compute_dtype=torch.float32)
                check(m.name, "fused MoE", name, t, fused_moe(x, ids, wts, w), ref)
    for b in BITS:
        for g in (32, 128):
            for sym in (False, True):
                w = random_packed_words(2048, 4096, b, g, sym, scale_dtype=torch.bfloat16,
                                        device=device)  # fmt: skip
                for rows_m in (1, 300):
                    x = random_activations(rows_m, 4096, dtype=dtype, device=device)
                    ref = dense_reference(x, w, compute_dtype=torch.float32)
                    name = f"W{b} g{g} {'sym' if sym else 'asym'}"
                    check("[2048, 4096]", "dense", name, rows_m, dense_wxa16(x, w), ref)
    return rows, ok


def timings(
    device: str, models: list[Model], tokens: list[int], bw: float | None
) -> list[list[str]]:
    cuda = device.startswith("cuda")
    if cuda:
        from kernels.moe.op import fused_moe as run_moe
    else:
        run_moe = fused_moe_reference  # the CPU serving path
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for m in models:
        g = torch.Generator(device=device).manual_seed(0)
        w13 = torch.randn(m.experts, 2 * m.inter, m.hidden, generator=g, device=device) * 0.05
        w2 = torch.randn(m.experts, m.hidden, m.inter, generator=g, device=device) * 0.05
        w13, w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
        if not cuda:
            w13, w2 = w13.float(), w2.float()  # fp32 on CPU: ~5× faster than bf16 there
        baseline = grouped_bf16(w13, w2)
        quant = {b: moe_weights(m, b, False, device) for b in BITS}
        for t in tokens:
            ids, wts = random_routing(t, m.top_k, m.experts, seed=t)
            ids, wts = ids.to(device), wts.to(device)
            x = random_activations(t, m.hidden, seed=t, dtype=dtype, device=device)
            active = int(torch.unique(ids).numel())
            act_bytes = 2 * t * m.hidden * x.element_size()
            base_t = None
            base_name = "fp32 loop (16-bit baseline)"
            if cuda:
                base_name = "bf16 grouped_mm" if hasattr(torch, "_grouped_mm") else "bf16 loop"
            call = (x, ids, wts)
            variants: list[tuple[str, int | None, Callable[[], Tensor]]] = [
                (base_name, None, lambda f=baseline, a=call: f(*a))
            ]
            for b in BITS:
                label = f"W{b}A16" + ("" if cuda else " reference")
                variants.append((label, b, lambda w=quant[b], a=call: run_moe(*a, w)))
            for name, bits, fn in variants:
                sec, how = time_call(fn, device)
                nbytes = active * expert_bytes(m, bits) + act_bytes
                if bits is None:
                    base_t = sec
                gbs = nbytes / sec / 1e9
                rows.append([
                    m.name, str(t), name, str(active), f"{nbytes / 1e6:.1f}",
                    f"{sec * 1e6:.1f}", how, f"{gbs:.0f}",
                    f"{100 * nbytes / sec / bw:.0f}%" if bw else "-",
                    f"{base_t / sec:.2f}×" if base_t else "-",
                ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    ap.add_argument("--tokens", default=None, help="comma list of T (default GPU 1..1024, CPU 1,4)")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    models = [MODELS[name] for name in args.models.split(",")]
    default_tokens = "1,4,16,64,256,1024" if cuda else "1,4"
    tokens = [int(v) for v in (args.tokens or default_tokens).split(",")]
    t0 = time.perf_counter()
    lines = [f"## Kernels (`bench/kernels.py`, {today()})", ""]
    ok = True
    if cuda:
        lines.append(f"**{device_name(device)}**, torch {torch.__version__}, "
                     f"triton {__import__('triton').__version__}")  # fmt: skip
        if not args.skip_correctness:
            rows, ok = correctness(device, models)
            lines += ["", "Correctness, bf16 activations, vs the fp32 torch reference on the same "
                      f"packed weights (tolerance max {TOLERANCES[torch.bfloat16][0]:.0e}, "
                      f"RMS {TOLERANCES[torch.bfloat16][1]:.0e}):", "",
                      markdown_table(["layer", "kernel", "variant", "T", "max rel", "RMS rel",
                                      ""], rows)]  # fmt: skip
            print("\n".join(lines[-1:]), flush=True)
        bw = copy_bandwidth(device)
        lines += ["", f"Measured copy bandwidth: {bw / 1e9:.0f} GB/s (1 GiB copy, read + write)."]
    else:
        bw = None
        lines += [f"**{device_name(device)}**: no GPU, so **the torch reference path only** (the "
                  "CPU serving path: fp32 math, only routed experts dequantized) at small T; the "
                  "Triton kernels are not timed. Run on a GPU for the kernel table."]  # fmt: skip
    rows = timings(device, models, tokens, bw)
    lines += ["", "Per MoE layer (group 128, asymmetric; random balanced routing; active = experts "
              "that received tokens; bytes = their weights + x + output):", "",
              markdown_table(["layer", "T", "variant", "active", "MB read", "µs", "timed",
                              "GB/s", "of copy BW", "vs 16-bit"], rows)]  # fmt: skip
    lines += ["", f"Total run time {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("kernels", text)
    if not ok:
        print("CORRECTNESS FAILED: see the table above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
