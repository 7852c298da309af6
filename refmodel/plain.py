"""Plain drawings: a second, deliberately different ShapesVQA generator for out-of-domain checks.

The bundled model is trained on `veq.reference.shapes`. These images are what a newcomer draws
in a few lines of PIL instead: CSS named colours (`fill="red"`), no jitter, no rotation, no
anti-aliasing, no noise, on a plain canvas of a few fixed greys, with the first phrasing that
comes to mind. Nothing here shares code with the training generator but the colour and shape
words, so a model that learnt its generator rather than the task fails here.

- `colour` and `shape`: one shape, centred or at a random spot, on a white, light grey, mid grey
  or black canvas of one of four sizes.
- `count`: one to three separated shapes (gaps of at least 8 px) on a white canvas.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from veq.reference.shapes import QA, Sample

#: CSS named colours (PIL `ImageColor`), chosen away from the training palette's centres. Each is
#: listed with the canvases it is visible on.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 140, 0),
    "purple": (128, 0, 128),
    "pink": (255, 182, 193),  # CSS lightpink
    "brown": (139, 69, 19),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "white": (255, 255, 255),
}
CANVASES: dict[str, int] = {"white": 255, "light grey": 200, "mid grey": 128, "black": 0}
SIZES = ((96, 96), (128, 128), (200, 200), (320, 240))
SHAPES = ("circle", "square", "triangle", "cross")


def _visible(color: tuple[int, int, int], canvas: int) -> bool:
    return math.dist(color, (canvas,) * 3) > 110


def draw(
    d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    """A plain PIL shape of "radius" `r` centred at (`cx`, `cy`)."""
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def one_shape(seed: int, family: str) -> Sample:
    """One shape on a plain canvas and a `color` or `shape` question about it."""
    rng = random.Random(seed)
    canvas_name = rng.choice(list(CANVASES))
    canvas = CANVASES[canvas_name]
    name = rng.choice([c for c, v in PALETTE.items() if _visible(v, canvas)])
    shape = rng.choice(SHAPES)
    w, h = rng.choice(SIZES)
    r = rng.uniform(0.12, 0.3) * min(w, h)
    if rng.random() < 0.5:
        cx, cy = w / 2, h / 2
    else:
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    img = Image.new("RGB", (w, h), (canvas,) * 3)
    draw(ImageDraw.Draw(img), shape, cx, cy, r, PALETTE[name])
    if family == "color":
        qa = QA("color", f"What color is the {shape}?", name)
    else:
        qa = QA("shape", rng.choice(["What shape is the object?", "What shape is this?"]), shape)
    return Sample(seed, img, None, (qa,))


def separated(seed: int, n: int) -> Sample:
    """`n` (1–3) separated shapes of distinct colours on a white canvas, and a count question."""
    rng = random.Random(seed)
    w, h = rng.choice(SIZES[1:])
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    colours = rng.sample([c for c, v in PALETTE.items() if _visible(v, 255)], n)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < n:
        r = rng.uniform(0.08, 0.16) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        # Bounding circles of radius r·√2 (a square's corners) at least 8 px apart.
        if all(math.hypot(cx - x, cy - y) > (r + s) * math.sqrt(2) + 8 for x, y, s in placed):
            placed.append((cx, cy, r))
    for (cx, cy, r), colour in zip(placed, colours, strict=True):
        draw(d, rng.choice(SHAPES), cx, cy, r, PALETTE[colour])
    return Sample(seed, img, None, (QA("count", "How many shapes are there?", str(n)),))


def plain_set(per_family: int = 48, seed: int = 0) -> list[Sample]:
    """`per_family` colour, shape and count questions (counts 1, 2, 3 in turn)."""
    base = 1_000_000 * (seed + 1)
    out = [one_shape(base + i, "color") for i in range(per_family)]
    out += [one_shape(base + 10_000 + i, "shape") for i in range(per_family)]
    out += [separated(base + 20_000 + i, 1 + i % 3) for i in range(per_family)]
    return out
