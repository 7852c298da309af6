"""ShapesVQA: a procedurally generated visual-question-answering task, deterministic from a seed.

Owns the task: scenes (1–4 coloured shapes on a dark, optionally noisy 128×128 background, one
shape per image quadrant at a jittered position and size, no two with the same colour and shape),
their PIL rendering, the question families with several phrasings each and one-word answers, the
text-only questions, the task vocabulary, and the disjoint seed ranges for training, validation
(tuning during training), calibration and the held-out evaluation. It does not tokenize or train.

Everything is a pure function of a seed: `sample(seed)` is the same scene and the same questions in
every process (`random.Random(seed)` drives the scene and questions, numpy's `default_rng(seed)` the
background noise).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
"""Side of every image in pixels (16 merged vision tokens with patch 16, merge 2)."""

#: Disjoint seed ranges. Training draws from TRAIN_SEEDS, periodic accuracy during training from
#: VALID_SEEDS, calibration samples from CALIB_SEEDS, and the model card / tests / `veq eval` from
#: HELDOUT_SEEDS (never seen while training or tuning).
TRAIN_SEEDS = range(0, 100_000_000)
VALID_SEEDS = range(100_000_000, 101_000_000)
CALIB_SEEDS = range(200_000_000, 201_000_000)
HELDOUT_SEEDS = range(300_000_000, 301_000_000)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 85, 245),
    "yellow": (240, 215, 35),
    "purple": (165, 55, 215),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
WORDS = (
    "apple",
    "bird",
    "boat",
    "cake",
    "cat",
    "dog",
    "fish",
    "hat",
    "kite",
    "lamp",
    "moon",
    "rose",
    "sun",
    "tree",
    "van",
    "wolf",
)
MAX_NUMBER = 20

VISION_FAMILIES = ("color", "shape", "count", "exists", "position")
FAMILIES = (*VISION_FAMILIES, "text")
"""Question families; `text` questions come without an image."""


@dataclass(frozen=True)
class Shape:
    """One object: colour and shape names, quadrant index (0..3, see QUADRANTS), centre and size
    in pixels."""

    color: str
    shape: str
    quadrant: int
    cx: int
    cy: int
    size: int

    @property
    def left(self) -> bool:
        return self.quadrant % 2 == 0

    @property
    def top(self) -> bool:
        return self.quadrant < 2


@dataclass(frozen=True)
class Scene:
    """The objects of one image and how its background looks."""

    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    noise: float


@dataclass(frozen=True)
class QA:
    family: str
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """One training/evaluation unit: an image (None for text-only) and questions about it."""

    seed: int
    image: Image.Image | None
    scene: Scene | None
    qas: tuple[QA, ...]


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    quadrants = rng.sample(range(4), n)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    shapes = []
    half = IMAGE_SIZE // 2
    for q, (color, shape) in zip(quadrants, pairs, strict=True):
        size = rng.randint(26, 44)
        lo, hi = size // 2 + 3, half - size // 2 - 3
        cx = (q % 2) * half + rng.randint(lo, hi)
        cy = (q // 2) * half + rng.randint(lo, hi)
        shapes.append(Shape(color, shape, q, cx, cy, size))
    background = tuple(rng.randint(0, 40) for _ in range(3))
    noise = rng.choice([0.0, 0.0, rng.uniform(3.0, 14.0)])
    return Scene(tuple(shapes), background, noise)  # type: ignore[arg-type]


def render(scene: Scene, seed: int) -> Image.Image:
    """The scene as a 128×128 RGB image (colours jittered by ±15 per channel)."""
    rng = random.Random(seed ^ 0x5EED)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLORS[s.color])
        r = s.size / 2
        x0, y0, x1, y1 = s.cx - r, s.cy - r, s.cx + r, s.cy + r
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.shape == "square":
            q = r * 0.85
            draw.rectangle((s.cx - q, s.cy - q, s.cx + q, s.cy + q), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif s.shape == "cross":
            w = r / 3
            draw.rectangle((x0, s.cy - w, x1, s.cy + w), fill=fill)
            draw.rectangle((s.cx - w, y0, s.cx + w, y1), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise AssertionError(s.shape)
    if scene.noise > 0:
        noise = np.random.default_rng(seed).normal(0.0, scene.noise, (IMAGE_SIZE, IMAGE_SIZE, 3))
        arr = np.asarray(img, dtype=np.float32) + noise
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def plural(word: str) -> str:
    return word + ("es" if word.endswith("s") else "s")


def _unique(scene: Scene, key: str, value: str) -> bool:
    return sum(getattr(s, key) == value for s in scene.shapes) == 1


def _reference(scene: Scene, obj: Shape, rng: random.Random) -> str:
    """The shortest description that picks out `obj` alone (shape, colour, or both)."""
    options = []
    if _unique(scene, "shape", obj.shape):
        options.append(f"the {obj.shape}")
    if _unique(scene, "color", obj.color):
        options.append(f"the {obj.color} shape")
    options.append(f"the {obj.color} {obj.shape}")
    return rng.choice(options[:2] if len(options) > 1 else options)


def _ask_color(scene: Scene, rng: random.Random) -> QA:
    obj = rng.choice(scene.shapes)
    if _unique(scene, "shape", obj.shape) and rng.random() < 0.6:
        ref = f"the {obj.shape}"
    else:
        ref = f"the shape in the {QUADRANTS[obj.quadrant]} corner"
    template = rng.choice(
        [
            "What color is {r}?",
            "Which colour does {r} have?",
            "What is the color of {r}?",
            "Name the colour of {r}.",
        ]
    )
    return QA("color", template.format(r=ref), obj.color)


def _ask_shape(scene: Scene, rng: random.Random) -> QA:
    obj = rng.choice(scene.shapes)
    if _unique(scene, "color", obj.color) and rng.random() < 0.6:
        ref = f"the {obj.color} object"
    else:
        ref = f"the object in the {QUADRANTS[obj.quadrant]} corner"
    template = rng.choice(
        [
            "What shape is {r}?",
            "Which shape is {r}?",
            "What kind of shape is {r}?",
            "Name the shape of {r}.",
        ]
    )
    return QA("shape", template.format(r=ref), obj.shape)


def _ask_count(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(["all", "all", "color", "shape"])
    if kind == "all":
        q = rng.choice(
            [
                "How many shapes are there?",
                "How many objects are in the image?",
                "Count the shapes.",
                "How many shapes can you see?",
            ]
        )
        return QA("count", q, str(len(scene.shapes)))
    if kind == "color":
        color = rng.choice([s.color for s in scene.shapes] + list(COLORS))
        q = rng.choice(["How many {c} shapes are there?", "Count the {c} shapes."])
        n = sum(s.color == color for s in scene.shapes)
        return QA("count", q.format(c=color), str(n))
    shape = rng.choice([s.shape for s in scene.shapes] + list(SHAPES))
    q = rng.choice(["How many {s} are there?", "How many {s} can you see?"])
    n = sum(s.shape == shape for s in scene.shapes)
    return QA("count", q.format(s=plural(shape)), str(n))


def _ask_exists(scene: Scene, rng: random.Random) -> QA:
    yes = rng.random() < 0.5
    kind = rng.choice(["pair", "pair", "shape", "color"])
    if kind == "pair":
        present = {(s.color, s.shape) for s in scene.shapes}
        pool = (
            sorted(present)
            if yes
            else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        )
        color, shape = rng.choice(pool)
        q = rng.choice(
            ["Is there a {c} {s}?", "Does the image contain a {c} {s}?", "Can you see a {c} {s}?"]
        )
        return QA("exists", q.format(c=color, s=shape), "yes" if yes else "no")
    attr, names = ("shape", SHAPES) if kind == "shape" else ("color", tuple(COLORS))
    present_names = {getattr(s, attr) for s in scene.shapes}
    absent = [n for n in names if n not in present_names]
    yes = yes or not absent
    name = rng.choice(sorted(present_names) if yes else absent)
    if attr == "shape":
        q = rng.choice(["Is there a {n}?", "Does the image contain a {n}?"])
    else:
        q = rng.choice(["Is there anything {n}?", "Is any shape {n}?"])
    return QA("exists", q.format(n=name), "yes" if yes else "no")


def _ask_position(scene: Scene, rng: random.Random) -> QA:
    obj = rng.choice(scene.shapes)
    ref = _reference(scene, obj, rng)
    if rng.random() < 0.5:
        q = rng.choice(
            [
                "Is {r} on the left or on the right?",
                "Is {r} in the left half or the right half?",
                "Which side is {r} on, left or right?",
            ]
        )
        answer = "left" if obj.left else "right"
    else:
        q = rng.choice(
            [
                "Is {r} at the top or at the bottom?",
                "Is {r} in the upper or lower half?",
                "Is {r} near the top or near the bottom?",
            ]
        )
        answer = "top" if obj.top else "bottom"
    return QA("position", q.format(r=ref), answer)


def _ask_text(rng: random.Random) -> QA:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}."])
        return QA("text", q.format(a=a, b=b), str(a + b))
    if kind == 1:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        q = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}."])
        return QA("text", q.format(a=a, b=b), str(a - b))
    if kind == 2:
        a, b = rng.sample(range(MAX_NUMBER + 1), 2)
        q = rng.choice(["Which number is larger, {a} or {b}?", "Which is bigger, {a} or {b}?"])
        return QA("text", q.format(a=a, b=b), str(max(a, b)))
    if kind == 3:
        a = rng.randint(0, MAX_NUMBER - 1)
        q = rng.choice(["What number comes after {a}?", "What is the next number after {a}?"])
        return QA("text", q.format(a=a), str(a + 1))
    words = rng.sample(WORDS, 3)
    if kind == 4:
        q = rng.choice(["What is the first word in: {w}?", "Say the first word of: {w}."])
        return QA("text", q.format(w=" ".join(words)), words[0])
    if kind == 5:
        q = rng.choice(["What is the last word in: {w}?", "Say the last word of: {w}."])
        return QA("text", q.format(w=" ".join(words)), words[-1])
    a, b = words[:2]
    q = rng.choice(
        [
            "Which word comes first in the alphabet, {a} or {b}?",
            "Which comes first alphabetically, {a} or {b}?",
        ]
    )
    return QA("text", q.format(a=a, b=b), min(a, b))


_ASK = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "exists": _ask_exists,
    "position": _ask_position,
}


def sample(
    seed: int, questions: int = 4, families: tuple[str, ...] | None = None, text_only: bool = False
) -> Sample:
    """A sample from `seed`: an image with `questions` questions drawn from `families` (default:
    the vision families, uniformly), or with `text_only` a text-only sample of text questions."""
    rng = random.Random(seed)
    if text_only:
        return Sample(seed, None, None, tuple(_ask_text(rng) for _ in range(questions)))
    scene = make_scene(rng)
    pool = families or VISION_FAMILIES
    qas = tuple(_ASK[rng.choice(pool)](scene, rng) for _ in range(questions))
    return Sample(seed, render(scene, seed), scene, qas)


def training_sample(seed: int, questions: int = 4, text_fraction: float = 0.25) -> Sample:
    """A training sequence: text-only with probability `text_fraction`, else an image sample."""
    text_only = random.Random(seed * 7919 + 1).random() < text_fraction
    return sample(seed, questions, text_only=text_only)


def question(seed: int, family: str) -> Sample:
    """One question of `family` (image + question, or text question alone) from `seed`."""
    if family == "text":
        return sample(seed, 1, text_only=True)
    return sample(seed, 1, families=(family,))


def evaluation_set(n: int, seeds: range = HELDOUT_SEEDS, start: int = 0) -> list[Sample]:
    """`n` single-question samples, families in turn (so each family gets n/6), from
    `seeds[start:]`."""
    return [question(seeds[start + i], FAMILIES[i % len(FAMILIES)]) for i in range(n)]


def answer_words() -> list[str]:
    """Every possible answer (each a single token of the reference tokenizer)."""
    return sorted(
        {*COLORS, *SHAPES, "yes", "no", "left", "right", "top", "bottom", *WORDS}
        | {str(i) for i in range(MAX_NUMBER + 1)}
    )


def vocabulary() -> list[str]:
    """Whole-word tokens for the tokenizer: every word of every question and answer, bare (after
    a newline or an image) and with a leading space, plus the chat roles."""
    words = set(answer_words()) | {"user", "assistant", "objects", "object", "image", "shapes"}
    words |= {plural(s) for s in SHAPES}
    for seed in range(3000):  # every phrasing occurs within the first few thousand seeds
        for s in (sample(seed, 4), sample(seed, 4, text_only=True)):
            for qa in s.qas:
                words.update(
                    qa.question.replace("?", " ")
                    .replace(".", " ")
                    .replace(",", " ")
                    .replace(":", " ")
                    .split()
                )
    out: list[str] = []
    for w in sorted(words):
        out += [w, " " + w]
    return out
