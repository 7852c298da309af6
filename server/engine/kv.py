"""The KV cache: static slots preallocated at start from a memory budget (gpt-fast's layout).

`KVPool` holds, per layer, `keys [S, Hk, L, Dk]` and `values [S, Hk, L, Dv]`: S slots of
L = `max_model_len` positions each, allocated once, so running out of memory shows at boot and
never mid-request. A sequence owns one slot from admission to its end; joining writes its
prefill into that slot and leaving frees it, and neither moves any other sequence's cache.
Static slots rather than paged blocks: every sequence fits in one slot by construction (the
server refuses prompt + max_tokens beyond `max_model_len`), decode shapes depend only on the
slots in use (what CUDA graphs need), and transformers' attention modules take a plain
`[B, Hk, L, D]` view rather than a block table. The price is memory: a slot reserves
`max_model_len` positions whatever its sequence's length, so a budget admits fewer short
sequences than paging would.

`SlotBatch` is the view one decode step works on (the slots of one batch), implementing the
one method transformers' attention modules call, `update(k, v, layer_idx, ...)`. The lowest
free slot is always taken, so a batch's slots are usually one contiguous range and its K/V one
view; otherwise they are gathered for the step. `StaticSlots` is the fixed-shape twin a
captured decode step (`server.engine.graphs`) works on: slots, write positions and mask all
live in device tensors, rows beyond the batch point at the pool's padding slot, and the keys
are read up to a bucketed length, so one CUDA graph serves every batch of its bucket.

Shape legend: S slots, B rows of a batch, Hk key/value heads, L slot length, D head dim.
"""

from __future__ import annotations

import heapq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor


class KVBudgetError(ValueError):
    """The budget holds no sequence of `max_model_len` tokens."""


@dataclass(frozen=True)
class KVGeometry:
    """Per-token shape of one model's cache: `layers × heads × (dk + dv)` elements."""

    layers: int
    heads: int
    dk: int
    dv: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.heads * (self.dk + self.dv) * self.dtype.itemsize

    def slots_for(self, budget_bytes: int, max_len: int) -> int:
        return budget_bytes // (self.bytes_per_token * max_len)


class KVPool:
    """Slots of preallocated K/V on `device`; `lengths [S]` counts each slot's valid positions."""

    def __init__(
        self,
        geometry: KVGeometry,
        slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        *,
        padding_slot: bool = False,
    ) -> None:
        """With `padding_slot`, one more slot (index `slots`) that is never handed out: the
        rows a fixed-shape step pads its batch with write there."""
        if slots < 1:
            raise KVBudgetError("the KV cache needs at least one slot")
        g = geometry
        self.geometry, self.slots, self.max_len = g, slots, max_len
        self.padding_slot = slots if padding_slot else None
        rows = slots + int(padding_slot)

        def allocate() -> tuple[list[Tensor], list[Tensor]]:
            keys = [torch.zeros(rows, g.heads, max_len, g.dk, dtype=g.dtype, device=device)]
            values = [torch.zeros(rows, g.heads, max_len, g.dv, dtype=g.dtype, device=device)]
            for _ in range(g.layers - 1):
                keys.append(torch.zeros_like(keys[0]))
                values.append(torch.zeros_like(values[0]))
            return keys, values

        # Zero-filling on the CPU runs an OpenMP team on the calling thread, which then outlives
        # the call; with two threads holding teams, libgomp stops spin-waiting once the cores are
        # oversubscribed and every parallel region of the engine thread pays a futex wake-up
        # (decode steps 2-4x slower on 2 cores; docs/design.md §7). A short-lived thread's team
        # ends with it.
        with ThreadPoolExecutor(1, thread_name_prefix="veq-kv-alloc") as pool:
            self.keys, self.values = pool.submit(allocate).result()
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self._free = list(range(slots))  # a min-heap: the lowest free slot first
        self._is_free = [True] * slots
        # Per slot, how far a step may have written since allocation: a step that raised wrote
        # past `lengths` without advancing it, and release must clear that too.
        self.touched = [0] * rows

    # -- accounting ----------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        """Bytes reserved (all slots, used or not, and the padding slot)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def capacity_tokens(self) -> int:
        return self.slots * self.max_len

    def used_tokens(self) -> int:
        return int(self.lengths.sum())

    # -- slots ---------------------------------------------------------------------------

    def allocate(self) -> int | None:
        """The lowest free slot (now owned by the caller), or None when all are taken."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._is_free[slot] = False
        return slot

    def release(self, slot: int) -> None:
        """Free `slot`, zeroing what it held, written positions past its length included: a
        shorter next occupant's batch reads past its length (masked, but a NaN left by a failed
        row would poison it: 0 · NaN is NaN). Releasing a free slot does nothing (a failure
        path may reach a slot twice; the heap must never hold it twice)."""
        if self._is_free[slot]:
            return
        n = max(int(self.lengths[slot]), self.touched[slot])
        for buf in self.keys + self.values:
            buf[slot, :, :n] = 0
        self.lengths[slot] = 0
        self.touched[slot] = 0
        self._is_free[slot] = True
        heapq.heappush(self._free, slot)

    def mark(self, slot: int, upto: int) -> None:
        """Positions up to `upto` of `slot` are about to be written."""
        self.touched[slot] = max(self.touched[slot], min(upto, self.max_len))

    def write(self, slot: int, keys: list[Tensor], values: list[Tensor]) -> None:
        """Put a prefill's cache (per layer `[1, Hk, n, D]`) at the start of `slot`."""
        n = int(keys[0].shape[2])
        if n > self.max_len:
            raise ValueError(f"{n} positions do not fit a slot of {self.max_len}")
        self.mark(slot, n)
        for buf, k in zip(self.keys, keys, strict=True):
            buf[slot, :, :n] = k[0]
        for buf, v in zip(self.values, values, strict=True):
            buf[slot, :, :n] = v[0]
        self.lengths[slot] = n

    def batch(self, slots: list[int]) -> SlotBatch:
        return SlotBatch(self, slots)

    def chunk(self, slot: int, n: int) -> SlotChunk:
        return SlotChunk(self, slot, n)


