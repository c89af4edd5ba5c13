import copy
import io

import pytest
import torch

from rotkern import SCOPES, RotatedAdamW, param_groups_for
from rotkern.optim._base import moment
from rotkern.scopes import ALL_SCOPES
from rotkern.testing import assert_close_to_ref, dense_adamw_oracle

from ._models import MLP, TinyBlock, batch_for, loss_of


def _random_grads(params, steps, scale=1.0):
    return [[torch.randn_like(p) * scale for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_rotation_none_is_torch_adamw(amsgrad, maximize):
    shapes = [(13, 7), (7,), (5, 3, 2)]
    p_ref = [torch.randn(s) for s in shapes]
    p_ours = [p.clone() for p in p_ref]
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    ref = torch.optim.AdamW(p_ref, foreach=False, **kw)
    ours = RotatedAdamW(p_ours, rotation="none", **kw)
    grads = _random_grads(p_ref, 50)
    _run(ref, p_ref, grads)
    _run(ours, p_ours, grads)
    for a, b in zip(p_ours, p_ref, strict=True):
        assert_close_to_ref(a, b, "identity_vs_torch", what="param")
    for a, b in zip(p_ours, p_ref, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_to_ref(ours.state[a][key], ref.state[b][key], "identity_vs_torch", what=key)


def _flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_cls", [MLP, TinyBlock])
@pytest.mark.parametrize("block_size", [5, 8])
def test_matches_dense_oracle(scope, model_cls, block_size):
    model = model_cls()
    groups = param_groups_for(model, weight_decay=0.1)
    params = groups[0]["params"]
    theta0 = _flat(params)
    opt = RotatedAdamW(groups, lr=1e-2, betas=(0.9, 0.95), rotation=scope, block_size=block_size, seed=3)
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(20):
        opt.zero_grad()
        loss_of(model, batch_for(model, gen)).backward()
        grads.append(_flat([p.grad for p in params]))
        opt.step()
    decay = torch.cat(
        [torch.full((p.numel(),), float(m)) for p, m in zip(params, groups[0]["decay_mask"], strict=True)]
    )
    theta, m, v = dense_adamw_oracle(
        opt.rotation_matrix(), theta0, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=decay
    )
    assert_close_to_ref(_flat(params), theta, "ref_vs_oracle", what=f"{scope} params")
    assert_close_to_ref(_flat([moment(opt.state[p], "exp_avg") for p in params]), m, "ref_vs_oracle", what="exp_avg")
    v_got = _flat([moment(opt.state[p], "exp_avg_sq") for p in params])
    assert_close_to_ref(v_got, v, "ref_vs_oracle", what="exp_avg_sq")


def test_oracle_has_the_expected_structure():
    w = torch.zeros(3, 10)
    opt = RotatedAdamW([w], rotation="output", block_size=4, seed=0)
    rot = opt.units(0)[0].rotation
    assert torch.equal(opt.rotation_matrix(), torch.kron(torch.eye(3, dtype=torch.float64), rot.dense()))
    opt = RotatedAdamW([w], rotation="input", block_size=4, seed=0)
    d = opt.rotation_matrix()
    rot3 = opt.units(0)[0].rotation.dense()  # columns of length 3 < block: one 3x3 Haar block
    # vec(R W) for row-major vec: kron(R, I_10)
    assert torch.allclose(d, torch.kron(rot3, torch.eye(10, dtype=torch.float64)))
    for scope in ALL_SCOPES:  # svd: the identity until its first step (test_svd_scope.py checks it after)
        d = RotatedAdamW([w], rotation=scope, block_size=4).rotation_matrix()
        assert torch.allclose(d @ d.T, torch.eye(30, dtype=torch.float64), atol=1e-12)


def test_rotated_adam_differs_from_adam_but_block_size_1_does_not():
    params = [torch.randn(6, 9)]
    grads = _random_grads(params, 10)
    finals = {}
    for name, kw in {
        "none": dict(rotation="none"),
        "global": dict(rotation="global", block_size=8),
        "b1": dict(rotation="global", block_size=1),
    }.items():
        p = [params[0].clone()]
        _run(RotatedAdamW(p, lr=1e-2, **kw), p, grads)
        finals[name] = p[0]
    # Blocks of size 1 are a permutation with sign flips: Adam is equivariant to those.
    torch.testing.assert_close(finals["b1"], finals["none"], rtol=1e-6, atol=1e-7)
    assert (finals["global"] - finals["none"]).abs().max() > 1e-3


def test_param_groups_may_differ_in_rotation_and_none_grads_are_skipped():
    a, b, c = torch.randn(4, 6), torch.randn(6, 4), torch.randn(5)
    opt = RotatedAdamW(
        [{"params": [a], "rotation": "output", "block_size": 3}, {"params": [b, c], "rotation": "global", "seed": 9}],
        lr=1e-2,
    )
    assert [len(opt.units(i)) for i in (0, 1)] == [1, 1]
    a.grad = torch.randn_like(a)
    c0 = c.clone()
    opt.step()
    assert torch.equal(c, c0) and c not in opt.state  # no grads in group 1: untouched
    # c has no grad but shares the global unit: a zero gradient inside the rotation, which advances the unit's
    # moments (one vector, one step count), while c's values stay as they were.
    b.grad = torch.randn_like(b)
    opt.step()
    assert torch.equal(c, c0) and opt.state[c]["step"].item() == 1 and moment(opt.state[c], "exp_avg").abs().sum() > 0


def test_bf16_params_keep_fp32_state():
    p16 = torch.randn(8, 12).bfloat16()
    p32 = p16.float()
    opt16 = RotatedAdamW([p16], rotation="layer", block_size=4, lr=1e-2)
    opt32 = RotatedAdamW([p32], rotation="layer", block_size=4, lr=1e-2)
    grads = _random_grads([p32], 5)
    _run(opt32, [p32], grads)
    _run(opt16, [p16], [[g.bfloat16()] for (g,) in grads])
    assert p16.dtype == torch.bfloat16 and moment(opt16.state[p16], "exp_avg").dtype == torch.float32
    assert (p16.float() - p32).abs().max() < 0.05


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("scope", ALL_SCOPES)
def test_state_dict_roundtrip_is_bit_exact(scope):
    model = TinyBlock()
    kw = dict(lr=1e-2, rotation=scope, block_size=5, seed=4, amsgrad=True)
    opt = RotatedAdamW(param_groups_for(model, weight_decay=0.1), **kw)
    gen = torch.Generator().manual_seed(0)
    batches = [batch_for(model, gen) for _ in range(8)]

    def train(m, o, bs):
        for b in bs:
            o.zero_grad()
            loss_of(m, b).backward()
            o.step()

    train(model, opt, batches[:4])
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    snapshot = copy.deepcopy(saved_opt)
    train(model, opt, batches[4:])

    model2 = TinyBlock()
    model2.load_state_dict(saved_model)
    opt2 = RotatedAdamW(param_groups_for(model2, weight_decay=0.1), **kw)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, batches[4:])
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p2, p, rtol=0, atol=0, msg=n)
    # Loading did not modify what the user saved.
    for k, st in snapshot["state"].items():
        for key, val in st.items():
            now = saved_opt["state"][k][key]
            assert torch.equal(val, now) if torch.is_tensor(val) else val == now


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(rotation="layer"), "rotation"),
        (dict(seed=5), "seed"),
        (dict(block_size=6), "block_size"),
    ],
)
def test_mismatched_checkpoint_is_refused(change, match):
    p = torch.randn(6, 10)
    kw = dict(rotation="output", block_size=4, seed=1)
    opt = RotatedAdamW([p], **kw)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    other = RotatedAdamW([p.clone()], **{**kw, **change})
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(sd)


