"""The reference model's card: measure everything it states, then write `MODEL_CARD.md`.

Owns the measurements a model card of the reference model reports, each made on the shipped
directory by the committed code: held-out exact-match accuracy per family and answer NLL, the
sensitivity to round-to-nearest quantization through the project's own pipeline
(`veq.quantize` → `veq.load`, g128), per-layer routing statistics by modality, and γ
(`veq.calib.gamma.measure_gamma`, both text definitions). Writes `card.json` (the numbers, which
tests read) and `MODEL_CARD.md` (the same numbers for people). It does not train.

    python -m refmodel.card --model veq/reference/mini --run /tmp/veq-runs/mini

Shape legend: T tokens, E experts, A top-k, L layers.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import tempfile
import time
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refmodel.plain import plain_set
from refmodel.train import ModelSize, TrainConfig, heads_of
from veq.reference import MINI_CALIB
from veq.reference.encode import Encoder, calibration_conversations, calibration_samples
from veq.reference.evaluate import evaluate, heldout_samples, load_reference
from veq.reference.shapes import CALIB_SEEDS, FAMILIES, HELDOUT_SEEDS, TRAIN_SEEDS, VALID_SEEDS

log = logging.getLogger("refmodel.card")

CARD_JSON = "card.json"
CARD_MD = "MODEL_CARD.md"
#: The test suite re-evaluates the first SMOKE_QUESTIONS held-out questions and compares.
SMOKE_QUESTIONS = 64
#: Questions per family of the plain drawings (`refmodel.plain`) the card reports.
PLAIN_PER_FAMILY = 60


@torch.no_grad()
def routing_stats(model: nn.Module, processor: Any, n: int = 96, seed: int = 0) -> list[dict]:
    """Per MoE layer, over `n` calibration conversations (3 image : 1 text-only): expert load
    distributions of vision tokens and of text tokens (every real non-vision token), their
    total-variation distance, busiest-expert load ÷ mean load (all tokens, and per modality), and
    how many experts are vision-leaning (vision share of the two normalised loads > 0.8)."""
    encoder = Encoder(processor)
    routers = [
        layer.mlp.gate for layer in model.model.language_model.layers if hasattr(layer.mlp, "gate")
    ]
    picks: list[list[torch.Tensor]] = [[] for _ in routers]
    handles = [
        r.register_forward_hook(lambda m, a, out, i=i: picks[i].append(out[2]))  # [T, A]
        for i, r in enumerate(routers)
    ]
    kinds = []
    try:
        samples = calibration_samples(n, seed)
        for i in range(0, n, 32):
            batch = encoder(samples[i : i + 32])
            model(**batch.inputs, use_cache=False)
            mask = batch.inputs["attention_mask"].reshape(-1).bool()
            vision = batch.inputs["mm_token_type_ids"].reshape(-1).bool()
            kinds.append(torch.where(mask, torch.where(vision, 0, 1), -1))
    finally:
        for h in handles:
            h.remove()
    kind = torch.cat(kinds)  # [T]: 0 vision, 1 text, -1 padding
    out = []
    for i, chosen in enumerate(picks):
        idx = torch.cat(chosen)  # [T, A]
        e = routers[i].weight.shape[0]

        def load(sel: torch.Tensor, idx: torch.Tensor = idx, e: int = e) -> torch.Tensor:
            counts = torch.bincount(idx[sel].reshape(-1), minlength=e).double()
            return counts / counts.sum().clamp(min=1)

        pv, pt, pall = load(kind == 0), load(kind == 1), load(kind >= 0)
        share = pv / (pv + pt).clamp(min=1e-12)
        out.append(
            {
                "layer": i,
                "tv_vision_text": round(float(0.5 * (pv - pt).abs().sum()), 4),
                "busiest_over_mean": round(float(pall.max() * e), 3),
                "busiest_over_mean_vision": round(float(pv.max() * e), 3),
                "busiest_over_mean_text": round(float(pt.max() * e), 3),
                "vision_leaning_experts": int((share > 0.8).sum()),
                "text_leaning_experts": int((share < 0.2).sum()),
            }
        )
    return out


def measure_model_gamma(model: nn.Module, processor: Any, n: int = 16) -> dict[str, Any]:
    """γ on `n` ShapesVQA calibration conversations with images (`measure_gamma`)."""
    from veq.calib.data import encode_conversation
    from veq.calib.gamma import measure_gamma

    token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    convs = calibration_conversations(n, text_fraction=0.0)
    samples = [encode_conversation(processor, c, token) for c in convs]
    res = measure_gamma(model, samples, max_samples=n)
    return {
        "gamma_text": round(res.gamma, 3),
        "gamma_answer": round(res.gamma_answer, 3),
        "per_layer_text": [round(x, 3) for x in res.per_layer],
        "samples": res.samples,
    }


def quantized_accuracy(
    model_dir: Path,
    method: str,
    bits: int,
    questions: Sequence[Any],
    plain: Sequence[Any],
    *,
    group_size: int = 128,
    samples: int = 8,
    cache_dir: Path,
) -> dict[str, Any]:
    """Quantize `model_dir` through `veq.quantize` (the `shapes` calibration source), load it
    with `veq.load` and evaluate on the held-out `questions` and the `plain` drawings."""
    import veq

    t0 = time.perf_counter()
    q = veq.quantize(
        model_dir,
        method=method,
        bits=bits,
        group_size=group_size,
        calib=MINI_CALIB,
        samples=samples,
        gamma=1.0,
        cache_dir=cache_dir,
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - t0
    model, processor = veq.load(q.path, device="cpu")
    res = evaluate(model.eval(), processor, questions)
    return {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "quantize_seconds": round(seconds, 1),
        **res.as_dict(),
        "plain": evaluate(model, processor, plain).as_dict(),
    }


def _training_wall_seconds(run: Path) -> float | None:
    """First to last timestamp of the run's log (covers restarts' gaps too)."""
    log_path = run / "train.log"
    if not log_path.exists():
        return None
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log_path.read_text(), re.M)
    if len(stamps) < 2:
        return None
    fmt = "%Y-%m-%d %H:%M:%S"
    return (datetime.strptime(stamps[-1], fmt) - datetime.strptime(stamps[0], fmt)).total_seconds()


def measure(
    model_dir: Path,
    *,
    questions: int = 2100,
    sensitivity: Sequence[tuple[str, int]] = (
        ("rtn", 8),
        ("rtn", 4),
        ("gptq", 4),
        ("veq", 4),
        ("rtn", 3),
        ("rtn", 2),
    ),
    run: Path | None = None,
) -> dict[str, Any]:
    """Every number of the card, measured on `model_dir`."""
    model, processor = load_reference(model_dir)
    held = heldout_samples(questions)
    t0 = time.perf_counter()
    base = evaluate(model, processor, held)
    smoke = evaluate(model, processor, held[:SMOKE_QUESTIONS])
    drawings = plain_set(PLAIN_PER_FAMILY)
    plain = evaluate(model, processor, drawings)
    log.info("16-bit: %s (%.0fs)", base.summary(), time.perf_counter() - t0)
    log.info("16-bit, plain drawings: %s", plain.summary())
    info = json.loads((model_dir / "training.json").read_text())
    card: dict[str, Any] = {
        "model": model_dir.name,
        "training": info,
        "heldout": {"seed": HELDOUT_SEEDS.start, **base.as_dict()},
        "smoke": {"questions": SMOKE_QUESTIONS, "accuracy": smoke.accuracy},
        "plain": plain.as_dict(),
    }
    if run is not None:
        card["training"]["wall_seconds"] = _training_wall_seconds(run)
        hist = run / "history.jsonl"
        if hist.exists():
            rows = [json.loads(line) for line in hist.read_text().splitlines() if line]
            card["validation_history"] = [
                {"step": r["step"], "accuracy": round(r["accuracy"], 4)} for r in rows
            ]
    card["routing"] = routing_stats(model, processor)
    card["gamma"] = measure_model_gamma(model, processor)
    log.info("gamma %s", card["gamma"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, bits in sensitivity:
            row = quantized_accuracy(
                model_dir, method, bits, held, drawings, cache_dir=Path(tmp) / "cache"
            )
            row["drop_points"] = round(100 * (base.accuracy - row["accuracy"]), 2)
            log.info(
                "%s W%d g128: acc %.4f (drop %.2f pt)",
                method,
                bits,
                row["accuracy"],
                row["drop_points"],
            )
            rows.append(row)
    card["sensitivity"] = rows
    return card


def _stage_lines(cfg: dict[str, Any], steps: int) -> list[str]:
    pointer = ""
    if cfg.get("pointer_weight", 0) > 0:
        answer, word = heads_of(cfg["pointer_heads"]), heads_of(cfg.get("word_heads", ""))

        def named(heads: list[tuple[int, int]]) -> str:
            return ", ".join(f"layer {layer} head {head}" for layer, head in heads)

        queries = [f"from the position predicting the answer ({named(answer)})"] if answer else []
        if word:
            queries.append(f"from the question's last colour or shape word ({named(word)})")
        pointer = (
            f", plus {cfg['pointer_weight']} × a pointer loss on {len(answer) + len(word)} "
            "decoder heads: −log of the attention they pay to the vision tokens of the shapes "
            "the answer is read from (the one asked about, or those counted), "
            + " and ".join(queries)
        )
    return [
        f"- {steps} steps of batch {cfg['batch']} sequences; each sequence is one image with "
        f"{cfg['questions']} questions as a multi-turn chat, or ({_pct(cfg['text_fraction'])} %) "
        f"{cfg['questions']} text-only questions"
        + (
            f"; {_listed(cfg['focus'].split(','))} questions asked twice as often as the "
            "other vision families."
            if cfg.get("focus")
            else "."
        ),
        f"- Loss: cross-entropy on answer tokens (answer + `<|im_end|>`), plus "
        f"{cfg['balance_coef']} × load-balancing loss, plus {cfg['aux_weight']} × an auxiliary "
        "per-cell classification on the vision tower's merged tokens (colour and shape of the "
        "object covering most of the cell, the number of object centres in it, and the cell's "
        f"own column and row; a training-only head, not shipped){pointer}.",
        f"- AdamW, lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine to {cfg['min_lr_ratio']}×), "
        f"weight decay {cfg['weight_decay']}, clip {cfg['clip']}, seed {cfg['seed']}; fp32 on "
        "CPU (two threads).",
    ]


def _flags(values: dict[str, Any], defaults: Any, skip: tuple[str, ...] = ()) -> str:
    """The command-line flags that set `values` where they differ from the dataclass's."""
    out = []
    for f in fields(defaults):
        v = values.get(f.name, f.default)
        if f.name in skip or (tuple(v) if isinstance(v, list) else v) == f.default:
            continue
        shown = " ".join(map(str, v)) if isinstance(v, list | tuple) else shlex.quote(str(v))
        out.append(f"--{f.name.replace('_', '-')} {shown}")
    return " ".join(out)


