"""pytest set-up for benchmarks/ (not among pyproject's testpaths: run ``pytest benchmarks/test_bench_step.py``).

pytest puts this folder on sys.path (rootdir-relative "prepend" imports, no __init__.py), so the tests import
``bench_step`` and ``report`` directly. Without pytest-benchmark a stand-in ``benchmark`` fixture runs each
target once, so the tests still check that every case executes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


try:
    import pytest_benchmark  # noqa: F401
except ImportError:

    class _Once:
        """pytest-benchmark's fixture API, reduced to running the target once."""

        def __init__(self) -> None:
            self.extra_info: dict = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, fn, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
            if setup is not None:
                setup()
            return fn(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _Once()
