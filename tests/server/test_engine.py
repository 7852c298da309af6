"""The engine against the model itself: batched prefill + batched decode = one-by-one greedy."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import Engine, GenerationRequest, SamplingParams
from server.engine.kv import KVPool
from server.engine.runner import ModelInfo, ModelRunner
from veq.calib.sources import builtin_conversations
from veq.models.processor import build_processor
from veq.testing import tiny_model


@pytest.fixture(scope="module")
def setup():
    processor = build_processor()
    model = tiny_model("qwen3_vl_moe", processor)
    prompts = []
    for conv in builtin_conversations(4, seed=1):  # three with photos of different sizes, one text
        text = processor.apply_chat_template(
            list(conv.messages[:1]), tokenize=False, add_generation_prompt=True
        )
        kwargs = {"text": [text], "return_tensors": "pt"}
        if conv.images:
            kwargs["images"] = list(conv.images)
        prompts.append(dict(processor(**kwargs)))
    return model, processor, prompts


def greedy_reference(model, inputs: dict, n: int) -> list[int]:
    """Full recomputation each step, no cache: the ground truth."""
    cur = dict(inputs)
    out = []
    for _ in range(n):
        with torch.no_grad():
            token = int(model(**cur).logits[0, -1].argmax())
        out.append(token)
        one = torch.tensor([[token]])
        cur["input_ids"] = torch.cat([cur["input_ids"], one], 1)
        cur["attention_mask"] = torch.ones_like(cur["input_ids"])
        if "mm_token_type_ids" in cur:
            zero = torch.zeros(1, 1, dtype=cur["mm_token_type_ids"].dtype)
            cur["mm_token_type_ids"] = torch.cat([cur["mm_token_type_ids"], zero], 1)
    return out


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["dynamic", "fixed-shapes"])
def test_batched_engine_matches_greedy_reference(setup, fixed_shapes):
    """Fixed shapes: batches padded to a bucket, inputs in device buffers (the step a CUDA
    graph captures, here run eagerly) decode the same tokens."""
    model, processor, prompts = setup
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = set()  # a random model: compare full lengths
    engine = Engine(runner, max_batch=8, fixed_shapes=fixed_shapes)
    engine.start()

    async def run() -> list[list[int]]:
        async def one(inputs: dict) -> list[int]:
            req = GenerationRequest(inputs, SamplingParams(max_tokens=8, temperature=0))
            tokens: list[int] = []
            async for event in engine.generate(req):
                tokens += event.token_ids
            return tokens

        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        got = asyncio.run(run())
    finally:
        engine.stop()
    assert engine.max_batch_seen == len(prompts)  # all four decoded together
    for inputs, tokens in zip(prompts, got, strict=True):
        assert tokens == greedy_reference(model, inputs, 8)


def test_cancelled_request_leaves_the_batch(setup):
    model, processor, prompts = setup
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = set()
    engine = Engine(runner, max_batch=8)
    engine.start()

    async def run() -> int:
        req = GenerationRequest(prompts[0], SamplingParams(max_tokens=200, temperature=0))
        seen = 0
        async for _event in engine.generate(req):
            seen += 1
            if seen == 3:
                break  # closing the stream cancels the request
        for _ in range(100):
            if engine.active == 0:
                break
            await asyncio.sleep(0.02)
        return seen

    try:
        assert asyncio.run(run()) == 3
        kv = engine.kv_stats()
        assert engine.active == 0 and kv["used_tokens"] == 0 and kv["free_slots"] == kv["slots"]
    finally:
        engine.stop()


def _tokens_and_finish(engine: Engine, inputs: dict, params: SamplingParams):
    async def run() -> tuple[list[int], str | None]:
        tokens: list[int] = []
        finish = None
        async for event in engine.generate(GenerationRequest(inputs, params)):
            tokens += event.token_ids
            finish = event.finish_reason or finish
        return tokens, finish

    return asyncio.run(run())


def test_eos_stops_unless_ignored_and_min_tokens_suppresses_it(setup):
    model, processor, prompts = setup
    reference = greedy_reference(model, prompts[0], 6)
    eos = reference[2]  # pretend the third greedy token ends the sequence
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = {eos}
    engine = Engine(runner, max_batch=8)
    engine.start()
    try:
        tokens, finish = _tokens_and_finish(
            engine, prompts[0], SamplingParams(max_tokens=6, temperature=0)
        )
        first_eos = reference.index(eos)
        assert (tokens, finish) == (reference[: first_eos + 1], "stop")

        # ignore_eos (vLLM's fixed-length mode): the same greedy tokens, all max_tokens of them.
        tokens, finish = _tokens_and_finish(
            engine, prompts[0], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        )
        assert (tokens, finish) == (reference, "length")

        # min_tokens: the end token cannot be sampled before 5 tokens exist.
        tokens, finish = _tokens_and_finish(
            engine, prompts[0], SamplingParams(max_tokens=6, temperature=0, min_tokens=5)
        )
        assert eos not in tokens[:5] and len(tokens) >= 5
        assert tokens[:first_eos] == reference[:first_eos]
    finally:
        engine.stop()


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["dynamic", "fixed-shapes"])
def test_requests_beyond_the_free_kv_slots_wait_and_match_greedy(setup, fixed_shapes):
    model, processor, _ = setup
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = set()
    engine = Engine(runner, max_batch=8, max_model_len=64, kv_slots=2, fixed_shapes=fixed_shapes)
    engine.start()
    prompts = []
    for i in range(5):
        ids = torch.tensor([[10 + i, *range(40, 44 + 3 * i)]])
        prompts.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    lengths = [7, 3, 5, 2, 6]  # sequences end at different steps: later ones take freed slots

    async def run():
        async def one(inputs, n):
            req = GenerationRequest(inputs, SamplingParams(max_tokens=n, temperature=0))
            return [t async for e in engine.generate(req) for t in e.token_ids]

        return await asyncio.wait_for(
            asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True))), 120
        )

    try:
        got = asyncio.run(run())
    finally:
        engine.stop()
    assert engine.max_batch_seen == 2  # two slots: never more rows than that
    for inputs, n, tokens in zip(prompts, lengths, got, strict=True):
        assert tokens == greedy_reference(model, inputs, n)
    assert engine.kv_stats()["free_slots"] == 2


def test_chunked_prefill_fills_the_same_cache_and_logits(setup):
    """A prompt prefilled 7 positions at a time (images included: deepstack features land on
    the chunk holding their tokens) leaves the cache and first-token logits of a whole one."""
    model, processor, prompts = setup
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    pool = KVPool(runner.kv_geometry(), 2, 512)
    for inputs in prompts:
        whole = runner.prefill([inputs])[0]
        job = runner.start_prefill(inputs)
        slot = pool.allocate()
        logits = None
        while logits is None:
            logits = runner.prefill_chunk(job, pool.chunk(slot, min(7, job.remaining)))
        n = job.length
        assert job.next_position == whole.next_position and int(pool.lengths[slot]) == n
        torch.testing.assert_close(logits, whole.logits, rtol=1e-4, atol=1e-4)
        for layer, key in enumerate(whole.keys):
            torch.testing.assert_close(pool.keys[layer][slot, :, :n], key[0], rtol=1e-4, atol=1e-5)
        pool.release(slot)


def test_long_prompts_prefill_in_chunks_between_decode_steps_and_match_greedy(setup):
    model, processor, prompts = setup
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    runner.eos_ids = set()
    # Every prompt is longer than 24 positions: all of them go through chunked prefill while
    # the ones already prefilled decode.
    assert all(p["input_ids"].shape[1] > 24 for p in prompts)
    engine = Engine(runner, max_batch=8, max_step_tokens=24)
    engine.start()
    chunks, fused = [], []
    real, real_fused = runner.prefill_chunk, runner.decode_and_chunk

    def spy(job, kv):
        chunks.append(kv.n)
        return real(job, kv)

    def spy_fused(tokens, positions, job, kv):
        fused.append(kv.chunk.n)
        return real_fused(tokens, positions, job, kv)

    runner.prefill_chunk, runner.decode_and_chunk = spy, spy_fused

    async def run() -> list[list[int]]:
        async def one(inputs: dict) -> list[int]:
            req = GenerationRequest(inputs, SamplingParams(max_tokens=8, temperature=0))
            return [t async for e in engine.generate(req) for t in e.token_ids]

        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)

    try:
        got = asyncio.run(run())
    finally:
        engine.stop()
    # Chunks ride in the decode forward once a batch is running; the first prompt's go alone.
    assert chunks and fused and max(chunks + fused) <= 24
    assert sum(chunks + fused) == sum(int(p["input_ids"].shape[1]) for p in prompts)
    for inputs, tokens in zip(prompts, got, strict=True):
        assert tokens == greedy_reference(model, inputs, 8)
    assert engine.kv_stats()["free_slots"] == engine.kv_stats()["slots"]


def test_a_fused_decode_and_chunk_step_equals_the_two_forwards(setup):
    """Decode rows and a prompt's chunk (with an image: deepstack features on its positions) in
    one forward give the rows' logits, the caches and the prompt's first-token logits of two."""
    from server.engine.kv import FusedStep

    model, processor, prompts = setup
    runner = ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))
    pools = [KVPool(runner.kv_geometry(), 4, 512) for _ in range(2)]
    rows = [0, 2]
    positions = []
    for pool in pools:
        for slot, inputs in zip((0, 1, 2), prompts[1:4], strict=True):
            pre = runner.prefill([inputs])[0]
            assert pool.allocate() == slot
            pool.write(slot, pre.keys, pre.values)
            positions.append(pre.next_position)
        pool.release(1)  # the chunked prompt takes the freed slot 1: rows are not one range
        assert pool.allocate() == 1
    positions = torch.tensor([positions[0], positions[2]])
    jobs = [runner.start_prefill(prompts[0]) for _ in pools]
    separate, fused = pools
    for step, n in enumerate((9, 11, jobs[0].length - 20)):
        tokens = [5 + step, 17 + step]
        want = runner.decode(tokens, positions + step, separate.batch(rows))
        want_first = runner.prefill_chunk(jobs[0], separate.chunk(1, n))
        step_kv = FusedStep(fused.batch(rows), fused.chunk(1, n))
        got, got_first = runner.decode_and_chunk(tokens, positions + step, jobs[1], step_kv)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got_first is None) == (want_first is None)
    torch.testing.assert_close(got_first, want_first, rtol=1e-4, atol=1e-4)
    assert fused.lengths.tolist() == separate.lengths.tolist()
    for k_fused, k_separate in zip(fused.keys, separate.keys, strict=True):
        torch.testing.assert_close(k_fused, k_separate, rtol=1e-4, atol=1e-5)
