"""Dynamic bases (svd, eigen): every basis-change policy against a dense-matrix oracle, SOAP's update, the Muon link,
decomposition fallbacks, resume.

The oracle holds, per matrix, the moments as a vector of length k w in the rotated coordinates and the basis as the
explicit (k w, k w) matrix ``D = kron(L^T, R^T)``; a basis change is ``C = D_new D_old^T``: m -> C m, v -> (C o C) v
(transport), the slot permutation (keep, for the eigen scope's reordering), or zeros with the bias correction
restarted (reset). The bases themselves come from the same decompositions on the same matrices (SVD of the gradient;
eigh, then one power iteration and a QR of the EMA factors), built densely here: the Householder completion by
``householder_product``, the two-sided maps by Kronecker products. Nothing else is shared with rotkern.
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import ext_available, interpret_mode, triton_available
from rotkern.bases import BASIS_CHANGES, EigenRotation, SvdRotation, robust_decomposition
from rotkern.testing import assert_close_to_ref

SHAPES = [(6, 4), (5, 7), (9, 3), (8,)]  # the (9, 3) weight is a fused qkv: three (3, 3) pieces
ROLES = ["matrix", "matrix", "qkv", "vector"]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _complete(x: torch.Tensor) -> torch.Tensor:
    """(n, r) orthonormal columns -> (n, n) orthogonal [x, complement], rotkern's completion, built densely."""
    n, r = x.shape
    if n == r:
        return x.double()
    a, tau = torch.geqrf(x)
    q = torch.linalg.householder_product(torch.cat([a, a.new_zeros(n, n - r)], 1).double(), tau.double())
    signs = torch.ones(n, dtype=torch.float64)
    signs[:r] = torch.where(torch.diagonal(a)[:r] >= 0, 1.0, -1.0).double()
    return q * signs


