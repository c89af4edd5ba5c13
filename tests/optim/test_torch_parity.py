"""The torch.optim contract, kept exactly: what a training script observes of ``torch.optim.AdamW``
holds for rotkern on every backend. ``rotation="none"`` is compared with torch.optim.AdamW itself; the rotated
scopes with the same rule (untouched frozen params, atomic refusals, copies that step identically ...).

Backends: ``eager`` (RotatedAdamW) always; ``ext`` after ``make ext`` (marker ``ext``); ``triton`` on a GPU or
under TRITON_INTERPRET=1 (marker ``interpret``). Tests without a ``backend`` argument exercise the shared base
class, which every backend inherits.
"""

import copy
import io
import logging
import os
import pickle

import pytest
import torch
from torch import nn

import rotkern
from rotkern import ALL_SCOPES, FusedRotatedAdamW, RotatedAdamW, RotatedSGD, _backend
from rotkern._backend import ext_available, triton_available
from rotkern.optim import _base
from rotkern.optim._base import moment
from rotkern.testing import assert_close_to_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_triton = pytest.mark.skipif(
    not (triton_available() and (INTERPRET or ON_GPU)), reason="needs triton and a CUDA GPU, or TRITON_INTERPRET=1"
)
needs_ext = pytest.mark.skipif(
    not ext_available() or ON_GPU, reason="needs rotkern._C (make ext) and CPU tensors (its only path)"
)
BACKENDS = [
    pytest.param("eager"),
    pytest.param("ext", marks=[pytest.mark.ext, needs_ext]),
    pytest.param("triton", marks=[pytest.mark.interpret, needs_triton]),
]
KW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, block_size=4, seed=3)


