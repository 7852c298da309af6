"""The wire format: pydantic models of every body the HTTP API reads or writes.

Owns the OpenAI Chat Completions request (messages with text and image parts, sampling knobs),
its response and SSE chunk, the `/v1/models` list (with a `veq` extension describing the
quantization being served), the admin requantize request and job status, and the OpenAI error
body. Validation here is the request's *shape*: types, ranges, at least one message, only
`n=1`, images only in user messages. Unknown extra request fields are ignored (clients send
many); a known field with a wrong type is an error whose location becomes the error's `param`.

It deliberately holds no logic: limits that depend on settings (`max_tokens` against
`max_tokens_limit`, prompt length, image count, the model name) are checked by the serving layer
and `server.media`; turning validation errors into HTTP answers is `server.errors`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from veq.recipe import Method

#: Bits a requantize job may target: the quantized widths, and 16 for the unquantized model.
TARGET_BITS: tuple[int, ...] = (2, 3, 4, 8, 16)
#: The SSE terminator of a streamed completion.
SSE_DONE = "data: [DONE]\n\n"

Role = Literal["system", "developer", "user", "assistant"]
FinishReason = Literal["stop", "length"]
JobState = Literal["queued", "running", "succeeded", "failed"]


class _Request(BaseModel):
    """Request bodies: unknown fields ignored; an explicit `null` for a field with a non-null
    default means "use the default" (clients serialise unset options as null)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if not (
                v is None
                and k in fields
                and not fields[k].is_required()
                and fields[k].get_default(call_default_factory=True) is not None
            )
        }


class _Response(BaseModel):
    """Response bodies: exactly the fields declared."""

    model_config = ConfigDict(extra="forbid")


# --- Chat request --------------------------------------------------------------------------------


class TextPart(_Request):
    """`{"type": "text", "text": "..."}`."""

    type: Literal["text"] = "text"
    text: str = Field(description="The text.")


class ImageURL(_Request):
    """The `image_url` object of an image part."""

    url: str = Field(
        min_length=1,
        description="A data:image/...;base64 URL, or http(s) when the server allows remote images.",
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted for compatibility; the model's processor decides resolution."
    )


