"""torch.amp.GradScaler with the rotated optimizers (``_step_supports_amp_scaling``): the scaler hands the step
``grad_scale`` and ``found_inf``. The fused kernels (Triton, ext) take them as tensors, unscale inside and write
nothing on inf/NaN, with no host read, as torch's fused AdamW does; the eager path reads found_inf on the host and
unscales copies of the grads. Eager on CPU; ext and the Triton interpreter under their markers."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern.optim._base import moment
from rotkern.testing import assert_close_to_ref

from ._backends import CPU_BACKENDS
from ._host_reads import HostReads

BACKENDS = CPU_BACKENDS


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))


def _opt(model, backend, **kw):
    kw = {"lr": 1e-2, "rotation": "global", "block_size": 8, **kw}
    if backend == "eager":
        return RotatedAdamW(model.parameters(), **kw)
    return FusedRotatedAdamW(model.parameters(), backend=backend, precision="ieee", **kw)


def _loss(model, t):
    gen = torch.Generator().manual_seed(t)
    return model(torch.randn(4, 6, generator=gen)).square().sum()


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unscale_first", [False, True])
def test_scaled_run_equals_the_unscaled_one_and_inf_steps_change_nothing(backend, unscale_first):
    plain, scaled = _model(), _model()
    opt_plain, opt_scaled = _opt(plain, backend), _opt(scaled, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for t in range(8):
        if t != 4:  # the same updates as the scaled run's finite steps
            opt_plain.zero_grad()
            _loss(plain, t).backward()
            opt_plain.step()
        opt_scaled.zero_grad()
        loss = _loss(scaled, t) * (float("inf") if t == 4 else 1.0)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt_scaled)  # e.g. for gradient clipping: the step then gets grad_scale=None
        before = _snapshot(scaled, opt_scaled) if t == 4 else None
        grads = [p.grad.clone() for p in scaled.parameters()]
        scaler.step(opt_scaled)
        scaler.update()
        for g, p in zip(grads, scaled.parameters(), strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)  # the step unscaled copies
        if before is not None:  # inf/NaN: params, moments and step counts bit-identical
            params, state = before
            assert all(torch.equal(a, b) for a, b in zip(params, scaled.parameters(), strict=True))
            for pid, st in opt_scaled.state_dict()["state"].items():
                for k, v in st.items():
                    assert torch.equal(v, state[pid][k]) if torch.is_tensor(v) else v == state[pid][k], (pid, k)
    assert scaler.get_scale() == 2.0**11  # doubled after 3 good steps, halved at the inf one, doubled again
    # Powers of two unscale exactly: the scaled run is the unscaled one bit for bit.
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_none_matches_torch_fused_adamw_under_a_grad_scaler(backend):
    """A NaN step skipped, the finite steps around it unscaled by a scale that is not 2^k: torch's fused AdamW's
    trajectory and step counts, on every backend (in the kernels on ext and Triton)."""
    ours, theirs = _model(), _model()
    opt = _opt(ours, backend, rotation="none")
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=3.0e3) for _ in range(2)]  # not a power of two
    for t in range(6):
        for model, o, scaler in zip((ours, theirs), (opt, ref), scalers, strict=True):
            o.zero_grad()
            loss = _loss(model, t) * (float("nan") if t == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert_close_to_ref(a, b, "identity_vs_torch", what="param")
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"]) == 5.0


FUSED = [b for b in BACKENDS if b.values[0] != "eager"]


def _scaled_step(opt, grad_scale=None, found_inf=None):
    """What GradScaler.step does around an optimizer that supports amp scaling."""
    opt.grad_scale, opt.found_inf = grad_scale, found_inf
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf


def _bf16_model():
    model = _model()
    model[0].to(torch.bfloat16)  # bf16 params and grads in one unit of the global scope, fp32 in the other
    return model


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scope", ["none", "output", "global"])
@pytest.mark.parametrize("scale", [2.0**12, 3000.0, 0.7])
def test_in_kernel_unscale_equals_dividing_the_grads_first(backend, scope, scale):
    """The kernels' division is IEEE (not a multiply by 1/scale, which differs for a scale that is not 2^k): a
    scaled step is bit for bit the step on grads divided by the scale beforehand, bf16 grads included."""
    scaled, plain = _bf16_model(), _bf16_model()
    opt_s, opt_p = (_opt(m, backend, rotation=scope) for m in (scaled, plain))
    gs = torch.tensor(scale)
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        for (ps, pp) in zip(scaled.parameters(), plain.parameters(), strict=True):
            g = torch.randn(ps.shape, generator=gen).to(ps.dtype)
            ps.grad = g.clone()
            pp.grad_dtype = None  # the reference takes fp32 grads for bf16 params
            pp.grad = g.float() / gs  # fp32: what the kernels compute from the bf16 grad
        grads = [p.grad.clone() for p in scaled.parameters()]
        _scaled_step(opt_s, gs, torch.zeros(()))
        opt_p.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(scaled.parameters(), grads, strict=True))
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt_s.state.values(), opt_p.state.values(), strict=True):
        assert torch.equal(a["step"], b["step"])
        assert all(torch.equal(moment(a, k), moment(b, k)) for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scope", ["none", "global"])
def test_a_found_inf_step_writes_nothing_even_the_first(backend, scope):
    """found_inf read in the kernels: a first step with inf creates the state as torch's fused AdamW does (zero
    moments, step 0) and changes no param; a later one changes nothing at all; the next finite step is the step an
    optimizer that never saw the inf ones takes."""
    model, ref = _model(), _model()
    opt, opt_ref = _opt(model, backend, rotation=scope), _opt(ref, backend, rotation=scope)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    _scaled_step(opt, torch.tensor(2.0), torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(float(st["step"]) == 0 and not moment(st, "exp_avg").any() for st in opt.state.values())
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.grad = torch.randn(p.shape, generator=gen)
            p.grad = q.grad * 2
        _scaled_step(opt, torch.tensor(2.0), torch.zeros(()))
        opt_ref.step()
        snap = _snapshot(model, opt)
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        _scaled_step(opt, torch.tensor(2.0), torch.ones(()))
        params, state = snap
        assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
        for pid, st in opt.state_dict()["state"].items():
            assert all(torch.equal(v, state[pid][k]) for k, v in st.items() if torch.is_tensor(v)), pid
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scope", ["none", "output", "global"])
def test_the_fused_step_reads_nothing_of_the_scaler_on_the_host(backend, scope):
    """The device path: under a GradScaler, the Triton step reads no tensor value on the host (each such read is a
    sync on CUDA; tests/optim/test_capturable.py counts real syncs on a GPU). The ext op runs on the CPU, where the
    launcher may read step counts; the scaler adds no read to it."""
    model = _model()
    opt = _opt(model, backend, rotation=scope, lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    counts = []
    for t in range(4):
        opt.zero_grad()
        loss = _loss(model, t) * (float("inf") if t == 2 else 1.0)
        scaler.scale(loss).backward()
        with HostReads() as scaled:
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        _loss(model, t).backward()
        with HostReads() as plain:
            opt.step()
        counts.append((scaled.count, plain.count))
    if backend == "triton":
        assert counts == [(0, 0)] * 4
    else:
        assert all(a == b for a, b in counts), counts
    assert float(next(iter(opt.state.values()))["step"]) == 7  # 8 steps, one skipped


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"), reason="host syncs need CUDA"
)
@pytest.mark.parametrize("scope", ["none", "output", "global"])
def test_scaler_step_never_syncs_with_the_host(scope):
    """On CUDA, scaler.step(opt) with the Triton step: torch.cuda.set_sync_debug_mode("error") raises on any sync."""
    model = _model().cuda()
    opt = FusedRotatedAdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), rotation=scope, block_size=16,
                            backend="triton")  # fmt: skip
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x = torch.randn(4, 6, device="cuda")
    for t in range(4):
        opt.zero_grad(set_to_none=False)
        loss = model(x).square().sum() * (float("inf") if t == 3 else 1.0)
        scaler.scale(loss).backward()
        if t >= 2:  # after the first steps built the kernels' cached tables
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    assert float(next(iter(opt.state.values()))["step"]) == 3  # the inf step was skipped on the device


@pytest.mark.parametrize("backend", FUSED)
def test_eager_unscales_bf16_grads_into_fp32_as_the_kernels_do(backend):
    """bf16 grads, a scale that is not 2^k: the eager path's unscaled copies stay fp32 (rounding them back to bf16
    moved exp_avg_sq by 6e-3 relative); eager and the fused kernels then agree to fp32 rounding."""
    out = []
    for make in (lambda p: RotatedAdamW(p, lr=1e-2, rotation="none"), lambda p: _opt_on(p, backend)):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
        opt = make([w])
        for t in range(5):
            w.grad = (torch.randn(64, generator=torch.Generator().manual_seed(t)) * 3000.0).to(torch.bfloat16)
            _scaled_step(opt, torch.tensor(3000.0), torch.zeros(()))
        out.append((w.detach().float(), moment(opt.state[w], "exp_avg_sq")))
    (we, ve), (wf, vf) = out
    assert torch.equal(we, wf)
    assert ((ve - vf).abs() / vf).max() < 1e-5


def _opt_on(params, backend):
    return FusedRotatedAdamW(params, lr=1e-2, rotation="none", backend=backend)