class Net(nn.Module):
    """Odd shapes of every role: an embedding, a fused QKV weight, a conv kernel, a linear with bias, a norm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.qkv = nn.Linear(6, 18, bias=False)
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(6)

    def forward(self, idx, img):
        x = self.norm(self.emb(idx))
        q, k, v = self.qkv(x).chunk(3, -1)
        y = torch.tanh((q * k).sum(-1, keepdim=True)) * v
        return self.fc(y).square().mean() + self.conv(img).square().mean()


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().to(DEVICE)


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 7, (2, 4), generator=gen).to(DEVICE), torch.randn(2, 2, 5, 5, generator=gen).to(DEVICE))
        for _ in range(n)
    ]


def _make(backend, params, **kw):
    kw = {**KW, **kw}
    if backend == "eager":
        return RotatedAdamW(params, **kw)
    return FusedRotatedAdamW(params, backend=backend, **kw)


def _train(model, opt, batches, drop=()):
    """Steps on ``batches``; params named in ``drop`` get ``grad = None`` before the step."""
    named = dict(model.named_parameters())
    for b in batches:
        opt.zero_grad()
        model(*b).backward()
        for name in drop:
            named[name].grad = None
        opt.step()


def _snapshot(opt):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()}
            for p, st in opt.state.items()}  # fmt: skip


def _assert_state_equal(a, b, what=""):
    assert a.keys() == b.keys(), what
    for pid in a:
        assert a[pid].keys() == b[pid].keys(), what
        for k, v in a[pid].items():
            w = b[pid][k]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), f"{what} {k}"


def _assert_models_equal(m1, m2):
    for (n, p), q in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q), n


# %% 1. frozen parameters and missing gradients ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ALL_SCOPES)
def test_frozen_params_are_untouched_and_invisible(scope, backend):
    model = _net()
    model.qkv.weight.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    twin = copy.deepcopy(model)
    opt = _make(backend, model.named_parameters(), rotation=scope)
    # The same optimizer given only the trainable params: the others must follow its trajectory exactly.
    ref = _make(backend, [(n, p) for n, p in twin.named_parameters() if p.requires_grad], rotation=scope)
    batches = _batches(5)
    _train(model, opt, batches)
    _train(twin, ref, batches)
    named = dict(model.named_parameters())
    for n, w in frozen.items():
        assert torch.equal(named[n], w), n
        assert named[n] not in opt.state, n
    _assert_models_equal(model, twin)


def test_frozen_params_like_torch_adamw():
    model = _net()
    model.qkv.weight.requires_grad_(False)
    twin = copy.deepcopy(model)
    ours = RotatedAdamW(model.parameters(), **{**KW, "rotation": "none"})
    ref = torch.optim.AdamW(twin.parameters(), lr=KW["lr"], betas=KW["betas"], weight_decay=KW["weight_decay"])
    batches = _batches(5)
    _train(model, ours, batches)
    _train(twin, ref, batches)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_close_to_ref(p, q, "identity_vs_torch", what=n)
        assert (p in ours.state) == (q in ref.state), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ALL_SCOPES)
def test_a_param_without_grad_at_a_step_is_not_modified(scope, backend):
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope)
    batches = _batches(4)
    _train(model, opt, batches[:2])
    before = model.fc.weight.detach().clone()
    state_before = _snapshot(opt)[id(model.fc.weight)]
    _train(model, opt, batches[2:3], drop=["fc.weight"])
    assert torch.equal(model.fc.weight, before)
    after = opt.state[model.fc.weight]
    if scope == "global":
        # Its moments are a chunk of the shared unit's vector: they advance with the unit, with one step count.
        assert float(after["step"]) == float(opt.state[model.fc.bias]["step"]) == 3
    else:
        _assert_state_equal({0: state_before}, {0: after}, "state of a param without grad")
    _train(model, opt, batches[3:])
    assert not torch.equal(model.fc.weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_frozen_param_trains_once_unfrozen(scope, backend):
    model = _net()
    model.fc.weight.requires_grad_(False)
    opt = _make(backend, model.named_parameters(), rotation=scope)
    batches = _batches(4)
    _train(model, opt, batches[:2])
    w = model.fc.weight.detach().clone()
    assert model.fc.weight not in opt.state
    model.fc.weight.requires_grad_(True)
    _train(model, opt, batches[2:])
    assert not torch.equal(model.fc.weight, w)
    assert float(opt.state[model.fc.weight]["step"]) == 2 and float(opt.state[model.fc.bias]["step"]) == 4


def test_missing_grads_like_torch_adamw():
    model = _net()
    twin = copy.deepcopy(model)
    ours = RotatedAdamW(model.parameters(), **{**KW, "rotation": "none"})
    ref = torch.optim.AdamW(twin.parameters(), lr=KW["lr"], betas=KW["betas"], weight_decay=KW["weight_decay"])
    batches = _batches(4)
    for b in batches:
        _train(model, ours, [b], drop=["fc.weight", "conv.bias"])
        _train(twin, ref, [b], drop=["fc.weight", "conv.bias"])
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_close_to_ref(p, q, "identity_vs_torch", what=n)
        assert (p in ours.state) == (q in ref.state), n


# %% 2. state_dict / load_state_dict semantics ----------------------------------------------------------------
def _hooked(opt, calls):
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post_first"), prepend=True)

    def rewrite(o, sd):
        calls.append("load_pre")
        sd = dict(sd)
        sd["param_groups"] = [{**g, "lr": 0.125} for g in sd["param_groups"]]
        return sd

    opt.register_load_state_dict_pre_hook(rewrite)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre_first"), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o.param_groups[0]["lr"])))


@pytest.mark.parametrize("scope", ["none", "global"])
def test_state_dict_hooks_run_like_torch(scope):
    results = {}
    for kind in ("torch", "rotkern"):
        model = _net()
        if kind == "torch":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        else:
            opt = RotatedAdamW(model.parameters(), lr=1e-2, rotation=scope, block_size=4)
        _train(model, opt, _batches(1))
        calls = []
        _hooked(opt, calls)
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        results[kind] = (calls, opt.param_groups[0]["lr"])
    assert results["rotkern"] == results["torch"]
    assert results["torch"][1] == 0.125  # the pre-hook's rewritten dict was loaded


def _set_step(sd, value):
    for st in sd["state"].values():
        st["step"] = value(st["step"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", "global", "output"])
@pytest.mark.parametrize("kind", ["int", "float", "float64 tensor"])
def test_step_saved_as_a_plain_number_loads_as_a_tensor(kind, scope, backend):
    convert = {"int": lambda s: int(s), "float": lambda s: float(s), "float64 tensor": lambda s: s.double()}[kind]
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope)
    batches = _batches(4)
    _train(model, opt, batches[:2])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    runs = []
    for change in (False, True):
        m = _net()
        m.load_state_dict(saved_model)
        o = _make(backend, m.named_parameters(), rotation=scope)
        sd = copy.deepcopy(saved)
        if change:
            _set_step(sd, convert)
        o.load_state_dict(sd)
        for st in o.state.values():
            assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32
            assert st["step"].device == o._step_device(next(m.parameters()))
        _train(m, o, batches[2:])
        assert all(float(st["step"]) == 4 for st in o.state.values())
        runs.append(m)
    _assert_models_equal(*runs)


def test_torch_adamw_normalises_a_plain_step_too():
    model = _net()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt, _batches(1))
    sd = copy.deepcopy(opt.state_dict())
    _set_step(sd, int)
    opt.load_state_dict(sd)
    assert all(torch.is_tensor(st["step"]) for st in opt.state.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", "layer"])
def test_loaded_state_is_copied_and_the_input_untouched(scope, backend):
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope, amsgrad=True)
    batches = _batches(3)
    _train(model, opt, batches[:1])
    sd = opt.state_dict()
    copy_before = copy.deepcopy(sd)
    other = _make(backend, model.named_parameters(), rotation=scope, amsgrad=True)
    other.load_state_dict(sd)
    for st_other in other.state.values():
        for v in st_other.values():
            assert all(v.data_ptr() != w.data_ptr() for st in opt.state.values() for w in st.values() if v.numel())
    _train(model, other, batches[1:])
    _assert_state_dicts_equal(sd, copy_before)


def _assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a.keys() == b.keys()
    _assert_state_equal(a["state"], b["state"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [RotatedAdamW, FusedRotatedAdamW])
def test_map_location_cpu_cuda_both_ways(cls):
    for src, dst in (("cpu", "cuda"), ("cuda", "cpu")):
        torch.manual_seed(0)
        model = Net().to(src)
        kw = dict(KW, rotation="global") if cls is RotatedAdamW else dict(KW, rotation="global", backend="auto")
        opt = cls(model.named_parameters(), **kw)
        for b in _batches(2):
            opt.zero_grad()
            model(*(t.to(src) for t in b)).backward()
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, map_location=dst)
        model2 = copy.deepcopy(model).to(dst)
        opt2 = cls(model2.named_parameters(), **kw)
        opt2.load_state_dict(sd)
        for p in model2.parameters():
            st = opt2.state[p]
            assert moment(st, "exp_avg").device == p.device and st["step"].device == opt2._step_device(p)


# %% 3. copies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ALL_SCOPES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_like_the_original(how, scope, backend):
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope, amsgrad=True, svd_every=2)
    _train(model, opt, _batches(2))
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert type(clone) is type(opt) and clone.compute_dtype == opt.compute_dtype
    if backend != "eager":
        assert (clone.backend, clone.precision) == (opt.backend, opt.precision)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in model.parameters()]
        for o in (opt, clone):
            for p, g in zip([p for grp in o.param_groups for p in grp["params"]], grads, strict=True):
                p.grad = g.clone()
            o.step()
    for p, q in zip(
        [p for g in opt.param_groups for p in g["params"]], [p for g in clone.param_groups for p in g["params"]],
        strict=True,
    ):
        assert p is not q and torch.equal(p, q)
        for key, val in opt.state[p].items():
            assert torch.equal(val, clone.state[q][key]), key


# %% 4. validation before mutation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(rotation="globl"), "unknown rotation"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=5000), "block_size"),
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(0.9, 1.5)), "beta parameter at index 1"),
        (dict(vectors="all"), "vectors"),
        (dict(names=["only one"]), "'names' has 1 entries"),
        (dict(roles=["matrix", "nonsense"]), "unknown role"),
        (dict(rotation="svd", roles=["qkv", "vector"], names=["a.qkv.weight", "a.bias"]), "multiple of 3"),
    ],
)
def test_a_refused_param_group_leaves_the_optimizer_as_it_was(bad, match):
    model = _net()
    opt = RotatedAdamW([model.emb.weight, model.conv.weight], **KW)
    _train(model, opt, _batches(1))
    before = (copy.deepcopy(opt.param_groups), _snapshot(opt), dict(opt._unit_cache))
    group = {"params": [model.fc.weight, model.fc.bias], **bad}
    if "multiple of 3" in match:
        group["params"] = [torch.randn(5, 6, requires_grad=True), model.fc.bias]
    original = dict(group)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(group)
    assert group == original  # the caller's dict is not modified
    assert len(opt.param_groups) == 1 and opt._unit_cache.keys() == before[2].keys()
    _assert_state_equal(_snapshot(opt), before[1])
    _train(model, opt, _batches(1))  # steps as before
    opt.add_param_group({"params": [model.fc.weight, model.fc.bias], "rotation": "output"})  # the corrected retry
    _train(model, opt, _batches(1))
    assert float(opt.state[model.fc.weight]["step"]) == 1


def _raises_like_torch(make_args):
    errors = []
    for cls in (torch.optim.AdamW, RotatedAdamW):
        with pytest.raises((TypeError, ValueError)) as info:
            cls(*make_args())
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_params_torch_refuses_are_refused_the_same_way():
    _raises_like_torch(lambda: [nn.Parameter(torch.randn(3))])  # one tensor, not an iterable
    _raises_like_torch(lambda: [[{"params": {nn.Parameter(torch.randn(3))}}]])  # a set: no order
    _raises_like_torch(lambda: [[]])  # nothing to optimise
    _raises_like_torch(lambda: [[torch.randn(3, requires_grad=True) * 2]])  # non-leaf
    _raises_like_torch(lambda: [[torch.randn(3), "not a tensor"]])
    p = nn.Parameter(torch.randn(3))
    _raises_like_torch(lambda: [[{"params": [p]}, {"params": [p]}]])  # one param in two groups
    _raises_like_torch(lambda: [[("a", nn.Parameter(torch.randn(3))), nn.Parameter(torch.randn(3))]])  # mixed names


def test_named_params_give_torch_param_names_and_rotkern_names():
    model = _net()
    opt = RotatedAdamW(model.named_parameters(), rotation="layer")
    ref = torch.optim.AdamW(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"]
    assert opt.param_groups[0]["names"] == ref.param_groups[0]["param_names"]
    assert opt.param_groups[0]["roles"][1] == "qkv"  # recognised by name
    assert opt.state_dict()["param_groups"][0]["param_names"] == ref.state_dict()["param_groups"][0]["param_names"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_step_changes_nothing(backend):
    model = _net()
    opt = _make(backend, [{"params": [model.fc.weight, model.fc.bias]}, {"params": [model.emb.weight]}])
    _train(model, opt, _batches(1))
    params = [p.detach().clone() for p in model.parameters()]
    state = _snapshot(opt)
    opt.zero_grad()
    model(*_batches(1, seed=3)[0]).backward()
    model.emb.weight.grad = model.emb.weight.grad.to_sparse()  # the last group's grad is refused
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    _assert_state_equal(_snapshot(opt), state)


def test_a_refused_load_changes_nothing():
    model = _net()
    opt = RotatedAdamW(model.named_parameters(), **KW)
    _train(model, opt, _batches(2))
    good = copy.deepcopy(opt.state_dict())
    groups = copy.deepcopy(opt.param_groups, memo={id(p): p for p in model.parameters()})
    state = _snapshot(opt)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["lr"] = 123.0
    last = max(bad["state"])
    bad["state"][last]["rotated_exp_avg"] = torch.zeros(1)
    with pytest.raises(ValueError, match="has shape"):
        opt.load_state_dict(bad)
    for g, h in zip(opt.param_groups, groups, strict=True):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
        assert all(p is q for p, q in zip(g["params"], h["params"], strict=True))
    _assert_state_equal(_snapshot(opt), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_unit_of_mixed_dtypes_runs_on_every_backend(backend):
    torch.manual_seed(0)
    w = torch.randn(6, 5, device=DEVICE)
    b = torch.randn(7, device=DEVICE).bfloat16()
    runs = {}
    for kind in ("eager", backend):
        params = [w.clone(), b.clone()]
        opt = _make(kind, params, rotation="global")
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            params[0].grad = torch.randn(6, 5, generator=gen).to(DEVICE)
            params[1].grad = torch.randn(7, generator=gen).to(DEVICE).bfloat16()
            opt.step()
        assert all(float(st["step"]) == 3 for st in opt.state.values())
        runs[kind] = params
    assert_close_to_ref(runs[backend][0], runs["eager"][0], "fused_fp32", what="fp32 member")
    assert_close_to_ref(runs[backend][1], runs["eager"][1], "bf16_one_ulp", what="bf16 member")
    assert runs[backend][1].dtype == torch.bfloat16


# %% 5. layouts -------------------------------------------------------------------------------------------
def _odd_layouts(seed=0):
    torch.manual_seed(seed)
    t = torch.randn(5, 7, device=DEVICE).t()  # a transposed leaf: not contiguous
    conv = torch.randn(4, 3, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    v = torch.randn(9, device=DEVICE)
    return [t.requires_grad_(), conv.requires_grad_(), v.requires_grad_()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ALL_SCOPES)
def test_non_contiguous_params_equal_their_contiguous_copies(scope, backend):
    odd = _odd_layouts()
    assert not odd[0].is_contiguous() and not odd[1].is_contiguous()
    plain = [p.detach().contiguous().requires_grad_() for p in odd]
    results = []
    for params in (odd, plain):
        opt = _make(backend, params, rotation=scope, svd_every=2)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=gen).to(DEVICE)
                p.grad = torch.empty_like(p).copy_(g)  # the param's own layout, as autograd gives it (transposed)
            opt.step()
        results.append((params, opt))
    (odd, o1), (plain, o2) = results
    assert not odd[0].grad.is_contiguous()
    assert odd[1].is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    for p, q in zip(odd, plain, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moment(o1.state[p], key), moment(o2.state[q], key))


def test_non_contiguous_params_like_torch_adamw():
    ours_p, ref_p = _odd_layouts(), _odd_layouts()
    ours = RotatedAdamW(ours_p, **{**KW, "rotation": "none"})
    ref = torch.optim.AdamW(ref_p, lr=KW["lr"], betas=KW["betas"], weight_decay=KW["weight_decay"], foreach=False)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(ours_p, ref_p, strict=True):
            q.grad = torch.empty_like(q).copy_(torch.randn(q.shape, generator=gen).to(DEVICE))  # q's layout
            p.grad = q.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p, strict=True):
        assert_close_to_ref(p, q, "identity_vs_torch", what="param")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_transposed_weight_steps_with_its_autograd_grad(backend):
    """A transposed nn.Parameter gets a transposed grad from autograd; the step takes it (as torch.optim.AdamW)."""
    w = torch.nn.Parameter(torch.randn(3, 6, device=DEVICE).t())
    ref = torch.nn.Parameter(w.detach().contiguous())  # the same values, laid out plainly
    opts = [_make(backend, [p], rotation="output", block_size=4) for p in (w, ref)]
    for _ in range(3):
        x = torch.randn(4, 6, device=DEVICE)
        for p in (w, ref):
            p.grad = None
            (x @ p).square().sum().backward()
        assert not w.grad.is_contiguous() and ref.grad.is_contiguous()
        for o in opts:
            o.step()
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


# %% 6. zero-size params ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ALL_SCOPES)
def test_zero_size_params_are_a_no_op(scope, backend):
    torch.manual_seed(0)
    shapes = [(6, 5), (0, 8), (9,), (0, 3, 3, 3), (4, 2, 3, 3)]
    full = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes]
    kept = [p.detach().clone().requires_grad_() for p in full if p.numel()]
    opts = [_make(backend, full, rotation=scope, svd_every=2), _make(backend, kept, rotation=scope, svd_every=2)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in full:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        for p, q in zip([p for p in full if p.numel()], kept, strict=True):
            q.grad = p.grad.clone()
        for o in opts:
            o.step()
    for p, q in zip([p for p in full if p.numel()], kept, strict=True):
        assert torch.equal(p, q)
    for p in full:
        if p.numel() == 0:  # state and step as torch keeps them
            assert float(opts[0].state[p]["step"]) == 3 and moment(opts[0].state[p], "exp_avg").shape == p.shape


def test_zero_size_params_like_torch_adamw():
    ps = [torch.randn(0, 8, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    ours = RotatedAdamW(ps, rotation="none")
    ref = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in ps])
    for _ in range(2):
        for o in (ours, ref):
            for p in o.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            o.step()
    for p, q in zip(ps, ref.param_groups[0]["params"], strict=True):
        assert ours.state[p].keys() == ref.state[q].keys()
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"])


# %% 7. rotated state never loads into torch.optim silently -----------------------------------------------
def _trained(scope, cls=RotatedAdamW, **kw):
    model = _net()
    opt = cls(model.named_parameters(), rotation=scope, block_size=4, **kw)
    _train(model, opt, _batches(2))
    return model, opt


@pytest.mark.parametrize("scope", [s for s in ALL_SCOPES if s != "none"])
@pytest.mark.parametrize("weights_only", [True, False])
def test_rotated_state_is_refused_by_torch_adamw_at_its_first_step(scope, weights_only):
    model, opt = _trained(scope)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=weights_only)
    for cls in (torch.optim.AdamW, torch.optim.Adam):
        target = cls(model.parameters())
        # Format 3 keeps rotated moments as rotated_exp_avg, ...: torch loads the entries and finds no exp_avg
        target.load_state_dict(sd)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(KeyError, match="exp_avg"):
            target.step()


def test_rotated_sgd_momentum_is_not_picked_up_by_torch_sgd():
    model, opt = _trained("global", RotatedSGD, lr=1e-2, momentum=0.9)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sgd.load_state_dict(opt.state_dict())
    _train(model, sgd, _batches(1))
    # torch.optim.SGD found no momentum buffer under its key: it started a fresh one (= the gradient).
    for p in model.parameters():
        assert torch.equal(sgd.state[p]["momentum_buffer"], p.grad)  # a fresh buffer: rotkern's is not found


def test_rotation_none_state_moves_to_torch_adamw_and_back():
    model, opt = _trained("none")
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW(twin.parameters(), lr=KW["lr"])
    ref.load_state_dict(opt.state_dict())
    back = RotatedAdamW(copy.deepcopy(model).parameters(), rotation="none")
    back.load_state_dict(ref.state_dict())
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key])
    # A torch state is refused where the moments would need a rotation: the converter is the way.
    _, rotated = _trained("global")
    with pytest.raises(ValueError, match=r"rotkern.from_adamw_state"):
        rotated.load_state_dict(ref.state_dict())


# %% checkpoints across model wrappers -------------------------------------------------------------------
class _Wrapper(nn.Module):
    """Names like DistributedDataParallel's (``module.``), without a process group."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["ddp", "compile"])
