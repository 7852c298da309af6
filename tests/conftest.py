"""Shared fixtures. Synthetic data lives in `veq.testing` so benchmarks use the same setups."""

from __future__ import annotations

import pytest

from veq.testing import correlated_inputs, random_weight


@pytest.fixture
def make_inputs():
    return correlated_inputs


@pytest.fixture
def make_weight():
    return random_weight
