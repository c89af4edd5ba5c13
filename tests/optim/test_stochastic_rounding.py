"""stochastic_rounding=True: bf16/fp16 params written by unbiased stochastic rounding of the fp32
result, deterministic from the seed and step, on every backend."""

from __future__ import annotations

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern.optim._base import stochastic_round

from ._backends import CPU_BACKENDS

BACKENDS = CPU_BACKENDS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * 3
    y = stochastic_round(x, dtype, seed=1)
    nearest = x.to(dtype)
    other = torch.nextafter(nearest, torch.where(nearest.float() > x, -torch.inf, torch.inf).to(dtype))
    assert bool(((y == nearest) | (y == other)).all())  # one of the two neighbours, always
    assert 0.2 < (y != nearest).float().mean() < 0.3  # the far one about a quarter of the time (uniform offsets)
    err = (y.float() - x).double()
    ulp = (other.float() - nearest.float()).abs().double()
    # unbiased: the mean error in ulps is within 4 standard errors of 0 (round-to-nearest's is not, below)
    z = (err / ulp).mean() / ((err / ulp).std() / len(x) ** 0.5)
    assert abs(z) < 4
    assert torch.equal(stochastic_round(x, dtype, seed=1), y) and not torch.equal(stochastic_round(x, dtype, 2), y)
    exact = torch.tensor([0.0, 1.0, -2.5, float("inf"), float("nan")])
    torch.testing.assert_close(stochastic_round(exact, dtype, 0), exact.to(dtype), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sub_ulp_updates_move_bf16_params_on_average(backend):
    # Params at 1.0 (bf16 ulp 2^-7 above), Adam steps of lr = 1e-3 ~ 0.13 ulp: round-to-nearest never moves them.
    kw = dict(lr=1e-3, weight_decay=0.0, rotation="none", seed=3)
    cls = RotatedAdamW if backend == "eager" else FusedRotatedAdamW
    extra = {} if backend == "eager" else {"backend": backend}
    runs = {}
    for sr in (False, True):
        p = torch.ones(4096, dtype=torch.bfloat16)
        opt = cls([p], stochastic_rounding=sr, **kw, **extra)
        for _ in range(20):
            p.grad = -torch.ones_like(p)  # Adam's update is lr per step, upward
            opt.step()
        runs[sr] = p.float()
        assert p.dtype == torch.bfloat16
    assert torch.equal(runs[False], torch.ones(4096))  # every update lost
    moved = runs[True].mean().item() - 1.0
    assert abs(moved - 20 * 1e-3) < 0.1 * 20 * 1e-3  # 20 lr on average (within 10 %)


def test_stochastic_rounding_is_deterministic_and_resumes(tmp_path):
    def run(steps, state=None):
        torch.manual_seed(0)
        p = torch.randn(64, 48).bfloat16()
        opt = RotatedAdamW([p], lr=1e-3, rotation="output", block_size=16, stochastic_rounding=True, seed=5)
        if state is not None:
            p.data.copy_(state[0])
            opt.load_state_dict(state[1])
        for t in steps:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).bfloat16()
            opt.step()
        return p, opt

    a, _ = run(range(10))
    b, _ = run(range(10))
    assert torch.equal(a, b)
    half, opt = run(range(5))
    resumed, _ = run(range(5, 10), (half.clone(), opt.state_dict()))
    assert torch.equal(resumed, a)
    with pytest.raises(ValueError, match="stochastic_rounding must be a bool"):
        RotatedAdamW([torch.zeros(3)], stochastic_rounding="yes")
