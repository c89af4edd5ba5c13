"""rotation="svd" (paper Alg. 5, Sec. 3.2): the dynamic SVD basis scope.

The reference here is Alg 5 written out in plain torch: dense bases, float64 Adam, g~ = L^T G R. Two things
are rotkern's definitions, not the paper's, and the reference follows them:

- the bases are completed to full orthogonal matrices with the Householder reflectors of the singular
  vectors (``torch.geqrf``; built densely here with ``torch.linalg.householder_product``, applied in rotkern
  with ``torch.ormqr``), signs fixed so that the first r columns are U and V themselves;
- at a recompute step g~ is S padded with zeros (what L^T G R is in exact arithmetic).

The SVD runs in the optimizer's compute dtype on the same gradient in both, so both see the same U, S, V;
everything else is independent.
"""

import copy
import io
import os

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW, RotatedSGD, param_groups_for
from rotkern._backend import triton_available
from rotkern.optim._base import moment
from rotkern.scopes import SvdRotation, build_units
from rotkern.testing import assert_close_to_ref, dense_adamw_oracle

from ._models import MLP, TinyBlock, batch_for, loss_of

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# %% the plain-torch Alg 5 -----------------------------------------------------------------------------
def _complete(x: torch.Tensor) -> torch.Tensor:
    """(n, r) orthonormal columns -> (n, n) orthogonal [x, complement] (float64), rotkern's completion."""
    n, r = x.shape
    if n == r:
        return x.double()
    a, tau = torch.geqrf(x)
    q = torch.linalg.householder_product(torch.cat([a, a.new_zeros(n, n - r)], 1).double(), tau.double())
    signs = torch.ones(n, dtype=torch.float64)
    signs[:r] = torch.where(torch.diagonal(a)[:r] >= 0, 1.0, -1.0).double()
    return q * signs


def _pieces(shape, qkv):
    k = shape[0] // 3 if qkv else shape[0]
    return [(j * k, (j + 1) * k) for j in range(3 if qkv else 1)]


def alg5(params0, grads, *, every, cdt, lr, betas, eps, weight_decay, amsgrad=False, maximize=False, qkv=()):
    """Alg 5 on every >= 2-D param (matricised (out, -1); q/k/v thirds of the indices in ``qkv``), Adam on the
    rest. Returns the final params, float64."""
    b1, b2 = betas
    thetas = [p.double().clone() for p in params0]
    state = [[{} for _ in _pieces(p.shape, i in qkv)] for i, p in enumerate(params0)]
    for t, gs in enumerate(grads, start=1):
        for i, (theta, g) in enumerate(zip(thetas, gs, strict=True)):
            g = -g if maximize else g
            mat = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
            delta = torch.zeros(mat.shape, dtype=torch.float64)
            for (a, b), st in zip(_pieces(g.shape, i in qkv), state[i], strict=True):
                gm = mat[a:b]
                if g.dim() < 2:  # a vector: plain Adam
                    left, right, gt = None, None, gm.double()
                elif (t - 1) % every == 0:
                    u, s, vh = torch.linalg.svd(gm.to(cdt), full_matrices=False)
                    st["L"], st["R"] = _complete(u), _complete(vh.mT)
                    gt = torch.zeros(gm.shape, dtype=torch.float64)
                    gt.diagonal()[: s.numel()] = s.double()
                    left, right = st["L"], st["R"]
                else:
                    left, right = st["L"], st["R"]
                    gt = left.T @ gm.double() @ right
                st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * gt
                st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * gt * gt
                st["vmax"] = torch.maximum(st.get("vmax", st["v"]), st["v"])
                vv = st["vmax"] if amsgrad else st["v"]
                u = (st["m"] / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + eps)
                delta[a:b] = u if left is None else left @ u @ right.T
            decay = weight_decay if g.dim() >= 2 else 0.0
            theta.mul_(1 - lr * decay).sub_(lr * delta.reshape(theta.shape))
    return thetas


