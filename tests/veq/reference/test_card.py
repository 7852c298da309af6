"""The model card says how the model was made: every training stage and the commands that
reproduce it, rendered from `card.json` exactly as committed."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from refmodel.card import CARD_JSON, CARD_MD, render
from refmodel.train import ModelSize, TrainConfig
from veq.reference import MINI_DIR


def _training(stages: list[dict]) -> dict:
    *earlier, last = stages
    return {
        "size": {**asdict(ModelSize()), "vision_depth": 4, "deepstack": [1, 2]},
        **last,
        "earlier_stages": earlier,
        "parameters": 1,
        "dtype": "bfloat16",
    }


def _card(training: dict) -> dict:
    shipped = json.loads((MINI_DIR / CARD_JSON).read_text())
    return {**shipped, "training": training}


@pytest.mark.skipif(not (MINI_DIR / CARD_JSON).exists(), reason="no card.json shipped")
def test_committed_card_is_its_rendered_json():
    card = json.loads((MINI_DIR / CARD_JSON).read_text())
    assert render(card) == (MINI_DIR / CARD_MD).read_text()


@pytest.mark.skipif(not (MINI_DIR / CARD_JSON).exists(), reason="no card.json shipped")
def test_a_warm_started_model_lists_both_stages_and_how_to_rerun_them():
    first = {"train": {**asdict(TrainConfig()), "aux_weight": 1.0, "steps": 12000}, "steps": 12000}
    second = {
        "train": {
            **asdict(TrainConfig()),
            "steps": 6000,
            "lr": 0.001,
            "pointer_weight": 1.0,
            "init": "mini2/checkpoint.pt",
        },
        "steps": 6000,
    }
    first["train_seconds"], second["train_seconds"] = 600.0, 300.0
    text = render(_card(_training([first, second])))
    training = text.split("## Training")[1].split("## Held-out")[0]
    assert "**Stage 1** (from scratch)" in training and "**Stage 2** (from stage 1's" in training
    assert training.count("pointer loss") == 1  # stage 2 only
    assert "pointer loss on 3 decoder heads" in training
    assert "answer (layer 2 head 1, layer 3 head 1)" in training
    assert "shape word (layer 1 head 1)" in training
    assert "15.0 min of step time" in training
    assert (
        "`python -m refmodel.train --run RUN1 --vision-depth 4 --deepstack 1 2 --steps 12000 "
        "--aux-weight 1.0`, then `python -m refmodel.train --run RUN2 --init RUN1/checkpoint.pt "
        "--vision-depth 4 --deepstack 1 2 --steps 6000 --lr 0.001 --pointer-weight 1.0`, then "
        "`python -m refmodel.train export --run RUN2 --out DIR`" in training
    )
    assert "mini2/" not in training  # no path of the machine that trained it


@pytest.mark.skipif(not (MINI_DIR / CARD_JSON).exists(), reason="no card.json shipped")
def test_a_stage_started_from_an_exported_model_says_so():
    first = {"train": asdict(TrainConfig()), "steps": 4000, "train_seconds": 60.0}
    second = {
        "train": {**asdict(TrainConfig()), "pointer_weight": 1.0, "init": "reference/mini"},
        "steps": 4000,
        "train_seconds": 60.0,
    }
    training = render(_card(_training([first, second]))).split("## Training")[1]
    assert "**Stage 2** (from stage 1's exported weights and a fresh cell head" in training
    assert (
        "then `python -m refmodel.train export --run RUN1 --out MODEL1`, then "
        "`python -m refmodel.train --run RUN2 --init MODEL1 " in training
    )


@pytest.mark.skipif(not (MINI_DIR / CARD_JSON).exists(), reason="no card.json shipped")
def test_a_stage_on_fresh_training_sequences_says_where_they_start():
    first = {"train": asdict(TrainConfig()), "steps": 4000, "train_seconds": 60.0}
    second = {
        "train": {
            **asdict(TrainConfig()),
            "init": "reference/mini",
            "data_start": 400000,
            "focus": "count,color,shape",
        },
        "steps": 4000,
        "train_seconds": 60.0,
    }
    training = render(_card(_training([first, second]))).split("## Training")[1]
    assert "training sequences from seed index 400,000 on" in training
    assert "count, color and shape questions asked twice as often" in training
    assert "--init MODEL1 --vision-depth 4 --deepstack 1 2 --focus count,color,shape " in training
    assert "--data-start 400000" in training
