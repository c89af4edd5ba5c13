"""torch.compile around opt.step(): the compiled step equals the eager one bit for bit on the eager
path, on the extension's op and on the Triton kernels (the torch.library op rotkern::rotated_adamw_step, run by
the interpreter here), and a changing (tensor) lr does not recompile it: the compile counters stay put over a
100-step schedule. The fused steps compile to one graph with no break; the eager reference path still breaks
the graph (host reads of its scalars, the rotations' lazy construction)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch._dynamo.utils import counters

from rotkern import FusedRotatedAdamW, RotatedAdamW

from ._backends import CPU_BACKENDS

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    extra = {} if backend == "eager" else {"backend": backend}

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


FUSED = [b for b in CPU_BACKENDS if b.values[0] != "eager"]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scope", ["none", "output", "global"])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_step_compiles_to_one_graph_without_a_break(backend, scope, scaled):
    """fullgraph=True: Dynamo raises at any graph break. The fused step (after a warm-up step that creates the state
    and loads the kernels) traces into one graph around one op per launch, and equals the eager step bit for bit
    with a changing tensor lr, tensor betas and, when scaled, GradScaler's tensors (a found_inf step included)."""
    _check_fullgraph(backend, scope, scaled, torch.device("cpu"), "ieee")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (the torch.library op on CUDA tensors)")
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("scope", ["none", "output", "global"])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_step_compiles_to_one_graph_on_cuda(scope, scaled, precision):
    """The same on a GPU: rotkern::rotated_adamw_step on CUDA tensors, compiled kernels (not the interpreter)."""
    _check_fullgraph("triton", scope, scaled, torch.device("cuda"), precision)


def _check_fullgraph(backend, scope, scaled, device, precision):
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        w, b = torch.randn(16, 24, device=device), torch.randn(16, device=device)
        ref_w, ref_b = w.clone(), b.clone()
        lrs = torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)
        betas = (torch.tensor(0.9, device=device), torch.tensor(0.95, device=device))
        opt, ref = (
            FusedRotatedAdamW([x, y], lr=lr, betas=betas, rotation=scope, block_size=8, backend=backend,
                              precision=precision)  # fmt: skip
            for x, y, lr in ((w, b, lrs[0]), (ref_w, ref_b, lrs[1]))
        )
        step = torch.compile(opt.step, fullgraph=True)
        for t in range(8):
            for x, y in ((w, b), (ref_w, ref_b)):
                gen = torch.Generator().manual_seed(t)
                x.grad = torch.randn(16, 24, generator=gen).to(device)
                y.grad = torch.randn(16, generator=gen).to(device)
            for lr in lrs:
                lr.fill_(1e-2 / (1 + t))
            for o in (opt, ref):
                if scaled:  # what GradScaler hands the step; the inf flag is set at t = 5
                    o.grad_scale = torch.tensor(1.0, device=device)
                    o.found_inf = torch.tensor(float(t == 5), device=device)
            (opt.step if t == 0 else step)()
            ref.step()
        assert torch.equal(w, ref_w) and torch.equal(b, ref_b)
        assert float(opt.state[w]["step"]) == (7 if scaled else 8)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", FUSED)
def test_a_compiled_training_step_with_a_scheduler_matches_eager(backend):
    """The use the issue names: a whole training step (forward, backward, opt.step, zero_grad) under torch.compile,
    with an LR scheduler writing a tensor lr. Equal to the eager loop up to the compiled forward/backward's own
    rounding, and no graph is added after the first steps (the breaks Dynamo takes are at backward() and at the
    scheduler's wrapper of step(), both torch's; the step itself compiles with fullgraph=True, test above)."""
    torch._dynamo.reset()
    counters.clear()
    try:
        models = [torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 6))]
        models.append(copy.deepcopy(models[0]))
        opts = [
            FusedRotatedAdamW(m.parameters(), lr=torch.tensor(1e-2), rotation="global", block_size=8, backend=backend,
                              precision="ieee")  # fmt: skip
            for m in models
        ]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in opts]

        def train_step(model, opt, sched, x):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            return loss

        compiled = torch.compile(train_step)
        graphs = None
        for t in range(12):
            x = torch.randn(8, 12, generator=torch.Generator().manual_seed(t))
            compiled(models[0], opts[0], scheds[0], x)
            train_step(models[1], opts[1], scheds[1], x)
            if t == 3:
                graphs = counters["stats"]["unique_graphs"]
        assert graphs and counters["stats"]["unique_graphs"] == graphs
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scope", ["svd", "eigen"])
def test_dynamic_scopes_compile_with_a_break_and_match_eager(backend, scope):
    """svd / eigen groups: their step runs outside the graph (host-side basis management; on Triton the two-sided
    kernel is not a torch.library op), so torch.compile breaks the graph there instead of tracing into it."""
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        w = torch.randn(6, 5)
        ref_w = w.clone()
        opt, ref = (
            FusedRotatedAdamW([x], rotation=scope, svd_every=2, precondition_every=2, backend=backend,
                              precision="ieee")  # fmt: skip
            for x in (w, ref_w)
        )
        step = torch.compile(opt.step)
        for t in range(5):
            g = torch.randn(6, 5, generator=torch.Generator().manual_seed(t))
            w.grad, ref_w.grad = g.clone(), g.clone()
            step()
            ref.step()
        # ext runs these units on the eager reference, which Inductor compiles (its fusions round the last bits
        # differently: 2e-9 here); on Triton they run outside the graph, bit for bit.
        torch.testing.assert_close(w, ref_w, rtol=0, atol=0 if backend == "triton" else 1e-7)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scope", ["none", "global", "output"])
def test_two_optimizers_each_compiling_its_own_step_match_eager(backend, scope):
    """The GAN pattern: a generator's and a discriminator's optimizer, each stepped through its own
    torch.compile(opt.step), on a fresh Dynamo state; both equal their uncompiled twins bit for bit."""
    cls = RotatedAdamW if backend == "eager" else FusedRotatedAdamW
    extra = {} if backend == "eager" else {"backend": backend}

    def nets():
        torch.manual_seed(0)
        return (
            torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)),
            torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)),
        )

    def opts(gen, disc):
        kw = dict(lr=1e-2, rotation=scope, block_size=4, **extra)
        return cls(gen.named_parameters(), **kw), cls(disc.named_parameters(), **kw)

    (g, d), (g_ref, d_ref) = nets(), nets()
    (og, od), (og_ref, od_ref) = opts(g, d), opts(g_ref, d_ref)
    torch._dynamo.reset()
    try:
        steps = (torch.compile(og.step), torch.compile(od.step))
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(8, 6, generator=gen)
            for (gg, dd, opt_g, opt_d), compiled in (((g, d, og, od), True), ((g_ref, d_ref, og_ref, od_ref), False)):
                opt_g.zero_grad()
                opt_d.zero_grad()
                dd(gg(x)).sum().backward()
                for opt, step in zip((opt_g, opt_d), steps, strict=True):
                    step() if compiled else opt.step()
    finally:
        torch._dynamo.reset()
    for a, b in zip([*g.parameters(), *d.parameters()], [*g_ref.parameters(), *d_ref.parameters()], strict=True):
        assert torch.equal(a, b)