class SlotBatch:
    """One decode step over `slots` (one row each, in this order)."""

    def __init__(self, pool: KVPool, slots: list[int]) -> None:
        self.pool = pool
        self.slots = slots
        lo = slots[0]
        contiguous = slots == list(range(lo, lo + len(slots)))
        self._rows: slice | Tensor = (
            slice(lo, lo + len(slots))
            if contiguous
            else torch.tensor(slots, device=pool.keys[0].device)
        )
        self._index = torch.tensor(slots)
        self._device_index = self._index.to(pool.keys[0].device)
        self._positions = self._device_index  # set by begin_step
        self._top = 0

    @property
    def lengths(self) -> Tensor:
        return self.pool.lengths[self._index]

    def begin_step(self) -> Tensor:
        """Returns the additive mask `[B, 1, 1, top]` (0 for the valid positions including the
        new one, -inf elsewhere) in fp32; `top` = the longest row + 1."""
        lengths = self.lengths
        self._positions = lengths.to(self._device_index.device)  # once per step, not per layer
        self._top = int(lengths.max()) + 1
        if self._top > self.pool.max_len:
            raise ValueError("a sequence outgrew its slot (max_model_len)")
        for slot, n in zip(self.slots, lengths.tolist(), strict=True):
            self.pool.mark(slot, n + 1)
        valid = torch.arange(self._top).unsqueeze(0) <= lengths.unsqueeze(1)
        mask = torch.zeros(valid.shape, dtype=torch.float32)
        mask[~valid] = float("-inf")
        return mask[:, None, None, :]

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Write `key/value: [B, Hk, 1, D]` at each row's position; return `[B, Hk, top, D]`."""
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        slots, pos = self._device_index, self._positions
        keys[slots, :, pos] = key[:, :, 0].to(keys.dtype)
        values[slots, :, pos] = value[:, :, 0].to(values.dtype)
        return keys[self._rows, :, : self._top], values[self._rows, :, : self._top]

    def end_step(self) -> None:
        self.pool.lengths[self._index] += 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.slots else 0


