"""FusedRotatedAdamW: the Triton step (and the compiled extension's) behind the RotatedAdamW interface.

Tests marked ``interpret`` run the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1); those marked
``ext`` run the compiled extension's CPU path (after ``make ext``); the backend selection and argument checks
run anywhere. Tests that take ``backend`` run once per kernel backend.
"""

import copy
import io
import logging
import os

import pytest
import torch

from rotkern import SCOPES, FusedRotatedAdamW, RotatedAdamW, _backend, param_groups_for
from rotkern._backend import can_run_triton, ext_available, resolve_backend, triton_available
from rotkern.optim._base import logical_keys, moment
from rotkern.testing import assert_close_to_ref

from ._models import MLP, TinyBlock, batch_for, loss_of

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_triton = pytest.mark.skipif(
    not (triton_available() and (INTERPRET or ON_GPU)), reason="needs triton and a CUDA GPU, or TRITON_INTERPRET=1"
)
needs_ext = pytest.mark.skipif(
    not ext_available() or ON_GPU, reason="needs rotkern._C (make ext) and CPU tensors (its only path)"
)
BACKEND_PARAMS = [
    pytest.param("triton", marks=[pytest.mark.interpret, needs_triton]),
    pytest.param("ext", marks=[pytest.mark.ext, needs_ext]),
]
KW = dict(lr=1e-2, betas=(0.9, 0.95), block_size=5, seed=4)


def _train(model, opt, batches):
    for b in batches:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()


def _batches(model, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        tuple(t.to(DEVICE) for t in b) if isinstance(b, tuple) else b.to(DEVICE)
        for b in (batch_for(model, gen) for _ in range(n))
    ]


def _pair(model_cls, scope, backend="triton", **kw):
    """The same model twice, with RotatedAdamW and FusedRotatedAdamW (``backend``)."""
    torch.manual_seed(0)
    m_ref = model_cls().to(DEVICE)
    m_fused = copy.deepcopy(m_ref)
    opts = dict(KW, rotation=scope, **kw)
    ref = RotatedAdamW(param_groups_for(m_ref, weight_decay=0.1), **opts)
    if torch.is_tensor(opts["lr"]):
        opts["lr"] = opts["lr"].clone()  # schedulers update a tensor lr in place: one per optimizer
    fused = FusedRotatedAdamW(param_groups_for(m_fused, weight_decay=0.1), backend=backend, **opts)
    return m_ref, ref, m_fused, fused


def _assert_same_trajectory(m_ref, ref, m_fused, fused, what, name="fused_fp32"):
    for (n, p), q in zip(m_ref.named_parameters(), m_fused.parameters(), strict=True):
        assert_close_to_ref(q, p, name, what=f"{what} {n}")
        for key, val in ref.state[p].items():
            if key != "step":
                assert_close_to_ref(fused.state[q][key], val, name, what=f"{what} {n} {key}")
            assert float(fused.state[q]["step"]) == float(ref.state[p]["step"])


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


