"""Chat completions: an OpenAI request in, engine work, an OpenAI response (or SSE) out.

Owns the request-level rules that need the model: which model names are served, images
fetched/decoded under the media policy, the chat template and processor, prompt length against
`max_model_len`, `max_tokens` defaults and limits, and the response and chunk shapes with usage
counting image tokens. It does not know HTTP routing or auth (`server.api`) nor batching
(`server.engine`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from server.engine import (
    Engine,
    EngineOverloaded,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
)
from server.engine.engine import EngineStopped
from server.errors import APIError, bad_request, model_not_found, overloaded, unavailable
from server.media import load_request_images
from server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)

#: The chat template and processor (image resizing, patching) run here, off the event loop, so
#: a large image does not stall every HTTP connection. One thread with one torch thread: a
#: bigger OpenMP team would fight the engine's for the cores.
_PREPROCESS = ThreadPoolExecutor(
    max_workers=1,
    thread_name_prefix="veq-preprocess",
    initializer=torch.set_num_threads,
    initargs=(1,),
)


class ChatService:
    def __init__(self, engine: Engine, settings: Any) -> None:
        self.engine = engine
        self.settings = settings
        self._preprocessing = 0  # requests waiting for or in the preprocessing thread

    @property
    def model_names(self) -> list[str]:
        return [self.engine.runner.info.name]

    # -- request → engine ------------------------------------------------------------------

    async def _messages(
        self, req: ChatCompletionRequest
    ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """OpenAI messages → template messages with `{"type": "image"}` parts, and the images
        (counted against the limit, then fetched/decoded under the media policy)."""
        images = await load_request_images(req.messages, self.settings)
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if m.content is None or isinstance(m.content, str):
                messages.append({"role": role, "content": m.content or ""})
                continue
            parts = [
                {"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
                for part in m.content
            ]
            messages.append({"role": role, "content": parts})
        return messages, images

    def _encode(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, Any]:
        processor = self.engine.runner.processor
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        return dict(processor(**kwargs))

    async def prepare(self, req: ChatCompletionRequest) -> GenerationRequest:
        if req.model not in self.model_names:
            raise model_not_found(req.model, self.model_names)
        messages, images = await self._messages(req)
        # Requests waiting for the preprocessing thread hold decoded images: bounded like the
        # engine's queue, and answered 503 beyond it.
        if self._preprocessing >= self.settings.max_queue:
            raise overloaded(1.0, "The server is at capacity (preprocessing queue full).")
        self._preprocessing += 1
        try:
            loop = asyncio.get_running_loop()
            inputs = await loop.run_in_executor(_PREPROCESS, self._encode, messages, images)
        except (ValueError, TypeError) as exc:
            raise bad_request(f"cannot build the prompt: {exc}", param="messages") from None
        finally:
            self._preprocessing -= 1
        prompt = int(inputs["input_ids"].shape[-1])
        limit = self.settings.max_model_len
        if prompt >= limit:
            raise bad_request(
                f"the prompt is {prompt} tokens (images included) but this server's context is "
                f"{limit}; shorten the conversation or send fewer or smaller images",
                param="messages",
                code="context_length_exceeded",
            )
        requested = req.requested_max_tokens
        cap = self.settings.max_tokens_limit
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if requested is not None and requested > cap:
            raise bad_request(f"{param} must be at most {cap}, got {requested}", param=param)
        if requested is not None and prompt + requested > limit:
            raise bad_request(
                f"{prompt} prompt tokens + {param} {requested} exceed the context of {limit}",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = requested if requested is not None else min(cap, limit - prompt)
        if req.min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({req.min_tokens}) must not exceed the token limit ({max_tokens})",
                param="min_tokens",
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=tuple(req.stop_strings),
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
        )
        return GenerationRequest(inputs=inputs, params=params)

    async def _events(self, gen: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """The engine's events; admission failures (queue full, draining) become HTTP errors
        on the first iteration, before anything was sent."""
        stream = self.engine.generate(gen)
        try:
            first = await stream.__anext__()
        except EngineOverloaded as exc:
            raise overloaded(1.0, f"The server is at capacity ({exc}); retry shortly.") from None
        except EngineStopped:
            raise unavailable("The server is shutting down; retry on another replica.") from None
        try:
            yield first
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    # -- engine → response -----------------------------------------------------------------

    def _fingerprint(self) -> str:
        info = self.engine.runner.info
        return f"veq-{info.method}-w{info.bits}"

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        gen = await self.prepare(req)
        text: list[str] = []
        finish = "stop"
        usage = Usage(
            prompt_tokens=gen.prompt_tokens, completion_tokens=0, total_tokens=gen.prompt_tokens
        )
        async for event in self._events(gen):
            text.append(event.text)
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    raise _engine_error(event)
                finish = event.finish_reason
                usage = Usage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    total_tokens=event.prompt_tokens + event.completion_tokens,
                )
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=req.model,
            choices=[Choice(message=AssistantMessage(content="".join(text)), finish_reason=finish)],
            usage=usage,
            system_fingerprint=self._fingerprint(),
        )

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """SSE lines: a role chunk, content chunks, the finish chunk, optional usage, [DONE].

        Validation and admission errors are raised before the first line (so they become an
        HTTP error, not a broken stream)."""
        gen = await self.prepare(req)
        events = self._events(gen)
        first = await events.__anext__()
        if first.finish_reason == "error":  # nothing sent yet: an HTTP error, not a stream
            await events.aclose()  # type: ignore[attr-defined]
            raise _engine_error(first)
        return self._sse(req, gen, first, events)

    async def _sse(
        self,
        req: ChatCompletionRequest,
        gen: GenerationRequest,
        first: GenerationEvent,
        events: AsyncIterator[GenerationEvent],
    ) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        fp = self._fingerprint()

        def chunk(delta: Delta, finish: str | None = None) -> str:
            return ChatCompletionChunk(
                id=cid,
                created=created,
                model=req.model,
                system_fingerprint=fp,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            ).sse()

        yield chunk(Delta(role="assistant", content=""))
        event = first
        try:
            while True:
                if event.finish_reason == "error":
                    err = _engine_error(event)
                    yield f"data: {json.dumps(err.body(), separators=(',', ':'))}\n\n"
                    break
                if event.text:
                    yield chunk(Delta(content=event.text))
                if event.finish_reason is not None:
                    yield chunk(Delta(), event.finish_reason)
                    if req.include_usage:
                        usage = Usage(
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            total_tokens=event.prompt_tokens + event.completion_tokens,
                        )
                        yield ChatCompletionChunk(
                            id=cid,
                            created=created,
                            model=req.model,
                            system_fingerprint=fp,
                            choices=[],
                            usage=usage,
                        ).sse()
                    break
                event = await events.__anext__()
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()
            await events.aclose()  # type: ignore[attr-defined]


def _engine_error(event: GenerationEvent) -> APIError:
    """The OpenAI-shaped error for an engine's final error event (500, or 503 to retry)."""
    code = "engine_overloaded" if event.error_status == 503 else "engine_error"
    headers = {"Retry-After": "1"} if event.error_status == 503 else None
    return APIError(
        event.error_status,
        event.error or "generation failed on the server; retry",
        code=code,
        headers=headers,
    )
