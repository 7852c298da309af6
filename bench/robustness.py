"""How much weight noise the reference model tolerates: the evidence behind its sensitivity.

    python bench/robustness.py [--models mini[,DIR...]] [--sigmas 0.25,0.5,1,2] [--samples 600]
                               [--seeds 0,1] [--component-sigma 1] [--group-size 128]
                               [--note TEXT] [--no-write]

For each model, adds Gaussian noise of `k · std(W)` to every matrix the quantization recipe
would quantize (attention and expert projections of the language model; the same set
`veq.models` lists), then to the attention projections alone and the experts alone, and, as
controls, zeroes either set. For comparison it runs RTN at 3 and 2 bits (asymmetric, g128 or
`--group-size`) through the real pipeline and reports each one's relative weight error
`‖W − Q(W)‖ / ‖W‖`, so the noise levels and the quantizers sit on one scale. It also
reports how large the largest input to a quantized projection is against the median one: LLMs
have outlier channels there, which is much of why rounding hurts them. Accuracy is exact match
on held-out ShapesVQA questions. Several models (e.g. shallower variants trained with
`python -m refmodel.train --layers N`) go in one table. The tables go to BENCHMARKS.md
(section `robustness`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Iterable
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
from veq.reference.evaluate import evaluate, heldout_samples  # noqa: E402
from veq.reference.shapes import HELDOUT_SEEDS  # noqa: E402


def attention_linears(model: nn.Module) -> list[nn.Module]:
    """The language model's attention projections the recipe quantizes."""
    arch = get_architecture(model)
    return [
        get_module(layer, p)
        for layer in decoder_layers(model, arch)
        for g in layer_linears(layer, arch)
        for p in g.linears
    ]


def attention_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weights of `attention_linears`."""
    return [m.weight.data for m in attention_linears(model)]


def expert_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Each routed expert's gate/up/down (views into fused expert tensors where the
    architecture fuses them)."""
    arch = get_architecture(model)
    out = []
    for layer in decoder_layers(model, arch):
        if is_moe_layer(layer, arch):
            moe = MoEView(layer, arch.moe)
            for e in range(moe.num_experts):
                w = moe.expert(e)
                out += [w.gate, w.up, w.down]
    return out


def quantized_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The weights the recipe quantizes: attention projections and routed experts."""
    return attention_matrices(model) + expert_matrices(model)


def add_noise(matrices: list[torch.Tensor], k: float, seed: int) -> None:
    """Add Gaussian noise of `k · std(W)` to each matrix in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in matrices:
            w.add_(torch.randn(w.shape, generator=gen) * float(w.std()) * k)


@torch.no_grad()
def input_outlier_ratio(model: nn.Module, processor: object, samples: list) -> float:
    """max |x| ÷ median |x| over the inputs of every quantized attention projection, on one
    batch: how far the model is from the outlier channels that make LLMs quantization-
    sensitive (LLM.int8()'s emergent outlier features; "massive activations" reach about 10⁴×
    the median in 7 B models, Sun et al. 2024)."""
    ratios: list[float] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float().abs()
        ratios.append(float(x.max() / x.median().clamp_min(1e-12)))

    handles = [m.register_forward_pre_hook(hook) for m in attention_linears(model)]
    try:
        evaluate(model, processor, samples)
    finally:
        for h in handles:
            h.remove()
    return max(ratios)


@torch.no_grad()
def relative_error(reference: nn.Module, other: nn.Module) -> float:
    """‖W − W'‖ / ‖W‖ over all quantized matrices together."""
    pairs = zip(quantized_matrices(reference), quantized_matrices(other), strict=True)
    return _ratio((a.float() - b.float(), a.float()) for a, b in pairs)


@torch.no_grad()
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