# %% against the eager reference ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_cls", [MLP, TinyBlock])
def test_matches_rotated_adamw(scope, model_cls, backend):
    m_ref, ref, m_fused, fused = _pair(model_cls, scope, backend, amsgrad=model_cls is TinyBlock)
    batches = _batches(m_ref, 8)
    _train(m_ref, ref, batches)
    _train(m_fused, fused, batches)
    _assert_same_trajectory(m_ref, ref, m_fused, fused, f"{scope} {model_cls.__name__}")
    assert all(fused.state[p]["step"].device == p.device for p in m_fused.parameters())
    assert fused.backend_used == backend


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_rotation_none_is_torch_adamw(amsgrad, backend):
    shapes = [(13, 7), (7,), (5, 3, 2), (3000,)]
    p_ref = [torch.randn(s, device=DEVICE) for s in shapes]
    p_ours = [p.clone() for p in p_ref]
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, amsgrad=amsgrad, maximize=amsgrad)
    ref = torch.optim.AdamW(p_ref, foreach=False, **kw)
    ours = FusedRotatedAdamW(p_ours, rotation="none", backend=backend, **kw)
    for _ in range(10):
        for p, q in zip(p_ref, p_ours, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step()
        ours.step()
    for a, b in zip(p_ours, p_ref, strict=True):
        assert_close_to_ref(a, b, "identity_vs_torch", what="param")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_to_ref(ours.state[a][key], ref.state[b][key], "identity_vs_torch", what=key)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("save_with, load_into", [("fused", "eager"), ("eager", "fused")])
def test_state_dict_moves_between_eager_and_fused(save_with, load_into, backend):
    classes = {"fused": FusedRotatedAdamW, "eager": RotatedAdamW}
    extra = {"fused": dict(backend=backend), "eager": {}}
    opts = dict(KW, rotation="global", amsgrad=True)
    torch.manual_seed(0)
    model = TinyBlock().to(DEVICE)
    opt = classes[save_with](param_groups_for(model, weight_decay=0.1), **opts, **extra[save_with])
    batches = _batches(model, 8)
    _train(model, opt, batches[:4])
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    assert saved_opt["rotkern"]["moments"] == ["exp_avg", "exp_avg_sq"]

    runs = {}
    for kind in (save_with, load_into):
        m = TinyBlock().to(DEVICE)
        m.load_state_dict(saved_model)
        o = classes[kind](param_groups_for(m, weight_decay=0.1), **opts, **extra[kind])
        o.load_state_dict(copy.deepcopy(saved_opt))
        want = next(m.parameters()).device if kind == "fused" else torch.device("cpu")
        assert all(st["step"].device == want for st in o.state.values())
        keys = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert all(set(logical_keys(st)) == keys for st in o.state.values())
        _train(m, o, batches[4:])
        runs[kind] = (m, o)
    (m_a, o_a), (m_b, o_b) = runs["eager"], runs["fused"]
    _assert_same_trajectory(m_a, o_a, m_b, o_b, f"{save_with} -> {load_into}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("scope", ["global", "output"])
def test_nan_grads_propagate_like_rotated_adamw(scope, backend):
    m_ref, ref, m_fused, fused = _pair(MLP, scope, backend)
    for model, opt in ((m_ref, ref), (m_fused, fused)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        model.fc1.weight.grad[2, 3] = float("nan")
        opt.step()
    for p, q in zip(m_ref.parameters(), m_fused.parameters(), strict=True):
        assert torch.equal(torch.isnan(p), torch.isnan(q))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.isnan(moment(ref.state[p], key)), torch.isnan(moment(fused.state[q], key)))
    assert torch.isnan(m_fused.fc1.weight).any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_tensor_lr_and_scheduler(backend):
    m_ref, ref, m_fused, fused = _pair(MLP, "output", backend, lr=torch.tensor(1e-2, device=DEVICE))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ref, fused)]
    batches = _batches(m_ref, 5)
    for b in batches:
        for model, opt, sched in ((m_ref, ref, scheds[0]), (m_fused, fused, scheds[1])):
            opt.zero_grad()
            loss_of(model, b).backward()
            opt.step()
            sched.step()
    _assert_same_trajectory(m_ref, ref, m_fused, fused, "tensor lr")


