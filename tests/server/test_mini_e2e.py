"""What a newcomer sees first: `make serve`'s model (the bundled `mini`, VEQ W4) answering
pictures drawn in a few lines of PIL, through the official `openai` client."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image, ImageDraw

from veq.reference import MINI_DIR, mini_available
from veq.reference.shapes import REFUSAL, SELF_DESCRIPTION

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(not mini_available(), reason=f"no reference model in {MINI_DIR}"),
]


@pytest.fixture(scope="module")
def client(mini_server):
    assert mini_server.settings.calib is None  # so the loader picks mini's own source, shapes
    return openai.OpenAI(
        base_url=f"{mini_server.url}/v1",
        api_key=mini_server.settings.api_key.get_secret_value(),
        max_retries=0,
        timeout=60,
    )


def _url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client: openai.OpenAI, question: str, img: Image.Image | None = None) -> str:
    content: list[dict] = [{"type": "text", "text": question}]
    if img is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _url(img)}})
    r = client.chat.completions.create(
        model="mini", messages=[{"role": "user", "content": content}], max_tokens=64
    )
    return r.choices[0].message.content


def _circle(colour: str, background: int) -> Image.Image:
    img = Image.new("RGB", (128, 128), (background,) * 3)
    ImageDraw.Draw(img).ellipse((64 - 24, 64 - 24, 64 + 24, 64 + 24), fill=colour)
    return img


@pytest.mark.parametrize("background", [255, 200])
@pytest.mark.parametrize("colour", ["red", "green", "blue"])
def test_centred_circle(client, colour, background):
    img = _circle(colour, background)
    assert _ask(client, "What color is the circle?", img) == colour
    assert _ask(client, "What shape is the object?", img) == "circle"


def _two_shapes() -> Image.Image:
    img = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((40, 70, 120, 150), fill="red")
    d.ellipse((190, 80, 270, 160), fill="blue")
    return img


def test_two_shapes_on_a_white_canvas(client):
    assert _ask(client, "How many shapes are there?", _two_shapes()) == "2"


def test_colour_of_one_of_two_shapes(client):
    img = _two_shapes()
    assert _ask(client, "What color is the square?", img) == "red"
    assert _ask(client, "What color is the circle?", img) == "blue"


def test_greeting_and_off_task_text(client):
    assert _ask(client, "Hello! What can you do?") == SELF_DESCRIPTION
    assert _ask(client, "What is the capital of France?") == REFUSAL
    # Not a training template: refusing generalises past them (not to every phrasing yet).
    assert _ask(client, "Can you book me a flight to Paris?") == REFUSAL