def test_checkpoint_of_another_model_or_optimizer_is_refused():
    p = torch.randn(6, 10)
    opt = RotatedAdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match="shapes"):
        RotatedAdamW([torch.randn(10, 6)]).load_state_dict(opt.state_dict())
    torch_opt = torch.optim.AdamW([p])
    torch_opt.step()
    with pytest.raises(ValueError, match=r"torch.optim state.*rotkern.from_adamw_state"):
        RotatedAdamW([p]).load_state_dict(torch_opt.state_dict())
    bad = opt.state_dict()
    bad["state"][0]["rotated_exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        RotatedAdamW([p]).load_state_dict(bad)


def test_bad_input_errors():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="block_size"):
        RotatedAdamW([w], block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        RotatedAdamW([w], block_size=-2)
    with pytest.raises(ValueError, match="unknown rotation"):
        RotatedAdamW([w], rotation="diagonal")
    with pytest.raises(ValueError, match="svd_every"):
        RotatedAdamW([w], rotation="svd", svd_every=0)
    with pytest.raises(ValueError, match="complex params keep complex moments"):
        RotatedAdamW([torch.randn(3, dtype=torch.complex64)], state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="beta"):
        RotatedAdamW([w], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="learning rate"):
        RotatedAdamW([w], lr=-1.0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = RotatedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_param_changing_shape_is_an_error():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = RotatedAdamW([("w", w)])
    w.data = torch.randn(4, 5)
    w.grad = torch.randn(4, 5)
    with pytest.raises(ValueError, match="'w' changed shape"):
        opt.step()


def test_changing_rotation_after_steps_is_refused():
    w = torch.randn(4, 4)
    opt = RotatedAdamW([w], rotation="output", block_size=2)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0]["rotation"] = "input"
    with pytest.raises(ValueError, match="changed after"):
        opt.step()


def test_closure_and_fp64_compute():
    w = torch.randn(3, 5, requires_grad=True)
    opt = RotatedAdamW([w], compute_dtype=torch.float64, block_size=4)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and moment(opt.state[w], "exp_avg").dtype == torch.float64


@pytest.mark.parametrize("scope", SCOPES)
def test_step_compiles_and_matches_eager(scope):
    """torch.compile(opt.step) is a benchmark baseline: it must trace and give the eager result."""
    torch._dynamo.reset()  # no dynamic-shape state from another test's compile of the same step
    shapes = [(24, 8), (8,), (16, 24)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opts = [RotatedAdamW(x, rotation=scope, block_size=8, lr=1e-2) for x in (ps, qs)]
    step = torch.compile(opts[0].step)
    for t in range(3):
        grads = [torch.randn(s) for s in shapes]
        for x in (ps, qs):
            for p, g in zip(x, grads, strict=True):
                p.grad = g.clone()
        step() if t else opts[0].step()  # the first step builds state and rotations outside the graph
        opts[1].step()
    for p, q in zip(ps, qs, strict=True):
        assert_close_to_ref(p.detach(), q.detach(), "fused_fp32", what=f"compiled {scope}")