@pytest.mark.interpret
@needs_triton
def test_float64_moments_run_the_reference_under_auto(monkeypatch):
    monkeypatch.delenv("ROTKERN_BACKEND", raising=False)
    torch.manual_seed(0)
    m_ref = MLP().to(DEVICE)
    m_fused = copy.deepcopy(m_ref)
    kw = dict(KW, rotation="global", compute_dtype=torch.float64)
    ref = RotatedAdamW(param_groups_for(m_ref, weight_decay=0.1), **kw)
    fused = FusedRotatedAdamW(param_groups_for(m_fused, weight_decay=0.1), **kw)
    batches = _batches(m_ref, 3)
    _train(m_ref, ref, batches)
    _train(m_fused, fused, batches)
    assert fused.backend_used == "eager"
    for p, q in zip(m_ref.parameters(), m_fused.parameters(), strict=True):
        assert torch.equal(p, q) and moment(fused.state[q], "exp_avg").dtype == torch.float64
    monkeypatch.setenv("ROTKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="fp32 moments"):
        _train(m_fused, fused, batches[:1])


@pytest.mark.interpret
@needs_triton
def test_params_on_several_devices_are_refused_before_any_change():
    # Non-contiguous params run on every backend (tests/optim/test_torch_parity.py); devices must agree.
    a = torch.randn(4, 6, device=DEVICE)
    b = torch.randn(3, 5, device="meta")
    for scope, err, match in (("output", RuntimeError, "several devices"), ("global", ValueError, "several devices")):
        opt = FusedRotatedAdamW([a, b], rotation=scope, backend="triton", block_size=4)
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        a0 = a.clone()
        with pytest.raises(err, match=match):
            opt.step()
        assert torch.equal(a, a0) and len(opt.state) == 0


# %% backend selection and argument checks (no kernel runs) ------------------------------------------
def test_backend_resolution(monkeypatch, caplog):
    monkeypatch.delenv("ROTKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_logged", set())
    unbuilt = "needs the compiled extension rotkern._C, which is not built (build it with: python -m rotkern.build_ext)"
    monkeypatch.setattr(_backend, "_ext_import_error", lambda: unbuilt)
    cpu = torch.zeros(1)
    assert not can_run_triton(cpu)
    assert resolve_backend("eager", cpu) == "eager"
    with caplog.at_level(logging.INFO, logger="rotkern"):
        assert resolve_backend("auto", cpu) == "eager"
        assert resolve_backend("auto", cpu) == "eager"
    # Falling back to the eager path is said once, at WARNING, with the reason.
    fallbacks = [r for r in caplog.records if "runs the eager reference" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING
    assert "for cpu tensors instead of a fused backend: needs CUDA tensors (or TRITON_INTERPRET=1); " in (
        fallbacks[0].getMessage()
    )
    assert unbuilt in fallbacks[0].getMessage()
    with pytest.raises(RuntimeError, match=r"backend='ext' needs the compiled extension rotkern._C, which is not"):
        resolve_backend("ext", cpu)
    # A built extension: auto prefers it to the eager reference on CPU tensors, never to Triton.
    monkeypatch.setattr(_backend, "_ext_import_error", lambda: None)
    assert resolve_backend("auto", cpu) == "ext" and resolve_backend("ext", cpu) == "ext"
    with pytest.raises(RuntimeError, match="has a CPU path only"):
        resolve_backend("ext", torch.zeros(1, device="meta"))
    monkeypatch.setattr(_backend, "_ext_import_error", lambda: unbuilt)
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1\); got cpu"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("ROTKERN_BACKEND", "eager")
    assert resolve_backend("triton", cpu) == "eager"
    monkeypatch.setenv("ROTKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ROTKERN_BACKEND"):
        resolve_backend("auto", cpu)
    monkeypatch.setenv("ROTKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="ROTKERN_BACKEND='triton'"):
        resolve_backend("auto", cpu)
    if triton_available():
        monkeypatch.delenv("ROTKERN_BACKEND")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert can_run_triton(cpu) and resolve_backend("auto", cpu) == "triton"
        assert resolve_backend("auto", torch.zeros(1, device="meta")) == "eager"


def test_bad_arguments():
    p = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="precision"):
        FusedRotatedAdamW(p, precision="fp16")
    with pytest.raises(ValueError, match="backend"):
        FusedRotatedAdamW(p, backend="cuda")
    with pytest.raises(ValueError, match="compute_dtype"):
        FusedRotatedAdamW(p, backend="triton", compute_dtype=torch.float64)


def test_eager_fallback_is_rotated_adamw_exactly(monkeypatch):
    monkeypatch.setenv("ROTKERN_BACKEND", "eager")
    torch.manual_seed(0)
    m_ref = TinyBlock()
    m_fused = copy.deepcopy(m_ref)
    ref = RotatedAdamW(param_groups_for(m_ref, weight_decay=0.1), **KW, rotation="output")
    fused = FusedRotatedAdamW(param_groups_for(m_fused, weight_decay=0.1), **KW, rotation="output", backend="triton")
    batches = [batch_for(m_ref, torch.Generator().manual_seed(i)) for i in range(3)]
    _train(m_ref, ref, batches)
    _train(m_fused, fused, batches)
    for p, q in zip(m_ref.parameters(), m_fused.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.skipif(INTERPRET or ON_GPU, reason="checks the error on a machine where Triton cannot run")
def test_explicit_triton_on_cpu_raises_at_step(monkeypatch):
    monkeypatch.delenv("ROTKERN_BACKEND", raising=False)
    p = torch.randn(3, 4, requires_grad=True)
    opt = FusedRotatedAdamW([p], backend="triton")
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        opt.step()


# %% GPU only ----------------------------------------------------------------------------------------
GPT2_SHAPES = (
    [((50304, 768), "embedding"), ((1024, 768), "embedding")]
    + [
        shape_role
        for _ in range(12)
        for shape_role in (
            ((768,), "vector"),
            ((2304, 768), "qkv"),
            ((768, 768), "matrix"),
            ((768,), "vector"),
            ((3072, 768), "matrix"),
            ((768, 3072), "matrix"),
        )
    ]
    + [((768,), "vector")]
)


# Extra device memory beyond params, grads and Adam's moments at GPT-2 124M, n = 768, as the README states it (MiB,
# from the plans: the fp32 workspace, the int32 permutation of global/layer, the tables).
GPT2_EXTRA_MIB = {"none": 4.6, "output": 489.1, "input": 488.0, "layer": 962.4, "global": 962.4}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scope", SCOPES)
def test_gpt2_memory_beyond_adam_state_is_what_the_readme_says(scope):
    """The allocator's view, the baseline taken before the first step (params and grads only): what the first step
    keeps beyond the moments and step counts is within 1 % (+ 2 MiB of small tables) of the README's figure; what
    it needed at its peak is printed (building the permutation on the device sorts 64-bit keys); a later step
    allocates at most 1 MiB beyond that."""
    params = [torch.randn(s, device="cuda") * 0.02 for s, _ in GPT2_SHAPES]
    d = sum(p.numel() for p in params)
    assert d == 124_373_760  # nanoGPT GPT-2 124M (tied head, no biases)
    group = {"params": params, "roles": [r for _, r in GPT2_SHAPES], "decay_mask": [p.dim() >= 2 for p in params]}
    opt = FusedRotatedAdamW(
        [group], lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, rotation=scope, block_size=768, backend="triton"
    )
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    first_peak = torch.cuda.max_memory_allocated() - base
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    kept = torch.cuda.memory_allocated() - base - state
    base2 = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    later = torch.cuda.max_memory_allocated() - base2
    mib = 2**20
    print(
        f"\n[{scope}] d={d}: kept beyond Adam state {kept / mib:.1f} MiB ({kept / (4 * d):.3f} fp32 d-vectors; README "
        f"{GPT2_EXTRA_MIB[scope]} MiB); first step peak {first_peak / mib:.1f} MiB beyond params and grads (state "
        f"{state / mib:.1f}); a later step's peak {later / mib:.2f} MiB"
    )
    assert state >= 8 * d  # exp_avg and exp_avg_sq, fp32
    assert kept <= GPT2_EXTRA_MIB[scope] * mib * 1.01 + 2 * mib
    assert later <= mib


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_changing_lr_does_not_recompile():
    from rotkern.kernels.rotated_adamw_step import _rotated_adamw_kernel

    caches = getattr(_rotated_adamw_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version keeps no device_caches to count compiled kernels")
    m_ref, ref, m_fused, fused = _pair(TinyBlock, "output")
    batches = _batches(m_fused, 4)
    _train(m_fused, fused, batches[:1])
    compiled = sum(len(v[0]) for v in caches.values())
    for i, b in enumerate(batches[1:]):
        for g in fused.param_groups:
            g["lr"] = 1e-2 / (i + 2)
        _train(m_fused, fused, [b])
    assert sum(len(v[0]) for v in caches.values()) == compiled


@pytest.mark.ext
@needs_ext
def test_backend_used_covers_every_group_of_the_step():
    """``backend_used`` is "eager" when any group ran a unit on the eager reference, whatever the groups' order."""
    a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(4, 6))
    for order in ([("svd", a), ("output", b)], [("output", b), ("svd", a)]):
        opt = FusedRotatedAdamW([{"params": [p], "rotation": r} for r, p in order], backend="ext", block_size=8)
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        assert opt.backend_used == "eager"
    opt = FusedRotatedAdamW([b], backend="ext", rotation="output", block_size=8)
    opt.step()
    assert opt.backend_used == "ext"
