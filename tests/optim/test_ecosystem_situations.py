"""Situations from other libraries' use of torch.optim (continual-learning code, torch's own optimizer tests),
each checked against what torch.optim.AdamW does, on every backend: empty per-param entries mean "no state
yet", a non-param key in ``opt.state`` survives a save and load, and tensor hyperparameters are refused in
torch's words.
"""

import copy

import pytest
import torch

from rotkern import ALL_SCOPES, RotatedAdamW

from .test_torch_parity import BACKENDS, _assert_models_equal, _batches, _make, _net, _train

ROTATED = [s for s in ALL_SCOPES if s not in ("none", "svd", "eigen")]


def _torch_then_rotkern(make_torch, make_rotkern, situation):
    """Run ``situation(model, opt)`` on torch.optim.AdamW and on rotkern; both must succeed."""
    for make in (make_torch, make_rotkern):
        model = _net()
        situation(model, make(model))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", *ROTATED])
def test_a_defaultdict_read_before_any_step_leaves_a_loadable_state(scope, backend):
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope)
    for p in model.parameters():
        assert opt.state[p] == {}  # a read of torch's defaultdict creates an empty entry
    sd = opt.state_dict()
    assert all(st == {} for st in sd["state"].values())
    fresh = _make(backend, model.named_parameters(), rotation=scope)
    fresh.load_state_dict(sd)
    batches = _batches(2)
    ref_model = _net()
    ref = _make(backend, ref_model.named_parameters(), rotation=scope)
    _train(model, fresh, batches)
    _train(ref_model, ref, batches)
    _assert_models_equal(model, ref_model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", *ROTATED])
def test_a_state_emptied_by_hand_restarts_that_param_and_the_checkpoint_still_loads(scope, backend):
    """avalanche's ``opt.state[p] = {}`` after a step: the next step trains, and save/load resumes it exactly."""
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope)
    batches = _batches(5)
    _train(model, opt, batches[:2])
    opt.state[model.fc.bias] = {}
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved["state"][list(dict(model.named_parameters())).index("fc.bias")] == {}
    _train(model, opt, batches[2:])
    # Every member of a unit keeps one step count (a multi-param unit restarts the emptied member's moments only).
    steps = {float(st["step"]) for st in opt.state.values()}
    assert steps == ({5.0} if scope == "global" else {5.0, 3.0}), steps  # fc.bias is its own unit but in global
    resumed = _net()
    resumed.load_state_dict(saved_model)
    other = _make(backend, resumed.named_parameters(), rotation=scope)
    other.load_state_dict(saved)
    _train(resumed, other, batches[2:])
    _assert_models_equal(model, resumed)
    # torch.optim.AdamW does the same: the emptied param restarts and the checkpoint loads.
    tmodel = _net()
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-2)
    _train(tmodel, topt, batches[:2])
    topt.state[tmodel.fc.bias] = {}
    topt.load_state_dict(copy.deepcopy(topt.state_dict()))
    _train(tmodel, topt, batches[2:])
    assert float(topt.state[tmodel.fc.bias]["step"]) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", "global", "output"])
def test_a_non_param_key_in_the_state_is_saved_and_loaded_back(scope, backend):
    """torch's own optimizer tests put ``opt.state["note"] = ...`` and expect it back after load_state_dict."""

    def situation(model, opt):
        _train(model, opt, _batches(1))
        opt.state["note"] = 1
        opt.state["meta"] = {"epoch": 3}
        sd = opt.state_dict()
        assert sd["state"]["note"] == 1 and sd["state"]["meta"] == {"epoch": 3}
        other = type(opt)(model.parameters(), **({} if isinstance(opt, torch.optim.AdamW) else _kw(opt)))
        other.load_state_dict(sd)
        assert other.state["note"] == 1 and other.state["meta"] == {"epoch": 3}
        _train(model, other, _batches(1, seed=1))

    def _kw(opt):
        g = opt.param_groups[0]
        kw = dict(rotation=g["rotation"], block_size=g["block_size"], seed=g["seed"])
        return kw if isinstance(opt, RotatedAdamW) else {**kw, "backend": backend}

    _torch_then_rotkern(
        lambda m: torch.optim.AdamW(m.parameters()),
        lambda m: _make(backend, m.parameters(), rotation=scope),
        situation,
    )


