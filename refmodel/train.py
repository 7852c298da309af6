"""Train the ShapesVQA reference model from scratch: `python -m refmodel.train`.

Owns the reference architecture (a small Qwen3-VL-MoE: widths multiples of 128 so g128 applies,
16 experts, top-4, a load-balancing loss), the training loop (fp32, CPU by default, loss on
answer tokens plus the router balance loss plus an auxiliary per-cell colour/shape loss on the
vision tower's merged tokens that shortens the vision plateau; the auxiliary head is not part of
the model), checkpoints every few hundred steps (resume by running the same command again),
a progress and loss log, periodic validation accuracy per family, and `export`: the Hugging Face
model directory (16-bit safetensors, config, processor files). It does not write the model card
(`refmodel.card`).

Every training sequence is a pure function of its index (`TRAIN_SEEDS[step · batch + i]`), so a
resumed run sees exactly the data an uninterrupted one would.

    python -m refmodel.train --run /tmp/veq-runs/mini --steps 4000
    python -m refmodel.train export --run /tmp/veq-runs/mini --out veq/reference/mini
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from veq.reference.encode import (
    CELL_TARGETS,
    POSITION_BINS,
    Batch,
    Encoder,
    reference_processor,
)
from veq.reference.evaluate import evaluate
from veq.reference.shapes import COLORS, SHAPES, TRAIN_SEEDS, VALID_SEEDS, evaluation_set
from veq.reference.shapes import training_sample as make_training_sample

log = logging.getLogger("refmodel.train")

CHECKPOINT = "checkpoint.pt"
LOG = "train.log"
HISTORY = "history.jsonl"
ARGS = "args.json"


@dataclass
class ModelSize:
    """The reference architecture's sizes (defaults: the shipped `mini`)."""

    hidden: int = 128
    layers: int = 4
    experts: int = 16
    top_k: int = 4
    moe_intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 128
    vision_depth: int = 3
    deepstack: tuple[int, ...] = (1,)


@dataclass
class TrainConfig:
    """Optimisation settings; stored in the run directory and reused on resume.

    `pointer_weight` > 0 adds the pointer loss (`pointer_loss`) on the attention heads named in
    `pointer_heads` ("layer.head,...", queried from the answer's position) and `word_heads`
    (queried from the question's naming word; "" for none); `init` names another run's
    checkpoint whose model and auxiliary head a new run starts from (fresh optimiser and
    schedule); `focus` ("count,position") names vision families asked twice as often;
    `data_start` is the index into `TRAIN_SEEDS` of the first training sequence, so that a later
    stage can train on sequences no earlier stage saw."""

    steps: int = 4000
    batch: int = 32
    questions: int = 4
    text_fraction: float = 0.2
    focus: str = ""
    data_start: int = 0
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    balance_coef: float = 0.01
    aux_weight: float = 0.5
    pointer_weight: float = 0.0
    pointer_heads: str = "2.1,3.1"
    word_heads: str = "1.1"
    init: str = ""
    seed: int = 0
    eval_every: int = 250
    eval_questions: int = 300
    checkpoint_every: int = 100


def build_model(processor: Any, size: ModelSize, seed: int = 0) -> nn.Module:
    """A freshly initialised Qwen3-VL-MoE model matched to `processor` (fp32, train mode)."""
    from transformers import AutoModelForImageTextToText

    from veq.testing import qwen3_vl_moe_config

    config = qwen3_vl_moe_config(
        processor,
        hidden=size.hidden,
        layers=size.layers,
        experts=size.experts,
        top_k=size.top_k,
        moe_intermediate=size.moe_intermediate,
        heads=size.heads,
        kv_heads=size.kv_heads,
        vision_hidden=size.vision_hidden,
        vision_depth=size.vision_depth,
        deepstack=tuple(size.deepstack),
    )
    config.text_config.router_aux_loss_coef = 0.0  # the loop adds the balance loss itself
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).float().train()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class CellHead(nn.Module):
    """Auxiliary head on the merged vision tokens `[C, H]`: one linear probe per target of
    `veq.reference.encode.CELL_TARGETS` (the dominant object's colour and shape, the number of
    object centres in the cell, the cell's column and row bin), each `[C, classes]`. Training
    only: it teaches the vision tower to put what the questions need into every token."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        classes = {
            "colors": 1 + len(COLORS),
            "shapes": 1 + len(SHAPES),
            "centres": 4,
            "cols": POSITION_BINS,
            "rows": POSITION_BINS,
        }
        self.probes = nn.ModuleDict({k: nn.Linear(hidden, classes[k]) for k in CELL_TARGETS})

    def loss(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(self.probes[k](x), targets[k]) for k in CELL_TARGETS)


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean over answers of each answer's mean token cross-entropy. `logits: [B, S, V]`.

    Per answer, not per token: a chat answer is a 20-token sentence, a vision answer one word
    and `<|im_end|>`; averaged per token, the sentences carried 80 % of the loss and the vision
    answers the rest."""
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], reduction="none"
    )  # [B, S-1], position p predicts token p + 1
    weights = torch.zeros_like(ce)
    for row, first, last, _ in batch.spans:
        weights[row, first - 1 : last] = 1.0 / (last - first + 1)
    return (ce * weights).sum() / max(len(batch.spans), 1)


