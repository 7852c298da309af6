"""Training smoke test: a few steps of a tiny configuration, resume, export, evaluate."""

from __future__ import annotations

import json

import pytest
import torch

from refmodel.train import CHECKPOINT, HISTORY, export, main
from veq.reference.evaluate import evaluate, heldout_samples, load_reference
from veq.reference.shapes import FAMILIES

TINY = (
    "--hidden 64 --layers 1 --experts 4 --top-k 2 --moe-intermediate 32 --heads 2 --kv-heads 1 "
    "--vision-hidden 32 --vision-depth 1 --deepstack 0 --batch 4 --eval-every 3 "
    "--eval-questions 12 --checkpoint-every 2 --warmup 2"
).split()


def test_train_resume_export_evaluate(tmp_path):
    run = tmp_path / "run"
    main(["--run", str(run), "--steps", "3", *TINY])
    first = torch.load(run / CHECKPOINT, weights_only=False)
    assert first["step"] == 3
    assert all(torch.isfinite(v).all() for v in first["model"].values())
    # Same run directory, more steps: resumes at step 3 (sizes come from the run directory).
    main(["--run", str(run), "--steps", "5"])
    second = torch.load(run / CHECKPOINT, weights_only=False)
    assert second["step"] == 5 and second["cfg"]["steps"] == 5
    log = (run / "train.log").read_text()
    assert "resuming run" in log and "step 5/5 loss" in log
    rows = [json.loads(line) for line in (run / HISTORY).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 5]
    assert set(rows[-1]["per_family"]) == set(FAMILIES)

    # A chunk limit stops at the next checkpoint (every 2 steps here); a stale validation row
    # beyond the checkpoint (a run killed after validating) is dropped when it resumes.
    main(["--run", str(run), "--steps", "8", "--max-minutes", "0"])
    assert torch.load(run / CHECKPOINT, weights_only=False)["step"] == 6
    assert "stopping at step 6" in (run / "train.log").read_text()
    with open(run / HISTORY, "a") as fh:
        fh.write(json.dumps({"step": 99, "accuracy": 0.0}) + "\n")
    main(["--run", str(run), "--steps", "8"])
    rows = [json.loads(line) for line in (run / HISTORY).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 5, 6, 8]

    out = export(run, tmp_path / "model")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 8 and info["dtype"] == "bfloat16"
    model, processor = load_reference(out)
    res = evaluate(model, processor, heldout_samples(12))
    assert res.n == 12 and 0.0 <= res.accuracy <= 1.0 and res.answer_nll > 0
    assert set(res.per_family) == set(FAMILIES)


def test_training_data_does_not_depend_on_resume_point(tmp_path):
    from refmodel.train import ModelSize, TrainConfig, Trainer

    cfg = TrainConfig(batch=3, eval_questions=6)
    size = ModelSize(
        hidden=64,
        layers=1,
        experts=4,
        top_k=2,
        moe_intermediate=32,
        heads=2,
        kv_heads=1,
        vision_hidden=32,
        vision_depth=1,
        deepstack=(0,),
    )
    t = Trainer(tmp_path, size, cfg)
    a, b = t.batch(4), t.batch(4)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    assert t.batch(5).spans != a.spans or not torch.equal(
        t.batch(5).inputs["input_ids"], a.inputs["input_ids"]
    )
    # A later stage that starts `data_start` sequences in sees what this run's step 4 saw.
    later = Trainer(tmp_path / "later", size, TrainConfig(batch=3, data_start=12))
    assert torch.equal(later.batch(0).inputs["input_ids"], a.inputs["input_ids"])
    with pytest.raises(ValueError, match="leaves the"):
        Trainer(tmp_path / "past", size, TrainConfig(batch=3, data_start=10**8))


