"""Request dependencies: the app state, API-key and admin-key checks, the ready chat service."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from server.engine import Engine
from server.engine.requant import Requantizer
from server.errors import forbidden, unauthorized, unavailable
from server.metrics import Metrics
from server.serving.chat import ChatService


@dataclass
class AppState:
    """Everything a route may need; one per app (`app.state.veq`)."""

    settings: Any
    metrics: Metrics
    engine: Engine | None = None
    chat: ChatService | None = None
    requant: Requantizer | None = None
    load_error: str | None = None
    loading: dict[str, int] = field(default_factory=lambda: {"layer": 0, "layers": 0})
    started: float = field(default_factory=time.time)


def get_state(request: Request) -> AppState:
    return request.app.state.veq


State = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_api_key(request: Request, state: State) -> None:
    key = state.settings.api_key
    if key is not None and not _matches(_bearer(request), key.get_secret_value()):
        raise unauthorized()


def require_admin_key(request: Request, state: State) -> None:
    key = state.settings.admin_key
    if key is None:
        raise forbidden(
            "admin endpoints are disabled; start the server with --admin-key (or VEQ_ADMIN_KEY)",
            code="admin_disabled",
        )
    if not _matches(_bearer(request), key.get_secret_value()):
        raise unauthorized(
            "Missing or invalid admin key; send 'Authorization: Bearer <admin key>'."
        )


def ready_chat(state: State) -> ChatService:
    if state.chat is None:
        if state.load_error:
            raise unavailable(f"the model failed to load: {state.load_error}")
        layer, layers = state.loading["layer"], state.loading["layers"]
        progress = f" (layer {layer} of {layers})" if layers else ""
        raise unavailable(f"the model is still loading{progress}; retry shortly", retry_after=5)
    return state.chat


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
Chat = Annotated[ChatService, Depends(ready_chat)]