class SlotChunk:
    """`n` more prompt positions of one slot (chunked prefill): `update(k: [1, Hk, n, D])`
    writes them after the slot's current length and returns the slot's `[1, Hk, len + n, D]`
    (a view: nothing is copied)."""

    def __init__(self, pool: KVPool, slot: int, n: int) -> None:
        self.pool, self.slot, self.n = pool, slot, n
        self.start = int(pool.lengths[slot])
        if self.start + n > pool.max_len:
            raise ValueError(f"{self.start + n} positions do not fit a slot of {pool.max_len}")
        pool.mark(slot, self.start + n)

    def causal_mask(self) -> Tensor:
        """The additive mask `[1, 1, n, len + n]` in fp32: chunk row i sees positions up to
        `len + i`."""
        total = self.start + self.n
        rows = torch.arange(self.start, total).unsqueeze(1)
        mask = torch.zeros(self.n, total, dtype=torch.float32)
        mask[torch.arange(total).unsqueeze(0) > rows] = float("-inf")
        return mask[None, None]

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        end = self.start + self.n
        keys[self.slot, :, self.start : end] = key[0].to(keys.dtype)
        values[self.slot, :, self.start : end] = value[0].to(values.dtype)
        return keys[self.slot : self.slot + 1, :, :end], values[self.slot : self.slot + 1, :, :end]

    def end_step(self) -> None:
        self.pool.lengths[self.slot] += self.n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class StaticSlots:
    """A fixed-shape decode step over `rows` rows: `slots [rows]` and `lengths [rows]` (long, on
    the pool's device) say where each row's cache lives and where its new position goes; keys
    are read up to `top` positions. Nothing here touches the host, so the step can be captured
    in a CUDA graph and replayed after the buffers are refilled (`server.engine.graphs`)."""

    def __init__(self, pool: KVPool, slots: Tensor, lengths: Tensor, top: int) -> None:
        if top > pool.max_len:
            raise ValueError(f"{top} positions do not fit a slot of {pool.max_len}")
        self.pool, self.slots, self.lengths, self.top = pool, slots, lengths, top
        self._arange = torch.arange(top, device=slots.device)

    def mask(self, dtype: torch.dtype) -> Tensor:
        """The additive mask `[rows, 1, 1, top]`: 0 up to each row's new position, -inf after."""
        valid = self._arange.unsqueeze(0) <= self.lengths.unsqueeze(1)
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        return torch.where(valid, zero, float("-inf")).to(dtype)[:, None, None, :]

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Write `key/value: [rows, Hk, 1, D]` at each row's length; return `[rows, Hk, top, D]`."""
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        keys[self.slots, :, self.lengths] = key[:, :, 0].to(keys.dtype)
        values[self.slots, :, self.lengths] = value[:, :, 0].to(values.dtype)
        k, v = keys[:, :, : self.top], values[:, :, : self.top]
        return k.index_select(0, self.slots), v.index_select(0, self.slots)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.top - 1


class FusedStep:
    """A decode step of a batch and the next chunk of one prompt in one forward (one sequence
    of `B + n` positions): the B rows' new keys go to their slots at their lengths, the chunk's
    after its slot's length. Attention reads one key sequence, each row's slot up to the
    batch's longest row and then the chunk's slot so far, and `mask` lets each query see only
    its own part (a row its slot up to its new position, a chunk position the prompt up to
    itself)."""

    def __init__(self, batch: SlotBatch, chunk: SlotChunk) -> None:
        self.batch, self.chunk = batch, chunk

    def mask(self) -> Tensor:
        """Additive `[1, 1, B + n, B·top + len + n]` fp32; call once per step, before update."""
        rows = self.batch.begin_step()[:, 0, 0]  # [B, top]
        b, top = rows.shape
        chunk = self.chunk.causal_mask()[0, 0]  # [n, len + n]
        n, span = chunk.shape
        out = torch.full((b + n, b * top + span), float("-inf"))
        for i in range(b):
            out[i, i * top : (i + 1) * top] = rows[i]
        out[b:, b * top :] = chunk
        return out[None, None]

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """`key/value: [1, Hk, B + n, D]` → `[1, Hk, B·top + len + n, D]`."""
        b = len(self.batch.slots)
        rows_k, rows_v = self.batch.update(
            key[0, :, :b].transpose(0, 1).unsqueeze(2),
            value[0, :, :b].transpose(0, 1).unsqueeze(2),
            layer_idx,
        )  # [B, Hk, top, D]
        chunk_k, chunk_v = self.chunk.update(key[:, :, b:], value[:, :, b:], layer_idx)

        def join(rows: Tensor, chunk: Tensor) -> Tensor:
            flat = rows.transpose(0, 1).reshape(1, rows.shape[1], -1, rows.shape[3])
            return torch.cat([flat, chunk], dim=2)

        return join(rows_k, chunk_k), join(rows_v, chunk_v)

    def end_step(self) -> None:
        self.batch.end_step()
        self.chunk.end_step()

    def rollback(self) -> None:
        """Undo `end_step`: the positions written stay, and the step run again overwrites them."""
        pool = self.batch.pool
        pool.lengths[self.batch._index] -= 1
        pool.lengths[self.chunk.slot] -= self.chunk.n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.chunk.get_seq_length(layer_idx)
