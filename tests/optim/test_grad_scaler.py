"""torch.amp.GradScaler with the rotated optimizers (``_step_supports_amp_scaling``): the scaler hands the step
``grad_scale`` and ``found_inf``; the step unscales copies of the grads and skips itself on inf/NaN, as torch's
fused AdamW does. Eager on CPU; ext and the Triton interpreter under their markers."""

from __future__ import annotations

import copy

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern.testing import assert_close_to_ref

from ._backends import CPU_BACKENDS

BACKENDS = CPU_BACKENDS


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))


def _opt(model, backend, **kw):
    kw = dict(lr=1e-2, rotation="global", block_size=8, **kw)
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


def test_rotation_none_matches_torch_fused_adamw_under_a_grad_scaler():
    ours, theirs = _model(), _model()
    opt = RotatedAdamW(ours.parameters(), lr=1e-2, rotation="none")
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