def _kron_t(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """kron(L^T, R^T): vec(L^T X R) for row-major vec."""
    return torch.kron(left.T.contiguous(), right.T.contiguous())


def _perm_matrix(order: torch.Tensor) -> torch.Tensor:
    """P with (P x)[j] = x[order[j]]."""
    n = order.numel()
    p = torch.zeros(n, n, dtype=torch.float64)
    p[torch.arange(n), order] = 1.0
    return p


class _Piece:
    """One matrix piece in the oracle: dense bases, moments as vectors in the rotated coordinates."""

    def __init__(self, k: int, w: int) -> None:
        self.k, self.w = k, w
        self.left = torch.eye(k, dtype=torch.float64)
        self.right = torch.eye(w, dtype=torch.float64)
        self.m = torch.zeros(k * w, dtype=torch.float64)
        self.v = torch.zeros(k * w, dtype=torch.float64)
        self.reset_at = 0
        self.gg: dict[str, torch.Tensor] = {}
        self.started = False

    def d(self) -> torch.Tensor:
        return _kron_t(self.left, self.right)

    def change(self, left, right, policy, done_steps, order=None):
        c = _kron_t(left, right) @ self.d().T  # D_new D_old^T
        if policy == "reset":
            self.m.zero_(), self.v.zero_()
            self.reset_at = done_steps
        else:
            perm = None
            if order is not None:
                perm = torch.kron(_perm_matrix(order[0]), _perm_matrix(order[1]))
            if policy in ("transport", "transport_m"):
                self.m = c @ self.m
            elif perm is not None:
                self.m = perm @ self.m
            if policy == "transport":
                self.v = (c * c) @ self.v
            elif perm is not None:
                self.v = perm @ self.v
        self.left, self.right = left, right


def _oracle(params0, grads, *, scope, every, change, cdt, lr, betas, eps, weight_decay, shampoo_beta=0.95, max_dim=99):
    """Adam in the explicit basis of every matrix piece (see the module docstring); vectors plain AdamW."""
    b1, b2 = betas
    thetas = [p.double().clone() for p in params0]
    pieces = []
    for shape, role in zip(SHAPES, ROLES, strict=True):
        if len(shape) == 1:
            pieces.append([_Piece(1, shape[0])])
        else:
            n = 3 if role == "qkv" else 1
            pieces.append([_Piece(shape[0] // n, shape[1]) for _ in range(n)])
    for t, gs in enumerate(grads, start=1):
        for i, (theta, g) in enumerate(zip(thetas, gs, strict=True)):
            mat = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
            delta = torch.zeros(mat.shape, dtype=torch.float64)
            for j, pc in enumerate(pieces[i]):
                gm = mat[j * pc.k : (j + 1) * pc.k].to(cdt)  # decompositions and factors in the compute dtype
                gt = None
                if g.dim() >= 2 and scope == "svd" and (t - 1) % every == 0:
                    u, s, vh = torch.linalg.svd(gm.to(cdt), full_matrices=False)
                    left, right = _complete(u), _complete(vh.mT)
                    if t > 1:
                        pc.change(left, right, change, t - 1)
                    pc.left, pc.right = left, right
                    gt = torch.zeros(pc.k, pc.w, dtype=torch.float64)
                    gt.diagonal()[: s.numel()] = s.double()
                    gt = gt.reshape(-1)
                if g.dim() >= 2 and scope == "eigen" and not pc.started:
                    # SOAP's first step: the factors and the first basis, nothing else
                    for side, gram, n in (("l", gm @ gm.T, pc.k), ("r", gm.T @ gm, pc.w)):
                        if n > max_dim:
                            continue
                        pc.gg[side] = gram
                        q = torch.linalg.eigh(gram)[1].flip(-1).double()
                        if side == "l":
                            pc.left = q
                        else:
                            pc.right = q
                    pc.started, pc.reset_at = True, t
                    continue
                if gt is None:
                    gt = pc.d() @ gm.double().reshape(-1)
                tb = t - pc.reset_at
                pc.m = b1 * pc.m + (1 - b1) * gt
                pc.v = b2 * pc.v + (1 - b2) * gt * gt
                u = (pc.m / (1 - b1**tb)) / ((pc.v / (1 - b2**tb)).sqrt() + eps)
                delta[j * pc.k : (j + 1) * pc.k] = (pc.d().T @ u).reshape(pc.k, pc.w)
                if g.dim() >= 2 and scope == "eigen":
                    for side, gram in (("l", gm @ gm.T), ("r", gm.T @ gm)):
                        if side in pc.gg:
                            # in the compute dtype, as the optimizer keeps them
                            pc.gg[side] = torch.lerp(pc.gg[side], gram, 1 - shampoo_beta)
                    if t % every == 0:
                        new, order = [pc.left, pc.right], []
                        for idx, side in enumerate(("l", "r")):
                            q = new[idx]
                            if side not in pc.gg:
                                order.append(torch.arange(q.shape[0]))
                                continue
                            power = pc.gg[side] @ q.to(cdt)
                            s = torch.argsort((q.to(cdt) * power).sum(0), descending=True)
                            new[idx] = torch.linalg.qr(power[:, s])[0].double()
                            order.append(s)
                        pc.change(new[0], new[1], change, t, order)
            if scope == "eigen" and g.dim() >= 2 and t == 1:
                continue  # SOAP's first step does not move the param
            decay = weight_decay if g.dim() >= 2 else 0.0
            theta.mul_(1 - lr * decay).sub_(lr * delta.reshape(theta.shape))
    return thetas


def _grads(steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # A few dominant directions per matrix, so that the bases matter and keep their order for a while.
    out = []
    for _ in range(steps):
        gs = []
        for s in SHAPES:
            g = torch.randn(s, generator=gen)
            if len(s) == 2:
                g += 3.0 * torch.randn(s[0], 1, generator=gen) @ torch.randn(1, s[1], generator=gen)
            gs.append(g * (1 + 0.5 * torch.rand((), generator=gen)))
        out.append(gs)
    return out


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.to(p.dtype)
        opt.step()


def _make(cls, params, scope, every, change, cdt=torch.float64, **kw):
    key = "svd_every" if scope == "svd" else "precondition_every"
    group = {"params": params, "roles": ROLES, "decay_mask": [len(s) == 2 for s in SHAPES]}
    return cls([group], rotation=scope, basis_change=change, compute_dtype=cdt, **{key: every}, **{**HYPER, **kw})


# %% against the dense oracle -----------------------------------------------------------------------------
@pytest.mark.parametrize("change", BASIS_CHANGES)
@pytest.mark.parametrize("scope", ["svd", "eigen"])
def test_every_policy_matches_the_dense_oracle_over_300_steps(scope, change):
    torch.manual_seed(7)
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    p0 = [p.clone() for p in params]
    grads = _grads(300, 11)
    every = 60  # svd: recomputes at 1, 61, ..., 241; eigen: refreshes at 60, ..., 300
    opt = _make(RotatedAdamW, params, scope, every, change)
    _run(opt, params, grads)
    want = _oracle(p0, grads, scope=scope, every=every, change=change, cdt=torch.float64, **HYPER)
    for shape, p, w in zip(SHAPES, params, want, strict=True):
        assert_close_to_ref(p, w, "ref_vs_oracle", what=f"{scope} {change} {shape}")
    if change == "reset":
        assert float(opt.state[params[0]]["basis_reset_at"]) == (241 - 1 if scope == "svd" else 300)
    # The policy matters: the same run with another policy ends elsewhere.
    other = "keep" if change != "keep" else "transport"
    params2 = [p.clone() for p in p0]
    _run(_make(RotatedAdamW, params2, scope, every, other), params2, grads)
    assert max((a - b).abs().max().item() for a, b in zip(params, params2, strict=True)) > 1e-4


@pytest.mark.parametrize("scope", ["svd", "eigen"])
def test_fp32_matches_the_oracle_with_fp32_decompositions(scope):
    torch.manual_seed(3)
    params = [torch.randn(s) for s in SHAPES]
    p0 = [p.clone() for p in params]
    grads = _grads(25, 5)
    opt = _make(RotatedAdamW, params, scope, 10, "transport", cdt=torch.float32)
    _run(opt, params, grads)
    want = _oracle(p0, grads, scope=scope, every=10, change="transport", cdt=torch.float32, **HYPER)
    for p, w in zip(params, want, strict=True):
        assert_close_to_ref(p, w, "ref_vs_oracle", what=f"{scope} fp32")


def _backends():
    out = ["eager"]
    if ext_available():
        out.append(pytest.param("ext", marks=pytest.mark.ext))
    out.append(
        pytest.param(
            "triton",
            marks=[
                pytest.mark.interpret,
                pytest.mark.skipif(not (triton_available() and interpret_mode()), reason="needs TRITON_INTERPRET=1"),
            ],
        )
    )
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("scope", ["svd", "eigen"])
def test_fused_optimizer_matches_the_reference(scope, backend):
    """Dynamic units run the eager reference on every backend; the group's vectors take the backend."""
    torch.manual_seed(1)
    params = [torch.randn(s) for s in SHAPES]
    ref = [p.clone() for p in params]
    grads = _grads(30, 2)
    fused = _make(FusedRotatedAdamW, params, scope, 7, "transport", cdt=torch.float32, backend=backend)
    _run(fused, params, grads)
    _run(_make(RotatedAdamW, ref, scope, 7, "transport", cdt=torch.float32), ref, grads)
    for p, r in zip(params, ref, strict=True):
        assert_close_to_ref(p, r, "fused_fp32", what=f"{scope} {backend}")


# %% SOAP -------------------------------------------------------------------------------------------------
def _soap(w0, grads, *, lr, betas, eps, weight_decay, shampoo_beta, every):
    """SOAP (Vyas et al. 2024, arXiv 2409.11321, Algorithm 3) on one matrix, plain torch, float64.

    M is kept in the standard basis and projected every step; V in the eigenbasis; the factors L, R are EMAs of
    G G^T and G^T G; every ``every`` steps Q_L, Q_R <- QR(L Q_L), QR(R Q_R) (power iteration, columns ordered by
    the eigenvalue estimates diag(Q^T L Q), V's slots reordered alike). Configured as rotkern's eigen scope: the
    first gradient only sets L = G G^T, R = G^T G and Q by eigh (no update: the official code's skipped first step),
    the factors take in G after each update, AdamW's bias correction (counted from the second gradient) and
    decoupled weight decay.
    """
    b1, b2 = betas
    w = w0.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    fl = fr = ql = qr = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if fl is None:
            fl, fr = g @ g.T, g.T @ g
            ql, qr = torch.linalg.eigh(fl)[1].flip(-1), torch.linalg.eigh(fr)[1].flip(-1)
            continue
        gp = ql.T @ g @ qr
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * gp * gp
        mp = ql.T @ m @ qr
        tb = t - 1
        n = (mp / (1 - b1**tb)) / ((v / (1 - b2**tb)).sqrt() + eps)
        w = w * (1 - lr * weight_decay) - lr * (ql @ n @ qr.T)
        fl = shampoo_beta * fl + (1 - shampoo_beta) * g @ g.T
        fr = shampoo_beta * fr + (1 - shampoo_beta) * g.T @ g
        if t % every == 0:
            pl, pr = fl @ ql, fr @ qr
            sl = torch.argsort((ql * pl).sum(0), descending=True)
            sr = torch.argsort((qr * pr).sum(0), descending=True)
            ql, qr = torch.linalg.qr(pl[:, sl])[0], torch.linalg.qr(pr[:, sr])[0]
            v = v[sl][:, sr]
    return w


@pytest.mark.parametrize("shape", [(6, 4), (4, 7), (5, 5)])
def test_eigen_scope_is_soap(shape):
    """The eigen scope with SOAP's hyperparameters and basis_change="transport_m" is SOAP's update (50 steps)."""
    gen = torch.Generator().manual_seed(sum(shape))
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(50)]
    soap = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, shampoo_beta=0.95)
    w = w0.clone()
    opt = RotatedAdamW(
        [w], rotation="eigen", precondition_every=10, basis_change="transport_m", compute_dtype=torch.float64, **soap
    )
    for g in grads:
        w.grad = g.clone()
        opt.step()
    want = _soap(w0, grads, every=10, **soap)
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-7)
    # "auto" is transport_m for the eigen scope.
    w2 = w0.clone()
    opt2 = RotatedAdamW([w2], rotation="eigen", precondition_every=10, compute_dtype=torch.float64, **soap)
    for g in grads:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w, w2)


def test_eigen_side_longer_than_max_precond_dim_is_the_identity():
    torch.manual_seed(0)
    w = torch.randn(12, 3)
    opt = RotatedAdamW([w], rotation="eigen", max_precond_dim=8, precondition_every=2)
    for _ in range(3):
        w.grad = torch.randn(12, 3)
        opt.step()
    st = opt.state[w]
    assert sorted(k for k in st if k.startswith("eigen_")) == ["eigen_gg_r", "eigen_q_r"]
    rot = opt.units(0)[0].rotation
    assert isinstance(rot, EigenRotation) and not rot.left_eigen
    left, _ = rot.matrices()
    assert torch.equal(left, torch.eye(12, dtype=torch.float64))
    # Both sides too long: no basis at all, plain AdamW.
    v, ref = torch.randn(12, 10), None
    ref = v.clone().requires_grad_()
    opt = RotatedAdamW([v], rotation="eigen", max_precond_dim=8, weight_decay=0.0)
    adamw = torch.optim.AdamW([ref], weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(12, 10)
        v.grad, ref.grad = g.clone(), g.clone()
        opt.step(), adamw.step()
    assert opt.units(0)[0].layout == "identity"
    torch.testing.assert_close(v, ref.detach(), rtol=1e-6, atol=1e-7)


# %% the paper's link to Muon -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 5)])
def test_svd_with_zero_betas_and_eps_is_u_v_transpose_every_step(shape):
    """beta1 = beta2 = eps = 0 with a recompute every step: each update is U V^T of that step's gradient (App. E)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(shape)
    opt = RotatedAdamW([w], rotation="svd", svd_every=1, lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)
    for _ in range(4):
        before = w.clone()
        g = torch.randn(shape, generator=gen)
        w.grad = g.clone()
        opt.step()
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        assert torch.isfinite(w).all()
        torch.testing.assert_close(before - w, u @ vh, rtol=1e-5, atol=1e-5)


# %% change of basis --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, shape", [(SvdRotation, (7, 4)), (SvdRotation, (4, 7)), (EigenRotation, (5, 6))])
def test_change_basis_is_the_dense_map(cls, shape):
    torch.manual_seed(0)
    rot = cls(*shape)
    old, new = [_bases(rot, torch.randn(shape, dtype=torch.float64)) for _ in range(2)]
    x = torch.randn(shape, dtype=torch.float64)
    d_old, d_new = _kron_t(*rot.matrices(old)), _kron_t(*rot.matrices(new))
    c = d_new @ d_old.T
    torch.testing.assert_close(rot.change_basis(x, old, new).reshape(-1), c @ x.reshape(-1), rtol=1e-10, atol=1e-12)
    sq = rot.change_basis(x.abs(), old, new, squared=True)
    torch.testing.assert_close(sq.reshape(-1), (c * c) @ x.abs().reshape(-1), rtol=1e-10, atol=1e-12)
    assert (sq >= 0).all()
    # From the standard basis, and to the same basis (nothing moves).
    torch.testing.assert_close(rot.change_basis(x, None, new), rot.rotate(x, new), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rot.change_basis(x, new, new), x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rot.change_basis(x.abs(), new, new, squared=True), x.abs(), rtol=1e-10, atol=1e-12)


def _bases(rot, g):
    if isinstance(rot, SvdRotation):
        return rot.compute(g)[1]
    return rot.initial(g)


def test_reset_restarts_the_bias_correction():
    """After a reset the first update in the new basis has Adam's first-step size, lr per coordinate (sign-like),
    not the 3x-too-large update that zeroed moments under a late bias correction would give."""
    torch.manual_seed(0)
    w = torch.zeros(5, 5, dtype=torch.float64)
    opt = RotatedAdamW(
        [w], rotation="svd", svd_every=20, basis_change="reset", lr=1.0, weight_decay=0.0, compute_dtype=torch.float64
    )
    for _ in range(21):
        before = w.clone()
        w.grad = torch.randn(5, 5, dtype=torch.float64)
        opt.step()
    step_21 = before - w  # the step of the second recompute: g~ = S, zero moments, bias correction at t = 1
    u, _, vh = torch.linalg.svd(w.grad, full_matrices=False)
    torch.testing.assert_close(step_21, u @ vh, rtol=1e-6, atol=1e-6)
    assert float(opt.state[w]["basis_reset_at"]) == 20


# %% failures ---------------------------------------------------------------------------------------------
def test_failed_decompositions_fall_back_and_are_counted(monkeypatch, caplog):
    real_svd, real_eigh = torch.linalg.svd, torch.linalg.eigh

    def svd_fails_in_fp32(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("svd: the algorithm failed to converge (simulated)")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd_fails_in_fp32)
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    ref = w.clone()
    opt = RotatedAdamW([w], rotation="svd", svd_every=2)
    with caplog.at_level(logging.WARNING, logger="rotkern"):
        for _ in range(3):
            w.grad = torch.randn(6, 4)
            opt.step()
    assert opt.basis_stats == {"fallback_float64": 2}  # recomputes at steps 1 and 3
    assert "succeeded in torch.float64" in caplog.text
    assert not torch.equal(w, ref) and torch.isfinite(w).all()

    def always_fails(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "svd", always_fails)
    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    for scope in ("svd", "eigen"):
        v = torch.randn(6, 4)
        opt = RotatedAdamW([v], rotation=scope, svd_every=2, precondition_every=2)
        for _ in range(3):
            v.grad = torch.randn(6, 4)
            opt.step()  # never raises
        assert opt.basis_stats.get("basis_kept", 0) >= 1 and torch.isfinite(v).all()
        left, right = opt.units(0)[0].rotation.matrices()
        if scope == "svd":  # no basis ever: the standard one, i.e. AdamW
            assert torch.equal(left, torch.eye(6, dtype=torch.float64))
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)


def test_robust_decomposition_rejects_non_finite_results():
    stats = {}
    calls = []

    def nan_in_fp32(a):
        calls.append(a.dtype)
        return (torch.full_like(a, float("nan")),) if a.dtype == torch.float32 else (a * 2,)

    out = robust_decomposition(nan_in_fp32, torch.ones(2, 2), "x", stats)
    assert calls == [torch.float32, torch.float64] and out[0].dtype == torch.float32
    assert torch.equal(out[0], 2 * torch.ones(2, 2))
    assert stats == {"fallback_float64": 1}


def test_non_finite_gradient_is_refused_by_eigen_before_any_change():
    w = torch.randn(4, 3)
    opt = RotatedAdamW([w], rotation="eigen")
    w.grad = torch.randn(4, 3)
    opt.step()
    snap = copy.deepcopy(opt.state_dict())
    before = w.clone()
    w.grad = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert torch.equal(w, before)
    now = opt.state_dict()["state"][0]
    assert sorted(now) == sorted(snap["state"][0])
    assert all(torch.equal(now[k], snap["state"][0][k]) for k in now if torch.is_tensor(now[k]))


@pytest.mark.parametrize("bad, match", [
    (dict(basis_change="rotate"), "basis_change"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(shampoo_beta=1.0), "shampoo_beta"),
    (dict(max_precond_dim=0), "max_precond_dim"),
])  # fmt: skip
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        RotatedAdamW([torch.zeros(3, 3)], rotation="eigen", **bad)


# %% resume -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["transport", "reset"])
def test_eigen_resumes_bit_identically_across_refreshes(change):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    grads = _grads(12, 4)
    opt = _make(RotatedAdamW, params, "eigen", 4, change, cdt=torch.float32)
    _run(opt, params, grads[:6])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    copy_params = [p.clone() for p in params]
    resumed = _make(RotatedAdamW, copy_params, "eigen", 4, change, cdt=torch.float32)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    _run(opt, params, grads[6:])
    _run(resumed, copy_params, grads[6:])
    for a, b in zip(params, copy_params, strict=True):
        assert torch.equal(a, b)


# %% batched decompositions -----------------------------------------------------------------------------------
def test_batched_decompositions_group_by_shape_and_isolate_failures(caplog, monkeypatch):
    import rotkern.bases
    from rotkern.bases import DECOMPOSITIONS, batched_decompositions

    monkeypatch.setattr(rotkern.bases._decompose, "BATCH_ON_CPU", True)  # what a GPU does, here on the CPU
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 3, generator=gen) for _ in range(3)] + [torch.randn(4, 4, generator=gen)]
    xs[1][0, 0] = float("nan")  # fails the batch's check for item 1 only
    jobs = [(i, "svd", x, f"x{i}") for i, x in enumerate(xs)]
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="rotkern"):
        out = batched_decompositions(jobs, stats)
    assert out[1] is None and stats == {"basis_kept": 1} and "x1" in caplog.text  # retried alone, then kept
    for i in (0, 2, 3):
        want = DECOMPOSITIONS["svd"](xs[i])
        for got, ref in zip(out[i], want, strict=True):
            assert_close_to_ref(got, ref, "roundtrip_fp32", what=f"item {i}")
    # eigh and qr, batched, as their unbatched calls
    sym = [x @ x.mT for x in xs[:1] + xs[2:3]]
    out = batched_decompositions([(i, "eigh", a, "") for i, a in enumerate(sym)] + [("q", "qr", xs[3], "")])
    for i, a in enumerate(sym):
        assert_close_to_ref(out[i][0], torch.linalg.eigvalsh(a), "roundtrip_fp32", what="eigh")
    assert_close_to_ref(out["q"][0], torch.linalg.qr(xs[3])[0], "roundtrip_fp32", what="qr")


@pytest.mark.parametrize("scope", ["svd", "eigen"])
def test_equal_shapes_decompose_in_one_batched_call(scope, monkeypatch):
    """q, k, v pieces and an equal-shaped matrix: one call per kind and shape, and the same steps as one call per
    unit (the prefetch switched off)."""
    from rotkern.bases import _lifecycle

    calls: list[tuple[str, tuple]] = []
    real = {"svd": torch.linalg.svd, "eigh": torch.linalg.eigh, "qr": torch.linalg.qr}

    def spy(kind):
        def fn(a, *args, **kwargs):
            calls.append((kind, tuple(a.shape)))
            return real[kind](a, *args, **kwargs)

        return fn

    shapes, roles = [(9, 3), (3, 3), (6, 4), (8,)], ["qkv", "matrix", "matrix", "vector"]
    kw = dict(**HYPER, rotation=scope, svd_every=2, precondition_every=2)

    def run(prefetch: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        params = [torch.randn(s) for s in shapes]
        opt = RotatedAdamW([{"params": params, "roles": roles}], **kw)
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    import rotkern.bases

    monkeypatch.setattr(rotkern.bases._decompose, "BATCH_ON_CPU", True)  # what a GPU does, here on the CPU
    for kind in real:
        monkeypatch.setattr(torch.linalg, kind, spy(kind))
    batched = run(True)
    if scope == "svd":  # recomputes at steps 1 and 3: the four (3, 3) units in one call, (6, 4) alone
        assert calls == [("svd", (4, 3, 3)), ("svd", (6, 4))] * 2
    else:  # step 1: eigh per side ((3, 3) x 4 units x 2 sides = 8 in one call); refreshes at steps 2 and 4
        assert calls[:3] == [("eigh", (8, 3, 3)), ("eigh", (6, 6)), ("eigh", (4, 4))]
        assert calls[3:6] == [("qr", (8, 3, 3)), ("qr", (6, 6)), ("qr", (4, 4))] and len(calls) == 9
    calls.clear()
    monkeypatch.setattr(_lifecycle, "prefetch_decompositions", lambda units, *a, **k: [None] * len(units))
    alone = run(False)
    assert all(len(shape) == 2 for _, shape in calls)  # one matrix per call
    for i, (p, q) in enumerate(zip(batched, alone, strict=True)):
        assert_close_to_ref(p, q, "fused_fp32", what=f"param {i}")
