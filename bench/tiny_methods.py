"""Every method on the tiny Qwen3-VL-MoE, with and without act-order: KL to the 16-bit model.

    python bench/tiny_methods.py [--bits 3] [--group-size 32] [--samples 32] [--seeds 0,1,2]
                                 [--methods rtn,awq,gptq,mbq,veq-me,veq-ma,veq] [--no-write]

The setting of issue 14's comparison with llm-compressor: `veq.testing.tiny_model
("qwen3_vl_moe")` (random weights, 2 layers, 8 experts top-2), `--samples` built-in image+chat
conversations for calibration, W3 g32 asymmetric codes, and the KL divergence to the 16-bit
model summed over the prompt positions of 6 other built-in conversations with photos, averaged
over them. γ is measured (`gamma auto`) on the calibration set. GPTQ-family methods run with
act-order (the default) and without, each with the group range search (`range_search`) on and
off; each cell is the mean and the min–max over calibration seeds, and `*` marks the method's
defaults. Writes BENCHMARKS.md section `tiny-methods`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _report import device_name, markdown_table, today, write_section  # noqa: E402

from veq.calib.data import encode_conversation  # noqa: E402
from veq.calib.gamma import resolve_gamma  # noqa: E402
from veq.calib.methods import METHOD_CLASSES  # noqa: E402
from veq.calib.pipeline import Calibrator  # noqa: E402
from veq.calib.sources import builtin_conversations  # noqa: E402
from veq.models.processor import build_processor  # noqa: E402
from veq.recipe import Recipe  # noqa: E402
from veq.testing import tiny_model  # noqa: E402


def _samples(processor, n: int, seed: int, images_only: bool = False):
    image = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    convs = builtin_conversations(4 * n if images_only else n, seed=seed)
    if images_only:
        convs = [c for c in convs if c.images][:n]
    return [encode_conversation(processor, c, image) for c in convs]


@torch.no_grad()
def _kl(base: list[torch.Tensor], model, evals) -> float:
    """KL(16-bit ‖ quantized) summed over each sample's positions, mean over samples."""
    total = 0.0
    for ref, s in zip(base, evals, strict=True):
        lp = model(**s.inputs, use_cache=False).logits.float().log_softmax(-1)
        total += float((ref.exp() * (ref - lp)).sum())
    return total / len(evals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", default="rtn,awq,gptq,mbq,veq-me,veq-ma,veq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    processor = build_processor()
    evals = _samples(processor, 6, seed=1000, images_only=True)
    with torch.no_grad():
        base_model = tiny_model("qwen3_vl_moe", processor)
        base = [
            base_model(**s.inputs, use_cache=False).logits.float().log_softmax(-1) for s in evals
        ]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for method in args.methods.split(","):
        hessian = METHOD_CLASSES[method].hessian
        variants = (
            [(a, r) for a in (True, False) for r in (True, False)] if hessian else [(None, None)]
        )
        for act_order, range_search in variants:
            kls = []
            for seed in seeds if method != "rtn" else seeds[:1]:
                samples = _samples(processor, args.samples, seed)
                model = tiny_model("qwen3_vl_moe", processor)
                g, source, ratios, _ = resolve_gamma(model, samples, "auto", 20.0, "cpu")
                recipe = Recipe(
                    method=method,
                    bits=args.bits,
                    group_size=args.group_size,
                    symmetric=False,
                    gamma=g,
                    act_order=bool(act_order),
                    range_search=bool(range_search),
                )
                Calibrator(
                    model,
                    samples,
                    recipe,
                    gamma=g,
                    gamma_source=source,
                    vision_ratios=ratios,
                    progress=False,
                ).run()  # writes the dequantized weights into `model`
                kls.append(_kl(base, model, evals))
            on = {None: "–", True: "on", False: "off"}
            default = act_order is None or (act_order and not range_search)
            spread = f"{min(kls):.4f}–{max(kls):.4f}" if len(kls) > 1 else "–"
            name = method + (" *" if default and hessian else "")
            rows.append(
                [name, on[act_order], on[range_search], f"{statistics.mean(kls):.4f}", spread]
            )
            print(
                f"{name:9s} act-order {on[act_order]:3s} range search {on[range_search]:3s}: "
                f"KL {statistics.mean(kls):.4f} ({spread})"
            )
    table = markdown_table(
        ["method", "act-order", "range search", "KL (mean)", "min–max over seeds"], rows
    )
    print(table)
    body = (
        f"## Methods on the tiny Qwen3-VL-MoE (`bench/tiny_methods.py`, {today()})\n\n"
        f"**{device_name('cpu')}**. `veq.testing.tiny_model('qwen3_vl_moe')` (random weights, "
        f"2 layers, 8 experts top-2), {args.samples} built-in image+chat calibration "
        f"conversations per seed (seeds {args.seeds}), W{args.bits} g{args.group_size} "
        "asymmetric, γ measured; KL to the 16-bit model summed over the positions of 6 other "
        "conversations with photos, mean over them (the setting of issue 14's comparison with "
        "llm-compressor, which is not installed here). Command: "
        f"`python bench/tiny_methods.py {' '.join(sys.argv[1:])}`.\n\n{table}\n"
    )
    if not args.no_write:
        write_section("tiny-methods", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
