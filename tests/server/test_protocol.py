"""The wire models: what a chat request may say, and the shapes the server answers with."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from server.errors import param_path
from server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    ImagePart,
    JobStatus,
    ModelCard,
    ModelList,
    QuantizationInfo,
    RequantizeRequest,
    TextPart,
    Usage,
)

PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def _req(**over: Any) -> dict[str, Any]:
    return {"model": "mini", "messages": [{"role": "user", "content": "hi"}], **over}


def _fail(body: dict[str, Any]) -> tuple[str | None, str]:
    """(param, message) of the first validation error."""
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate(body)
    err = exc.value.errors()[0]
    return param_path(err["loc"]), err["msg"]


def test_minimal_request_gets_openai_defaults() -> None:
    r = ChatCompletionRequest.model_validate(_req())
    assert (r.temperature, r.top_p, r.top_k, r.n, r.stream) == (1.0, 1.0, None, 1, False)
    assert r.requested_max_tokens is None and r.stop_strings == [] and not r.include_usage


def test_mixed_content_with_images() -> None:
    r = ChatCompletionRequest.model_validate(
        _req(
            messages=[
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what colour?"},
                        {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
                        {"type": "image_url", "image_url": PNG_URL},  # bare string tolerated
                    ],
                },
                {"role": "assistant", "content": "red"},
                {"role": "assistant", "content": None},
            ]
        )
    )
    parts = r.messages[1].content
    assert isinstance(parts, list)
    assert isinstance(parts[0], TextPart) and isinstance(parts[1], ImagePart)
    assert parts[2].image_url.url == PNG_URL  # type: ignore[union-attr]


def test_unknown_fields_ignored_and_nulls_mean_default() -> None:
    r = ChatCompletionRequest.model_validate(
        _req(
            temperature=None,
            stream=None,
            n=None,
            frequency_penalty=0.5,
            response_format_extension={"x": 1},
            logit_bias={"1": 2},
            messages=[{"role": "user", "content": "hi", "weird": True}],
        )
    )
    assert r.temperature == 1.0 and r.stream is False and r.n == 1
    assert not hasattr(r, "response_format_extension")


def test_sampling_fields() -> None:
    r = ChatCompletionRequest.model_validate(
        _req(
            max_tokens=5,
            max_completion_tokens=7,
            temperature=0,
            top_p=0.5,
            top_k=40,
            seed=-3,
            stop=["a", "b"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert r.requested_max_tokens == 7 and r.stop_strings == ["a", "b"] and r.include_usage
    assert ChatCompletionRequest.model_validate(_req(stop="END")).stop_strings == ["END"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        (_req(messages=[]), "messages", "at least 1"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "required"),
        (_req(messages=[{"role": "user", "content": 5}]), "messages[0].content", "string or"),
        (_req(messages=[{"role": "user", "content": []}]), "messages[0].content", "at least 1"),
        (_req(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "'user'"),
        (_req(messages=[{"role": "user"}]), "messages[0]", "needs content"),
        (
            _req(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
            "messages[0].content[0]",
            "'text' and 'image_url'",
        ),
        (
            _req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0].image_url.url",
            "required",
        ),
        (
            _req(
                messages=[
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}],
                    }
                ]
            ),
            "messages[0]",
            "only accepted in user messages",
        ),
        (_req(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (_req(max_tokens="many"), "max_tokens", "integer"),
        (_req(max_completion_tokens=-1), "max_completion_tokens", "greater"),
        (_req(temperature=2.5), "temperature", "less than or equal to 2"),
        (_req(temperature="hot"), "temperature", "number"),
        (_req(top_p=0), "top_p", "greater than 0"),
        (_req(top_p=1.5), "top_p", "less than or equal to 1"),
        (_req(top_k=-1), "top_k", "greater than or equal to 0"),
        (_req(stop=["a"] * 5), "stop", "at most 4"),
        (_req(stop=""), "stop", "must not be empty"),
        (_req(stop=7), "stop", "string or a list"),
        (_req(n=2), "n", "only n=1"),
        (_req(stream="yes please"), "stream", "boolean"),
        (_req(logprobs=True), "logprobs", "not supported"),
        (_req(tools=[{"type": "function"}]), "tools", "not supported"),
        (_req(seed=2**70), "seed", "less than"),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    got_param, msg = _fail(body)
    assert got_param == param
    assert words in msg


def test_response_shape_matches_openai() -> None:
    resp = ChatCompletion(
        id="chatcmpl-1",
        created=1,
        model="mini",
        choices=[Choice(message={"content": "red"}, finish_reason="stop")],  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=20, completion_tokens=1, total_tokens=21),
    )
    body = resp.model_dump(mode="json")
    assert body["object"] == "chat.completion"
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "red"},
        "finish_reason": "stop",
        "logprobs": None,
    }
    with pytest.raises(ValidationError):
        Choice(message={"content": "x"}, finish_reason="tool_calls")  # type: ignore[arg-type]


def test_chunk_sse_omits_unset_delta_fields() -> None:
    first = ChatCompletionChunk(
        id="c", created=1, model="mini", choices=[ChunkChoice(delta=Delta(role="assistant"))]
    )
    line = first.sse()
    assert line.startswith("data: ") and line.endswith("\n\n")
    body = json.loads(line[len("data: ") :])
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"][0]["delta"] == {"role": "assistant"}
    assert body["choices"][0]["finish_reason"] is None
    usage = ChatCompletionChunk(
        id="c",
        created=1,
        model="mini",
        choices=[],
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    assert json.loads(usage.sse()[6:])["usage"]["total_tokens"] == 3


def test_model_list_has_veq_extension() -> None:
    listing = ModelList(
        data=[
            ModelCard(
                id="mini",
                created=0,
                veq=QuantizationInfo(method="veq", bits=4, group_size=128, weight_bytes=1000),
            )
        ]
    ).model_dump(mode="json")
    assert listing["object"] == "list"
    card = listing["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "veq"
    assert card["veq"]["bits"] == 4 and card["veq"]["weight_bytes"] == 1000


def test_requantize_request() -> None:
    assert RequantizeRequest.model_validate({"bits": 3}).method is None
    r = RequantizeRequest.model_validate({"bits": 2, "method": "rtn", "group_size": "channel"})
    assert r.group_size == "channel"
    for bad in ({"bits": 5}, {}, {"bits": 3, "group_size": 48}, {"bits": 3, "bitz": 2}):
        with pytest.raises(ValidationError):
            RequantizeRequest.model_validate(bad)


def test_job_status_and_error_body() -> None:
    job = JobStatus(id="j1", state="running", request=RequantizeRequest(bits=3), created=5)
    body = job.model_dump(mode="json")
    assert body["progress"] == {"layer": 0, "layers": 0} and body["error"] is None
    with pytest.raises(ValidationError):
        JobStatus(id="j", state="paused", request=RequantizeRequest(bits=3), created=5)  # type: ignore[arg-type]
    err = ErrorResponse.model_validate(
        {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    )
    assert err.error.type == "invalid_request_error"
