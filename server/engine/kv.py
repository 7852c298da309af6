"""The running batch's KV cache: one padded buffer per layer, one write position per row.

Rows are sequences of different lengths: row b holds `lengths[b]` valid positions; decoding
writes each row's new key/value at its own position, and the attention mask hides the padding.
Rows join (a prefilled sequence's K/V) and leave (finished) between steps. It implements the
one method transformers' attention modules call, `update(k, v, layer_idx, ...)`.

Shape legend: B rows, Hk key/value heads, L capacity, D head dim (may differ for K and V).
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchKVCache:
    def __init__(self) -> None:
        self.keys: list[Tensor] = []  # per layer [B, Hk, L, Dk]
        self.values: list[Tensor] = []  # per layer [B, Hk, L, Dv]
        self.lengths = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity, 64)
        pad = new - self.capacity
        self.keys = [torch.nn.functional.pad(k, (0, 0, 0, pad)) for k in self.keys]
        self.values = [torch.nn.functional.pad(v, (0, 0, 0, pad)) for v in self.values]

    def add(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Append a sequence: per layer `[1, Hk, S, D]` (a prefill's cache)."""
        length = int(keys[0].shape[2])
        if not self.keys:
            self.keys = [k.clone() for k in keys]
            self.values = [v.clone() for v in values]
            self.lengths = torch.tensor([length])
            return
        self._grow(length)
        cap = self.capacity
        self.keys = [
            torch.cat([buf, torch.nn.functional.pad(k, (0, 0, 0, cap - length)).to(buf)])
            for buf, k in zip(self.keys, keys, strict=True)
        ]
        self.values = [
            torch.cat([buf, torch.nn.functional.pad(v, (0, 0, 0, cap - length)).to(buf)])
            for buf, v in zip(self.values, values, strict=True)
        ]
        self.lengths = torch.cat([self.lengths, torch.tensor([length])])

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished sequences); trims unused capacity."""
        if not rows:
            self.keys, self.values, self.lengths = [], [], torch.zeros(0, dtype=torch.long)
            return
        idx = torch.tensor(rows, device=self.keys[0].device)
        self.lengths = self.lengths[torch.tensor(rows)]
        top = int(self.lengths.max())
        self.keys = [k.index_select(0, idx)[:, :, :top] for k in self.keys]
        self.values = [v.index_select(0, idx)[:, :, :top] for v in self.values]

    def begin_step(self) -> Tensor:
        """Make room for one new token per row; returns the additive mask `[B, 1, 1, L]` (0 for
        the valid positions including the new one, -inf for padding) in fp32."""
        self._grow(int(self.lengths.max()) + 1)
        top = int(self.lengths.max()) + 1
        pos = torch.arange(top)
        valid = pos.unsqueeze(0) <= self.lengths.unsqueeze(1)
        mask = torch.zeros(valid.shape, dtype=torch.float32)
        mask[~valid] = float("-inf")
        return mask[:, None, None, :]

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Write `key/value: [B, Hk, 1, D]` at each row's position; return `[B, Hk, L, D]`."""
        rows = torch.arange(self.rows, device=key.device)
        pos = self.lengths.to(key.device)
        self.keys[layer_idx][rows, :, pos] = key[:, :, 0].to(self.keys[layer_idx])
        self.values[layer_idx][rows, :, pos] = value[:, :, 0].to(self.values[layer_idx])
        top = int(self.lengths.max()) + 1
        return self.keys[layer_idx][:, :, :top], self.values[layer_idx][:, :, :top]

    def end_step(self) -> None:
        self.lengths = self.lengths + 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.rows else 0