class ImagePart(_Request):
    """`{"type": "image_url", "image_url": {"url": "...", "detail": "auto"}}`."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v: Any) -> Any:
        # Some clients send `"image_url": "data:..."`; the intent is unambiguous.
        return {"url": v} if isinstance(v, str) else v


def _part_kind(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return (
        {"text": "text-part", "image_url": "image-part"}.get(kind)
        if isinstance(kind, str)
        else None
    )


ContentPart = Annotated[
    Annotated[TextPart, Tag("text-part")] | Annotated[ImagePart, Tag("image-part")],
    Discriminator(
        _part_kind,
        custom_error_type="unsupported_content_part",
        custom_error_message="unsupported content part: this server accepts parts of type "
        "'text' and 'image_url' (an object with a 'type' field)",
    ),
]


def _content_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return "string-content"
    if isinstance(v, list | tuple):
        return "parts-content"
    return None


Content = Annotated[
    Annotated[str, Tag("string-content")]
    | Annotated[list[ContentPart], Field(min_length=1), Tag("parts-content")],
    Discriminator(
        _content_kind,
        custom_error_type="content_type",
        custom_error_message="content must be a string or a non-empty list of content parts",
    ),
]


class ChatMessage(_Request):
    """One message. `developer` is accepted as a synonym of `system` (newer OpenAI clients)."""

    role: Role = Field(description="system, developer, user or assistant.")
    content: Content | None = Field(
        None, description="A string, or a list of text and image_url parts (images: user only)."
    )
    name: str | None = Field(None, description="Accepted and ignored.")

    @model_validator(mode="after")
    def _content_fits_role(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of parts)")
        if (
            self.role != "user"
            and isinstance(self.content, list)
            and any(isinstance(p, ImagePart) for p in self.content)
        ):
            raise ValueError(f"images are only accepted in user messages, not in {self.role}")
        return self


class StreamOptions(_Request):
    include_usage: bool = Field(
        False, description="Send a last chunk with `usage` and empty `choices` before [DONE]."
    )


def _stop_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return "one-stop"
    return "stop-list" if isinstance(v, list | tuple) else None


Stop = Annotated[
    Annotated[str, Tag("one-stop")]
    | Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(min_length=1, max_length=4),
        Tag("stop-list"),
    ],
    Discriminator(
        _stop_kind,
        custom_error_type="stop_type",
        custom_error_message="stop must be a string or a list of up to 4 strings",
    ),
]


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`. Sampling defaults follow OpenAI (temperature 1, top_p 1)."""

    model: str = Field(min_length=1, description="A model id from GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (legacy).")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; wins over max_tokens when both are set."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(
        None, ge=0, description="Extension: keep the k likeliest tokens; 0 or null disables."
    )
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Makes sampling repeatable for one request."
    )
    stop: Stop | None = Field(
        None, description="Up to 4 strings; generation stops before the first one produced."
    )
    min_tokens: int = Field(
        0, ge=0, description="Extension (vLLM): end-of-sequence is not sampled before this many."
    )
    ignore_eos: bool = Field(
        False,
        description="Extension (vLLM): generate past end-of-sequence until max_tokens or a stop "
        "string; for fixed-length benchmarks.",
    )
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    n: int = Field(1, description="Choices to generate; only 1 is supported.")
    user: str | None = Field(None, description="End-user id; accepted and ignored.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Accepted; may be ignored.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Accepted; may be ignored.")
    logprobs: bool = Field(False, description="Not supported: true is rejected.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: must be empty.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "":
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}; send {v} requests instead")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool) -> bool:
        if v:
            raise ValueError("logprobs are not supported by this server; omit the field")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("tool calling is not supported by this server; omit 'tools'")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens`, else `max_tokens`, else None (the server's default)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (empty when absent)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


# --- Chat response -------------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int = Field(ge=0, description="Prompt tokens, image tokens included.")
    completion_tokens: int = Field(ge=0, description="Generated tokens.")
    total_tokens: int = Field(ge=0, description="prompt_tokens + completion_tokens.")


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Response):
    """The non-streamed answer."""

    id: str = Field(description="chatcmpl-...")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix seconds.")
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="The served quantization label.")


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    """One SSE event of a streamed answer. The first carries `delta.role`, the last of the
    choice carries `finish_reason`; with `include_usage` one more has `choices=[]` and `usage`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    def sse(self) -> str:
        """`data: {...}\\n\\n`, with unset delta fields left out (as OpenAI sends them)."""
        body = self.model_dump(mode="json")
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if body["system_fingerprint"] is None:
            del body["system_fingerprint"]
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


# --- Models --------------------------------------------------------------------------------------


class QuantizationInfo(_Response):
    """The `veq` extension of a model entry: what is being served right now."""

    method: Method | None = Field(description="Quantization method; null when unquantized.")
    bits: int = Field(description="Weight bits; 16 means unquantized.")
    group_size: int | None = Field(description="Input features per scale; null: per channel.")
    symmetric: bool | None = Field(
        None, description="Symmetric codes (no zero points); null when unquantized."
    )
    weight_bytes: int = Field(ge=0, description="Bytes of weights resident on the device.")
    label: str | None = Field(None, description="Short name of the recipe, e.g. veq-w4g128.")


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "veq"
    veq: QuantizationInfo


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- Admin ---------------------------------------------------------------------------------------


class RequantizeRequest(BaseModel):
    """`POST /admin/requantize`. Omitted fields keep the serving recipe's value. Unlike the chat
    API, unknown fields are an error here: a mistyped knob must not requantize silently wrong."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(description="Target bits: 2, 3, 4, 8, or 16 for the unquantized model.")
    method: Method | None = Field(None, description="Quantization method (default: current).")
    group_size: int | Literal["channel"] | None = Field(
        None, description="32, 64, 128 or 'channel'; null keeps the current grouping."
    )
    calib: str | None = Field(
        None, min_length=1, description="Calibration data (default: current)."
    )
    symmetric: bool | None = Field(
        None,
        description="Symmetric codes (true) or a zero point per group (false); null: the "
        "serving setting (--symmetric / --asymmetric, else the width's default).",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in TARGET_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, TARGET_BITS))}, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64, 128 or 'channel', got {v}")
        return v


class JobProgress(_Response):
    layer: int = Field(0, ge=0, description="Decoder layers done.")
    layers: int = Field(0, ge=0, description="Decoder layers in all (0 until known).")


class JobStatus(_Response):
    """`GET /admin/jobs/{id}`, and the 202 answer of `POST /admin/requantize`."""

    id: str
    object: Literal["requantize.job"] = "requantize.job"
    state: JobState
    request: RequantizeRequest = Field(description="What the job builds.")
    progress: JobProgress = Field(default_factory=JobProgress)
    error: str | None = Field(None, description="Why it failed (user-facing; no traceback).")
    created: int = Field(description="Unix seconds the job was accepted.")
    started: int | None = None
    finished: int | None = None
    from_cache: bool | None = Field(None, description="Whether the checkpoint came from cache.")


# --- Errors --------------------------------------------------------------------------------------


class ErrorDetail(_Response):
    message: str = Field(description="What was wrong and what to do about it.")
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(None, description="The request field at fault, e.g. messages[0].")
    code: str | None = Field(None, description="A stable machine-readable code, when there is one.")


class ErrorResponse(_Response):
    """Every error the server answers: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail
