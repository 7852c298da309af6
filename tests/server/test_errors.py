"""Every failure in OpenAI's error shape, through a tiny app with the handlers installed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.errors import (
    APIError,
    BodySizeLimitMiddleware,
    bad_request,
    install_body_limit,
    install_error_handlers,
    model_not_found,
    overloaded,
    param_path,
    unauthorized,
)
from server.protocol import ChatCompletionRequest

CAP = 4096


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    install_body_limit(app, CAP)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        return {"n_messages": len(body.messages)}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret at /home/user/.cache/veq/model.safetensors")

    @app.get("/full")
    async def full() -> None:
        raise overloaded(2.5)

    @app.get("/model")
    async def model() -> None:
        raise model_not_found("gpt-9", ["mini"])

    @app.get("/auth")
    async def auth() -> None:
        raise unauthorized()

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


GOOD = {"model": "mini", "messages": [{"role": "user", "content": "hi"}]}


def test_valid_request_passes(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json=GOOD).json() == {"n_messages": 1}


def test_malformed_json(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        content=b'{"model": "mini", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    err = _error(resp, 400)
    assert err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]


def test_body_not_an_object(client: TestClient) -> None:
    err = _error(client.post("/v1/chat/completions", json=[1, 2]), 400)
    assert "JSON object" in err["message"]


def test_missing_body(client: TestClient) -> None:
    err = _error(client.post("/v1/chat/completions"), 400)
    assert "required" in err["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({**GOOD, "messages": []}, "messages"),
        ({**GOOD, "max_tokens": "ten"}, "max_tokens"),
        ({**GOOD, "temperature": 9}, "temperature"),
        ({**GOOD, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0]",
        ),
        ({**GOOD, "n": 3}, "n"),
        ({"messages": GOOD["messages"]}, "model"),
    ],
)
def test_validation_errors_are_400_with_param(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    err = _error(client.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert err["message"]


def test_several_errors_are_counted(client: TestClient) -> None:
    err = _error(client.post("/v1/chat/completions", json={"messages": [], "top_p": 7}), 400)
    assert "more invalid field" in err["message"]


def test_unknown_route_is_404(client: TestClient) -> None:
    err = _error(client.get("/v2/nothing"), 404)
    assert err["type"] == "not_found_error" and err["code"] == "route_not_found"


def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    resp = client.get("/v1/chat/completions")
    err = _error(resp, 405)
    assert "POST" in resp.headers["allow"] and "POST" in err["message"]


def test_api_errors_keep_status_headers_and_code(client: TestClient) -> None:
    resp = client.get("/full")
    err = _error(resp, 503)
    assert resp.headers["retry-after"] == "3" and err["code"] == "queue_full"
    err = _error(client.get("/model"), 404)
    assert err["param"] == "model" and "'mini'" in err["message"]
    resp = client.get("/auth")
    assert _error(resp, 401)["type"] == "authentication_error"
    assert resp.headers["www-authenticate"] == "Bearer"


def test_unexpected_exception_is_generic_500(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("ERROR", logger="veq.server"):
        resp = client.get("/boom")
    err = _error(resp, 500)
    assert err["type"] == "internal_error"
    assert (
        "secret" not in resp.text and "/home" not in resp.text and "RuntimeError" not in resp.text
    )
    # The server log keeps the traceback.
    assert any(r.exc_info and "secret" in str(r.exc_info[1]) for r in caplog.records)


def test_body_over_cap_by_content_length(client: TestClient) -> None:
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (2 * CAP)}]}
    err = _error(client.post("/v1/chat/completions", json=big), 413)
    assert err["code"] == "request_too_large" and "--max-body-bytes" in err["message"]


def test_body_over_cap_when_streamed_without_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "mini", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}]}'

    resp = client.post(
        "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    _error(resp, 413)


def test_body_under_cap_streamed_passes(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "mini", "messages": '
        yield b'[{"role": "user", "content": "hi"}]}'

    resp = client.post(
        "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 200


def test_param_path() -> None:
    loc = ("body", "messages", 0, "content", "parts-content", 1, "image-part", "image_url", "url")
    assert param_path(loc) == "messages[0].content[1].image_url.url"
    assert param_path(("body",)) is None
    assert param_path(("stop", "list[str]")) == "stop"


def test_api_error_body() -> None:
    err = bad_request("nope", param="x", code="c")
    assert err.body() == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "x", "code": "c"}
    }
    assert APIError(409, "busy").type == "conflict_error"
    with pytest.raises(ValueError):
        BodySizeLimitMiddleware(FastAPI(), 0)