def test_an_unlisted_integer_param_id_is_still_refused():
    model = _net()
    opt = _make("eager", model.parameters(), rotation="global")
    _train(model, opt, _batches(1))
    sd = opt.state_dict()
    sd["state"][99] = copy.deepcopy(sd["state"][0])
    with pytest.raises(ValueError, match="param id 99, which no param group lists"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
        (dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99))), r"Tensor betas\[0\] must be 1-element"),
        (dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.99]))), r"Tensor betas\[1\] must be 1-element"),
        (dict(betas=(torch.tensor(0.9), 0.99)), "betas must be either both floats or both Tensors"),
        (
            dict(lr=torch.tensor(1e-3), foreach=True),
            "lr as a Tensor is not supported for capturable=False and foreach=True",
        ),
    ],
)
def test_tensor_hyperparameters_are_refused_in_torch_s_words(kwargs, message):
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    # torch's constructor compares a many-element betas tensor with a float first (a RuntimeError of its own)
    # and never reaches its "must be 1-element" wording; the others it words as rotkern does.
    if "1-element" not in message or "lr" in kwargs:
        with pytest.raises(ValueError, match=message):
            torch.optim.AdamW(params, **kwargs)
    with pytest.raises(ValueError, match=message):
        RotatedAdamW(params, **kwargs)
    opt = RotatedAdamW(params)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **kwargs})


def _edit(kind, params, extra):
    if kind == "append":
        params.append(extra)
    elif kind == "delete":
        del params[1]
    else:
        params[1] = extra


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", "output", "input", "layer"])
@pytest.mark.parametrize("kind", ["append", "delete", "replace"])
def test_a_param_list_changed_in_place_trains_the_new_list(kind, scope, backend):
    """avalanche's update_optimizer edits group["params"] in place; torch.optim trains the new list."""
    model = _net()
    opt = _make(backend, model.named_parameters(), rotation=scope)
    batches = _batches(3)
    _train(model, opt, batches[:1])
    params = opt.param_groups[0]["params"]
    extra = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)).to(params[0].device))
    kept = [p for p in params]
    _edit(kind, params, extra)
    before = {id(p): p.detach().clone() for p in params}
    for b in batches[1:]:
        opt.zero_grad()
        (model(*b) + (extra.square().sum() if extra.grad is not None or kind != "delete" else 0)).backward()
        opt.step()
    group = opt.param_groups[0]
    assert all(len(group[k]) == len(params) for k in ("shapes", "roles", "frozen", "names"))
    for p in params:
        if p.grad is not None:
            assert not torch.equal(p, before[id(p)])  # every param of the new list trained
            assert float(opt.state[p]["step"]) == (3 if any(p is q for q in kept) else 2)
    assert all(any(p is q for q in params) for p in opt.state)  # removed params' state is dropped
    sd = opt.state_dict()  # saves and loads with the new list
    other = _make(backend, [{"params": list(params), "roles": group["roles"], "names": group["names"]}], rotation=scope)
    other.load_state_dict(sd)
    # torch.optim.AdamW accepts the same edit.
    tmodel = _net()
    topt = torch.optim.AdamW(tmodel.parameters())
    _train(tmodel, topt, batches[:1])
    _edit(kind, topt.param_groups[0]["params"], torch.nn.Parameter(torch.randn(4, 6)))
    _train(tmodel, topt, batches[1:])


def test_a_param_list_change_that_would_mix_bases_is_refused_before_anything_changes():
    model = _net()
    opt = _make("eager", model.named_parameters(), rotation="global")
    _train(model, opt, _batches(1))
    params = opt.param_groups[0]["params"]
    snapshot = copy.deepcopy(opt.state_dict())
    params.append(torch.nn.Parameter(torch.randn(4, 6)))
    with pytest.raises(ValueError, match="param list changed in place.*add_param_group"):
        opt.step()
    params.pop()
    assert opt.state_dict()["param_groups"] == snapshot["param_groups"]
    _train(model, opt, _batches(1, seed=1))  # the original list still trains


@pytest.mark.parametrize("scope", ["none", "global", "output"])
def test_named_and_plain_params_save_the_same_groups_but_torch_s_param_names(scope):
    """Names given as (name, tensor) pairs are saved once, as torch's param_names; rotkern keeps them live."""
    model = _net()
    named = _make("eager", model.named_parameters(), rotation=scope)
    roles = named.param_groups[0]["roles"]
    plain = _make("eager", [{"params": list(model.parameters()), "roles": roles}], rotation=scope)
    a, b = named.state_dict()["param_groups"][0], plain.state_dict()["param_groups"][0]
    assert a.pop("param_names") == [n for n, _ in model.named_parameters()]
    assert a == b
    assert named.param_groups[0]["names"] == named.param_groups[0]["param_names"]  # live: both keys
    # A checkpoint saved with names still loads, and its names are still compared.
    sd = named.state_dict()
    other = _make("eager", _net().named_parameters(), rotation=scope)
    other.load_state_dict(sd)
    assert other.param_groups[0]["names"] == a.get("names", named.param_groups[0]["names"])


