"""`GET /health` (liveness), `GET /ready` (model loaded), `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.api.deps import ApiKey, State, ready_chat

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State) -> dict[str, str]:
    ready_chat(state)  # 503 in OpenAI shape while loading or after a failed load
    return {"status": "ready"}


@router.get("/metrics", dependencies=[ApiKey])
async def metrics(state: State) -> Response:
    body = state.metrics.render(state.engine)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
