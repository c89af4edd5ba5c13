"""torch.compile around opt.step() (issue 15): the compiled step equals the eager one bit for bit on the eager
path and on the extension's op, and a changing (tensor) lr does not recompile it: the compile counters stay put
over a 100-step schedule. (rotkern's step still has graph breaks: its kernels are not yet torch.library ops.)"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import ext_available


@pytest.mark.parametrize(
    "backend",
    [
        "eager",
        pytest.param("ext", marks=[pytest.mark.ext, pytest.mark.skipif(not ext_available(), reason="needs make ext")]),
    ],
)
def test_compiled_step_equals_eager_without_recompiles_over_an_lr_schedule(backend):
    torch._dynamo.reset()
    counters.clear()
    try:
        _run(backend)
    finally:
        # Dynamo keeps per-code-object state (which sizes turned dynamic) across torch.compile calls: leave none
        # behind for later tests that compile the same step.
        torch._dynamo.reset()


def _run(backend):
    cls = RotatedAdamW if backend == "eager" else FusedRotatedAdamW
    extra = {} if backend == "eager" else {"backend": "ext"}

    def make(w):
        opt = cls([w], lr=torch.tensor(1e-2), rotation="output", block_size=8, **extra)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

    torch.manual_seed(0)
    w = torch.randn(16, 24)
    ref_w = w.clone()
    (opt, sched), (ref, ref_sched) = make(w), make(ref_w)
    step = torch.compile(opt.step)
    graphs = None
    for t in range(100):
        g = torch.randn_like(w)
        w.grad, ref_w.grad = g.clone(), g.clone()
        step()
        ref.step()
        sched.step()
        ref_sched.step()
        if t == 2:  # the first steps compile (state creation, then the steady step)
            graphs = counters["stats"]["unique_graphs"]
    assert graphs and counters["stats"]["unique_graphs"] == graphs  # 97 more lr values, no new graph
    assert torch.equal(w, ref_w)