def pointer_loss(
    attentions: list[torch.Tensor],
    pointers: list[tuple[int, int, torch.Tensor]],
    heads: list[int],
) -> torch.Tensor:
    """Mean over `pointers` (`Batch.pointers` or `Batch.word_pointers`) and heads of −log(the
    attention mass the query position pays to the cells that show the shapes its answer is
    about). `attentions`: per supervised layer `[B, H, S, S]` (softmax weights); `heads[i]`: the
    head of layer i.

    Without it the decoder has to discover, from one-word answers alone, that "the triangle" means
    reading the colour of the tokens where a triangle is; the first `mini` sat at chance on
    every scene with two or more shapes after 12,000 steps, while answering one-shape scenes
    perfectly. It constrains only where a head looks, not what the model answers."""
    if not pointers:
        return torch.zeros(())
    rows = torch.tensor([r for r, _, _ in pointers])
    queries = torch.tensor([q for _, q, _ in pointers])  # targets: [P, S]
    targets = torch.zeros(len(rows), attentions[0].shape[-1], device=attentions[0].device)
    for i, (_, _, keys) in enumerate(pointers):
        targets[i, keys] = 1.0
    total = torch.zeros(())
    for attn, head in zip(attentions, heads, strict=True):
        mass = (attn[rows, head, queries] * targets).sum(-1)  # [P]
        total = total - torch.log(mass + 1e-6).mean()
    return total / len(heads)


def balance_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor, top_k: int):
    """Switch-style load-balancing loss over the real (unpadded) tokens of every MoE layer:
    E · Σ_e f_e · P_e, with f_e the fraction of top-k slots and P_e the mean router probability.
    `router_logits`: per layer `[B·S, E]`; `mask`: `[B, S]`."""
    keep = mask.reshape(-1).bool()
    total = torch.zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = logits[keep].float().softmax(-1)  # [T, E]
        e = probs.shape[-1]
        idx = probs.topk(top_k, dim=-1).indices
        frac = torch.zeros(e).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / (
            idx.numel()
        )
        total = total + e * (frac * probs.mean(0)).sum()
    return total / max(len(router_logits), 1)


