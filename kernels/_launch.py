"""The one place a launcher hands a Triton kernel its grid and arguments.

Owns the seam between building a launch (the launchers in `kernels.dense.op` and
`kernels.moe.op`) and running it, so that `kernels.aot` can run the real launchers on meta
tensors and compile exactly what they would launch. It does not choose tiles nor compile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher built it: `kernel[grid](*args, **kwargs)`."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_recorder: ContextVar[list[Launch] | None] = ContextVar("kernels_launch_recorder", default=None)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch `kernel` on `grid`, or record the launch inside `recording()`."""
    rec = _recorder.get()
    if rec is not None:
        rec.append(Launch(kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect the launches made inside the block instead of running them."""
    launches: list[Launch] = []
    token = _recorder.set(launches)
    try:
        yield launches
    finally:
        _recorder.reset(token)
