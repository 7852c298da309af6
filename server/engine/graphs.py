"""Decode at fixed shapes, replayed from CUDA graphs (`--cuda-graphs`).

A decode step of a few rows is a few hundred small kernel launches; on a GPU their launch cost,
not the weights' bytes, bounds a small batch. Captured once in a CUDA graph, the whole step is
one launch. A graph fixes every shape and address, so `StaticDecoder` pads each batch to a
bucket (rows: powers of two up to `--max-batch`; key length: powers of two from 128 up to
`--max-model-len`) and copies its inputs (token ids, RoPE positions, slots, cache lengths) into
buffers that live as long as the decoder. Rows beyond the batch decode a dummy token into the
pool's padding slot; their logits are dropped. The step itself (`ModelRunner.decode_static`)
reads the slots' K/V up to the bucket's length and builds its mask on the device, so nothing in
it waits for the host, the condition for capture. Sampling stays outside the graph: one host
sync per step, as before.

Graphs are captured when a bucket is first used (vLLM captures them all at start; here start-up
stays quick and a bucket nobody reaches costs nothing), after two warm-up runs on a side stream,
into one memory pool shared by all of them. Logits land in one `[max_batch, V]` buffer every
graph writes, so the graphs hold no output memory of their own. If capture fails (a module that
syncs with the host, such as transformers' looped experts), the decoder says why in `stats()`
and runs the same fixed-shape step eagerly. Without `capture` (CPU, tests) it always runs
eagerly: the same code, the same buckets.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from server.engine.kv import KVPool, StaticSlots
from server.engine.runner import ModelRunner

log = logging.getLogger(__name__)

#: The shortest key-length bucket: below it, one bucket (attention over 128 positions is cheap).
MIN_LENGTH_BUCKET = 128


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit` itself: `buckets(24) = [1, 2, 4,
    8, 16, 24]`."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class StaticDecoder:
    """Fixed-shape decode steps of one runner over one pool's slots."""

    def __init__(self, runner: ModelRunner, pool: KVPool, max_batch: int, capture: bool) -> None:
        if pool.padding_slot is None:
            raise ValueError("fixed-shape decoding needs a KV pool with a padding slot")
        if capture and runner.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; this model runs on the CPU")
        self.runner, self.pool, self.capture = runner, pool, capture
        self.row_buckets = buckets(max_batch)
        self.length_buckets = buckets(pool.max_len, min(MIN_LENGTH_BUCKET, pool.max_len))
        n, dev = self.row_buckets[-1], runner.device
        # The step's inputs: refilled before every step, read by every graph.
        self._inputs = torch.zeros(4, n, dtype=torch.long, device=dev)
        self._ids, self._positions, self._slots, self._lengths = self._inputs.unbind(0)
        self._logits: Tensor | None = None  # [n, V] fp32, written by every graph
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._mempool: Any = None
        self.failed: str | None = None
        """Why capture failed, after which every step runs eagerly."""
        self.replays = 0
        if capture:
            _sync_free_experts(runner.model)

    def bucket(self, rows: int, top: int) -> tuple[int, int]:
        """The smallest (rows, length) bucket holding `rows` rows of up to `top` positions."""
        r = next(b for b in self.row_buckets if b >= rows)
        t = next(b for b in self.length_buckets if b >= top)
        return r, t

    def step(self, tokens: list[int], positions: list[int], slots: list[int]) -> Tensor:
        """One decode step of `len(tokens)` rows (one token each at RoPE `positions`, caches in
        `slots`); the rows' lengths advance by one. Returns logits [B, V] fp32."""
        pool, b = self.pool, len(tokens)
        lengths = pool.lengths[slots]
        rows, top = self.bucket(b, int(lengths.max()) + 1)
        for slot, n in zip(slots, lengths.tolist(), strict=True):
            pool.mark(slot, n + 1)
        pad = rows - b
        host = torch.tensor(
            [
                tokens + [0] * pad,
                positions + [0] * pad,
                slots + [pool.padding_slot] * pad,
                lengths.tolist() + [0] * pad,
            ]
        )
        self._inputs[:, :rows].copy_(host, non_blocking=True)
        logits = self._run(rows, top)[:b]
        pool.lengths[slots] += 1
        return logits

    def _view(self, rows: int, top: int) -> StaticSlots:
        return StaticSlots(self.pool, self._slots[:rows], self._lengths[:rows], top)

    def _eager(self, rows: int, top: int) -> Tensor:
        return self.runner.decode_static(
            self._ids[:rows], self._positions[:rows], self._view(rows, top)
        )

    def _run(self, rows: int, top: int) -> Tensor:
        if not self.capture or self.failed is not None:
            return self._eager(rows, top)
        graph = self._graphs.get((rows, top))
        if graph is None:
            try:
                graph = self._capture(rows, top)
            except Exception as exc:  # a host sync, or an op capture does not allow
                torch.cuda.synchronize()
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log.warning("CUDA graph capture failed (%s); decoding eagerly", self.failed)
                return self._eager(rows, top)
        graph.replay()
        self.replays += 1
        assert self._logits is not None
        return self._logits[:rows]

    def _capture(self, rows: int, top: int) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (lazy initialisation, autotuning and allocator growth must
        not happen under capture), then capture the step into the shared pool. The warm-ups
        write this step's K/V, which the replay then writes again: the same values."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                out = self._eager(rows, top)
        torch.cuda.current_stream().wait_stream(side)
        if self._logits is None:
            self._logits = torch.empty(
                self.row_buckets[-1], out.shape[-1], dtype=out.dtype, device=out.device
            )
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a requantization job working the GPU on its own thread meanwhile
        # neither breaks this capture nor is broken by it.
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            self._logits[:rows].copy_(self._eager(rows, top))
        self._graphs[(rows, top)] = graph
        log.info("captured the decode step for %d rows of up to %d positions", rows, top)
        return graph

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.capture,
            "captured": sorted(f"{r}x{t}" for r, t in self._graphs),
            "replays": self.replays,
            "failed": self.failed,
        }


def _sync_free_experts(model: torch.nn.Module) -> None:
    """transformers' default experts loop over the experts that got tokens (`nonzero`, a host
    sync); its `batched_mm` implementation computes the same without one. Our quantized
    experts (`veq.nn.QuantMoEExperts`) are sync-free already and unaffected."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return
    try:
        setter("batched_mm")
    except Exception as exc:  # a model without swappable experts: capture will say if it syncs
        log.info("experts implementation left as is: %s", exc)