@pytest.mark.parametrize("cls", ["eager", "fused-auto"])
@pytest.mark.parametrize("scope", ["none", "global", "output"])
def test_float64_params_compute_and_keep_float64_moments_by_default(cls, scope):
    """torch.optim.AdamW computes in the param's dtype: at lr = 1e-9, float64 params near 1.0 must move."""
    from rotkern import FusedRotatedAdamW

    torch.manual_seed(0)
    w = torch.nn.Parameter(1 + 0.01 * torch.randn(5, 6, dtype=torch.float64))
    b = torch.nn.Parameter(1 + 0.01 * torch.randn(5, dtype=torch.float64))
    start = [w.detach().clone(), b.detach().clone()]
    make = RotatedAdamW if cls == "eager" else FusedRotatedAdamW
    opt = make([("w", w), ("b", b)], lr=1e-9, rotation=scope, block_size=4, weight_decay=0.0)
    tw, tb = (torch.nn.Parameter(t.clone()) for t in start)
    topt = torch.optim.AdamW([tw, tb], lr=1e-9, weight_decay=0.0)
    for k in range(3):
        g = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        gb = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + k))
        w.grad, b.grad, tw.grad, tb.grad = g, gb, g.clone(), gb.clone()
        opt.step()
        topt.step()
    assert opt.compute_dtype == torch.float64
    assert all(v.dtype == torch.float64 for st in opt.state.values() for k, v in st.items() if k != "step")
    assert not torch.equal(w, start[0]) and not torch.equal(b, start[1])
    moved = (w - start[0]).abs().max()
    assert moved > 2e-9  # 3 steps of ~lr each; in fp32 the param could not move at all (ulp(1) = 1.2e-7)
    if scope == "none":
        torch.testing.assert_close(w, tw, rtol=0, atol=1e-15)
        torch.testing.assert_close(b, tb, rtol=0, atol=1e-15)


def test_float64_params_keep_an_explicit_fp32_compute_and_refuse_fp32_only_backends():
    from rotkern import FusedRotatedAdamW

    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float64))
    assert RotatedAdamW([p], compute_dtype=torch.float32).compute_dtype == torch.float32
    assert RotatedAdamW([torch.nn.Parameter(torch.ones(3))]).compute_dtype == torch.float32
    with pytest.raises(ValueError, match="float64 params compute in float64 by default: pass backend='eager'"):
        FusedRotatedAdamW([p], backend="triton")
    FusedRotatedAdamW([p], backend="triton", compute_dtype=torch.float32)  # accepted: fp32 steps, as before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["none", "global", "layer", "output"])
def test_another_group_s_per_param_lists_copied_in_are_put_back(scope, backend):
    """ZeroRedundancyOptimizer's load_state_dict copies every group key of rank 0's local optimizer (per-param
    shapes, names, roles, ... included) into each rank's local optimizer, whose params are another subset: the
    optimizer keeps its own lists and trains as its untouched twin does."""
    named = list(_net().named_parameters())
    half = len(named) // 2
    models = [_net(), _net()]
    ranks = [
        [_make(backend, [(n, p) for n, p in list(m.named_parameters())[lo:hi]], rotation=scope) for m in models]
        for lo, hi in ((0, half), (half, len(named)))
    ]
    batches = _batches(4)

    def train(chunk):
        for b in chunk:
            for m, (opt0, opt1) in zip(models, zip(*ranks, strict=True), strict=True):
                opt0.zero_grad()
                opt1.zero_grad()
                m(*b).backward()
                opt0.step()
                opt1.step()

    train(batches[:2])
    rank0, rank1 = ranks[0][0], ranks[1][0]  # model 0's two "ranks"; model 1's are the untouched twins
    for src, dst in zip(rank0.param_groups, rank1.param_groups, strict=True):
        dst.update({k: v for k, v in src.items() if k != "params"})  # what ZeRO's _sync_param_groups does
    train(batches[2:])
    _assert_models_equal(models[0], models[1])
    assert rank1.param_groups[0]["shapes"] == [list(p.shape) for _, p in named[half:]]
    assert rank1.state_dict()["param_groups"][0]["shapes"] == [list(p.shape) for _, p in named[half:]]