def test_pointer_loss_of_known_attention():
    from refmodel.train import pointer_loss

    s = 10
    batch = [(0, 7, torch.tensor([2, 3])), (1, 9, torch.tensor([5]))]
    uniform = torch.full((2, 2, s, s), 1.0 / s)
    want = -(torch.log(torch.tensor(0.2)) + torch.log(torch.tensor(0.1))) / 2
    assert torch.allclose(pointer_loss([uniform], batch, [1]), want, atol=1e-5)
    sharp = torch.zeros(2, 2, s, s)
    sharp[0, 1, 7, 3] = sharp[1, 1, 9, 5] = 1.0
    assert float(pointer_loss([sharp, sharp], batch, [1, 1])) < 1e-5
    assert float(pointer_loss([sharp], batch, [0])) > 10  # the other head looks elsewhere


def test_warm_start_with_the_pointer_loss(tmp_path):
    base = tmp_path / "base"
    main(["--run", str(base), "--steps", "2", *TINY])
    run = tmp_path / "tuned"
    pointer = [
        "--pointer-weight",
        "1",
        "--pointer-heads",
        "0.1",
        "--word-heads",
        "0.0",
        "--init",
        str(base / CHECKPOINT),
    ]
    main(["--run", str(run), "--steps", "2", *TINY, *pointer])
    log = (run / "train.log").read_text()
    assert f"starting from {base / CHECKPOINT} (its step 2)" in log
    # −log of the mass on a few of the image tokens: finite, and not the −log 1e-6 of none.
    assert 0 < float(log.split(" pointer ")[1].split()[0]) < 10
    assert json.loads((run / "args.json").read_text())["cfg"]["pointer_weight"] == 1.0
    # The exported model says how it was made: both stages, no path of this machine.
    info = json.loads((export(run, tmp_path / "model") / "training.json").read_text())
    assert info["steps"] == 2 and info["train"]["init"] == "base/checkpoint.pt"
    assert [st["steps"] for st in info["earlier_stages"]] == [2]
    assert info["earlier_stages"][0]["train"]["pointer_weight"] == 0.0


def test_init_loads_the_other_runs_weights_not_its_step(tmp_path):
    from refmodel.train import ModelSize, TrainConfig, Trainer

    base = tmp_path / "base"
    main(["--run", str(base), "--steps", "2", *TINY])
    stored = json.loads((base / "args.json").read_text())
    size = ModelSize(**{**stored["size"], "deepstack": tuple(stored["size"]["deepstack"])})
    cfg = TrainConfig(**{**stored["cfg"], "init": str(base / CHECKPOINT)})
    t = Trainer(tmp_path / "tuned", size, cfg)
    assert t.load() is False and t.step == 0  # a new run: fresh optimiser and schedule
    source = torch.load(base / CHECKPOINT, weights_only=False)
    for name, value in t.model.state_dict().items():
        assert torch.equal(value, source["model"][name]), name


def test_init_from_an_exported_model_directory(tmp_path):
    """The shipped model is a valid starting point: its weights (bf16 → fp32) and its lineage."""
    base = tmp_path / "base"
    main(["--run", str(base), "--steps", "2", *TINY])
    exported = export(base, tmp_path / "model")
    run = tmp_path / "tuned"
    main(["--run", str(run), "--steps", "1", *TINY, "--init", str(exported)])
    assert (
        f"starting from exported {exported} (its step 2; fresh cell head)"
        in (run / "train.log").read_text()
    )
    info = json.loads((export(run, tmp_path / "tuned-model") / "training.json").read_text())
    assert info["train"]["init"] == f"{tmp_path.name}/model"
    assert [st["steps"] for st in info["earlier_stages"]] == [2]

    from refmodel.train import ModelSize, TrainConfig, Trainer

    stored = json.loads((base / "args.json").read_text())
    size = ModelSize(**{**stored["size"], "deepstack": tuple(stored["size"]["deepstack"])})
    t = Trainer(tmp_path / "fresh", size, TrainConfig(**{**stored["cfg"], "init": str(exported)}))
    assert t.load() is False and t.step == 0
    source = torch.load(base / CHECKPOINT, weights_only=False)["model"]
    for name, value in t.model.state_dict().items():
        assert torch.equal(value, source[name].bfloat16().float()), name