def _grads(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


ODD_SHAPES = [(7, 5), (5, 7), (1, 4), (4, 3, 3, 3), (6,)]  # conv: (out, in * kh * kw) = (4, 27)


# %% against Alg 5 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cdt", [torch.float32, torch.float64])
def test_matches_plain_alg5_over_recompute_boundaries(seed, cdt):
    torch.manual_seed(100 + seed)
    params = [torch.randn(s) for s in ODD_SHAPES]
    p0 = [p.clone() for p in params]
    grads = _grads(ODD_SHAPES, 8, seed)  # recomputes at steps 1, 4, 7
    decay_mask = [p.dim() >= 2 for p in params]
    opt = RotatedAdamW(
        [{"params": params, "decay_mask": decay_mask}], rotation="svd", svd_every=3, compute_dtype=cdt, **HYPER
    )
    _run(opt, params, grads)
    want = alg5(p0, grads, every=3, cdt=cdt, **HYPER)
    for shape, p, w in zip(ODD_SHAPES, params, want, strict=True):
        assert_close_to_ref(p, w, "ref_vs_oracle", what=f"svd {shape} {cdt}")
    assert [float(opt.state[p]["step"]) for p in params] == [8.0] * len(params)
    assert "svd_u" not in opt.state[params[-1]]  # vectors="auto": the 1-D param is unrotated


@pytest.mark.parametrize("amsgrad, maximize", [(True, False), (False, True)])
def test_matches_plain_alg5_with_amsgrad_maximize_and_split_qkv(amsgrad, maximize):
    shapes = [(12, 4), (5, 6)]
    params = [torch.randn(s) for s in shapes]
    p0 = [p.clone() for p in params]
    grads = _grads(shapes, 7, 5)
    kw = dict(HYPER, amsgrad=amsgrad, maximize=maximize)
    opt = RotatedAdamW(
        [{"params": params, "roles": ["qkv", "matrix"]}], rotation="svd", svd_every=2, compute_dtype=torch.float64, **kw
    )
    assert [u.shape for u in opt.units(0)] == [(4, 4)] * 3 + [(5, 6)]
    _run(opt, params, grads)
    want = alg5(p0, grads, every=2, cdt=torch.float64, qkv=(0,), **kw)
    for p, w in zip(params, want, strict=True):
        assert_close_to_ref(p, w, "ref_vs_oracle", what="svd qkv")
    assert opt.state[params[0]]["svd_u"].shape == (3, 4, 4)
    # split_qkv=False: one 12 x 4 matrix, so a different trajectory
    unsplit = [p.clone() for p in p0]
    opt2 = RotatedAdamW(
        [{"params": unsplit, "roles": ["qkv", "matrix"]}], rotation="svd", svd_every=2, split_qkv=False, **kw
    )
    _run(opt2, unsplit, grads)
    assert_close_to_ref(unsplit[0], alg5(p0, grads, every=2, cdt=torch.float32, **kw)[0], "ref_vs_oracle", what="qkv")
    assert (unsplit[0] - params[0]).abs().max() > 1e-4


def test_first_step_is_lr_times_u_v_transpose():
    """At step 1 g~ = S, so Adam's update is sign(S) = 1 on the diagonal: the Muon direction U V^T (paper App. E)."""
    w = torch.zeros(6, 9)
    g = torch.randn(6, 9)
    w.grad = g.clone()
    RotatedAdamW([w], rotation="svd", lr=0.1, eps=1e-12, weight_decay=0.0).step()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(w, -0.1 * u @ vh, rtol=1e-5, atol=1e-6)


# %% bases ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 4), (6, 6), (300, 20), (20, 300), (64, 48)])
def test_bases_are_orthogonal_and_start_with_the_singular_vectors(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    rot = SvdRotation(*shape)
    s, bases = rot.compute(g)
    left, right = rot.matrices(bases, dtype=torch.float32)
    for q in (left, right):
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=1e-5)
    u, s_ref, vh = torch.linalg.svd(g, full_matrices=False)
    r = min(shape)
    torch.testing.assert_close(left[:, :r], u, rtol=0, atol=1e-5)
    torch.testing.assert_close(right[:, :r], vh.mT, rtol=0, atol=1e-5)
    assert torch.equal(s, s_ref)
    assert rot.left_implicit == (shape[0] > r) and rot.right_implicit == (shape[1] > r)
    # The implicit (Householder) products agree with the dense matrices, and unrotate inverts rotate.
    x = torch.randn(shape)
    torch.testing.assert_close(rot.rotate(x, bases), left.T @ x @ right, rtol=0, atol=1e-5)
    torch.testing.assert_close(rot.unrotate(rot.rotate(x, bases), bases), x, rtol=0, atol=1e-5)
    # L^T G R is S padded with zeros, up to rounding (the step uses S itself).
    want = torch.zeros(shape)
    want.diagonal()[:r] = s
    torch.testing.assert_close(rot.rotate(g, bases), want, rtol=0, atol=1e-4)


def test_bases_are_deterministic_and_in_state():
    torch.manual_seed(0)
    shapes = [(9, 4), (4, 9)]
    runs = []
    for _ in range(2):
        params = [torch.ones(s) for s in shapes]
        opt = RotatedAdamW(params, rotation="svd", svd_every=2)
        _run(opt, params, _grads(shapes, 3, 0))
        runs.append(opt)
    for p, q in zip(runs[0].param_groups[0]["params"], runs[1].param_groups[0]["params"], strict=True):
        st, st2 = runs[0].state[p], runs[1].state[q]
        assert sorted(st) == sorted(st2) and all(torch.equal(st[k], st2[k]) for k in st)
    st = runs[0].state[runs[0].param_groups[0]["params"][0]]
    assert {k: tuple(v.shape) for k, v in st.items() if k.startswith("svd_")} == {
        "svd_u": (1, 9, 4),
        "svd_u_tau": (1, 4),
        "svd_v": (1, 4, 4),
    }


def test_bases_change_only_at_recompute_steps():
    w = torch.randn(5, 3)
    opt = RotatedAdamW([w], rotation="svd", svd_every=3)
    seen = []
    for _ in range(7):
        w.grad = torch.randn_like(w)
        opt.step()
        seen.append(opt.state[w]["svd_v"].clone())
    same = [torch.equal(a, b) for a, b in zip(seen[:-1], seen[1:], strict=True)]
    assert same == [True, True, False, True, True, False]  # new bases at steps 4 and 7


# %% units ----------------------------------------------------------------------------------------------
def test_svd_units():
    shapes = [torch.Size(s) for s in [(12, 5), (5,), (6, 3, 3, 3), (9, 4), (30, 8)]]
    roles = ["matrix", "vector", "matrix", "qkv", "embedding"]
    units = build_units(shapes, "svd", roles=roles)
    assert [(u.layout, u.shape) for u in units] == [
        ("svd", (12, 5)),
        ("identity", (1, 5)),
        ("svd", (6, 27)),
        ("svd", (3, 4)),
        ("svd", (3, 4)),
        ("svd", (3, 4)),
        ("svd", (30, 8)),  # embeddings as stored: the orientation cannot matter under an SVD
    ]
    assert [u.rotation.piece for u in units[3:6]] == [0, 1, 2]
    assert build_units(shapes, "svd", roles=roles, vectors="rotate")[1].layout == "flat"
    assert build_units(shapes, "svd", roles=roles, embedding="as_linear")[-1].shape == (30, 8)
    with pytest.raises(ValueError, match="multiple of 3"):
        build_units([torch.Size((10, 4))], "svd", roles=["qkv"])


# %% state_dict ------------------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def _train(model, opt, batches):
    for b in batches:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()


@pytest.mark.parametrize("cls", [RotatedAdamW, FusedRotatedAdamW])
def test_state_dict_roundtrip_across_a_boundary_is_bit_exact(cls):
    kw = dict(lr=1e-2, rotation="svd", svd_every=3, amsgrad=True)
    if cls is FusedRotatedAdamW:
        kw["backend"] = "eager"
    torch.manual_seed(0)
    model = TinyBlock()
    opt = cls(param_groups_for(model, weight_decay=0.1), **kw)
    gen = torch.Generator().manual_seed(0)
    batches = [batch_for(model, gen) for _ in range(8)]
    _train(model, opt, batches[:2])
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    snapshot = copy.deepcopy(saved_opt)
    _train(model, opt, batches[2:])  # recomputes at steps 4 and 7

    model2 = TinyBlock()
    model2.load_state_dict(saved_model)
    opt2 = RotatedAdamW(param_groups_for(model2, weight_decay=0.1), **{k: v for k, v in kw.items() if k != "backend"})
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, batches[2:])
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p2, p), n
        for key, val in opt.state[p].items():
            assert torch.equal(opt2.state[p2][key].cpu(), val.cpu()), (n, key)
    for k, st in snapshot["state"].items():
        for key, val in st.items():
            now = saved_opt["state"][k][key]
            assert torch.equal(val, now) if torch.is_tensor(val) else val == now


