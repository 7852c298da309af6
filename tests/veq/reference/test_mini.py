"""The shipped reference model answers as its model card says, and survives W4 quantization.

Skipped when `veq/reference/mini` holds no model (e.g. a checkout without package data).
"""

from __future__ import annotations

import json

import pytest

from veq.reference import MINI_DIR, mini_available
from veq.reference.card import CARD_JSON, SMOKE_QUESTIONS, load_reference
from veq.reference.evaluate import evaluate, heldout_samples

pytestmark = pytest.mark.skipif(
    not mini_available() or not (MINI_DIR / CARD_JSON).exists(),
    reason=f"no trained reference model in {MINI_DIR} (train and export it: see MODEL_CARD.md)",
)

# Re-evaluating the card's first 64 held-out questions must reproduce the card's count up to one
# answer flipped by floating-point differences between machines (1/64).
SMOKE_TOLERANCE = 1.5 / SMOKE_QUESTIONS
# 64 questions against the card's accuracy over all held-out questions: 3 binomial standard
# deviations at 95 % (±0.082), rounded up.
OVERALL_TOLERANCE = 0.09


@pytest.fixture(scope="module")
def card():
    return json.loads((MINI_DIR / CARD_JSON).read_text())


@pytest.fixture(scope="module")
def reference():
    return load_reference(MINI_DIR)


@pytest.fixture(scope="module")
def questions():
    return heldout_samples(SMOKE_QUESTIONS)


@pytest.fixture(scope="module")
def accuracy(reference, questions):
    model, processor = reference
    return evaluate(model, processor, questions).accuracy


def test_accuracy_matches_model_card(card, accuracy):
    assert abs(accuracy - card["smoke"]["accuracy"]) <= SMOKE_TOLERANCE
    assert abs(accuracy - card["heldout"]["accuracy"]) <= OVERALL_TOLERANCE


def test_w4_quantization_keeps_98_percent(accuracy, questions, tmp_path):
    import veq
    from veq.reference.encode import write_calibration_jsonl

    calib = write_calibration_jsonl(tmp_path / "calib", 4)
    q = veq.quantize(
        MINI_DIR,
        method="gptq",
        bits=4,
        group_size=128,
        calib=str(calib),
        samples=4,
        gamma=1.0,
        cache_dir=tmp_path / "cache",
        device="cpu",
        progress=False,
    )
    model, processor = veq.load(q.path, device="cpu")
    quantized = evaluate(model.eval(), processor, questions).accuracy
    assert quantized >= 0.98 * accuracy, (quantized, accuracy)
