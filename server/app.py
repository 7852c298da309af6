"""The FastAPI application: `build_app(settings, engine=None)`.

With an engine (tests), it serves that engine at once. Without, start-up loads the model on a
background thread (quantize or load from the cache, progress in the log and in `/ready`'s
message) while `/health` answers and `/ready` says 503; a failed load keeps the server up and
`/ready` failing with the reason. Shutdown drains running requests up to `drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI

import veq
from server.api import admin, openai, ops
from server.api.deps import AppState
from server.engine import Engine
from server.engine.kv import KVBudgetError
from server.engine.requant import Requantizer
from server.engine.runner import ModelRunner
from server.errors import install_body_limit, install_error_handlers
from server.loader import build_runner
from server.metrics import Metrics
from server.serving.chat import ChatService

log = logging.getLogger(__name__)

#: (settings, overrides, on_layer) -> runner; `build_runner` unless a test injects another.
Factory = Callable[[Any, dict[str, Any], Callable[[int, int], None]], ModelRunner]


def _factory_for(settings: Any, factory: Factory) -> Callable[..., ModelRunner]:
    def build(overrides: dict[str, Any], on_layer: Callable[[int, int], None]) -> ModelRunner:
        return factory(settings, overrides, on_layer)

    return build


#: The default step budget (`--max-step-tokens`). On the 2-core CPU we measure on, 96 keeps the
#: largest decode gap under four 3,750-token prompts within 5× a steady step (128 hovers around
#: it), at the price of slower long prefills (BENCHMARKS "Decode stalls"). On a GPU a step's
#: fixed cost is mostly launches; 2048 is of the order vLLM's chunked prefill uses.
STEP_TOKENS = {"cpu": 96, "cuda": 2048}


def kv_slots(settings: Any, runner: ModelRunner) -> int:
    """KV slots of `max_model_len` tokens the budget holds, at most `max_batch`.

    The budget: `kv_cache_memory` bytes when set; on CUDA, what `gpu_memory_utilization` of the
    device leaves after what is already allocated (the loaded model); on CPU, one slot per
    batch row. Raises `KVBudgetError` (so start-up fails with the reason, not a request later)
    when it holds no sequence at all."""
    geometry = runner.kv_geometry()
    per_seq = geometry.bytes_per_token * settings.max_model_len
    if settings.kv_cache_memory is not None:
        budget = settings.kv_cache_memory
    elif runner.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(runner.device)
        budget = int(settings.gpu_memory_utilization * total) - (total - free)
    else:
        return settings.max_batch
    # CUDA graphs pad batches into one more slot (`KVPool.padding_slot`), inside the budget.
    slots = geometry.slots_for(max(budget, 0), settings.max_model_len) - int(settings.cuda_graphs)
    if slots < 1:
        raise KVBudgetError(
            f"the KV-cache budget ({max(budget, 0) / 2**20:.0f} MiB) holds no sequence of "
            f"--max-model-len {settings.max_model_len} ({per_seq / 2**20:.1f} MiB each): lower "
            "--max-model-len or raise --kv-cache-memory / --gpu-memory-utilization"
        )
    return min(slots, settings.max_batch)


def _attach(state: AppState, engine: Engine, factory: Factory) -> None:
    state.engine = engine
    state.chat = ChatService(engine, state.settings)
    state.requant = Requantizer(engine, _factory_for(state.settings, factory))


def build_app(
    settings: Any,
    engine: Engine | None = None,
    *,
    factory: Factory | None = None,
) -> FastAPI:
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics)
    make = factory or (lambda s, o, cb: build_runner(s, o, cb, progress=True))

    def load(threads: int) -> None:
        torch.set_num_threads(threads)  # OpenMP settings are per OS thread

        def progress(layer: int, layers: int) -> None:
            state.loading.update(layer=layer, layers=layers)

        try:
            runner = make(settings, {}, progress)
            slots = kv_slots(settings, runner)
            eng = Engine(
                runner,
                max_batch=settings.max_batch,
                max_queue=settings.max_queue,
                max_model_len=settings.max_model_len,
                kv_slots=slots,
                max_step_tokens=settings.max_step_tokens
                or STEP_TOKENS.get(runner.device.type, 2048),
                cuda_graphs=settings.cuda_graphs,
                observer=metrics.observer(),
            )
            log.info(
                "KV cache: %d slots of %d tokens, %.1f MiB reserved",
                slots,
                settings.max_model_len,
                eng.kv_bytes() / 2**20,
            )
            eng.start()
            _attach(state, eng, make)
            log.info(
                "serving %s (%s, %d-bit)", runner.info.name, runner.info.method, runner.info.bits
            )
        except Exception as exc:  # the server stays up and /ready reports it
            log.exception("model load failed")
            state.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.observer = metrics.observer()
            engine.start()
            _attach(state, engine, make)
        else:
            threading.Thread(
                target=load, args=(torch.get_num_threads(),), name="veq-load", daemon=True
            ).start()
        yield
        if state.engine is not None:
            drained = await asyncio.to_thread(state.engine.drain, settings.drain_timeout_s)
            if not drained:
                log.warning("drain timeout: cancelling %d running requests", state.engine.active)
            state.engine.stop()

    app = FastAPI(
        title="veq",
        version=veq.__version__,
        description="OpenAI-compatible chat for quantized MoE vision-language models.",
        lifespan=lifespan,
    )
    app.state.veq = state
    install_error_handlers(app)
    install_body_limit(app, settings.max_body_bytes)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    return app
