"""ShapesVQA: a procedurally generated visual-question-answering task, deterministic from a seed.

Owns the task: scenes (1–6 coloured shapes anywhere on an image of 64–512 px, aspect up to 2:1),
their PIL rendering with domain randomisation (white, light, grey, dark, gradient and noisy
backgrounds; filled, outlined or hollow shapes; aliased or anti-aliased edges; every colour drawn
from a range of hue, saturation and value, so "red" is many reds), the question families with
several phrasings each, the text-only questions (arithmetic and word games, greetings, off-task
requests), the task vocabulary, and the disjoint seed ranges for training, validation, calibration
and the held-out evaluation. It does not tokenize or train.

Everything is a pure function of a seed: `sample(seed)` is the same scene and the same questions in
every process (`random.Random(seed)` drives the scene and questions, numpy's `default_rng(seed)` the
pixel noise).
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Disjoint seed ranges. Training draws from TRAIN_SEEDS, periodic accuracy during training from
#: VALID_SEEDS, calibration samples from CALIB_SEEDS, and the model card / tests / `veq eval` from
#: HELDOUT_SEEDS (never seen while training or tuning).
TRAIN_SEEDS = range(0, 100_000_000)
VALID_SEEDS = range(100_000_000, 101_000_000)
CALIB_SEEDS = range(200_000_000, 201_000_000)
HELDOUT_SEEDS = range(300_000_000, 301_000_000)

#: Each colour word is a box in HSV (hue in degrees, may wrap below 0; saturation and value in
#: [0, 1]) wide enough to hold what people and CSS's named colours call it, and at least 35 RGB
#: units from every other box (a test checks), so that every drawn colour has one right name.
COLORS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-10, 5), (0.75, 1.0), (0.8, 1.0)),
    "orange": ((22, 36), (0.8, 1.0), (0.9, 1.0)),
    "yellow": ((52, 62), (0.65, 1.0), (0.85, 1.0)),
    "green": ((95, 150), (0.55, 1.0), (0.4, 0.95)),
    "blue": ((205, 238), (0.65, 1.0), (0.5, 1.0)),
    "purple": ((272, 302), (0.6, 1.0), (0.4, 0.85)),
    "pink": ((325, 355), (0.25, 0.5), (0.9, 1.0)),
    "brown": ((16, 34), (0.55, 0.9), (0.3, 0.55)),
    "black": ((0, 360), (0.0, 0.3), (0.0, 0.13)),
    "grey": ((0, 360), (0.0, 0.05), (0.38, 0.72)),
    "white": ((0, 360), (0.0, 0.05), (0.95, 1.0)),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("white", "light", "grey", "dark", "gradient")
MAX_SHAPES = 6
MIN_SIDE, MAX_SIDE = 64, 512
#: A shape's size (its bounding box side) as a fraction of the image's short side.
MIN_SIZE, MAX_SIZE = 0.08, 0.6
#: Two shapes' centres are at least this fraction of the sum of their half-sizes apart, so they
#: may touch and overlap a little, never hide each other.
MIN_SEPARATION = 0.8
#: Position questions are asked only about shapes at least this far (fraction of the image side)
#: from the middle line, where "left" or "top" has one answer.
POSITION_MARGIN = 0.12
#: Colours differ from the background under them by at least this RGB distance.
MIN_CONTRAST = 95.0

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

SELF_DESCRIPTION = (
    "I am mini, a tiny vision model. Show me a picture of shapes and ask about their color, "
    "shape, number or position."
)
REFUSAL = "Sorry, I can only answer questions about the shapes in a picture."

VISION_FAMILIES = ("color", "shape", "count", "exists", "position")
TEXT_FAMILIES = ("text", "chat")
FAMILIES = (*VISION_FAMILIES, *TEXT_FAMILIES)
"""Question families; `text` (arithmetic, word games) and `chat` (greetings, off-task requests)
come without an image."""


@dataclass(frozen=True)
class Shape:
    """One object: colour and shape names, fill and outline RGB (outline None: none; fill None:
    hollow), centre and size (bounding-box side) in pixels of the image, rotation in degrees."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float
    rotation: float
    fill: tuple[int, int, int] | None
    outline: tuple[int, int, int] | None
    stroke: int
    """Outline width in pixels (hollow shapes: the whole drawing)."""


