"""Failures stay local: a prefill that raises or runs out of memory ends that admission's requests
with an error, a row whose logits are not finite ends alone, a decode step that raises ends its
batch; every client gets a final event within a timeout, and later requests succeed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
import torch

from server.engine import Engine, GenerationEvent, GenerationRequest, SamplingParams
from server.engine.runner import ModelInfo, ModelRunner
from veq.models.processor import build_processor
from veq.testing import tiny_model

POISON = 7  # a prompt whose first token is this id triggers the prefill faults
LONG = 30  # decode faults hit the rows of prompts at least this long


class FaultyRunner(ModelRunner):
    """The real runner, with faults injected for prompts that start with `POISON`."""

    def __init__(self, *args, fault: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fault = fault
        self.poisoned_rows: list[bool] = []

    def prefill(self, inputs: list[dict]) -> list:
        poisoned = [int(x["input_ids"][0, 0]) == POISON for x in inputs]
        if any(poisoned) and self.fault == "prefill-raises":
            raise RuntimeError("injected prefill failure")
        if any(poisoned) and self.fault == "prefill-oom":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        out = super().prefill(inputs)
        if self.fault == "prefill-nan":
            for pre, bad in zip(out, poisoned, strict=True):
                if bad:
                    pre.logits[3] = float("nan")
        self.poisoned_rows += poisoned
        return out

    def decode(self, last, positions, kv) -> torch.Tensor:
        logits = super().decode(last, positions, kv)
        long_rows = positions >= LONG  # rows of the long prompt
        if self.fault == "decode-nan":
            logits[long_rows] = float("nan")
        if self.fault == "decode-raises" and bool(long_rows.any()):
            raise RuntimeError("injected decode failure")
        return logits


@pytest.fixture(scope="module")
def parts():
    processor = build_processor()
    return tiny_model("qwen3_vl_moe", processor), processor


def _prompt(first: int, length: int = 12) -> dict:
    ids = torch.tensor([[first, *range(40, 40 + length - 1)]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _engine(parts, fault: str) -> Engine:
    model, processor = parts
    runner = FaultyRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0), fault=fault)
    runner.eos_ids = set()
    engine = Engine(runner, max_batch=8)
    engine.start()
    return engine


def _run_all(engine: Engine, prompts: list[dict], params: Callable[[int], SamplingParams]):
    """Every request's events, gathered with a timeout: a hang fails the test."""

    async def one(i: int, inputs: dict) -> list[GenerationEvent]:
        return [e async for e in engine.generate(GenerationRequest(inputs, params(i)))]

    async def run():
        return await asyncio.wait_for(
            asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))), timeout=60
        )

    return asyncio.run(run())


def _greedy(n: int) -> Callable[[int], SamplingParams]:
    return lambda i: SamplingParams(max_tokens=n, temperature=0)


@pytest.mark.parametrize(
    ("fault", "status"), [("prefill-raises", 500), ("prefill-oom", 503), ("prefill-nan", 500)]
)
def test_a_failed_prefill_ends_its_requests_and_the_engine_goes_on(parts, fault, status):
    engine = _engine(parts, fault)
    try:
        # The poisoned prompt is prefilled with a healthy one (one admission): a raising prefill
        # fails both, a NaN row fails alone.
        events = _run_all(engine, [_prompt(POISON), _prompt(11)], _greedy(4))
        for got in events[: 2 if fault != "prefill-nan" else 1]:
            (last,) = got
            assert last.finish_reason == "error" and last.error_status == status
            assert "prefill" in last.error and "Traceback" not in last.error
        if fault == "prefill-nan":
            assert events[1][-1].finish_reason == "length" and len(events[1]) == 4
        # Later requests are served normally.
        (later,) = _run_all(engine, [_prompt(12)], _greedy(3))
        assert later[-1].finish_reason == "length" and sum(len(e.token_ids) for e in later) == 3
        assert engine.drain(timeout=5)  # nothing left running or waiting
    finally:
        engine.stop()


