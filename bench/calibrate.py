"""Calibration cost per method on a small Qwen3-VL-MoE (tens of millions of parameters).

    python bench/calibrate.py [--depths 4,8] [--methods rtn,gptq,...] [--samples 8]
                              [--device cpu|cuda] [--no-write]

Each (depth, method) runs in a fresh process so peak memory is its own: wall time of the
pipeline (γ given, so γ's backward pass is timed once separately), peak host RSS above the
loaded model, and on CUDA the peak GPU allocation. The pipeline keeps only the current decoder
layer on the GPU, so peak GPU memory should track one layer, not the depth: two depths show it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import device_name, markdown_table, today, write_section  # noqa: E402

METHODS = ("rtn", "gptq", "awq", "mbq", "veq-me", "veq-ma", "veq")


def build(depth: int, samples: int):
    from transformers import Qwen3VLMoeForConditionalGeneration

    from veq.calib.data import encode_conversation
    from veq.calib.sources import builtin_conversations
    from veq.models.processor import build_processor
    from veq.testing import qwen3_vl_moe_config

    processor = build_processor()
    config = qwen3_vl_moe_config(
        processor,
        hidden=512,
        layers=depth,
        experts=16,
        top_k=4,
        moe_intermediate=256,
        heads=8,
        kv_heads=4,
        vision_hidden=64,
        deepstack=(0,),
    )
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    data = [
        encode_conversation(processor, c, config.image_token_id)
        for c in builtin_conversations(samples, seed=0)
    ]
    return model, data


def child(depth: int, method: str, samples: int, device: str) -> dict[str, float]:
    from veq.calib.gamma import measure_gamma
    from veq.calib.pipeline import Calibrator
    from veq.recipe import Recipe

    model, data = build(depth, samples)
    params = sum(p.numel() for p in model.parameters())
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gamma_s = float("nan")
    if method == "veq":
        t0 = time.perf_counter()
        measure_gamma(model, data, device="cpu")
        gamma_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    recipe = Recipe(method=method, bits=4, group_size=128, gamma=10.0)
    Calibrator(
        model, data, recipe, gamma=10.0, gamma_source="given", device=device, progress=False
    ).run()
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    layer_bytes = sum(p.numel() * 4 for p in model.model.language_model.layers[0].parameters())
    return {
        "depth": depth,
        "method": method,
        "params": params,
        "seconds": seconds,
        "gamma_seconds": gamma_s,
        "peak_host_mib": (peak[0] - base) / 2**20,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else float("nan"),
        "layer_mib": layer_bytes / 2**20,
        "tokens": sum(int(s.kinds.numel()) for s in data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("DEPTH", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.samples, args.device)))
        return

    rows, results = [], []
    for depth in (int(d) for d in args.depths.split(",")):
        for method in args.methods.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(depth),
                method,
                "--samples",
                str(args.samples),
                "--device",
                args.device,
                *(["--threads", str(args.threads)] if args.threads else []),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"depth {depth} {method:7s} {r['seconds']:7.1f} s  "
                f"host +{r['peak_host_mib']:.0f} MiB  gpu {r['peak_gpu_mib']:.0f} MiB",
                flush=True,
            )
            rows.append(
                [
                    str(depth),
                    f"{r['params'] / 1e6:.1f} M",
                    method,
                    f"{r['seconds']:.1f}",
                    f"{r['peak_host_mib']:.0f}",
                    "n/a" if args.device == "cpu" else f"{r['peak_gpu_mib']:.0f}",
                    f"{r['layer_mib']:.1f}",
                ]
            )
    table = markdown_table(
        [
            "layers",
            "params",
            "method",
            "wall s",
            "peak host MiB above model",
            "peak GPU MiB",
            "one layer fp32 MiB",
        ],
        rows,
    )
    gamma = [r for r in results if r["method"] == "veq"]
    gamma_line = ", ".join(f"{g['depth']} layers {g['gamma_seconds']:.1f} s" for g in gamma)
    print(table)
    body = (
        f"## Calibration (`bench/calibrate.py`, {today()})\n\n"
        f"**{device_name(args.device)}**, calibration on `{args.device}`; Qwen3-VL-MoE with "
        f"hidden 512, 16 experts top-4, expert width 256; {args.samples} built-in samples "
        f"({results[0]['tokens']} tokens); W4 g128; γ given (γ = auto's backward pass: "
        f"{gamma_line or 'not run'}); {torch.get_num_threads()} torch thread(s).\n\n{table}\n"
    )
    if args.device == "cpu":
        body += (
            "\nOn the CPU the whole model already lives in host memory, so the host column is "
            "the pipeline's own overhead (captured activations, statistics, one layer's "
            "solver work); the GPU column needs a CUDA run.\n"
        )
    if not args.no_write:
        write_section("calibrate", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
