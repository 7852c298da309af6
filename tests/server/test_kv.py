"""The KV cache's slots: preallocated from a budget, joins and leaves that move no other
sequence's cache, admission by free slots, and a budget too small failing at start-up."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from server.app import kv_slots
from server.engine.kv import KVBudgetError, KVGeometry, KVPool
from server.engine.runner import ModelInfo, ModelRunner
from veq.models.processor import build_processor
from veq.testing import tiny_model


def _prefill(n: int, seed: int, g: KVGeometry) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, g.heads, n, g.dk, generator=gen) for _ in range(g.layers)]
    values = [torch.randn(1, g.heads, n, g.dv, generator=gen) for _ in range(g.layers)]
    return keys, values


def test_joins_and_leaves_move_no_other_sequence():
    g = KVGeometry(layers=2, heads=2, dk=8, dv=4, dtype=torch.float32)
    pool = KVPool(g, slots=4, max_len=32)
    storage = [t.data_ptr() for t in pool.keys + pool.values]
    slots = [pool.allocate() for _ in range(3)]
    assert slots == [0, 1, 2]
    for slot, n in zip(slots, (5, 9, 3), strict=True):
        pool.write(slot, *_prefill(n, slot, g))
    before = [t.clone() for t in pool.keys + pool.values]
    pool.release(1)  # a sequence leaves ...
    assert pool.allocate() == 1  # ... and the next one takes the lowest free slot
    pool.write(1, *_prefill(7, 10, g))
    after = pool.keys + pool.values
    assert [t.data_ptr() for t in after] == storage  # nothing was reallocated
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old[0], new[0]) and torch.equal(old[2], new[2])
    assert pool.lengths.tolist() == [5, 7, 3, 0] and pool.used_tokens() == 15
    assert pool.free_slots == 1 and pool.capacity_tokens == 128
    assert pool.nbytes() == 4 * 32 * g.bytes_per_token


def test_a_batch_of_scattered_slots_attends_to_its_own_rows():
    g = KVGeometry(layers=1, heads=1, dk=4, dv=4, dtype=torch.float32)
    pool = KVPool(g, slots=4, max_len=16)
    for slot in range(4):
        assert pool.allocate() == slot
        pool.write(slot, *_prefill(slot + 2, slot, g))
    batch = pool.batch([3, 1])  # not contiguous: gathered for the step
    mask = batch.begin_step()
    assert mask.shape == (2, 1, 1, 6)  # the longest row (5) + the new position
    new_k, new_v = torch.ones(2, 1, 1, 4), 2 * torch.ones(2, 1, 1, 4)
    k, v = batch.update(new_k, new_v, 0)
    assert torch.equal(k[0, 0, 5], torch.ones(4)) and torch.equal(k[1, 0, 3], torch.ones(4))
    assert torch.equal(k[0, 0, :5], pool.keys[0][3, 0, :5])
    assert torch.isinf(mask[1, 0, 0, 4:]).all() and (mask[1, 0, 0, :4] == 0).all()
    batch.end_step()
    assert pool.lengths.tolist() == [2, 4, 4, 6]


class _Settings:
    max_batch, max_model_len, gpu_memory_utilization, cuda_graphs = 16, 512, 0.9, False

    def __init__(self, kv_cache_memory: int | None) -> None:
        self.kv_cache_memory = kv_cache_memory


def test_budget_to_slots():
    processor = build_processor()
    model = tiny_model("qwen3_vl_moe", processor)
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    per_seq = runner.kv_geometry().bytes_per_token * 512
    assert kv_slots(_Settings(None), runner) == 16  # CPU default: one per batch row
    assert kv_slots(_Settings(3 * per_seq + 1), runner) == 3
    assert kv_slots(_Settings(100 * per_seq), runner) == 16  # never more than --max-batch
    with pytest.raises(KVBudgetError, match="holds no sequence of --max-model-len 512"):
        kv_slots(_Settings(per_seq - 1), runner)


def test_a_budget_too_small_fails_at_start_with_the_reason(server_factory):
    live = server_factory(start=False, kv_cache_memory=1000)
    with pytest.raises(RuntimeError, match="KV-cache budget"):
        live.start()
    r = httpx.get(f"{live.url}/ready", timeout=5)
    assert r.status_code == 503 and "KV-cache budget" in r.json()["error"]["message"]


def test_stats_and_metrics_report_kv_capacity_and_use(server_factory):
    live = server_factory(kv_cache_memory=None, max_batch=4)
    stats = httpx.get(f"{live.url}/admin/stats", headers={"Authorization": "Bearer admin-key"})
    kv = stats.json()["kv_cache"]
    assert kv["slots"] == 4 and kv["slot_tokens"] == 512 and kv["capacity_tokens"] == 2048
    assert kv["reserved_bytes"] == 4 * kv["bytes_per_sequence"] and kv["used_tokens"] == 0
    text = httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer test-key"}).text
    assert "veq_kv_cache_capacity_tokens 2048.0" in text and "veq_kv_cache_free_slots 4.0" in text


def test_a_freed_slot_holds_nothing_of_its_last_sequence():
    g = KVGeometry(layers=1, heads=1, dk=2, dv=2, dtype=torch.float32)
    pool = KVPool(g, slots=2, max_len=8)
    slot = pool.allocate()
    keys, values = _prefill(5, 0, g)
    keys[0][0, 0, 2] = float("nan")  # a failed row's cache
    pool.write(slot, keys, values)
    pool.release(slot)
    assert torch.count_nonzero(pool.keys[0][slot]) == 0 and not pool.keys[0].isnan().any()


def test_64_streams_under_a_budget_of_three_sequences_all_end(server_factory):
    """The issue's acceptance: a KV budget that holds 3 sequences, 64 concurrent streaming
    requests. Each ends within its timeout with an answer, or with 503 and Retry-After when the
    queue is full; the batch never outgrows the budget, and the server serves on afterwards."""
    processor = build_processor()
    model = tiny_model("qwen3_vl_moe", processor)
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    per_seq = runner.kv_geometry().bytes_per_token * 512
    live = server_factory(kv_cache_memory=3 * per_seq + 100, max_queue=24)
    auth = {"Authorization": "Bearer test-key"}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "count the shapes"}],
        "max_tokens": 12,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, int]:
        async with client.stream("POST", "/v1/chat/completions", json=body | {"seed": i}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            if r.status_code != 200:
                return r.status_code, r.headers.get("retry-after"), 0
            assert lines[-1] == "data: [DONE]"
            usage = json.loads(lines[-2][6:])["usage"]
            return r.status_code, None, usage["completion_tokens"]

    async def run() -> list[tuple[int, str | None, int]]:
        async with httpx.AsyncClient(base_url=live.url, headers=auth, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 120)

    results = asyncio.run(run())
    answered = [n for status, _, n in results if status == 200]
    refused = [retry for status, retry, _ in results if status == 503]
    assert len(answered) + len(refused) == 64, sorted({s for s, _, _ in results})
    assert len(answered) >= 24 and all(n == 12 for n in answered)
    assert all(retry is not None and int(retry) >= 1 for retry in refused)
    assert live.state.engine.max_batch_seen <= 3
    assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
    after = httpx.post(
        f"{live.url}/v1/chat/completions", json=body | {"stream": False}, headers=auth, timeout=60
    )
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 12


def test_release_clears_what_a_failed_step_wrote_and_twice_is_once():
    """A chunk (or decode) step that raised wrote past the slot's length without advancing
    it: release clears those positions too. Releasing a free slot again changes nothing, so
    the next two allocations get two different slots."""
    g = KVGeometry(layers=1, heads=1, dk=2, dv=2, dtype=torch.float32)
    pool = KVPool(g, slots=2, max_len=16)
    slot = pool.allocate()
    pool.write(slot, *_prefill(3, 0, g))
    chunk = pool.chunk(slot, 5)
    nan = torch.full((1, 1, 5, 2), float("nan"))
    chunk.update(nan, nan, 0)  # ... and then the forward raised: no end_step
    assert int(pool.lengths[slot]) == 3 and pool.keys[0][slot].isnan().any()
    pool.release(slot)
    pool.release(slot)
    assert not pool.keys[0].isnan().any() and torch.count_nonzero(pool.keys[0]) == 0
    assert pool.free_slots == 2 and sorted([pool.allocate(), pool.allocate()]) == [0, 1]
    assert pool.allocate() is None
