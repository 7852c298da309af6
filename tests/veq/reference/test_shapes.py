"""ShapesVQA generator: determinism, disjoint seed ranges, one-word answers, every family."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from veq.reference import shapes
from veq.reference.shapes import (
    CALIB_SEEDS,
    FAMILIES,
    HELDOUT_SEEDS,
    TRAIN_SEEDS,
    VALID_SEEDS,
)


def test_same_seed_same_sample():
    for seed in (0, 7, HELDOUT_SEEDS.start + 3):
        a, b = shapes.sample(seed), shapes.sample(seed)
        assert a.qas == b.qas and a.scene == b.scene
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert shapes.sample(1).qas != shapes.sample(2).qas


def test_seed_ranges_are_disjoint():
    ranges = [TRAIN_SEEDS, VALID_SEEDS, CALIB_SEEDS, HELDOUT_SEEDS]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start


def test_images_are_128_rgb_with_one_to_four_shapes():
    counts = Counter()
    for seed in range(200):
        s = shapes.sample(seed)
        assert s.image.size == (128, 128) and s.image.mode == "RGB"
        n = len(s.scene.shapes)
        counts[n] += 1
        assert len({(o.color, o.shape) for o in s.scene.shapes}) == n
        assert len({o.quadrant for o in s.scene.shapes}) == n
    assert set(counts) == {1, 2, 3, 4}


def test_answers_are_one_word_from_the_answer_set():
    allowed = set(shapes.answer_words())
    for seed in range(300):
        for s in (shapes.sample(seed), shapes.sample(seed, text_only=True)):
            for qa in s.qas:
                assert re.fullmatch(r"[a-z0-9]+", qa.answer), qa
                assert qa.answer in allowed


def test_every_family_with_several_phrasings():
    phrasings: dict[str, set[str]] = {f: set() for f in FAMILIES}
    for seed in range(600):
        for s in (shapes.sample(seed), shapes.sample(seed, text_only=True)):
            for qa in s.qas:
                # The phrasing: the question with the scene-specific words masked.
                words = {*shapes.COLORS, *shapes.SHAPES, *map(shapes.plural, shapes.SHAPES)}
                masked = " ".join(
                    "X" if w.strip("?.,:") in words else w for w in qa.question.split()
                )
                phrasings[qa.family].add(re.sub(r"\d+", "N", masked))
    for family, found in phrasings.items():
        assert len(found) >= 3, (family, found)


def test_evaluation_set_rotates_families():
    samples = shapes.evaluation_set(12)
    assert [s.qas[0].family for s in samples] == list(FAMILIES) * 2
    assert all(len(s.qas) == 1 for s in samples)
    assert samples[5].image is None and samples[0].image is not None


def _referent(question: str, objs):
    """The object a question names: by quadrant, by shape, by colour, or by both."""
    for q, name in enumerate(shapes.QUADRANTS):
        if f"the {name} corner" in question:
            return next(o for o in objs if o.quadrant == q)
    words = set(re.findall(r"[a-z]+", question))
    color = next((c for c in shapes.COLORS if c in words), None)
    shape = next((k for k in shapes.SHAPES if k in words), None)
    found = [o for o in objs if color in (None, o.color) and shape in (None, o.shape)]
    assert len(found) == 1, (question, objs)
    return found[0]


@pytest.mark.parametrize("family", shapes.VISION_FAMILIES)
def test_answers_agree_with_the_scene(family):
    for seed in range(150):
        s = shapes.question(seed, family)
        qa, objs = s.qas[0], s.scene.shapes
        words = set(re.findall(r"[a-z]+", qa.question))
        if family == "color":
            assert qa.answer == _referent(qa.question, objs).color
        elif family == "shape":
            assert qa.answer == _referent(qa.question, objs).shape
        elif family == "position":
            o = _referent(qa.question, objs)
            side = "left" if o.quadrant % 2 == 0 else "right"
            height = "top" if o.quadrant < 2 else "bottom"
            assert qa.answer in ({side} if "left" in words else {height})
        elif family == "count":
            color = next((c for c in shapes.COLORS if c in words), None)
            shape = next((k for k in shapes.SHAPES if shapes.plural(k) in words), None)
            n = sum(color in (None, o.color) and shape in (None, o.shape) for o in objs)
            assert qa.answer == str(n), qa
        else:
            color = next((c for c in shapes.COLORS if c in words), None)
            shape = next((k for k in shapes.SHAPES if k in words), None)
            present = any(color in (None, o.color) and shape in (None, o.shape) for o in objs)
            assert qa.answer == ("yes" if present else "no"), qa


def test_exists_answers_are_balanced():
    answers = Counter(shapes.question(seed, "exists").qas[0].answer for seed in range(600))
    assert 0.4 < answers["yes"] / 600 < 0.6