@dataclass(frozen=True)
class Scene:
    """An image's size, objects (drawn in order) and background: `kind` from BACKGROUNDS, its one
    or two RGB colours (two: a linear gradient along `angle` degrees), Gaussian `noise` sigma,
    and the supersampling factor of the edges (1: aliased)."""

    width: int
    height: int
    shapes: tuple[Shape, ...]
    kind: str
    colors: tuple[tuple[int, int, int], ...]
    angle: float
    noise: float
    antialias: int


@dataclass(frozen=True)
class QA:
    """One question of `family` and its exact answer; `about` indexes the scene's shapes that the
    answer is read from (the one asked about, or those counted or found; empty for text
    questions and for a "no")."""

    family: str
    question: str
    answer: str
    about: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One training/evaluation unit: an image (None for text-only) and questions about it."""

    seed: int
    image: Image.Image | None
    scene: Scene | None
    qas: tuple[QA, ...]


# -- scenes ---------------------------------------------------------------------------------------
def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def draw_color(name: str, rng: random.Random) -> tuple[int, int, int]:
    """An RGB value of colour word `name`, uniform in its HSV box."""
    (h0, h1), (s0, s1), (v0, v1) = COLORS[name]
    return _rgb(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


def contrast(rgb: tuple[int, int, int], background: tuple[tuple[int, int, int], ...]) -> float:
    """RGB distance from `rgb` to the nearest colour of a background: its one colour, or any
    blend along its gradient (the segment between the two end colours)."""
    if len(background) == 1:
        return math.dist(rgb, background[0])
    a, b = (np.asarray(c, dtype=np.float64) for c in background)
    c, ab = np.asarray(rgb, dtype=np.float64), b - a
    t = float(np.clip(np.dot(c - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * ab)))


def _background(rng: random.Random) -> tuple[str, tuple[tuple[int, int, int], ...], float]:
    def tone(kind: str) -> tuple[int, int, int]:
        tint = rng.uniform(0, 360)
        if kind == "white":
            return _rgb(tint, rng.uniform(0, 0.03), rng.uniform(0.96, 1.0))
        if kind == "light":
            return _rgb(tint, rng.uniform(0, 0.15), rng.uniform(0.75, 0.93))
        if kind == "grey":
            return _rgb(tint, rng.uniform(0, 0.08), rng.uniform(0.35, 0.65))
        return _rgb(tint, rng.uniform(0, 0.4), rng.uniform(0.0, 0.22))

    kind = rng.choice(BACKGROUNDS)
    if kind == "gradient":
        a, b = rng.sample(["white", "light", "grey", "dark"], 2)
        return kind, (tone(a), tone(b)), rng.uniform(0, 360)
    return kind, (tone(kind),), 0.0


def _place(
    rng: random.Random, n: int, width: int, height: int, centred: bool
) -> list[tuple[float, float, float]]:
    """`n` (cx, cy, size) with sizes in [MIN_SIZE, cap(n)] of the short side, bounded overlap."""
    short = min(width, height)
    cap = min(MAX_SIZE, 0.95 / math.sqrt(n + 0.6))
    for _attempt in range(40):
        sizes = sorted((rng.uniform(MIN_SIZE, cap) * short for _ in range(n)), reverse=True)
        placed: list[tuple[float, float, float]] = []
        for size in sizes:
            r = size / 2
            for _ in range(60):
                if centred and not placed:
                    cx = width / 2 + rng.uniform(-0.03, 0.03) * width
                    cy = height / 2 + rng.uniform(-0.03, 0.03) * height
                else:
                    cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
                if all(
                    math.hypot(cx - x, cy - y) >= MIN_SEPARATION * (r + s / 2) for x, y, s in placed
                ):
                    placed.append((cx, cy, size))
                    break
            else:
                break
        if len(placed) == n:
            return placed
        cap = max(MIN_SIZE * 1.5, cap * 0.85)
    raise RuntimeError("placement always succeeds for six shapes at the smallest size")


def make_scene(rng: random.Random) -> Scene:
    """A random scene: image size and aspect, background, 1–6 placed and coloured shapes."""
    long_side = rng.randint(MIN_SIDE, MAX_SIDE)
    aspect = math.exp(rng.uniform(0, math.log(2.0))) if rng.random() < 0.6 else 1.0
    short_side = max(MIN_SIDE, round(long_side / aspect))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    kind, bg, angle = _background(rng)
    centred = rng.random() < 0.12
    n = 1 if centred else rng.randint(1, MAX_SHAPES)
    slots = _place(rng, n, width, height, centred)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], len(COLORS) * len(SHAPES))
    shapes: list[Shape] = []
    for cx, cy, size in slots:
        # Shapes whose boxes may overlap this one: its colour must stand out from theirs too,
        # or two overlapping shapes would read as one.
        near = [
            o.fill or o.outline
            for o in shapes
            if math.hypot(cx - o.cx, cy - o.cy) < (size + o.size) / 2 * math.sqrt(2)
        ]
        for color, shape in pairs:
            if any(o.color == color and o.shape == shape for o in shapes):
                continue
            value = draw_color(color, rng)
            if contrast(value, bg) >= MIN_CONTRAST and all(
                math.dist(value, other) >= MIN_CONTRAST for other in near
            ):
                break
        else:  # pragma: no cover - some colour always contrasts
            raise RuntimeError("no colour contrasts with the background")
        style = rng.random()
        stroke = max(1, round(size * rng.uniform(0.04, 0.09)))
        if style < 0.75:
            fill, outline = value, None
        elif style < 0.88:
            edge = (20, 20, 20) if sum(value) > 380 else (235, 235, 235)
            fill, outline = value, edge
        else:
            fill, outline, stroke = None, value, max(2, round(size * rng.uniform(0.1, 0.16)))
        rot = rng.uniform(-12, 12) if shape != "circle" else 0.0
        shapes.append(Shape(color, shape, cx, cy, size, rot, fill, outline, stroke))
    noise = rng.uniform(3.0, 18.0) if rng.random() < 0.2 else 0.0
    aa = rng.choice([1, 2, 3])
    return Scene(width, height, tuple(shapes), kind, bg, angle, noise, aa)


def outline_of(
    s: Shape, scale: float = 1.0, scale_y: float | None = None
) -> list[tuple[float, float]] | tuple[float, ...]:
    """The drawn outline of `s` with x scaled by `scale` and y by `scale_y` (default: the same;
    the processor's resize stretches an image a little when its sides round differently): an
    ellipse box (x0, y0, x1, y1) for circles, else polygon vertices."""
    stretch = 1.0 if scale_y is None else scale_y / scale
    cx, cy, r = s.cx * scale, s.cy * scale * stretch, s.size * scale / 2
    if s.shape == "circle":
        return (cx - r, cy - r * stretch, cx + r, cy + r * stretch)
    if s.shape == "square":
        q = r * 0.86
        pts = [(-q, -q), (q, -q), (q, q), (-q, q)]
    elif s.shape == "triangle":
        pts = [(0.0, -r), (r, r * 0.8), (-r, r * 0.8)]
    else:
        w = r / 3
        pts = [
            (-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
            (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w),
        ]  # fmt: skip
    c, sn = math.cos(math.radians(s.rotation)), math.sin(math.radians(s.rotation))
    return [(cx + x * c - y * sn, cy + (x * sn + y * c) * stretch) for x, y in pts]


def _draw(
    draw: ImageDraw.ImageDraw,
    s: Shape,
    scale: float,
    fill: int | tuple[int, int, int] | None,
    outline: int | tuple[int, int, int] | None,
    width: int,
    scale_y: float | None = None,
) -> None:
    shape = outline_of(s, scale, scale_y)
    if s.shape == "circle":
        draw.ellipse(shape, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape, fill=fill, outline=outline, width=width)


def _canvas(scene: Scene, w: int, h: int) -> Image.Image:
    if len(scene.colors) == 1:
        return Image.new("RGB", (w, h), scene.colors[0])
    a, b = (np.asarray(c, dtype=np.float32) for c in scene.colors)
    t = math.radians(scene.angle)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = (xs / w - 0.5) * math.cos(t) + (ys / h - 0.5) * math.sin(t)
    lo, hi = float(proj.min()), float(proj.max())
    u = ((proj - lo) / max(hi - lo, 1e-6))[..., None]
    return Image.fromarray((a + (b - a) * u).round().astype(np.uint8))


def render(scene: Scene, seed: int) -> Image.Image:
    """The scene as an RGB image of its width × height."""
    aa = scene.antialias
    big = _canvas(scene, scene.width * aa, scene.height * aa)
    draw = ImageDraw.Draw(big)
    for s in scene.shapes:
        _draw(draw, s, aa, s.fill, s.outline, s.stroke * aa if s.outline else 0)
    img = big if aa == 1 else big.resize((scene.width, scene.height), Image.Resampling.BOX)
    if scene.noise > 0:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((scene.height, scene.width, 1), dtype=np.float32)
        noise = noise * scene.noise + rng.standard_normal(
            (scene.height, scene.width, 3), dtype=np.float32
        ) * (scene.noise / 3)
        arr = np.asarray(img, dtype=np.float32) + noise
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return img


def label_map(scene: Scene, width: int, height: int) -> np.ndarray:
    """Which object owns each pixel of the scene drawn at `width` × `height`: `[height, width]`
    uint8, 0 background, i + 1 for `scene.shapes[i]` (later objects cover earlier ones)."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    sx, sy = width / scene.width, height / scene.height
    for i, s in enumerate(scene.shapes):
        hollow = s.fill is None
        stroke = max(1, round(s.stroke * (sx + sy) / 2)) if hollow else 0
        _draw(draw, s, sx, None if hollow else i + 1, i + 1 if hollow else None, stroke, sy)
    return np.asarray(mask)


# -- questions ------------------------------------------------------------------------------------
def plural(word: str) -> str:
    """ "circle" → "circles", "cross" → "crosses"."""
    return word + ("es" if word.endswith("s") else "s")


def article(word: str) -> str:
    """`word` with its indefinite article ("a red", "an orange")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _indices(scene: Scene, match: Callable[[Shape], bool]) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(scene.shapes) if match(o))


def _unique(scene: Scene, key: str, value: str) -> bool:
    return sum(getattr(s, key) == value for s in scene.shapes) == 1


def _reference(scene: Scene, obj: Shape, rng: random.Random) -> str:
    """A description that picks out `obj` alone (shape, colour, or both)."""
    options = [f"the {obj.color} {obj.shape}"]
    if _unique(scene, "shape", obj.shape):
        options.append(f"the {obj.shape}")
    if _unique(scene, "color", obj.color):
        options.append(f"the {obj.color} " + rng.choice(["shape", "object", "one"]))
    if len(scene.shapes) == 1:
        options.append(rng.choice(["the shape", "the object"]))
    return rng.choice(options)


def _ask_color(scene: Scene, rng: random.Random) -> QA | None:
    if len(scene.shapes) == 1 and rng.random() < 0.4:
        obj = scene.shapes[0]
        ref = rng.choice(["the shape", "the object", "it", "this shape", f"the {obj.shape}"])
    else:
        pool = [o for o in scene.shapes if _unique(scene, "shape", o.shape)]
        if not pool:
            return None
        obj = rng.choice(pool)
        ref = f"the {obj.shape}"
    template = rng.choice(
        [
            "What color is {r}?",
            "What colour is {r}?",
            "Which color is {r}?",
            "What is the color of {r}?",
            "What is the colour of {r}?",
            "Name the colour of {r}.",
            "Tell me the color of {r}.",
        ]
    )
    return QA("color", template.format(r=ref), obj.color, _indices(scene, lambda o: o is obj))


def _ask_shape(scene: Scene, rng: random.Random) -> QA | None:
    if len(scene.shapes) == 1 and rng.random() < 0.4:
        obj = scene.shapes[0]
        q = rng.choice(
            [
                "What shape is this?",
                "What shape is the object?",
                "What shape do you see?",
                "What is the shape in the image?",
                "Which shape is in the picture?",
                f"What shape is the {obj.color} object?",
            ]
        )
        return QA("shape", q, obj.shape, (0,))
    pool = [o for o in scene.shapes if _unique(scene, "color", o.color)]
    if not pool:
        return None
    obj = rng.choice(pool)
    ref = f"the {obj.color} " + rng.choice(["object", "shape", "thing", "one"])
    template = rng.choice(
        [
            "What shape is {r}?",
            "Which shape is {r}?",
            "What kind of shape is {r}?",
            "What is the shape of {r}?",
            "Name the shape of {r}.",
        ]
    )
    return QA("shape", template.format(r=ref), obj.shape, _indices(scene, lambda o: o is obj))


def _ask_count(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(["all", "all", "all", "color", "shape"])
    if kind == "all":
        q = rng.choice(
            [
                "How many shapes are there?",
                "How many objects are in the image?",
                "How many shapes are in the picture?",
                "Count the shapes.",
                "How many shapes can you see?",
                "How many things are there?",
            ]
        )
        return QA("count", q, str(len(scene.shapes)), tuple(range(len(scene.shapes))))
    if kind == "color":
        color = rng.choice([s.color for s in scene.shapes] + list(COLORS))
        q = rng.choice(["How many {c} shapes are there?", "Count the {c} shapes."])
        about = _indices(scene, lambda o: o.color == color)
        return QA("count", q.format(c=color), str(len(about)), about)
    shape = rng.choice([s.shape for s in scene.shapes] + list(SHAPES))
    q = rng.choice(["How many {s} are there?", "How many {s} can you see?"])
    about = _indices(scene, lambda o: o.shape == shape)
    return QA("count", q.format(s=plural(shape)), str(len(about)), about)


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
            ["Is there {a} {s}?", "Does the image contain {a} {s}?", "Can you see {a} {s}?"]
        )
        about = _indices(scene, lambda o: (o.color, o.shape) == (color, shape))
        return QA("exists", q.format(a=article(color), s=shape), "yes" if yes else "no", about)
    attr, names = ("shape", SHAPES) if kind == "shape" else ("color", tuple(COLORS))
    present_names = {getattr(s, attr) for s in scene.shapes}
    # A colour the picture shows elsewhere (outline edges) is no clean "no".
    shown = {"black", "white"} if any(s.fill and s.outline for s in scene.shapes) else set()
    absent = [n for n in names if n not in present_names and n not in shown]
    yes = yes or not absent
    name = rng.choice(sorted(present_names) if yes else absent)
    if attr == "shape":
        q = rng.choice(["Is there a {n}?", "Does the image contain a {n}?", "Do you see a {n}?"])
    else:
        q = ["Is any shape {n}?", "Is there {a} shape?"]
        if name not in ("black", "grey", "white"):  # backgrounds may well be one of those
            q.append("Is there anything {n}?")
        q = rng.choice(q)
    about = _indices(scene, lambda o: getattr(o, attr) == name)
    return QA("exists", q.format(n=name, a=article(name)), "yes" if yes else "no", about)


def side(scene: Scene, obj: Shape, axis: str) -> str | None:
    """`left`/`right` (axis "x") or `top`/`bottom` (axis "y") of `obj`, or None within
    POSITION_MARGIN of the middle."""
    if axis == "x":
        u = obj.cx / scene.width - 0.5
        return None if abs(u) < POSITION_MARGIN else ("left" if u < 0 else "right")
    u = obj.cy / scene.height - 0.5
    return None if abs(u) < POSITION_MARGIN else ("top" if u < 0 else "bottom")


def _ask_position(scene: Scene, rng: random.Random) -> QA | None:
    axis = rng.choice("xy")
    pool = [o for o in scene.shapes if side(scene, o, axis)]
    if not pool:
        return None
    obj = rng.choice(pool)
    ref = _reference(scene, obj, rng)
    if axis == "x":
        q = rng.choice(
            [
                "Is {r} on the left or on the right?",
                "Is {r} in the left half or the right half?",
                "Which side is {r} on, left or right?",
                "Is {r} left or right?",
            ]
        )
    else:
        q = rng.choice(
            [
                "Is {r} at the top or at the bottom?",
                "Is {r} in the upper or lower half?",
                "Is {r} near the top or near the bottom?",
                "Is {r} top or bottom?",
            ]
        )
    about = _indices(scene, lambda o: o is obj)
    return QA("position", q.format(r=ref), side(scene, obj, axis) or "", about)


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


GREETINGS = ("Hello", "Hi", "Hey", "Hello there", "Hi there", "Good morning", "Good evening")
CAPABILITIES = (
    "What can you do?",
    "Who are you?",
    "What are you?",
    "What do you do?",
    "How can you help me?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "What can I ask you?",
)
# Off-task requests: templates filled from open word lists. The chat family stays out of the
# whole-word vocabulary (see `vocabulary`; only its answers and greetings are in it), so most
# off-task words reach the model as byte-level pieces, which is what a newcomer's off-task
# question looks like to it.
_OFF_TASK = (
    "What is the capital of {place}?",
    "Who is the president of {place}?",
    "What is the weather like in {place}?",
    "Write a poem about {topic}.",
    "Write a story about {topic}.",
    "Tell me a joke about {topic}.",
    "Explain {topic} to me.",
    "What do you think about {topic}?",
    "How do I cook {food}?",
    "Give me a recipe for {food}.",
    "Translate {thing} into {language}.",
    "How do you say {thing} in {language}?",
    "Can you help me with my {thing}?",
    "Recommend a good {thing}.",
    "What is your favorite {thing}?",
    "Where can I buy {food}?",
    "Why is the sky {adjective}?",
    "Tell me a joke.",
    "What time is it?",
    "What is the meaning of life?",
    "Write some Python code.",
    "Sing me a song.",
    "What day is it today?",
    "Who won the game last night?",
)
_FILL = {
    "place": "France Spain Japan Brazil Canada Kenya Peru Norway Italy Egypt India Chile".split(),
    "topic": "love history music physics money winter dragons robots cars space art".split(),
    "food": "pasta rice soup bread pancakes curry salad tacos noodles eggs".split(),
    "thing": "homework taxes email resume bike phone book movie password garden".split(),
    "language": "French German Spanish Chinese Italian Russian Arabic Hindi".split(),
    "adjective": "blue dark bright cloudy orange".split(),
}


def _ask_chat(rng: random.Random) -> QA:
    kind = rng.random()
    if kind < 0.5:
        if rng.random() < 0.35:
            q = rng.choice(GREETINGS) + rng.choice(["!", ".", "", ","])
        elif rng.random() < 0.5:
            q = rng.choice(CAPABILITIES)
        else:
            q = rng.choice(GREETINGS) + rng.choice(["! ", ", ", ". "]) + rng.choice(CAPABILITIES)
        return QA("chat", q, SELF_DESCRIPTION)
    template = rng.choice(_OFF_TASK)
    fields = {k: rng.choice(v) for k, v in _FILL.items()}
    return QA("chat", template.format(**fields), REFUSAL)


_ASK = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "exists": _ask_exists,
    "position": _ask_position,
}


def _text_question(rng: random.Random, pool: tuple[str, ...]) -> QA:
    return _ask_chat(rng) if rng.choice(pool) == "chat" else _ask_text(rng)


def sample(
    seed: int, questions: int = 4, families: tuple[str, ...] | None = None, text_only: bool = False
) -> Sample:
    """A sample from `seed`: an image with `questions` questions drawn from `families` (default:
    the vision families, uniformly), or with `text_only` (or text families only) a text-only
    sample of text and chat questions.

    A scene where a single requested family has nothing to ask (a colour question needs an object
    whose shape is unique) is redrawn from the same seed's stream, so the result stays a pure
    function of the seed."""
    scene, qas = scene_and_questions(seed, questions, families, text_only)
    return Sample(seed, None if scene is None else render(scene, seed), scene, qas)


def scene_and_questions(
    seed: int, questions: int = 4, families: tuple[str, ...] | None = None, text_only: bool = False
) -> tuple[Scene | None, tuple[QA, ...]]:
    """`sample` without drawing the image (the image is a function of the scene and the seed)."""
    rng = random.Random(seed)
    pool = families or (TEXT_FAMILIES if text_only else VISION_FAMILIES)
    if not (set(pool) <= set(VISION_FAMILIES) or set(pool) <= set(TEXT_FAMILIES)):
        raise ValueError(f"families must be vision families or text families, got {pool}")
    if text_only or set(pool) <= set(TEXT_FAMILIES):
        return None, tuple(_text_question(rng, pool) for _ in range(questions))
    while True:
        scene = make_scene(rng)
        qas: list[QA] = []
        for _ in range(questions * 8):
            qa = _ASK[rng.choice(pool)](scene, rng)
            if qa is not None:
                qas.append(qa)
            if len(qas) == questions:
                return scene, tuple(qas)


def training_sample(
    seed: int, questions: int = 4, text_fraction: float = 0.25, focus: tuple[str, ...] = ()
) -> Sample:
    """A training sequence: text-only with probability `text_fraction`, else an image sample whose
    questions come from the vision families uniformly, those named in `focus` twice as often."""
    text_only = random.Random(seed * 7919 + 1).random() < text_fraction
    if text_only:
        return sample(seed, questions, text_only=True)
    unknown = set(focus) - set(VISION_FAMILIES)
    if unknown:
        raise ValueError(f"focus names unknown vision families: {sorted(unknown)}")
    pool = (*VISION_FAMILIES, *focus) if focus else None
    return sample(seed, questions, families=pool)


def question(seed: int, family: str) -> Sample:
    """One question of `family` (image + question, or text question alone) from `seed`."""
    return sample(seed, 1, families=(family,))


def evaluation_set(n: int, seeds: range = HELDOUT_SEEDS, start: int = 0) -> list[Sample]:
    """`n` single-question samples, families in turn (so each family gets n/7), from
    `seeds[start:]`."""
    return [question(seeds[start + i], FAMILIES[i % len(FAMILIES)]) for i in range(n)]


def answer_words() -> list[str]:
    """Every one-word answer (each a single token of the reference tokenizer)."""
    return sorted(
        {*COLORS, *SHAPES, "yes", "no", "left", "right", "top", "bottom", *WORDS}
        | {str(i) for i in range(MAX_NUMBER + 1)}
    )


def _words(text: str) -> list[str]:
    for ch in "?.,:!":
        text = text.replace(ch, " ")
    return text.split()


def vocabulary() -> list[str]:
    """Whole-word tokens for the tokenizer: every word of every vision and text question and
    answer, the chat family's answers and greetings, bare (after a newline or an image) and with
    a leading space, plus the chat roles. Off-task requests are left out on purpose (see
    `_OFF_TASK`)."""
    words = set(answer_words()) | {"user", "assistant", "objects", "object", "image", "shapes"}
    words |= {plural(s) for s in SHAPES}
    words |= {*_words(SELF_DESCRIPTION), *_words(REFUSAL)}
    words |= {w for g in (*GREETINGS, *CAPABILITIES) for w in _words(g)}
    rng = random.Random(0)
    for seed in range(1500):  # every phrasing occurs within the first few hundred seeds
        for qa in scene_and_questions(seed, 4)[1]:
            words.update(_words(qa.question))
        words.update(_words(_ask_text(rng).question))
    out: list[str] = []
    for w in sorted(words):
        out += [w, " " + w]
    return out