def _stepped(**kw):
    w = torch.randn(6, 4)
    opt = RotatedAdamW([w], rotation="svd", svd_every=3, **kw)
    w.grad = torch.randn_like(w)
    opt.step()
    return w, opt


@pytest.mark.parametrize(
    "change, match",
    [(dict(svd_every=4), "svd_every"), (dict(rotation="layer"), "rotation"), (dict(rotation="none"), "rotation")],
)
def test_mismatched_checkpoint_is_refused(change, match):
    w, opt = _stepped()
    other = RotatedAdamW([w.clone()], **{"rotation": "svd", "svd_every": 3, **change})
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(opt.state_dict())


def test_bad_bases_in_checkpoint_are_refused():
    w, opt = _stepped()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["svd_u"] = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="svd_u"):
        RotatedAdamW([w.clone()], rotation="svd", svd_every=3).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["state"][0]["svd_u_tau"]
    with pytest.raises(ValueError, match="basis keys"):
        RotatedAdamW([w.clone()], rotation="svd", svd_every=3).load_state_dict(bad)


def test_svd_every_only_matters_for_svd_groups():
    p = torch.randn(4, 4)
    opt = RotatedAdamW([p], rotation="output", block_size=2, svd_every=5)
    p.grad = torch.randn_like(p)
    opt.step()
    RotatedAdamW([p.clone()], rotation="output", block_size=2, svd_every=7).load_state_dict(opt.state_dict())
    sd = opt.state_dict()
    del sd["param_groups"][0]["svd_every"]  # a checkpoint from before the svd scope
    RotatedAdamW([p.clone()], rotation="output", block_size=2).load_state_dict(sd)


