"""Shared fixtures. Synthetic data lives in `veq.testing` so benchmarks use the same setups."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. It must be switched on before any
# @triton.jit function is decorated, i.e. before a kernel module is imported: conftest runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from veq.testing import correlated_inputs, random_weight


@pytest.fixture
def make_inputs():
    return correlated_inputs


@pytest.fixture
def make_weight():
    return random_weight
