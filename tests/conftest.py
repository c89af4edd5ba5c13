import functools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _seed_everything():
    # Fresh but reproducible inputs per test; rotations have their own seeds and ignore these.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _trainers_run_where_the_test_says(request, monkeypatch):
    """The tests beside this file (not tests/kernels, tests/optim) that are not marked gpu mean the CPU on every
    machine, so a trainer they run in-process must be given its device (tests/_trainer_helpers: FAST, CPU,
    CPU_ARGV): --device=auto picks CUDA wherever a GPU is visible. A trainer resolving "auto" in such a test fails
    here, on a CPU-only machine too, instead of running elsewhere (or on a missing cuda:LOCAL_RANK) on a GPU host."""
    if Path(request.node.path).resolve().parent != TESTS or request.node.get_closest_marker("gpu"):
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


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(request.param)
