"""Fixed-shape decode steps (`server.engine.graphs`): buckets, padding rows that touch only the
padding slot, no host sync inside the step (the condition for CUDA-graph capture), the flag
refused without CUDA, and, on a GPU, graph replays that equal eager steps."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.engine import Engine
from server.engine.graphs import StaticDecoder, buckets
from server.engine.kv import KVPool
from server.engine.runner import ModelInfo, ModelRunner
from veq.models.processor import build_processor
from veq.testing import tiny_model


def test_buckets_are_powers_of_two_up_to_the_limit():
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(1) == [1]
    assert buckets(4096, 128) == [128, 256, 512, 1024, 2048, 4096]
    assert buckets(64, 64) == [64]


def _runner(quantized_into=None) -> ModelRunner:
    """The tiny Qwen3-VL-MoE, 16-bit, or RTN W4 g32 through a checkpoint in `quantized_into`."""
    processor = build_processor()
    model = tiny_model("qwen3_vl_moe", processor)
    if quantized_into is not None:
        import veq

        q = veq.quantize(
            model,
            processor=processor,
            method="rtn",
            bits=4,
            group_size=32,
            out=quantized_into,
            progress=False,
        )
        model, processor = veq.load(q.path, device="cpu")
    return ModelRunner(model, processor, ModelInfo("tiny", "none", 16, None, 0))


def _fill(runner: ModelRunner, pool: KVPool, slots: list[int], seed: int) -> list[int]:
    """Prefill random prompts of different lengths into `slots`; their next RoPE positions."""
    gen = torch.Generator().manual_seed(seed)
    positions = []
    for i, slot in enumerate(slots):
        ids = torch.randint(10, 200, (1, 5 + 3 * i), generator=gen)
        pre = runner.prefill([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])[0]
        assert pool.allocate() is not None
        pool.write(slot, pre.keys, pre.values)
        positions.append(pre.next_position)
    return positions


def test_a_padded_fixed_shape_step_equals_the_dynamic_one():
    """Three rows in scattered slots, padded to a bucket of 4: the rows' logits and caches equal
    the dynamic step's; the padding row wrote only into the padding slot."""
    runner = _runner()
    geometry = runner.kv_geometry()
    dynamic = KVPool(geometry, 4, 64)
    static = KVPool(geometry, 4, 64, padding_slot=True)
    slots = [0, 1, 2]
    positions = _fill(runner, dynamic, slots, 0)
    _fill(runner, static, slots, 0)
    dynamic.release(1)  # leave a hole: rows 0 and 2 are not one range
    static.release(1)
    slots, positions = [2, 0], [positions[2], positions[0]]
    decoder = StaticDecoder(runner, static, max_batch=4, capture=False)
    before = [k.clone() for k in static.keys]
    for step in range(3):
        tokens = [17 + step, 40 + step]
        want = runner.decode(tokens, torch.tensor(positions), dynamic.batch(slots))
        got = decoder.step(tokens, positions, slots)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        positions = [p + 1 for p in positions]
    assert decoder.bucket(2, 20) == (2, 64)
    assert static.lengths[:4].tolist() == dynamic.lengths.tolist()
    for layer, (k_static, k_dynamic) in enumerate(zip(static.keys, dynamic.keys, strict=True)):
        torch.testing.assert_close(k_static[:4], k_dynamic, rtol=1e-5, atol=1e-6)
        assert torch.equal(k_static[1], before[layer][1])  # the free slot: untouched
    assert int(static.lengths[static.padding_slot]) == 0


class _HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device (`.item()`, `.tolist()`,
    `bool(t)`, `nonzero` and other data-dependent shapes)."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten.masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if any(name.startswith(s) for s in self.SYNCS):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_fixed_shape_step_of_a_quantized_model_never_waits_for_the_host(tmp_path, monkeypatch):
    """The captured step of a veq-quantized model (our Triton experts and linears, run by the
    interpreter on this CPU) does no host sync: what CUDA-graph capture requires. The dynamic
    step and the CPU reference experts, for contrast, do."""
    runner = _runner(tmp_path / "w4")
    pool = KVPool(runner.kv_geometry(), 2, 64, padding_slot=True)
    positions = _fill(runner, pool, [0, 1], 1)
    decoder = StaticDecoder(runner, pool, max_batch=4, capture=False)
    decoder.step([5, 6], positions, [0, 1])  # fills the buffers, as before a replay
    view = decoder._view(2, 64)
    with _HostSyncs() as reference:  # VEQ_KERNELS=auto on CPU: the plain-torch experts
        want = runner.decode_static(decoder._ids[:2], decoder._positions[:2], view)
    assert "aten.nonzero" in reference.seen
    monkeypatch.setenv("VEQ_KERNELS", "triton")  # the GPU's kernels, interpreted
    with _HostSyncs() as syncs:
        logits = runner.decode_static(decoder._ids[:2], decoder._positions[:2], view)
    assert syncs.seen == []
    torch.testing.assert_close(logits, want, rtol=2e-3, atol=2e-3)
    with _HostSyncs() as dynamic:
        runner.decode([5, 6], torch.tensor(positions), pool.batch([0, 1]))
    assert "aten._local_scalar_dense" in dynamic.seen


def test_cuda_graphs_are_refused_without_cuda():
    runner = _runner()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(runner, max_batch=2, cuda_graphs=True)


def test_serve_with_cuda_graphs_on_the_cpu_reports_why_at_ready(server_factory):
    import httpx

    live = server_factory(start=False, cuda_graphs=True)
    with pytest.raises(RuntimeError, match="CUDA"):
        live.start()
    r = httpx.get(f"{live.url}/ready", timeout=5)
    assert r.status_code == 503 and "--cuda-graphs" in r.json()["error"]["message"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_equal_eager_steps_on_a_gpu(tmp_path):
    runner = _runner(tmp_path / "w4")
    runner.model.to("cuda")
    runner = ModelRunner(runner.model, runner.processor, runner.info)
    geometry = runner.kv_geometry()
    eager_pool = KVPool(geometry, 4, 256, "cuda", padding_slot=True)
    graph_pool = KVPool(geometry, 4, 256, "cuda", padding_slot=True)
    positions = _fill(runner, eager_pool, [0, 1, 2], 2)
    _fill(runner, graph_pool, [0, 1, 2], 2)
    eager = StaticDecoder(runner, eager_pool, max_batch=4, capture=False)
    graphs = StaticDecoder(runner, graph_pool, max_batch=4, capture=True)
    for step in range(4):
        tokens = [3 + step, 9 + step, 27 + step]
        want = eager.step(tokens, positions, [0, 1, 2])
        got = graphs.step(tokens, positions, [0, 1, 2])
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        positions = [p + 1 for p in positions]
    stats = graphs.stats()
    assert stats["failed"] is None and stats["captured"] == ["4x128"] and stats["replays"] == 4
