"""`POST /v1/chat/completions` and `GET /v1/models`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import ApiKey, Chat, State, ready_chat
from server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    QuantizationInfo,
)

router = APIRouter(prefix="/v1", dependencies=[ApiKey])


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, chat: Chat, state: State):
    metrics = state.metrics
    try:
        if body.stream:
            lines = await chat.stream(body)
            metrics.requests.labels("200").inc()
            return StreamingResponse(lines, media_type="text/event-stream")
        task = asyncio.ensure_future(chat.complete(body))
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():  # stop generating for nobody
                task.cancel()
                break
        result = await task
    except Exception as exc:
        metrics.requests.labels(str(getattr(exc, "status", 500))).inc()
        raise
    metrics.requests.labels("200").inc()
    return result


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    chat = ready_chat(state)
    info = chat.engine.runner.info
    return ModelList(
        data=[
            ModelCard(
                id=info.name,
                created=int(state.started),
                veq=QuantizationInfo(
                    method=None if info.bits == 16 else info.method,
                    bits=info.bits,
                    group_size=info.group_size,
                    symmetric=info.symmetric,
                    weight_bytes=info.weight_bytes,
                    label=info.label,
                ),
            )
        ]
    )
