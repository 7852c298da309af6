"""How much weight noise the reference model tolerates: the evidence behind its sensitivity.

    python bench/robustness.py [--model mini] [--sigmas 0.25,0.5,1,2] [--samples 600]
                               [--seeds 0,1] [--no-write]

Adds Gaussian noise of `k · std(W)` to every matrix the quantization recipe would quantize
(attention and expert projections of the language model; the same set `veq.models` lists),
and, as controls, zeroes the attention output or the experts. For comparison it runs RTN at
3 and 2 bits (asymmetric, g128) through the real pipeline and reports each one's relative
weight error `‖W − Q(W)‖ / ‖W‖`, so the noise levels and the quantizers sit on one scale.
Accuracy is exact match on held-out ShapesVQA questions. The table goes to BENCHMARKS.md
(section `robustness`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

# The repository first: bench/kernels.py would otherwise shadow the `kernels` package.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from _report import device_name, markdown_table, today, write_section  # noqa: E402
from torch import nn  # noqa: E402

from veq import api  # noqa: E402
from veq.algorithms import rtn  # noqa: E402
from veq.config import QuantConfig  # noqa: E402
from veq.models import (  # noqa: E402
    MoEView,
    decoder_layers,
    get_architecture,
    get_module,
    is_moe_layer,
    layer_linears,
)
from veq.reference.evaluate import evaluate  # noqa: E402
from veq.reference.shapes import HELDOUT_SEEDS  # noqa: E402


def quantized_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weights the recipe quantizes: every listed linear, and each expert's gate/up/down
    (views into fused expert tensors where the architecture fuses them)."""
    arch = get_architecture(model)
    out = []
    for layer in decoder_layers(model, arch):
        for g in layer_linears(layer, arch):
            out += [get_module(layer, p).weight.data for p in g.linears]
        if is_moe_layer(layer, arch):
            moe = MoEView(layer, arch.moe)
            for e in range(moe.num_experts):
                w = moe.expert(e)
                out += [w.gate, w.up, w.down]
    return out


def relative_error(reference: nn.Module, other: nn.Module) -> float:
    """‖W − W'‖ / ‖W‖ over all quantized matrices together."""
    pairs = zip(quantized_matrices(reference), quantized_matrices(other), strict=True)
    return _ratio((a.float() - b.float(), a.float()) for a, b in pairs)


def rtn_error(model: nn.Module, cfg: QuantConfig) -> float:
    """‖W − RTN(W)‖ / ‖W‖ over all quantized matrices (what the pipeline's RTN writes)."""
    return _ratio(
        (w.float() - rtn(w, cfg).dequantize(), w.float()) for w in quantized_matrices(model)
    )


def _ratio(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    num = den = 0.0
    for diff, ref in pairs:
        num += float(diff.pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--sigmas", default="0.25,0.5,1,2")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seeds", default="0,1", help="noise seeds")
    ap.add_argument("--cache-dir", default="/tmp/veq-bench-robustness")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    path = api.resolve_model(args.model)
    processor = api.load_processor(path)
    cpu = torch.device("cpu")
    start = HELDOUT_SEEDS.start + 2000

    def fresh() -> nn.Module:
        return api.load_model(path, cpu).eval()

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, processor, n=args.samples, seed=start).accuracy

    base_model = fresh()
    base = accuracy(base_model)
    rows = [["16-bit", "0", f"{100 * base:.1f}", "–"]]
    print(rows[-1], flush=True)

    for k in (float(s) for s in args.sigmas.split(",")):
        accs, errs = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            model = fresh()
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for w in quantized_matrices(model):
                    w.add_(torch.randn(w.shape, generator=gen) * float(w.std()) * k)
            accs.append(accuracy(model))
            errs.append(relative_error(base_model, model))
        rows.append(
            [
                f"Gaussian noise {k:g} σ (seeds {args.seeds})",
                f"{statistics.fmean(errs):.3f}",
                f"{100 * statistics.fmean(accs):.1f}",
                f"{100 * (statistics.fmean(accs) - base):+.1f}",
            ]
        )
        print(rows[-1], flush=True)

    for bits in (3, 2):
        q = api.quantize(
            path, method="rtn", bits=bits, cache_dir=args.cache_dir, device=cpu, progress=False
        )
        model, _ = api.load(q.path, device=cpu)
        acc = accuracy(model.eval())
        rows.append(
            [
                f"RTN W{bits} g128 (asymmetric)",
                f"{rtn_error(base_model, QuantConfig(bits=bits, group_size=128)):.3f}",
                f"{100 * acc:.1f}",
                f"{100 * (acc - base):+.1f}",
            ]
        )
        print(rows[-1], flush=True)

    for what in ("o_proj", "experts"):
        model = fresh()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers." in name and "language_model" in name and what in name:
                    p.zero_()
        acc = accuracy(model)
        rows.append(
            [f"control: {what} zeroed", "–", f"{100 * acc:.1f}", f"{100 * (acc - base):+.1f}"]
        )
        print(rows[-1], flush=True)

    table = markdown_table(["weights", "relative error", "accuracy %", "change (points)"], rows)
    print(table)
    body = (
        f"## Weight-noise robustness of the reference model (`bench/robustness.py`, {today()})\n\n"
        f"**{device_name('cpu')}**, model `{args.model}`, {args.samples} held-out questions. "
        "Noise is added to exactly the matrices quantization touches (language-model attention "
        "and experts); 'relative error' is ‖W − W′‖ / ‖W‖ over all of them, so the noise rows "
        "and the RTN rows sit on one scale. The controls show those matrices do carry the "
        f"answers.\n\n{table}\n"
    )
    if not args.no_write:
        write_section("robustness", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