def model_rows(name: str, args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    """The noise, component, RTN and control rows for one model, and its summary row."""
    path = api.resolve_model(name)
    processor = api.load_processor(path)
    cpu = torch.device("cpu")
    samples = heldout_samples(args.samples, HELDOUT_SEEDS.start + 2000)
    seeds = [int(s) for s in args.seeds.split(",")]

    def fresh() -> nn.Module:
        return api.load_model(path, cpu).eval()

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, processor, samples).accuracy

    base_model = fresh()
    base = accuracy(base_model)
    layers = len(decoder_layers(base_model, get_architecture(base_model)))
    text = base_model.config.text_config
    label = f"`{name if name in api.BUNDLED else path.name}`"
    rows: list[list[str]] = []

    def row(what: str, error: str, acc: float) -> None:
        rows.append([label, what, error, f"{100 * acc:.1f}", f"{100 * (acc - base):+.1f}"])
        print(" | ".join(rows[-1]), flush=True)

    def noisy(k: float, pick: Callable[[nn.Module], list[torch.Tensor]]) -> tuple[float, float]:
        accs, errs = [], []
        for seed in seeds:
            model = fresh()
            add_noise(pick(model), k, seed)
            accs.append(accuracy(model))
            errs.append(relative_error(base_model, model))
        return statistics.fmean(accs), statistics.fmean(errs)

    rows.append([label, "16-bit", "0", f"{100 * base:.1f}", "–"])
    for k in (float(s) for s in args.sigmas.split(",")):
        acc, err = noisy(k, quantized_matrices)
        row(f"Gaussian noise {k:g} σ", f"{err:.3f}", acc)
    for what, pick in (("attention only", attention_matrices), ("experts only", expert_matrices)):
        acc, err = noisy(args.component_sigma, pick)
        row(f"noise {args.component_sigma:g} σ, {what}", f"{err:.3f}", acc)
    for bits in (3, 2):
        q = api.quantize(
            path,
            method="rtn",
            bits=bits,
            group_size=args.group_size,
            cache_dir=args.cache_dir,
            device=cpu,
            progress=False,
        )
        model, _ = api.load(q.path, device=cpu)
        err = rtn_error(base_model, QuantConfig(bits=bits, group_size=args.group_size))
        row(f"RTN W{bits} g{args.group_size} (asymmetric)", f"{err:.3f}", accuracy(model.eval()))
    for what, pick in (("attention", attention_matrices), ("experts", expert_matrices)):
        model = fresh()
        with torch.no_grad():
            for w in pick(model):
                w.zero_()
        row(f"control: {what} zeroed", "–", accuracy(model))

    summary = [
        label,
        f"{layers}",
        f"{text.num_attention_heads} ({text.num_key_value_heads})",
        f"{sum(p.numel() for p in base_model.parameters()) / 1e6:.2f} M",
        f"{100 * base:.1f}",
        f"{input_outlier_ratio(base_model, processor, samples[:64]):.0f}×",
    ]
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--models",
        "--model",
        default="mini",
        help="bundled names or model directories, comma-separated",
    )
    ap.add_argument("--sigmas", default="0.25,0.5,1,2")
    ap.add_argument("--component-sigma", type=float, default=1.0)
    ap.add_argument(
        "--group-size", type=int, default=128, help="RTN group size (must divide every width)"
    )
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seeds", default="0,1", help="noise seeds")
    ap.add_argument("--cache-dir", default="/tmp/veq-bench-robustness")
    ap.add_argument("--note", default="", help="a sentence on where the other models come from")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    rows, summaries = [], []
    for name in args.models.split(","):
        r, s = model_rows(name, args)
        rows += r
        summaries.append(s)

    models = markdown_table(
        [
            "model",
            "decoder layers",
            "heads (KV)",
            "parameters",
            "16-bit accuracy %",
            "largest ÷ median input",
        ],
        summaries,
    )
    table = markdown_table(
        ["model", "weights", "relative error", "accuracy %", "change (points)"], rows
    )
    print(models, table, sep="\n\n")
    body = (
        f"## Weight-noise robustness of the reference model (`bench/robustness.py`, {today()})\n\n"
        f"**{device_name('cpu')}**, {args.samples} held-out questions per model, noise seeds "
        f"{args.seeds}. Noise is added to exactly the matrices quantization touches "
        "(language-model attention and experts, or one of the two); 'relative error' is "
        "‖W − W′‖ / ‖W‖ over all of them, so the noise rows and the RTN rows sit on one scale. "
        "The controls show those matrices do carry the answers. 'largest ÷ median input' is the "
        "largest input to a quantized attention projection over the median one, on 64 "
        f"questions.{' ' + args.note if args.note else ''}\n\n{models}\n\n{table}\n"
    )
    if not args.no_write:
        write_section("robustness", body)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
