"""Shared fixtures. Synthetic data lives in `veq.testing` so benchmarks use the same setups."""

from __future__ import annotations

import os
import signal

import pytest
import torch

# veq.testing imports no kernel module, so it may come before the interpreter switch.
from veq.testing import correlated_inputs, random_weight

# Without a GPU, Triton kernels run under the interpreter. It must be switched on before any
# @triton.jit function is decorated, i.e. before a kernel module is imported: conftest runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A suite started as a background job (`make test &`) inherits SIGINT ignored, and so would the
# CLI children that tests interrupt with it. A handler of our own is reset to the default on
# exec, so the children can be interrupted (and so can the suite).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests run tiny tensors: a second intra-op thread buys nothing there, and on a shared 2-core
# machine spinning OpenMP workers slow small ops down by up to 100x.
torch.set_num_threads(1)


@pytest.fixture
def make_inputs():
    return correlated_inputs


@pytest.fixture
def make_weight():
    return random_weight