# %% options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, None])
def test_svd_every_validation(bad):
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="svd_every"):
        RotatedAdamW([w], rotation="svd", svd_every=bad)
    with pytest.raises(ValueError, match="svd_every"):
        RotatedAdamW([{"params": [w], "svd_every": bad}], rotation="svd")


def test_svd_is_refused_where_not_implemented():
    with pytest.raises(ValueError, match="svd"):
        RotatedSGD([torch.randn(3, 3)], rotation="svd")


def test_rotate_outside_the_step_uses_the_current_bases():
    """Unit rotations are bound to the optimizer state (for metrics): identity before step 1, then L^T x R."""
    w = torch.randn(5, 8)
    opt = RotatedAdamW([w], rotation="svd")
    rot = opt.units(0)[0].rotation
    x = torch.randn(5, 8)
    assert torch.equal(rot.rotate(x), x) and torch.equal(opt.rotation_matrix(), torch.eye(40, dtype=torch.float64))
    w.grad = torch.randn_like(w)
    opt.step()
    left, right = rot.matrices()
    torch.testing.assert_close(rot.rotate(x.double()), left.T @ x.double() @ right)
    torch.testing.assert_close(rot.unrotate(rot.rotate(x)), x, rtol=0, atol=1e-5)


# %% dense oracle ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_cls", [MLP, TinyBlock])
def test_matches_dense_oracle(model_cls):
    """F > steps: one basis, fixed from step 1, so AdamW in the basis rotation_matrix() is the oracle.

    float64 compute: the oracle's D g of the step-1 gradient leaves rounding noise where L^T G R is zero,
    and noise above eps becomes a full Adam step. In float64 it stays far below eps."""
    torch.manual_seed(0)
    model = model_cls().double()
    groups = param_groups_for(model, weight_decay=0.1)
    params = groups[0]["params"]
    flat = lambda ts: torch.cat([t.detach().reshape(-1).double() for t in ts])  # noqa: E731
    theta0 = flat(params)
    opt = RotatedAdamW(groups, lr=1e-2, betas=(0.9, 0.95), rotation="svd", svd_every=100, compute_dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(20):
        opt.zero_grad()
        batch = batch_for(model, gen)
        batch = tuple(t.double() for t in batch) if isinstance(batch, tuple) else batch
        loss_of(model, batch).backward()
        grads.append(flat([p.grad for p in params]))
        opt.step()
    decay = torch.cat(
        [torch.full((p.numel(),), float(m)) for p, m in zip(params, groups[0]["decay_mask"], strict=True)]
    )
    rotation = opt.rotation_matrix()
    assert not torch.equal(rotation, torch.eye(len(theta0), dtype=torch.float64))
    theta, m, v = dense_adamw_oracle(
        rotation, theta0, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=decay
    )
    assert_close_to_ref(flat(params), theta, "ref_vs_oracle", what="svd params")
    assert_close_to_ref(flat([moment(opt.state[p], "exp_avg") for p in params]), m, "ref_vs_oracle", what="exp_avg")
    v_got = flat([moment(opt.state[p], "exp_avg_sq") for p in params])
    assert_close_to_ref(v_got, v, "ref_vs_oracle", what="exp_avg_sq")


# %% FusedRotatedAdamW ----------------------------------------------------------------------------------
def _init_of(seed):
    torch.manual_seed(seed)
    return TinyBlock().state_dict()


def _fused_pair(backend, seed=0, steps=5):
    torch.manual_seed(seed)
    m_ref = TinyBlock()
    m_fused = copy.deepcopy(m_ref)
    kw = dict(lr=1e-2, rotation="svd", svd_every=2)
    ref = RotatedAdamW(param_groups_for(m_ref, weight_decay=0.1), **kw)
    fused = FusedRotatedAdamW(param_groups_for(m_fused, weight_decay=0.1), backend=backend, **kw)
    gen = torch.Generator().manual_seed(seed)
    batches = [batch_for(m_ref, gen) for _ in range(steps)]
    _train(m_ref, ref, batches)
    _train(m_fused, fused, batches)
    return m_ref, ref, m_fused, fused


def test_fused_eager_equals_rotated_adamw():
    m_ref, ref, m_fused, fused = _fused_pair("eager")
    assert fused.backend_used == "eager"
    for (n, p), q in zip(m_ref.named_parameters(), m_fused.parameters(), strict=True):
        assert torch.equal(p, q), n
        assert float(fused.state[q]["step"]) == float(ref.state[p]["step"]) == 5.0
        for key, val in ref.state[p].items():
            assert torch.equal(fused.state[q][key].cpu(), val.cpu()), (n, key)


def test_fused_svd_only_groups_follow_the_backend():
    w = torch.randn(6, 4)
    opt = FusedRotatedAdamW([w], rotation="svd")  # auto: the two-sided kernel where Triton runs, else eager
    w.grad = torch.randn_like(w)
    opt.step()
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and triton_available()
    assert opt.backend_used == ("triton" if interpret else "eager") and float(opt.state[w]["step"]) == 1.0
    w = torch.randn(6, 4)
    opt = FusedRotatedAdamW([w], rotation="svd", backend="triton")
    w.grad = torch.randn_like(w)
    if interpret:
        opt.step()
        assert opt.backend_used == "triton" and opt.two_sided_steps == 1
    else:  # an explicit backend that cannot run raises before anything changes
        with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
            opt.step()
        assert not opt.state


@pytest.mark.interpret
@pytest.mark.skipif(
    not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"), reason="needs TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_triton_matches_by_the_float64_rule(seed):
    """Every matrix unit of a TinyBlock in the two-sided kernel (the q/k/v pieces and c_proj square; c_fc,
    mlp.c_proj and the embedding with one side formed densely from its reflectors), the LayerNorm weight in the
    one-sided kernels (CPU, under the interpreter), across 2 SVD recomputes.

    An SVD recompute amplifies ulp differences in the params (ill-conditioned singular vectors: both fp32 runs end
    ~0.2 (L2) from the float64 one), so the fused model is judged against a float64 run: L2 error over all params
    <= 2x the eager fp32 optimizer's + floor (rotkern.testing). Measured over 12 seeds: 0.95-1.32x the eager
    error. Per param the ratio is chaotic (one param of one seed in 12 reaches 4x while its model's is 0.99x).
    """
    m_ref, ref, m_fused, fused = _fused_pair("triton", seed)
    m64 = TinyBlock()
    m64.load_state_dict(_init_of(seed))
    m64 = m64.double()
    r64 = RotatedAdamW(param_groups_for(m64, weight_decay=0.1), lr=1e-2, rotation="svd", svd_every=2)
    gen = torch.Generator().manual_seed(seed)
    _train(m64, r64, [batch_for(m64, gen) for _ in range(5)])
    assert fused.two_sided_steps == 7 * 5 and fused.backend_used == "triton"  # 7 matrix units, every step
    flat = [torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]) for m in (m_fused, m_ref, m64)]
    assert_close_to_ref(flat[0], flat[2], "fp32_floor", eager=flat[1], norm=True, what="all params")
    assert all(float(fused.state[q]["step"]) == 5.0 for q in m_fused.parameters())
    # Before the first recompute (the bases of step 1 come from the same gradient in both), the fixed fp32 rule.
    m_ref, ref, m_fused, fused = _fused_pair("triton", seed, steps=2)
    assert fused.two_sided_steps == 7 * 2
    for (n, p), q in zip(m_ref.named_parameters(), m_fused.parameters(), strict=True):
        assert_close_to_ref(q, p, "fused_fp32", what=n)
        for key, val in ref.state[p].items():
            if key != "step":
                assert_close_to_ref(fused.state[q][key], val, "fused_fp32", what=f"{n} {key}")