def heads_of(spec: str) -> list[tuple[int, int]]:
    """ "2.1,3.1" → [(2, 1), (3, 1)]: (layer, head) pairs."""
    return [(int(a), int(b)) for a, b in (item.split(".") for item in spec.split(",") if item)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio · lr` at `cfg.steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """Owns the model, optimiser and auxiliary head of one run directory."""

    def __init__(self, run: Path, size: ModelSize, cfg: TrainConfig) -> None:
        self.run, self.size, self.cfg = run, size, cfg
        if not 0 <= cfg.data_start <= len(TRAIN_SEEDS) - cfg.steps * cfg.batch:
            raise ValueError(
                f"data_start {cfg.data_start} + {cfg.steps} steps × {cfg.batch} sequences "
                f"leaves the {len(TRAIN_SEEDS):,} training seeds"
            )
        run.mkdir(parents=True, exist_ok=True)
        self.processor = reference_processor()
        self.encoder = Encoder(self.processor)
        self.model = build_model(self.processor, size, cfg.seed)
        self.head = CellHead(size.hidden)
        self.params = [*self.model.parameters(), *self.head.parameters()]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
        )
        self.step = 0
        self.seconds = 0.0
        self.stages: list[dict[str, Any]] = []
        """The runs this one started from (`cfg.init`), oldest first: cfg, steps, seconds."""
        self._merged: list[torch.Tensor] = []
        merger = self.model.model.visual.merger
        merger.register_forward_hook(lambda m, a, out: self._merged.append(out))
        self._attn: dict[int, torch.Tensor] = {}
        self.pointer_heads, self.word_heads = heads_of(cfg.pointer_heads), heads_of(cfg.word_heads)
        if cfg.pointer_weight > 0:
            for layer, head in [*self.pointer_heads, *self.word_heads]:
                if not (0 <= layer < size.layers and 0 <= head < size.heads):
                    raise ValueError(f"no head {layer}.{head} in {size.layers} × {size.heads}")
            # Attention weights exist only on the eager path; the model is the same.
            self.model.set_attn_implementation("eager")
            layers = self.model.model.language_model.layers
            for layer in {layer for layer, _ in [*self.pointer_heads, *self.word_heads]}:
                layers[layer].self_attn.register_forward_hook(self._keep_attention(layer))
        self.valid = evaluation_set(cfg.eval_questions, VALID_SEEDS)

    def _keep_attention(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> None:
            self._attn[layer] = out[1]

        return hook

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "seconds": self.seconds,
            "size": asdict(self.size),
            "cfg": asdict(self.cfg),
            "stages": self.stages,
        }
        tmp = self.run / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.run / CHECKPOINT)

    def load(self) -> bool:
        path = self.run / CHECKPOINT
        if not path.exists():
            if self.cfg.init:
                self._start_from(Path(self.cfg.init))
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.stages = state.get("stages", [])
        # Validation rows written after this checkpoint belong to steps that run again.
        history = self.run / HISTORY
        if history.exists():
            rows = [line for line in history.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line)["step"] <= self.step]
            if len(kept) != len(rows):
                history.write_text("".join(line + "\n" for line in kept))
        return True

    def _start_from(self, init: Path) -> None:
        """Load another run's checkpoint (model and cell head), or an exported model directory
        (its weights in fp32; the cell head, which export drops, starts fresh)."""
        if not init.is_dir():
            state = torch.load(init, map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.head.load_state_dict(state["head"])
            done = {"cfg": state["cfg"], "steps": state["step"], "seconds": state["seconds"]}
            self.stages = [*state.get("stages", []), done]
            log.info("starting from %s (its step %d)", init, state["step"])
            return
        from transformers import AutoModelForImageTextToText

        # from_pretrained, not the raw file: it maps saved names back to this model's.
        exported = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32)
        self.model.load_state_dict(exported.state_dict())
        info = json.loads((init / "training.json").read_text())
        self.stages = [
            *(
                {"cfg": st["train"], "steps": st["steps"], "seconds": st["train_seconds"]}
                for st in info.get("earlier_stages", [])
            ),
            {"cfg": info["train"], "steps": info["steps"], "seconds": info["train_seconds"]},
        ]
        log.info("starting from exported %s (its step %d; fresh cell head)", init, info["steps"])

    # -- one step -----------------------------------------------------------------------------
    def batch(self, step: int) -> Batch:
        base = self.cfg.data_start + step * self.cfg.batch
        focus = tuple(f for f in self.cfg.focus.split(",") if f)
        return self.encoder(
            [
                make_training_sample(
                    TRAIN_SEEDS[base + i], self.cfg.questions, self.cfg.text_fraction, focus
                )
                for i in range(self.cfg.batch)
            ],
            targets=True,
        )

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        self._merged.clear()
        self._attn.clear()
        out = self.model(**batch.inputs, output_router_logits=True, use_cache=False)
        answer = answer_loss(out.logits, batch)
        balance = balance_loss(out.router_logits, batch.inputs["attention_mask"], self.size.top_k)
        loss = answer + self.cfg.balance_coef * balance
        parts = {"answer": answer, "balance": balance}
        if self._merged and batch.cells:
            cells = self.head.loss(self._merged[-1], batch.cells)
            loss = loss + self.cfg.aux_weight * cells
            parts["cells"] = cells
        if self.cfg.pointer_weight > 0:
            for name, heads, pointers in (
                ("pointer", self.pointer_heads, batch.pointers),
                ("word", self.word_heads, batch.word_pointers),
            ):
                if heads:
                    attn = [self._attn[layer] for layer, _ in heads]
                    parts[name] = pointer_loss(attn, pointers, [h for _, h in heads])
                    loss = loss + self.cfg.pointer_weight * parts[name]
        parts["loss"] = loss
        return parts

    def train_step(self) -> dict[str, float]:
        batch = self.batch(self.step)
        lr = lr_at(self.step, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        parts = self.losses(batch)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
        self.opt.step()
        self.step += 1
        row = {k: float(v.detach()) for k, v in parts.items()}
        row.update(lr=lr, gnorm=float(gnorm), tokens=batch.tokens)
        return row

    def validate(self) -> dict[str, Any]:
        self.model.eval()
        try:
            res = evaluate(self.model, self.processor, self.valid)
        finally:
            self.model.train()
        return res.as_dict()

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, max_minutes: float | None = None) -> None:
        """Train to `cfg.steps`, or stop at a checkpoint after `max_minutes` of wall clock (run
        the same command again to resume)."""
        started = time.perf_counter()
        resumed = self.load()
        log.info(
            "%s run %s at step %d/%d; %d parameters",
            "resuming" if resumed else "starting",
            self.run,
            self.step,
            self.cfg.steps,
            parameter_count(self.model),
        )
        window: list[dict[str, float]] = []
        t_last = time.perf_counter()
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            row = self.train_step()
            self.seconds += time.perf_counter() - t0
            window.append(row)
            if self.step % 25 == 0 or self.step == self.cfg.steps:
                mean = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
                now = time.perf_counter()
                log.info(
                    "step %d/%d loss %.4f answer %.4f cells %.4f pointer %.4f word %.4f "
                    "balance %.3f lr %.2e gnorm %.2f %.2fs/step train %.0fs",
                    self.step,
                    self.cfg.steps,
                    mean["loss"],
                    mean["answer"],
                    mean.get("cells", float("nan")),
                    mean.get("pointer", float("nan")),
                    mean.get("word", float("nan")),
                    mean["balance"],
                    mean["lr"],
                    mean["gnorm"],
                    (now - t_last) / len(window),
                    self.seconds,
                )
                window, t_last = [], now
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                res = self.validate()
                log.info(
                    "validation step %d: acc %.4f per family %s",
                    self.step,
                    res["accuracy"],
                    json.dumps(res["per_family"]),
                )
                with open(self.run / HISTORY, "a") as fh:
                    fh.write(json.dumps({"step": self.step, "seconds": self.seconds, **res}) + "\n")
                t_last = time.perf_counter()
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save()
                if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                    log.info(
                        "stopping at step %d after %.0f min (--max-minutes); run the same "
                        "command to resume",
                        self.step,
                        (time.perf_counter() - started) / 60,
                    )
                    return
        log.info("done: %d steps, %.0f s of training", self.step, self.seconds)


