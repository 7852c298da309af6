"""ShapesVQA generator: determinism, disjoint seed ranges, domain randomisation within its stated
bounds, answers that agree with the scene, every family with several phrasings."""

from __future__ import annotations

import colorsys
import math
import random
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
from veq.reference.shapes import scene_and_questions as qs  # no image drawn: fast


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


def test_scenes_are_randomised_within_their_bounds():
    counts, kinds, sizes, aa = Counter(), Counter(), [], Counter()
    centred = hollow = 0
    for seed in range(300):
        sc, _ = qs(seed)
        if seed < 20:
            image = shapes.render(sc, seed)
            assert image.size == (sc.width, sc.height) and image.mode == "RGB"
        assert shapes.MIN_SIDE <= min(sc.width, sc.height)
        assert max(sc.width, sc.height) <= shapes.MAX_SIDE
        assert max(sc.width, sc.height) / min(sc.width, sc.height) <= 2.0 + 1e-9
        n = len(sc.shapes)
        counts[n] += 1
        kinds[sc.kind] += 1
        aa[sc.antialias] += 1
        assert len({(o.color, o.shape) for o in sc.shapes}) == n
        short = min(sc.width, sc.height)
        for i, o in enumerate(sc.shapes):
            sizes.append(o.size / short)
            assert o.size / 2 <= o.cx <= sc.width - o.size / 2
            assert o.size / 2 <= o.cy <= sc.height - o.size / 2
            assert all(
                math.hypot(o.cx - p.cx, o.cy - p.cy)
                >= shapes.MIN_SEPARATION * (o.size + p.size) / 2 - 1e-6
                for p in sc.shapes[:i]
            )
            rgb = np.asarray(o.fill or o.outline, dtype=float)
            # Against every blend of a gradient, not just its ends.
            a, b = (np.asarray(c, dtype=float) for c in (sc.colors * 2)[:2])
            blends = a + np.linspace(0, 1, 101)[:, None] * (b - a)
            assert np.linalg.norm(blends - rgb, axis=1).min() >= shapes.MIN_CONTRAST - 0.5
            hollow += o.fill is None
        if n == 1 and abs(sc.shapes[0].cx / sc.width - 0.5) < 0.04:
            centred += 1
    assert set(counts) == set(range(1, shapes.MAX_SHAPES + 1))
    assert set(kinds) == set(shapes.BACKGROUNDS) and set(aa) == {1, 2, 3}
    assert min(sizes) < 0.1 and max(sizes) > 0.5
    assert centred >= 20 and hollow >= 20