def test_a_non_finite_row_ends_alone_mid_batch(parts):
    engine = _engine(parts, "decode-nan")
    try:
        events = _run_all(engine, [_prompt(20, LONG), _prompt(21), _prompt(22)], _greedy(6))
        (first, last) = events[0][0], events[0][-1]
        assert len(first.token_ids) == 1  # its prefill token came through, then decode failed
        assert last.finish_reason == "error" and "non-finite" in last.error
        for got in events[1:]:
            assert got[-1].finish_reason == "length" and sum(len(e.token_ids) for e in got) == 6
    finally:
        engine.stop()


def test_a_raising_decode_step_ends_its_batch_and_the_engine_goes_on(parts):
    engine = _engine(parts, "decode-raises")
    try:
        events = _run_all(engine, [_prompt(30, LONG), _prompt(31)], _greedy(5))
        for got in events:
            assert sum(e.finish_reason is not None for e in got) == 1  # one final event each
            assert got[-1].finish_reason == "error" and "decode" in got[-1].error
        (later,) = _run_all(engine, [_prompt(32)], _greedy(4))
        assert later[-1].finish_reason == "length" and sum(len(e.token_ids) for e in later) == 4
    finally:
        engine.stop()


def test_http_clients_get_an_openai_error_not_a_hang(server_factory, png):
    """Through the server: a prefill that raises answers 500 (non-streaming) and, streaming,
    an HTTP error before any chunk; the next request is answered."""
    live = server_factory()
    state = live.state
    runner = state.chat.engine.runner
    real = runner.prefill
    calls = {"n": 0}

    def failing(inputs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("injected")
        return real(inputs)

    runner.prefill = failing
    headers = {"Authorization": "Bearer test-key"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    r = httpx.post(
        f"{live.url}/v1/chat/completions", json=body | {"stream": True}, headers=headers, timeout=30
    )
    assert r.status_code == 500 and "prefill" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_stream_that_fails_mid_way_ends_with_an_error_chunk_then_done(server_factory):
    live = server_factory()
    runner = live.state.chat.engine.runner
    real = runner.decode
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(*args)

    runner.decode = failing
    headers = {"Authorization": "Bearer test-key"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with httpx.stream(
        "POST",
        f"{live.url}/v1/chat/completions",
        json=body | {"stream": True},
        headers=headers,
        timeout=30,
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))
    assert error["error"]["code"] == "engine_error" and "decode" in error["error"]["message"]
    assert all('"finish_reason":"stop"' not in line for line in lines)
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_a_failure_at_the_first_token_frees_its_slot(parts, chunked):
    """With one KV slot, a request whose first token fails (here: the observer raises) must
    give its slot back, or the next request would wait forever."""
    from server.engine.engine import EngineObserver

    model, processor = parts
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = set()
    calls = {"n": 0}

    def first_token(_: float) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")

    engine = Engine(
        runner,
        max_batch=4,
        kv_slots=1,
        max_step_tokens=16 if chunked else None,
        observer=EngineObserver(on_first_token=first_token),
    )
    engine.start()
    try:
        (first,) = _run_all(engine, [_prompt(40, 24)], _greedy(3))
        assert first[-1].finish_reason == "error"
        (second,) = _run_all(engine, [_prompt(41, 24)], _greedy(3))
        assert second[-1].finish_reason == "length"
        assert engine.drain(timeout=5)  # the final event comes just before the slot is freed
        assert engine.kv_stats()["free_slots"] == 1
    finally:
        engine.stop()


def test_stop_ends_running_requests(parts):
    engine = _engine(parts, "none")

    async def run() -> list[GenerationEvent]:
        req = GenerationRequest(_prompt(50), SamplingParams(max_tokens=100_000, temperature=0))
        events = []
        async for event in engine.generate(req):
            events.append(event)
            if len(events) == 3:
                asyncio.get_running_loop().run_in_executor(None, engine.stop)
        return events

    events = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert events[-1].finish_reason == "cancelled"


def test_a_raising_fused_step_ends_its_rows_and_the_chunked_prompt(parts):
    """A decode forward that carries a long prompt's chunk and raises ends both the batch's
    rows and that prompt, each with one error; the engine serves on."""
    model, processor = parts
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = set()
    real = runner.decode_and_chunk
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fused failure")
        return real(*args)

    runner.decode_and_chunk = failing
    engine = Engine(runner, max_batch=8, max_step_tokens=16)
    engine.start()
    try:

        async def run():
            short = GenerationRequest(_prompt(40, 8), SamplingParams(max_tokens=50, temperature=0))
            long = GenerationRequest(_prompt(41, 60), SamplingParams(max_tokens=3, temperature=0))
            queue = engine.submit(short)
            first = await asyncio.wait_for(queue.get(), 30)  # decoding before the long one comes
            events = [first]

            async def rest(q):
                out = []
                while not out or out[-1].finish_reason is None:
                    out.append(await q.get())
                return out

            long_events = asyncio.create_task(rest(engine.submit(long)))
            events += await asyncio.wait_for(rest(queue), 30)
            return events, await asyncio.wait_for(long_events, 30)

        rows, chunked = asyncio.run(run())
        assert calls["n"] >= 1
        for got in (rows, chunked):
            assert sum(e.finish_reason is not None for e in got) == 1
            assert got[-1].finish_reason == "error"
        assert "decode" in rows[-1].error and "prefill" in chunked[-1].error
        (later,) = _run_all(engine, [_prompt(42, 40)], _greedy(4))
        assert later[-1].finish_reason == "length" and sum(len(e.token_ids) for e in later) == 4
        assert engine.drain(timeout=5)  # the last slot is freed just after its final event
        assert engine.kv_stats()["free_slots"] == engine.kv_stats()["slots"]
    finally:
        engine.stop()


def test_a_non_finite_row_in_a_fused_step_still_ends_alone(parts):
    """In the fused forward a NaN in one row reaches every row through attention (simulated
    here: all rows' logits NaN). The step is undone and run apart, so that only the bad row
    ends, the healthy row decodes on, and the chunked prompt completes."""
    model, processor = parts
    runner = FaultyRunner(
        model, processor, ModelInfo("tiny", "none", 16, None, 0), fault="decode-nan"
    )
    runner.eos_ids = set()
    real = runner.decode_and_chunk
    fused = {"n": 0}

    def spreading(tokens, positions, job, kv):
        fused["n"] += 1
        logits, first = real(tokens, positions, job, kv)
        if bool((positions >= LONG).any()):
            logits[:] = float("nan")
        return logits, first

    runner.decode_and_chunk = spreading
    engine = Engine(runner, max_batch=8, max_step_tokens=40)
    engine.start()
    try:

        async def run():
            async def collect(q):
                out = []
                while not out or out[-1].finish_reason is None:
                    out.append(await q.get())
                return out

            bad = engine.submit(GenerationRequest(_prompt(50, LONG), _greedy(8)(0)))
            good = engine.submit(GenerationRequest(_prompt(51, 12), _greedy(8)(0)))
            first_bad, first_good = await bad.get(), await good.get()
            # One token: its decode rows would sit past LONG, where the fault NaNs every row.
            long = engine.submit(GenerationRequest(_prompt(52, 60), _greedy(1)(0)))
            got = await asyncio.wait_for(
                asyncio.gather(collect(bad), collect(good), collect(long)), 30
            )
            return [first_bad, *got[0]], [first_good, *got[1]], got[2]

        bad, good, long = asyncio.run(run())
        assert fused["n"] >= 1
        assert bad[-1].finish_reason == "error" and "non-finite" in bad[-1].error
        assert good[-1].finish_reason == "length" and sum(len(e.token_ids) for e in good) == 8
        assert long[-1].finish_reason == "length" and sum(len(e.token_ids) for e in long) == 1
        assert engine.drain(timeout=5)
        assert engine.kv_stats()["free_slots"] == engine.kv_stats()["slots"]
    finally:
        engine.stop()
