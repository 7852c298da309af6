"""Every failure the HTTP API answers, in OpenAI's error shape.

Owns `APIError` (status, message, type, param, code, headers) and its helpers (`bad_request`,
`not_found`, `model_not_found`, `unauthorized`, `forbidden`, `conflict`, `payload_too_large`,
`overloaded`, `unavailable`), `install_error_handlers(app)`, which turns request validation
errors, `APIError`, routing errors (404, 405) and any other exception into
`{"error": {"message", "type", "param", "code"}}`, and `BodySizeLimitMiddleware`, a pure ASGI
guard answering 413 before a large body is read (`Content-Length`) or as soon as the streamed
bytes pass the cap (chunked uploads).

Messages say what was wrong and what to do; they never carry tracebacks, exception text from
libraries or server paths: an unexpected exception is logged here with its traceback and the
client gets a generic 500. It deliberately does not decide *when* to fail (auth, limits, queue
depth belong to their routers and the serving layer) and has no knowledge of settings beyond
the byte cap it is handed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol import ErrorResponse

log = logging.getLogger("veq.server")

#: Pass as a route's `responses=` so the OpenAPI schema documents the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    500: {"model": ErrorResponse, "description": "Internal error"},
    503: {"model": ErrorResponse, "description": "Overloaded or not ready"},
}

_STATUS_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "overloaded_error",
}
_MAX_ECHO = 200  # longest piece of client input quoted back in a message
_JSON_OBJECT = "a JSON object with 'Content-Type: application/json'"


class APIError(Exception):
    """A failure with an HTTP status that the client is told about in OpenAI's shape.

    Raise it anywhere below a route (dependencies, serving layer, `server.media`); the handler
    installed by `install_error_handlers` answers it. `message` must be safe to show a client.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r})"


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- Helpers -------------------------------------------------------------------------------------


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 `invalid_request_error`."""
    return APIError(400, message, param=param, code=code)


def not_found(message: str, code: str = "not_found") -> APIError:
    """404 `not_found_error`."""
    return APIError(404, message, code=code)


def model_not_found(model: str, available: Sequence[str]) -> APIError:
    """404 for a `model` the server does not serve, naming those it does."""
    served = ", ".join(f"'{m}'" for m in available) or "none"
    return APIError(
        404,
        f"The model '{_echo(model)}' does not exist on this server; it serves {served} "
        "(see GET /v1/models).",
        param="model",
        code="model_not_found",
    )


def unauthorized(
    message: str = "Missing or invalid API key; send it as 'Authorization: Bearer <key>'.",
) -> APIError:
    """401 `authentication_error` with `WWW-Authenticate: Bearer`."""
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str, code: str | None = None) -> APIError:
    """403 `permission_error`."""
    return APIError(403, message, code=code)


def conflict(message: str, code: str | None = None) -> APIError:
    """409 `conflict_error` (e.g. a requantize job is already running)."""
    return APIError(409, message, code=code)


def payload_too_large(limit_bytes: int, what: str = "Request body") -> APIError:
    """413: names the cap and the way out."""
    return APIError(
        413,
        f"{what} is larger than this server's limit of {_size(limit_bytes)}; send smaller or "
        "fewer images, or start the server with a larger --max-body-bytes.",
        code="request_too_large",
    )


def overloaded(retry_after: float, message: str | None = None) -> APIError:
    """503 `overloaded_error` with `Retry-After` (whole seconds, at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return APIError(
        503,
        message or f"The server is at capacity (request queue full); retry in {seconds} s.",
        code="queue_full",
        headers={"Retry-After": str(seconds)},
    )


def unavailable(message: str, retry_after: float | None = None) -> APIError:
    """503 `unavailable_error` (model loading, failed, or the server draining)."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else None
    return APIError(503, message, type="unavailable_error", code="unavailable", headers=headers)


# --- Validation errors → one human message and a param ------------------------------------------


def param_path(loc: Sequence[str | int]) -> str | None:
    """A pydantic location as a request path: `('body', 'messages', 0, 'content')` →
    `messages[0].content`. Union labels and tags (`'parts-content'`, `'list[str]'`) are dropped,
    as is the `body` prefix FastAPI adds; the same format `server.media` is given."""
    out = ""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += f".{part}" if out else part
    return out or None


def _echo(text: Any) -> str:
    s = str(text)
    return s if len(s) <= _MAX_ECHO else s[:_MAX_ECHO] + "…"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _describe(err: Mapping[str, Any]) -> tuple[str, str | None]:
    """(message, param) for one pydantic error dict."""
    kind = err.get("type", "")
    param = param_path(err.get("loc", ()))
    where = f"'{param}'" if param else "the request body"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    msg = msg.replace(" after validation", "")
    ctx = err.get("ctx") or {}
    if kind == "json_invalid":
        return (
            "The request body is not valid JSON "
            f"({_echo(ctx.get('error', 'decode error'))}); send {_JSON_OBJECT}.",
            None,
        )
    if kind == "missing" and param is None:
        return f"The request body is required; send {_JSON_OBJECT}.", None
    if kind == "missing":
        return f"{where} is required.", param
    if kind in ("model_attributes_type", "dict_type") and param is None:
        return f"The request body must be a JSON object; send {_JSON_OBJECT}.", None
    if kind == "too_short" and ctx.get("min_length") == 1:
        return f"{where} must not be empty.", param
    if kind == "extra_forbidden":
        return f"{where} is not a known field; remove it.", param
    return f"Invalid {where}: {msg}.".replace("..", "."), param


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """400 for pydantic/FastAPI validation errors: the first problem in full, with its `param`,
    and how many more there are."""
    if not errors:
        return bad_request("The request is invalid.")
    message, param = _describe(errors[0])
    others = {param_path(e.get("loc", ())) for e in errors[1:]} - {param}
    if others:
        message += f" ({len(others)} more invalid field{'s' if len(others) > 1 else ''}.)"
    return bad_request(message, param=param)


# --- Handlers ------------------------------------------------------------------------------------


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status, headers = exc.status_code, dict(exc.headers or {})
    route = f"{request.method} {_echo(request.url.path)}"
    if status == 404:
        err = not_found(
            f"There is no route {route}; see GET /v1/models and POST /v1/chat/completions.",
            code="route_not_found",
        )
    elif status == 405:
        allowed = headers.get("allow") or headers.get("Allow")
        hint = f"; use {allowed}" if allowed else ""
        err = APIError(405, f"Method not allowed: {route}{hint}.", code="method_not_allowed")
    elif status == 413:
        err = APIError(413, str(exc.detail), code="request_too_large")
    elif status == 400 and exc.detail == "There was an error parsing the body":
        err = bad_request(f"The request body could not be read; send {_JSON_OBJECT}.")
    else:
        # Starlette/FastAPI details for other statuses are short fixed strings, never paths.
        err = APIError(status, str(exc.detail))
    err.headers = {**headers, **err.headers}
    return err.response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "unhandled %s in %s %s",
        type(exc).__name__,
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return APIError(
        500,
        "The server hit an internal error while handling this request; it was logged. "
        "Retry, and report it if it persists.",
        code="internal_error",
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure of `app` through the OpenAI error shape. Call once, at build time.

    Note that Starlette re-raises an unexpected exception after the 500 is sent (so that the
    server can log it too): under `TestClient`, pass `raise_server_exceptions=False`.
    """
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)


# --- Body size guard -----------------------------------------------------------------------------


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when the streamed body passes the cap. An HTTPException so that
    FastAPI's body parser re-raises it as is instead of turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodySizeLimitMiddleware:
    """Pure ASGI guard: 413 (OpenAI shape) for HTTP bodies over `max_body_bytes`.

    A declared `Content-Length` over the cap is refused before the app runs and before a byte
    of the body is read. Otherwise the bytes are counted as the app reads them; past the cap,
    `receive` raises, whatever the app was about to answer is discarded, and the 413 is sent
    (when the app has not started a response of its own yet). Install with
    `app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)`.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)
            return

        received = 0
        overflow = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    overflow = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:
                return  # the app's answer to the overflow is replaced by ours
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = payload_too_large(self.max_body_bytes).response()
        response.headers["Connection"] = "close"
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install_body_limit(app: FastAPI, max_body_bytes: int) -> None:
    """`app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=...)`, at build time."""
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
