"""Calibration sources: a small registry of named sets, JSONL files and Hugging Face datasets.

Owns where calibration conversations come from. Named sources register themselves with
`register` (this module registers `builtin`; `veq.reference` registers `shapes`, the bundled
model's task, so this package never imports the reference model's); a spec that is no registered
name is `hf:NAME[:SPLIT]` (needs `datasets` and a network) or a JSONL file of
`{"image"|"images", "messages"}` or LLaVA-style `{"image", "conversations"}` rows. It does not
tokenize (`veq.calib.data`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from veq.calib.data import CalibrationError, Conversation, image_parts

Loader = Callable[[int, int], list[Conversation]]
"""`(n, seed) -> n conversations`, a pure function of its arguments."""


@dataclass(frozen=True)
class Source:
    name: str
    about: str
    load: Loader


_REGISTRY: dict[str, Source] = {}


def register(name: str, about: str) -> Callable[[Loader], Loader]:
    """Register the decorated `(n, seed)` loader as source `name` (`about`: one line for help)."""

    def add(load: Loader) -> Loader:
        _REGISTRY[name] = Source(name, about, load)
        return load

    return add


def registered() -> list[Source]:
    """The named sources, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# Real photographs shipped (offline) by scikit-image, with text written for each.
_PHOTOS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "astronaut": (
        "An astronaut in a white spacesuit poses in front of an American flag.",
        [("Who is in the picture?", "An astronaut."), ("What colour is the suit?", "White.")],
    ),
    "chelsea": (
        "A ginger tabby cat looks to the side with its ears up.",
        [("What animal is this?", "A cat."), ("What colour is its fur?", "Orange.")],
    ),
    "coffee": (
        "A cup of coffee on a saucer with a spoon, seen from above on a red table.",
        [("What drink is shown?", "Coffee."), ("Is there a spoon?", "Yes.")],
    ),
    "rocket": (
        "A rocket stands on the launch pad under a clear sky.",
        [("What vehicle is this?", "A rocket."), ("Is it flying?", "No.")],
    ),
    "camera": (
        "A black-and-white photo of a man operating a camera on a tripod.",
        [("Is the photo in colour?", "No."), ("What is the man using?", "A camera.")],
    ),
    "coins": (
        "Many old coins lie scattered on a dark background.",
        [("What objects are shown?", "Coins."), ("Are there more than five?", "Yes.")],
    ),
    "moon": (
        "The surface of the moon with craters, in grey tones.",
        [("What is shown?", "The moon's surface."), ("Are there craters?", "Yes.")],
    ),
    "hubble_deep_field": (
        "A deep-space telescope image full of distant galaxies.",
        [("What fills the image?", "Galaxies."), ("Is the background dark?", "Yes.")],
    ),
    "immunohistochemistry": (
        "A microscope image of stained tissue with brown and blue cells.",
        [("What kind of image is this?", "A microscope image."), ("Name a colour.", "Brown.")],
    ),
    "retina": (
        "A medical photograph of a human retina with blood vessels.",
        [("What organ is shown?", "An eye's retina."), ("Are vessels visible?", "Yes.")],
    ),
    "page": (
        "A scanned page of printed text with uneven lighting.",
        [("What does the image contain?", "Printed text."), ("Is it a photo of a cat?", "No.")],
    ),
    "clock": (
        "A wall clock photographed at an angle.",
        [("What object is this?", "A clock."), ("Does it have hands?", "Yes.")],
    ),
    "colorwheel": (
        "A colour wheel showing all hues around a circle.",
        [("What shape is it?", "A circle."), ("How many colours?", "Many.")],
    ),
    "brick": (
        "A close-up of a brick wall texture.",
        [("What material is this?", "Brick."), ("Is it a person?", "No.")],
    ),
}

_TEXT_ONLY: list[tuple[str, str]] = [
    ("What is 7 plus 5?", "12."),
    ("Spell the word cat backwards.", "tac."),
    ("Which is larger, 19 or 91?", "91."),
    ("Name the colour of the sky on a clear day.", "Blue."),
    ("Complete the sequence: 2, 4, 6, ...", "8."),
    ("What is the opposite of cold?", "Hot."),
]


def _photo(name: str, max_side: int) -> Image.Image:
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    img = Image.fromarray(array).convert("RGB")
    img.thumbnail((max_side, max_side))
    return img


@register(
    "builtin",
    "real photographs (shipped offline by scikit-image) with a caption and a question each, "
    "and every fourth conversation a text-only turn",
)
def builtin_conversations(n: int, seed: int = 0, max_side: int = 224) -> list[Conversation]:
    """`n` conversations: photos (two turns each: caption, question) and, every fourth, a
    text-only question so that text-only routing is represented."""
    rng = random.Random(seed)
    names = sorted(_PHOTOS)
    rng.shuffle(names)
    out = []
    for i in range(n):
        if i % 4 == 3:
            q, a = _TEXT_ONLY[(i // 4) % len(_TEXT_ONLY)]
            out.append(
                Conversation(
                    (), ({"role": "user", "content": q}, {"role": "assistant", "content": a})
                )
            )
            continue
        name = names[i % len(names)]
        caption, qas = _PHOTOS[name]
        q, a = qas[rng.randrange(len(qas))]
        messages = (
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}],
            },
            {"role": "assistant", "content": caption},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        )
        out.append(Conversation((_photo(name, max_side),), messages))
    return out


def _load_image(path: str, base: Path) -> Image.Image:
    p = Path(path)
    p = p if p.is_absolute() else base / p
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read calibration image {path!r}: {exc}") from None


def _llava_messages(turns: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = []
    for turn in turns:
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}.get(
            str(turn.get("from", turn.get("role"))), None
        )
        if role is None:
            raise CalibrationError(f"unknown LLaVA speaker {turn.get('from')!r}")
        text = str(turn.get("value", turn.get("content", "")))
        if role == "user" and "<image>" in text:
            parts: list[dict[str, Any]] = []
            for k, piece in enumerate(text.split("<image>")):
                if k:
                    parts.append({"type": "image"})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": text})
    return messages


def _normalise_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style `image_url` parts become `{"type": "image"}` placeholders."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image"} if p.get("type") in ("image", "image_url") else p for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


def place_images(messages: list[dict[str, Any]], n_images: int) -> list[dict[str, Any]]:
    """`messages` with one `{"type": "image"}` placeholder per image: as given, or, when a row
    names images but its text has no placeholder (LLaVA-style loaders and TRL assume this), all
    of them at the start of the first user turn. Any other mismatch is an error."""
    n_parts = image_parts(messages)
    if n_parts == n_images:
        return messages
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if n_parts or first_user is None:
        raise CalibrationError(f"{n_images} image(s) but {n_parts} image placeholder(s)")
    out = list(messages)
    content = out[first_user]["content"]
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    out[first_user] = {**out[first_user], "content": [{"type": "image"}] * n_images + parts}
    return out


def load_jsonl(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL file; image paths are relative to the file."""
    path = _require_file(path)
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path.name}:{lineno}: invalid JSON ({exc.msg})") from None
        images = row.get("images") or ([row["image"]] if row.get("image") else [])
        imgs = tuple(_load_image(str(p), path.parent) for p in images)
        if "messages" in row:
            messages = _normalise_parts(row["messages"])
        elif "conversations" in row:
            messages = _llava_messages(row["conversations"])
        else:
            raise CalibrationError(f"{path.name}:{lineno}: needs 'messages' or 'conversations'")
        try:
            messages = place_images(messages, len(imgs))
        except CalibrationError as exc:
            raise CalibrationError(f"{path.name}:{lineno}: {exc}") from None
        out.append(Conversation(imgs, tuple(messages)))
    if not out:
        raise CalibrationError(f"calibration file {path.name} has no samples")
    return out


def load_hf_dataset(name: str, n: int, split: str = "train") -> list[Conversation]:
    """LLaVA-style conversations from a Hugging Face dataset (needs `datasets` and a network)."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            "calibration from a Hugging Face dataset needs the 'datasets' package "
            "(pip install 'veq[hf]') and a network; use 'builtin' or a JSONL file offline"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=f"{split}[:{n}]")
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise CalibrationError(f"cannot load dataset {name!r}: {exc}") from None
    out = []
    for row in ds:
        image = row.get("image")
        imgs = (image.convert("RGB"),) if isinstance(image, Image.Image) else ()
        if "conversations" in row:
            messages = _llava_messages(row["conversations"])
        else:
            messages = _normalise_parts(row["messages"])
        out.append(Conversation(imgs, tuple(place_images(messages, len(imgs)))))
    return out


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(_REGISTRY))
        raise CalibrationError(
            f"calibration source {str(path)!r} does not exist (not a file, 'hf:NAME' or a known "
            f"name: {known})"
        )
    return path


def check_source(spec: str) -> None:
    """Fail as `conversations` would on a source that is not there, without reading anything
    (for recipes that need no data: a typo is still an error)."""
    if spec not in _REGISTRY and not spec.startswith("hf:"):
        _require_file(spec)


def conversations(spec: str, n: int, seed: int = 0) -> list[Conversation]:
    """`n` conversations from `spec`: a registered name (`registered()`), 'hf:NAME[:SPLIT]', or a
    JSONL path (shuffled by `seed`, first `n`)."""
    if n < 1:
        raise CalibrationError(f"need at least one calibration sample, got {n}")
    if spec in _REGISTRY:
        return _REGISTRY[spec].load(n, seed)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return load_hf_dataset(name, n, split or "train")
    convs = load_jsonl(spec)
    random.Random(seed).shuffle(convs)
    return convs[:n]