def _hsv(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360, s, v


def _names(rgb) -> list[str]:
    """Every colour word whose HSV box holds `rgb` (rounding to 8 bits allowed for)."""
    h, s, v = _hsv(rgb)
    if v < 0.15:  # 8-bit rounding makes the saturation of near-black meaningless
        s = min(s, 0.3)
    out = []
    for name, ((h0, h1), (s0, s1), (v0, v1)) in shapes.COLORS.items():
        in_hue = any(h0 - 1 <= hh <= h1 + 1 for hh in (h, h - 360)) or s < 0.02
        if in_hue and s0 - 0.02 <= s <= s1 + 0.02 and v0 - 0.02 <= v <= v1 + 0.02:
            out.append(name)
    return out


def test_every_drawn_colour_has_one_name():
    rng = random.Random(0)
    for name in shapes.COLORS:
        for _ in range(200):
            assert _names(shapes.draw_color(name, rng)) == [name]


def test_colour_boxes_stay_apart():
    """The nearest two colours of any two words, on a grid over their HSV boxes."""

    def grid(name):
        (h0, h1), (s0, s1), (v0, v1) = shapes.COLORS[name]
        steps = [i / 6 for i in range(7)]
        return [
            shapes._rgb(h0 + (h1 - h0) * a, s0 + (s1 - s0) * b, v0 + (v1 - v0) * c)
            for a in steps
            for b in steps
            for c in steps
        ]

    points = {name: np.asarray(grid(name), dtype=float) for name in shapes.COLORS}
    names = list(points)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = np.linalg.norm(points[a][:, None] - points[b][None], axis=-1).min()
            assert d >= 30, (a, b, d)


def test_answers_are_words_of_the_answer_set_or_the_two_sentences():
    allowed = set(shapes.answer_words())
    for seed in range(300):
        for _, qas in (qs(seed), qs(seed, text_only=True)):
            for qa in qas:
                if qa.family == "chat":
                    assert qa.answer in (shapes.SELF_DESCRIPTION, shapes.REFUSAL)
                else:
                    assert re.fullmatch(r"[a-z0-9]+", qa.answer), qa
                    assert qa.answer in allowed


def test_chat_greets_and_refuses():
    answers = {
        qa.question: qa.answer for seed in range(400) for qa in shapes.question(seed, "chat").qas
    }
    assert answers["What can you do?"] == shapes.SELF_DESCRIPTION
    assert any(q.startswith("Hello") for q, a in answers.items() if a == shapes.SELF_DESCRIPTION)
    assert 0.35 < sum(a == shapes.REFUSAL for a in answers.values()) / len(answers) < 0.65


def test_every_family_with_several_phrasings():
    phrasings: dict[str, set[str]] = {f: set() for f in FAMILIES}
    words = {*shapes.COLORS, *shapes.SHAPES, *map(shapes.plural, shapes.SHAPES)}
    for seed in range(250):
        for family in FAMILIES:
            qa = qs(seed, 1, (family,))[1][0]
            masked = " ".join("X" if w.strip("?.,:!") in words else w for w in qa.question.split())
            phrasings[family].add(re.sub(r"\d+", "N", masked))
    for family, found in phrasings.items():
        assert len(found) >= 5, (family, found)


def test_evaluation_set_rotates_families():
    samples = shapes.evaluation_set(14)
    assert [s.qas[0].family for s in samples] == list(FAMILIES) * 2
    assert all(len(s.qas) == 1 for s in samples)
    assert samples[5].image is None and samples[6].image is None and samples[0].image is not None


def _referent(question: str, objs):
    """The object a question names: by shape, by colour, by both, or the only one."""
    words = set(re.findall(r"[a-z]+", question))
    color = next((c for c in shapes.COLORS if c in words), None)
    shape = next((k for k in shapes.SHAPES if k in words), None)
    found = [o for o in objs if color in (None, o.color) and shape in (None, o.shape)]
    assert len(found) == 1, (question, objs)
    return found[0]


@pytest.mark.parametrize("family", shapes.VISION_FAMILIES)
def test_answers_agree_with_the_scene(family):
    for seed in range(150):
        scene, (qa,) = qs(seed, 1, (family,))
        objs = scene.shapes
        words = set(re.findall(r"[a-z]+", qa.question))
        if family == "color":
            assert qa.answer == _referent(qa.question.replace("color", ""), objs).color
        elif family == "shape":
            assert qa.answer == _referent(qa.question, objs).shape
        elif family == "position":
            o = _referent(qa.question, objs)
            x, y = o.cx / scene.width - 0.5, o.cy / scene.height - 0.5
            if "left" in words:
                assert abs(x) >= shapes.POSITION_MARGIN
                assert qa.answer == ("left" if x < 0 else "right")
            else:
                assert abs(y) >= shapes.POSITION_MARGIN
                assert qa.answer == ("top" if y < 0 else "bottom")
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
    answers = Counter(qs(seed, 1, ("exists",))[1][0].answer for seed in range(600))
    assert 0.4 < answers["yes"] / 600 < 0.6


def test_label_map_marks_the_drawn_pixels():
    """Where the label map says an unoccluded filled object, the image shows its fill colour."""
    checked = 0
    for seed in range(200):
        s = shapes.sample(seed)
        sc = s.scene
        obj = sc.shapes[0]
        if sc.antialias != 1 or sc.noise or len(sc.shapes) != 1 or obj.fill is None or obj.outline:
            continue
        labels = shapes.label_map(sc, sc.width, sc.height)
        inside = np.asarray(s.image)[labels == 1]
        assert inside.size and (np.abs(inside.astype(int) - obj.fill).max(1) <= 1).mean() > 0.9
        assert (labels == 1).mean() > 0.5 * (obj.size / 2) ** 2 / (sc.width * sc.height)
        checked += 1
    assert checked >= 5


def test_label_map_follows_the_processors_stretch():
    """132×76 becomes 192×128 in the processor (x ×1.45, y ×1.68): the map stretches with it."""
    scene = shapes.sample(1).scene
    assert (scene.width, scene.height) == (132, 76)
    labels = shapes.label_map(scene, 192, 128)
    ys, xs = np.nonzero(labels == 1)
    obj = scene.shapes[0]
    assert obj.shape == "triangle" and abs(obj.rotation) < 1  # apex at cy - r, base at cy + 0.8r
    sx, sy, r = 192 / 132, 128 / 76, obj.size / 2
    assert abs(ys.min() - (obj.cy - r) * sy) < 2 and abs(ys.max() - (obj.cy + 0.8 * r) * sy) < 2
    assert abs(xs.min() - (obj.cx - r) * sx) < 2 and abs(xs.max() - (obj.cx + r) * sx) < 2


@pytest.mark.parametrize("family", shapes.VISION_FAMILIES)
def test_about_names_the_shapes_the_answer_is_read_from(family):
    """`QA.about` (the pointer loss's targets) agrees with the answer it explains."""
    for seed in range(150):
        scene, (qa,) = qs(seed, 1, (family,))
        about = [scene.shapes[i] for i in qa.about]
        assert len(set(qa.about)) == len(qa.about)
        words = set(re.findall(r"[a-z]+", qa.question))
        color = next((c for c in shapes.COLORS if c in words), None)
        if family in ("color", "shape", "position"):
            asked = qa.question.replace("color", "") if family == "color" else qa.question
            assert about == [_referent(asked, scene.shapes)], qa
            assert getattr(about[0], family, qa.answer) == qa.answer
        elif family == "count":
            shape = next((k for k in shapes.SHAPES if shapes.plural(k) in words), None)
            counted = [
                o for o in scene.shapes if color in (None, o.color) and shape in (None, o.shape)
            ]
            assert about == counted, qa
        else:
            shape = next((k for k in shapes.SHAPES if k in words), None)
            found = [
                o for o in scene.shapes if color in (None, o.color) and shape in (None, o.shape)
            ]
            assert about == found, qa
            assert bool(about) == (qa.answer == "yes"), qa


def test_training_focus_asks_the_named_families_twice_as_often():
    def count_share(focus: tuple[str, ...]) -> float:
        c = Counter(
            q.family
            for seed in range(300)
            for q in shapes.training_sample(seed, 4, text_fraction=0.0, focus=focus).qas
        )
        assert set(c) <= set(shapes.VISION_FAMILIES)
        return c["count"] / sum(c.values())

    assert count_share(("count",)) > 1.5 * count_share(())
    with pytest.raises(ValueError, match="unknown vision families"):
        shapes.training_sample(0, 4, text_fraction=0.0, focus=("text",))
