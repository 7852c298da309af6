"""Bad input and auth against the real server: OpenAI error JSON, never a 500 or a traceback."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

API_KEY, ADMIN_KEY = "test-key", "admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(live, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(
        f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kw
    )


def chat(content, **extra) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        **extra,
    }


def image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/work/" not in r.text and "/tmp/" not in r.text
    if param is not None:
        assert err["param"] == param, err
    return err


def _png_bytes(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (chat("x", temperature="hot"), "temperature"),
        (chat("x", max_tokens=0), "max_tokens"),
        (chat("x", n=2), "n"),
        (chat([{"type": "audio", "audio": {}}]), "messages[0].content[0]"),
    ],
)
def test_validation_errors_are_400_with_param(live, body, param):
    assert_error(post(live, body), 400, param)


def test_malformed_json(live):
    r = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 400)


def test_unknown_model_is_404(live):
    err = assert_error(post(live, {**chat("x"), "model": "gpt-9"}), 404, "model")
    assert "tiny" in err["message"]


def test_unknown_fields_are_ignored(live):
    r = post(live, chat("x", logit_bias={}, some_future_field={"a": 1}))
    assert r.status_code == 200, r.text


def test_max_tokens_over_limit(live):
    assert_error(post(live, chat("x", max_tokens=10_000)), 400, "max_tokens")


def test_prompt_over_max_model_len(live):
    assert_error(post(live, chat("word " * 2000)), 400, "messages")


@pytest.mark.parametrize(
    "url, code_fragment",
    [
        ("data:image/png;base64,@@@not-base64@@@", "base64"),
        ("data:image/png;base64," + base64.b64encode(b"hello world").decode(), "image"),
        ("data:image/png;base64," + base64.b64encode(_png_bytes()[:40]).decode(), ""),
        ("data:text/plain;base64,aGk=", ""),
        ("file:///etc/passwd", ""),
        ("http://127.0.0.1/a.png", "--allow-remote-images"),
    ],
)
def test_bad_images_are_400(live, url, code_fragment):
    err = assert_error(post(live, chat(image(url))), 400, "messages[0].content[0].image_url.url")
    assert code_fragment.lower() in err["message"].lower()


def test_decompression_bomb_is_400(live):
    big = 5000  # 25 Mpx > the default 16.7 Mpx cap; a flat PNG compresses to a few KB
    buf = io.BytesIO()
    Image.new("L", (big, big)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    err = assert_error(post(live, chat(image(url))), 400)
    assert "pixel" in err["message"].lower()


def test_too_many_images(live):
    small = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": small}}] * 5
    assert_error(post(live, chat(parts)), 400, "messages")


def test_body_too_large_is_413(live):
    r = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=b"x" * (21 << 20),
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert_error(r, 413)


def test_api_key_required_except_health_and_ready(live):
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.get(f"{live.url}/ready").status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert_error(httpx.get(f"{live.url}{path}"), 401)
        assert_error(httpx.get(f"{live.url}{path}", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(live, chat("x"), headers={}), 401)


def test_admin_needs_the_admin_key(live):
    assert_error(httpx.get(f"{live.url}/admin/stats", headers=AUTH), 401)
    r = httpx.get(f"{live.url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and r.json()["weight_bytes"] > 0
    assert_error(
        httpx.get(f"{live.url}/admin/jobs/nope", headers={"Authorization": f"Bearer {ADMIN_KEY}"}),
        404,
    )
    r = httpx.post(
        f"{live.url}/admin/requantize",
        json={"bits": 5},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert_error(r, 400, "bits")


def test_unknown_route_is_404_in_openai_shape(live):
    assert_error(httpx.get(f"{live.url}/v1/nothing", headers=AUTH), 404)