def _training_lines(t: dict[str, Any]) -> list[str]:
    """How the model was trained: every stage (a warm start continues the one before), time,
    data, and the commands that reproduce it."""
    stages = [*t.get("earlier_stages", []), t]
    lines: list[str] = []
    commands = []
    size = _flags(t["size"], ModelSize)
    for i, st in enumerate(stages, 1):
        # `--init` names a run's checkpoint, or an exported model directory (no cell head).
        exported = i > 1 and not st["train"].get("init", "").endswith(".pt")
        if len(stages) > 1:
            start = (
                "from scratch"
                if i == 1
                else f"from stage {i - 1}'s "
                + (
                    "exported weights and a fresh cell head"
                    if exported
                    else "weights and cell head"
                )
                + ", a fresh optimiser and schedule, "
                + (
                    f"training sequences from seed index {st['train']['data_start']:,} on"
                    if st["train"].get("data_start")
                    else "the training seeds again from the first"
                )
            )
            lines.append(f"**Stage {i}** ({start}):")
            lines.append("")
        lines += _stage_lines(st["train"], st["steps"])
        if len(stages) > 1:
            lines.append("")
        if exported:
            commands.append(
                f"`python -m refmodel.train export --run RUN{i - 1} --out MODEL{i - 1}`"
            )
        init = (
            (f" --init MODEL{i - 1}" if exported else f" --init RUN{i - 1}/checkpoint.pt")
            if i > 1
            else ""
        )
        cfg = _flags(st["train"], TrainConfig, skip=("init",))
        run = f"RUN{i}" if len(stages) > 1 else "RUN"
        commands.append(f"`python -m refmodel.train --run {run}{init} {size} {cfg}`")
    seconds = sum(st["train_seconds"] for st in stages)
    last = "; the last stage" if len(stages) > 1 else ","
    wall = t.get("wall_seconds")
    lines += [
        f"- Training time: {seconds / 60:.1f} min of step time"
        + (f"{last} {wall / 60:.1f} min wall clock (with validation)." if wall else "."),
        f"- Data: training seeds {_range(TRAIN_SEEDS)}, validation (used while training) "
        f"{_range(VALID_SEEDS)}, calibration {_range(CALIB_SEEDS)}, held-out (this card only) "
        f"{_range(HELDOUT_SEEDS)}.",
        f"- Reproduce: {', then '.join(commands)}, then `python -m refmodel.train export "
        f"--run {'RUN' + str(len(stages)) if len(stages) > 1 else 'RUN'} --out DIR`.",
    ]
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _listed(words: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def render(card: dict[str, Any]) -> str:
    """MODEL_CARD.md from `card.json`'s content."""
    t = card["training"]
    size, cfg = t["size"], t["train"]
    h = card["heldout"]
    p = card["plain"]
    lines = [
        f"# {card['model']}: the ShapesVQA reference model",
        "",
        "A small Qwen3-VL-MoE-architecture vision-language model trained from scratch on",
        "ShapesVQA (`veq.reference.shapes`), a procedurally generated VQA task with domain",
        "randomisation: 1–6 shapes (circle, square, triangle, cross) in eleven colour words (red,",
        "orange, yellow, green, blue, purple, pink, brown, black, grey, white; each a range of",
        "hues, saturations and values) anywhere on images of 64–512 px with aspect ratios up to",
        "2:1; white, light, grey, dark, gradient and noisy backgrounds; filled, outlined and",
        "hollow shapes from 8 % to 60 % of the short side, overlapping a little at most and",
        "then in contrasting colours; aliased and anti-aliased edges. Questions about colour,",
        "shape, count, existence and position,",
        "text-only questions (arithmetic, number order, word order), and chat: greetings and",
        '"what can you do?" get a one-line self-description, off-task requests a polite',
        "refusal. Vision and text answers are one word and one token. It is veq's quality",
        "reference (`veq eval` measures quantization methods on it) and the model `make serve`",
        "answers with; it is a test instrument, not a general-purpose model.",
        "",
        "Every number below was measured by `python -m refmodel.card` on this directory.",
        "",
        "## Configuration",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {t['parameters']:,} |",
        f"| weights | {t['dtype']} safetensors |",
        f"| text decoder | {size['layers']} layers, hidden {size['hidden']}, "
        f"{size['heads']} heads / {size['kv_heads']} KV heads |",
        f"| MoE | {size['experts']} experts, top-{size['top_k']}, expert width "
        f"{size['moe_intermediate']}, every layer |",
        f"| vision tower | depth {size['vision_depth']}, hidden {size['vision_hidden']}, "
        f"patch 16, merge 2, deepstack {list(size['deepstack'])} |",
        "| images | resized (aspect kept) to 128²–192² pixels: 16–36 vision tokens |",
        "| tokenizer | byte-level BPE, task words as whole tokens, Qwen chat template |",
        "",
        "## Training",
        "",
        *_training_lines(t),
        "",
        "## Held-out accuracy (16-bit)",
        "",
        f"{h['n']} single-question samples from held-out seed {h['seed']} (families in turn), "
        "greedy exact match:",
        "",
        "| family | questions | exact match % |",
        "|---|---|---|",
    ]
    for fam in FAMILIES:
        if fam in h["per_family"]:
            lines.append(f"| {fam} | {h['per_family_n'][fam]} | {_pct(h['per_family'][fam])} |")
    lines += [
        f"| **overall** | {h['n']} | **{_pct(h['accuracy'])}** |",
        "",
        "## Pictures it was not trained on (16-bit)",
        "",
        "`refmodel.plain`: a second, deliberately different generator, what a newcomer draws",
        'in a few lines of PIL. One shape in a CSS named colour (`fill="red"`), no jitter,',
        "rotation, anti-aliasing or noise, centred or anywhere, on a white, light grey (200),",
        'mid grey (128) or black canvas of 96², 128², 200² or 320×240 px, asked "What color',
        'is the circle?" or "What shape is the object?"; and 1–3 separated shapes on white,',
        'asked "How many shapes are there?".',
        "",
        "| family | questions | exact match % |",
        "|---|---|---|",
    ]
    for fam, acc in p["per_family"].items():
        lines.append(f"| {fam} | {p['per_family_n'][fam]} | {_pct(acc)} |")
    lines += [
        f"| **overall** | {p['n']} | **{_pct(p['accuracy'])}** |",
        "",
        f"Mean answer negative log-likelihood: {h['answer_nll']:.4f} nats. The first "
        f"{card['smoke']['questions']} of these questions give {_pct(card['smoke']['accuracy'])} %;"
        " the test suite re-checks that.",
        "",
        "## Sensitivity to quantization (g128, through `veq.quantize` + `veq.load`)",
        "",
        "Weights of the text decoder (attention and experts) quantized; the vision tower, router",
        "and `lm_head` stay 16-bit. Calibration: 8 conversations of the `shapes` source (RTN",
        "uses none).",
        "",
        "| method | bits | exact match % | drop (points) | answer NLL | plain drawings % | "
        "kept of 16-bit (held-out / plain) |",
        "|---|---|---|---|---|---|---|",
        f"| none | 16 | {_pct(h['accuracy'])} | 0 | {h['answer_nll']:.4f} | "
        f"{_pct(p['accuracy'])} | 100 % / 100 % |",
    ]
    for r in card["sensitivity"]:
        kept = (r["accuracy"] / h["accuracy"], r["plain"]["accuracy"] / p["accuracy"])
        lines.append(
            f"| {r['method']} | {r['bits']} | {_pct(r['accuracy'])} | {r['drop_points']:.1f} | "
            f"{r['answer_nll']:.4f} | {_pct(r['plain']['accuracy'])} | "
            f"{_pct(kept[0])} % / {_pct(kept[1])} % |"
        )
    lines += _family_table("held-out set", h, [(r, r) for r in card["sensitivity"]])
    lines += _family_table("plain drawings", p, [(r, r["plain"]) for r in card["sensitivity"]])
    lines += [
        "",
        "## Routing by modality",
        "",
        "Over 96 calibration sequences (3 with an image : 1 text-only); vision = image tokens,",
        "text = every other real token. TV = total-variation distance between the vision and",
        "text expert-load distributions; busiest ÷ mean = the most loaded expert's share of",
        "top-k slots × number of experts; vision- (text-) leaning = experts whose normalised",
        "vision load is > 80 % (< 20 %) of vision + text load.",
        "",
        "| layer | TV vision/text | busiest ÷ mean (all) | vision | text | vision-leaning | "
        "text-leaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in card["routing"]:
        lines.append(
            f"| {r['layer']} | {r['tv_vision_text']:.3f} | {r['busiest_over_mean']:.2f} | "
            f"{r['busiest_over_mean_vision']:.2f} | {r['busiest_over_mean_text']:.2f} | "
            f"{r['vision_leaning_experts']} | {r['text_leaning_experts']} |"
        )
    g = card["gamma"]
    lines += [
        "",
        "## γ (text vs vision gradient magnitude)",
        "",
        f"Measured with `veq.calib.gamma.measure_gamma` at decoder-layer inputs on {g['samples']}",
        "ShapesVQA calibration conversations with images (loss on answer tokens):",
        "",
        f"- γ with text = every non-vision token: **{g['gamma_text']:.2f}** "
        f"(per layer {', '.join(f'{x:.2f}' for x in g['per_layer_text'])})",
        f"- γ with text = answer tokens only: **{g['gamma_answer']:.2f}**",
        "",
        "Vision gradients are exactly zero at the last layer's output, so γ is measured at layer",
        "inputs; with one-token answers the answer-only set is small, hence both definitions.",
    ]
    if card.get("validation_history"):
        hist = card["validation_history"]
        lines += [
            "",
            "## Validation accuracy while training",
            "",
            f"(validation seeds, {cfg['eval_questions']} questions; not the held-out set)",
            "",
            " · ".join(f"{r['step']}: {_pct(r['accuracy'])}" for r in hist),
        ]
    lines += [
        "",
        "## Limitations",
        "",
        "- Synthetic, closed-vocabulary task; the model knows nothing else, and answers any",
        "  question about an image as one of its task's questions.",
        "- Positions are halves only (left/right, top/bottom), asked about shapes clearly off",
        "  the middle; counting goes to six.",
    ]
    lines += _sensitivity_verdict(card)
    return "\n".join(lines) + "\n"


#: veq's sensitivity target for the reference (issue 4): minimum accuracy drop in points.
SENSITIVITY_TARGET = {("rtn", 3): 3.0, ("rtn", 2): 15.0}


def _family_table(
    title: str, base: dict[str, Any], rows: Sequence[tuple[dict[str, Any], dict[str, Any]]]
) -> list[str]:
    """Per-family exact match of the 16-bit `base` result and of each (setting, result) row."""
    families = list(base["per_family"])
    lines = [
        "",
        f"Per family, {title} (exact match %):",
        "",
        "| method | bits | " + " | ".join(families) + " |",
        "|---|---|" + "---|" * len(families),
        "| none | 16 | " + " | ".join(_pct(base["per_family"][f]) for f in families) + " |",
    ]
    for setting, result in rows:
        cells = " | ".join(_pct(result["per_family"][f]) for f in families)
        lines.append(f"| {setting['method']} | {setting['bits']} | {cells} |")
    return lines


def _sensitivity_verdict(card: dict[str, Any]) -> list[str]:
    """A limitation line when the model is less sensitive to RTN than veq's target asks."""
    drops = {(r["method"], r["bits"]): r["drop_points"] for r in card["sensitivity"]}
    short = [
        f"RTN W{bits} g128 loses {drops[(m, bits)]:.1f} points (target ≥ {need:g})"
        for (m, bits), need in SENSITIVITY_TARGET.items()
        if (m, bits) in drops and drops[(m, bits)] < need
    ]
    if not short:
        return []
    return [
        "- **Too robust to be a sensitive reference yet**: " + "; ".join(short) + ". Methods "
        "cannot be separated on this model until a leaner or more demanding design is trained.",
    ]


def _range(r: range) -> str:
    return f"[{r.start:,}, {r.stop:,})"


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    (model_dir / CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
    (model_dir / CARD_MD).write_text(render(card))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m refmodel.card", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="the exported model directory")
    p.add_argument("--run", type=Path, default=None, help="its training run (for wall time)")
    p.add_argument("--questions", type=int, default=2100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-only", action="store_true", help="re-render MODEL_CARD.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.render_only:
        card = json.loads((a.model / CARD_JSON).read_text())
    else:
        card = measure(a.model, questions=a.questions, run=a.run)
    write_card(a.model, card)
    print(a.model / CARD_MD)


if __name__ == "__main__":
    main()
