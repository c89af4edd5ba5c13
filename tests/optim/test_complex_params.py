"""Complex params, as torch.optim.AdamW steps them: a complex element is two real coordinates. In every scope
and on every backend a complex param steps exactly as the real param holding its coordinates (real and
imaginary parts interleaved along the last dim, ``torch.view_as_real(p)`` flattened into it) and keeps
complex moments of its own shape, as torch does."""

import copy
import io

import pytest
import torch

from rotkern import ALL_SCOPES, FusedRotatedAdamW, RotatedAdamW, RotatedSGD, to_adamw_state
from rotkern.optim import moment
from rotkern.optim._base import as_real
from rotkern.testing import assert_close_to_ref

from ._backends import CPU_BACKENDS

NAMES = ["a.weight", "b.bias", "c.weight", "d.scale"]
SHAPES = [(5, 3), (4,), (7, 2), ()]
KW = dict(lr=1e-2, weight_decay=0.1, block_size=4)


def _make(backend, params, **kw):
    if backend == "eager":
        return RotatedAdamW(params, **{**KW, **kw})
    return FusedRotatedAdamW(params, backend=backend, **{**KW, **kw})


def _pair(seed, transposed=False, dtype=torch.complex64):
    """Complex params (one transposed, i.e. non-contiguous, when asked) and their real twins."""
    gen = torch.Generator().manual_seed(seed)
    cp = [torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    if transposed:
        cp[0] = torch.randn(SHAPES[0][::-1], dtype=dtype, generator=gen).t()
    rp = [as_real(p.contiguous()).clone() for p in cp]
    return cp, rp


def _grads(cp, rp, gen):
    for p, q in zip(cp, rp, strict=True):
        g = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        p.grad, q.grad = g, as_real(g).clone()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scope", ALL_SCOPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_complex_param_steps_as_its_real_coordinates(scope, backend, seed):
    cp, rp = _pair(seed, transposed=seed == 1)
    real = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))  # a real param beside them
    kw = dict(rotation=scope, amsgrad=seed == 1)
    oc = _make(backend, [*zip(NAMES, cp, strict=True), ("e.weight", real)], **kw)
    orr = _make(backend, [*zip(NAMES, rp, strict=True), ("e.weight", real.clone())], **kw)
    real_twin = orr.param_groups[0]["params"][-1]
    gen = torch.Generator().manual_seed(10 + seed)
    for _ in range(4):
        _grads(cp, rp, gen)
        real.grad = torch.randn(3, 4, generator=gen)
        real_twin.grad = real.grad.clone()
        oc.step()
        orr.step()
    for p, q in zip(cp, rp, strict=True):
        assert torch.equal(as_real(p.contiguous()), q)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if seed == 1 else ()):
            m = moment(oc.state[p], key)
            assert m.dtype == torch.complex64 and m.shape == p.shape
            assert torch.equal(as_real(m), moment(orr.state[q], key))
    assert torch.equal(real, real_twin)
    assert not torch.equal(as_real(cp[0].contiguous()), _pair(seed, transposed=seed == 1)[1][0])  # it trained


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rotation_none_matches_torch_adamw_on_complex_params(backend):
    cp, _ = _pair(0)
    ref = [p.clone() for p in cp]
    opt = _make(backend, list(zip(NAMES, cp, strict=True)), rotation="none")
    torch_opt = torch.optim.AdamW(ref, **{k: v for k, v in KW.items() if k != "block_size"})
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(cp, ref, strict=True):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(cp, ref, strict=True):
        assert_close_to_ref(as_real(p), as_real(q), "identity_vs_torch")
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == torch_opt.state[q][key].dtype == torch.complex64
            assert_close_to_ref(as_real(opt.state[p][key]), as_real(torch_opt.state[q][key]), "identity_vs_torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scope", ["global", "output", "svd"])
def test_a_complex_checkpoint_resumes_bit_identically(scope, backend):
    cp, _ = _pair(0, transposed=True)
    opt = _make(backend, list(zip(NAMES, cp, strict=True)), rotation=scope)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in cp:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = [p.detach().clone() for p in cp]
    resumed = _make(backend, list(zip(NAMES, again, strict=True)), rotation=scope)
    resumed.load_state_dict(torch.load(buf))
    for _ in range(3):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in cp]
        for o, ps in ((opt, cp), (resumed, again)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            o.step()
    for p, q in zip(cp, again, strict=True):
        assert torch.equal(p, q)


def _step_twins(cls, cp, rp, seed, **kw):
    """``cls`` on the complex params and on their real twins, 3 steps on the same grads; both optimizers."""
    oc = cls(list(zip(NAMES, cp, strict=True)), **kw)
    orr = cls(list(zip(NAMES, rp, strict=True)), **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        _grads(cp, rp, gen)
        oc.step()
        orr.step()
    for p, q in zip(cp, rp, strict=True):
        assert torch.equal(as_real(p), q)
    return oc, orr


def test_complex128_params_compute_in_float64():
    cp, rp = _pair(0, dtype=torch.complex128)
    oc, _ = _step_twins(RotatedAdamW, cp, rp, 5, **KW)
    assert oc.compute_dtype == torch.float64
    assert all(moment(oc.state[p], "exp_avg").dtype == torch.complex128 for p in cp)


def test_rotated_sgd_steps_complex_params_as_their_real_coordinates():
    cp, rp = _pair(2)
    _step_twins(RotatedSGD, cp, rp, 6, lr=1e-2, momentum=0.9, rotation="global", block_size=4)


def test_complex_refusals_name_the_param_and_change_nothing():
    p = torch.randn(4, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"param 0.*state_dtype=torch.bfloat16 has no complex counterpart"):
        RotatedAdamW([p], state_dtype=torch.bfloat16)
    opt = RotatedAdamW([p], **KW)
    before = p.clone()
    p.grad_dtype = None  # autograd would refuse it; a grad set by hand need not match
    p.grad = torch.randn(4, 3)  # a real grad for a complex param
    with pytest.raises(ValueError, match="grad has dtype torch.float32; the param is torch.complex64"):
        opt.step()
    assert torch.equal(p, before) and not opt.state
    p.grad = torch.randn(4, 3, dtype=torch.complex64)
    opt.step()
    with pytest.raises(ValueError, match="param 0 of the source is complex"):
        to_adamw_state(opt)
    sd = copy.deepcopy(opt.state_dict())
    real = RotatedAdamW([torch.randn(4, 3)], **KW)
    with pytest.raises(ValueError, match="the param is torch.float32 .a complex param keeps complex moments"):
        real.load_state_dict(sd)
    assert not real.state
