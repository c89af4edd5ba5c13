"""tests/conftest.py's device guard, for the trainer tests in this folder too (it only covers the files beside it)."""

import functools
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _trainers_run_where_the_test_says(request, monkeypatch):
    """The tests in this folder that are not marked gpu mean the CPU on every machine, so a trainer they run
    in-process must be given its device (tests/_trainer_helpers: FAST, CPU, CPU_ARGV): --device=auto picks CUDA
    wherever a GPU is visible. A trainer resolving "auto" in such a test fails here, on a CPU-only machine too,
    instead of running elsewhere (or on a missing cuda:LOCAL_RANK) on a GPU host."""
    if Path(request.node.path).resolve().parent != HERE or request.node.get_closest_marker("gpu"):
        return
    from rotkern.trainers import train as train_mod

    real = train_mod.resolve_device

    @functools.wraps(real)  # __wrapped__: the real one, for a test of "auto" itself
    def resolve_device(name: str, local_rank: int = 0) -> torch.device:
        if name == "auto":
            raise AssertionError(
                "a CPU test resolved the trainer's --device=auto, which means CUDA on a GPU host: pass device='cpu' "
                "(tests/_trainer_helpers.CPU, CPU_ARGV, FAST) or mark the test gpu"
            )
        return real(name, local_rank)

    monkeypatch.setattr(train_mod, "resolve_device", resolve_device)