def export(run: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the run's model as a Hugging Face directory: `dtype` safetensors, config,
    processor files, and `training.json` (sizes, settings, steps, training seconds)."""
    state = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
    size = ModelSize(**{k: tuple(v) if k == "deepstack" else v for k, v in state["size"].items()})
    processor = reference_processor()
    model = build_model(processor, size)
    model.load_state_dict(state["model"])
    model.config.text_config.router_aux_loss_coef = state["cfg"]["balance_coef"]
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    info = {
        "size": state["size"],
        "train": _portable(state["cfg"]),
        "steps": state["step"],
        "train_seconds": round(state["seconds"], 1),
        "earlier_stages": [
            {"train": _portable(st["cfg"]), "steps": st["steps"], "train_seconds": st["seconds"]}
            for st in state.get("stages", [])
        ],
        "parameters": parameter_count(model),
        "dtype": str(dtype).removeprefix("torch."),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def _portable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings without this machine's paths: `init` as run name / file name."""
    if not cfg.get("init"):
        return cfg
    init = Path(cfg["init"])
    return {**cfg, "init": f"{init.parent.name}/{init.name}"}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in fields(cls):
        name = "--" + f.name.replace("_", "-")
        if f.name == "deepstack":
            parser.add_argument(name, type=int, nargs="*", default=None)
        else:
            parser.add_argument(name, type=type(f.default), default=None)


def _from_args(cls: type, args: argparse.Namespace, stored: dict[str, Any] | None) -> Any:
    values = dict(stored or {})
    for f in fields(cls):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    if "deepstack" in values:
        values["deepstack"] = tuple(values["deepstack"])
    return cls(**values)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="python -m refmodel.train export")
        p.add_argument("--run", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
        a = p.parse_args(argv[1:])
        print(export(a.run, a.out, getattr(torch, a.dtype)))
        return
    p = argparse.ArgumentParser(
        prog="python -m refmodel.train",
        description="Train (or resume) the ShapesVQA reference model in a run directory.",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (resumes if present)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=120.0,
        help="stop at the first checkpoint after this much wall clock (default 120; resume by "
        "running the same command)",
    )
    _add_dataclass_args(p, ModelSize)
    _add_dataclass_args(p, TrainConfig)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run.mkdir(parents=True, exist_ok=True)
    stored = json.loads((args.run / ARGS).read_text()) if (args.run / ARGS).exists() else {}
    size = _from_args(ModelSize, args, stored.get("size"))
    cfg = _from_args(TrainConfig, args, stored.get("cfg"))
    if stored and asdict(size) != {
        **stored["size"],
        "deepstack": tuple(stored["size"]["deepstack"]),
    }:
        p.error("model sizes differ from the run directory's; use a new --run")
    (args.run / ARGS).write_text(json.dumps({"size": asdict(size), "cfg": asdict(cfg)}, indent=2))
    handlers = [logging.StreamHandler(), logging.FileHandler(args.run / LOG)]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        Trainer(args.run, size, cfg).fit(args.max_minutes)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


if __name__ == "__main__":
    main()