def test_checkpoints_move_between_wrapped_and_unwrapped_models(wrap):
    model = _net()
    wrapped = _Wrapper(model) if wrap == "ddp" else torch.compile(model)
    prefix = "module." if wrap == "ddp" else "_orig_mod."
    assert next(iter(dict(wrapped.named_parameters()))).startswith(prefix)
    batches = _batches(4)
    opt = RotatedAdamW(wrapped.named_parameters(), **KW, rotation="output")
    _train(model, opt, batches[:2])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[2:])
    for direction in ("unwrapped", "wrapped"):
        m = _net()
        m.load_state_dict(saved_model)
        named = m.named_parameters() if direction == "unwrapped" else _Wrapper(m).named_parameters()
        o = RotatedAdamW(named, **KW, rotation="output")
        o.load_state_dict(copy.deepcopy(saved))
        _train(m, o, batches[2:])
        _assert_models_equal(model, m)
        if direction == "unwrapped":
            assert o.param_groups[0]["names"][0] == "emb.weight"  # this model's names are kept
    renamed = copy.deepcopy(saved)
    renamed["param_groups"][0]["param_names"] = ["x" + n for n in renamed["param_groups"][0]["param_names"]]
    with pytest.raises(ValueError, match="names"):
        RotatedAdamW(_net().named_parameters(), **KW, rotation="output").load_state_dict(renamed)


# %% what the optimizer says ------------------------------------------------------------------------------
def test_roles_guessed_from_shapes_are_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(_base, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="rotkern"):
        RotatedAdamW(_net().named_parameters(), rotation="layer")  # names: nothing guessed
        assert not caplog.records
        RotatedAdamW(_net().parameters(), rotation="global")  # roles do not matter in the global scope
        assert not caplog.records
        RotatedAdamW(_net().parameters(), rotation="output")
        RotatedAdamW(_net().parameters(), rotation="layer")
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "guessed from shapes (matrix x4, vector x4)" in msg and "named_parameters()" in msg


def test_auto_falling_back_to_eager_is_logged_once(monkeypatch, caplog):
    monkeypatch.delenv("ROTKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="rotkern"):
        for _ in range(2):
            model, opt = _trained("global", FusedRotatedAdamW, compute_dtype=torch.float64)
            assert opt.backend_used == "eager"
    fallbacks = [r for r in caplog.records if "runs the eager reference" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING


# %% what scripts around the optimizer rely on ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_hooks_scheduler_and_grad_scaler(backend):
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation="global")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    batches = _batches(3)
    for b in batches:
        opt.zero_grad()
        scaler.scale(model(*b)).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert calls == ["pre", "post"] * 3 and opt.param_groups[0]["lr"] == KW["lr"] / 8
    # An overflow: the scaler skips the step, so nothing changes.
    params, state = [p.detach().clone() for p in model.parameters()], _snapshot(opt)
    opt.zero_grad()
    scaler.scale(model(*batches[0])).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    _assert_state_equal(_snapshot(opt), state)
    # The optimizer supports amp scaling (as torch's fused AdamW): the scaler calls step(), which skips itself.
    assert calls == ["pre", "post"] * 4


def test_public_api_exports_the_converters():
    assert rotkern.from_adamw_state is rotkern.optim.convert.from_adamw_state
    assert rotkern.to_adamw_state is rotkern.optim.convert.to_adamw_state


def test_torch_adamw_keywords_are_accepted():
    model = _net()
    kw = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=True, maximize=True)
    for extra in (dict(foreach=False), dict(foreach=True), dict(fused=None), dict(fused=True)):
        for cls in (RotatedAdamW, FusedRotatedAdamW):
            opt = cls(model.parameters(), **kw, **extra, rotation="none")
            ref = torch.optim.AdamW(model.parameters(), **kw, **extra)
            shared = {k: v for k, v in ref.param_groups[0].items() if k not in ("params", "decoupled_weight_decay")}
            assert {k: opt.param_groups[0][k] for k in shared} == shared
    for bad in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{bad}=True"):
            RotatedAdamW(model.parameters(), **{bad: True})
    # FusedRotatedAdamW implements capturable=True (its Triton step; tests/optim/test_capturable.py)
    assert FusedRotatedAdamW(model.parameters(), capturable=True).param_groups[0]["capturable"] is True


@pytest.mark.parametrize("scope", ["global", "svd"])
def test_loading_keeps_the_rotations_built(scope):
    # The units (and the fused kernels' plans keyed by them) survive a load: rebuilding a GPT-2 global plan takes
    # tens of seconds. svd units stay bound to the state they read their bases from.
    model, opt = _trained(scope, svd_every=2)
    units = opt.units(0)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.units(0) is units
    _train(model, opt, _batches(2))  # svd: crosses a recompute with the loaded bases
