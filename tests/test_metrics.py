import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rotkern import RotatedAdamW, param_groups_for
from rotkern import metrics as M
from rotkern.optim._base import moment
from rotkern.testing import tolerance

from .optim._models import MLP, TinyBlock, batch_for, loss_of

ROTATED = ["global", "layer", "output", "input"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: intra-op threads only add contention on a shared CPU (4 s vs 30 s seen).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _flat(ts):
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts])


def _trained(model_cls, scope, *, steps=2, block_size=5, seed=0, device="cpu", dtype=torch.float64, **model_kw):
    model = model_cls(**model_kw).to(device=device, dtype=torch.float64)
    groups = param_groups_for(model, weight_decay=0.1)
    opt = RotatedAdamW(
        groups, lr=1e-2, betas=(0.9, 0.95), rotation=scope, block_size=block_size, seed=seed, compute_dtype=dtype
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        batch = batch_for(model, gen)
        batch = batch.to(device) if torch.is_tensor(batch) else tuple(b.to(device, torch.float64) for b in batch)
        loss_of(model, batch).backward()
        opt.step()
    return model, opt, groups[0]["params"]


# -- update orthogonality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("model_cls", [MLP, TinyBlock])
def test_update_matrix_without_rotation_reads_the_state(model_cls, seed, device):
    _, opt, params = _trained(model_cls, "none", seed=seed, device=device, dtype=torch.float32)
    for p in params:
        st = opt.state[p]
        want = moment(st, "exp_avg") / (moment(st, "exp_avg_sq").sqrt() + 1e-8)
        got = M.update_matrix(opt, p)
        assert got.shape == p.shape and got.device == p.device
        assert torch.equal(got, want)


@pytest.mark.parametrize("block_size, seed, dtype", [(5, 0, torch.float64), (8, 3, torch.float32)])
@pytest.mark.parametrize("model_cls", [MLP, TinyBlock])
@pytest.mark.parametrize("scope", ROTATED)
def test_update_matrices_match_the_dense_oracle(scope, model_cls, block_size, seed, dtype, device):
    _, opt, params = _trained(model_cls, scope, block_size=block_size, seed=seed, device=device, dtype=dtype)
    d = opt.rotation_matrix()
    m = _flat([moment(opt.state[p], "exp_avg") for p in params])
    v = _flat([moment(opt.state[p], "exp_avg_sq") for p in params])
    want = d.T @ (m / (v.sqrt() + 1e-8))
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else tolerance("ref_vs_oracle")
    tol = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(_flat(M.update_matrices(opt)), want, **tol)
    # One param alone (a q/k/v-split or global unit is un-rotated and the param's piece picked).
    off = sum(p.numel() for p in params[:2])
    got = M.update_matrix(opt, params[2])
    assert got.dtype == dtype
    torch.testing.assert_close(_flat([got]), want[off : off + params[2].numel()], **tol)


def test_update_matrices_and_grad_norm_under_the_svd_scope():
    from rotkern import scopes

    if "svd" not in getattr(scopes, "ALL_SCOPES", ()):
        pytest.skip("this rotkern has no svd scope")
    model = TinyBlock().double()
    groups = param_groups_for(model, weight_decay=0.1)
    opt = RotatedAdamW(groups, lr=1e-2, rotation="svd", svd_every=2, compute_dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # bases recomputed at steps 1 and 2: moments carried across a basis change
        opt.zero_grad()
        loss_of(model, batch_for(model, gen)).backward()
        opt.step()
    params = groups[0]["params"]
    d = opt.rotation_matrix()
    m = _flat([moment(opt.state[p], "exp_avg") for p in params])
    v = _flat([moment(opt.state[p], "exp_avg_sq") for p in params])
    torch.testing.assert_close(_flat(M.update_matrices(opt)), d.T @ (m / (v.sqrt() + 1e-8)), rtol=1e-10, atol=1e-12)
    grads = [torch.randn_like(p) for p in params]
    assert M.rotated_grad_inf_norm(opt, grads) == pytest.approx((d @ _flat(grads)).abs().max().item(), rel=1e-12)


def test_update_matrix_errors():
    _, opt, _ = _trained(MLP, "global")
    with pytest.raises(ValueError, match="not in this optimizer"):
        M.update_matrix(opt, torch.zeros(3))
    fresh = RotatedAdamW([torch.zeros(4, 3)], rotation="global")
    with pytest.raises(ValueError, match="take an Adam step"):
        M.update_matrix(fresh, fresh.param_groups[0]["params"][0])


def test_cv_by_hand_and_alternatives():
    a = torch.zeros(4, 6, dtype=torch.float64)
    a[range(4), range(4)] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    # Any U diag V^T has the same spectrum.
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    for mat in (a, u @ a @ w):
        cv = M.cv_singular_values(mat)
        assert cv == pytest.approx(math.sqrt(1.25) / 2.5, rel=1e-12)
        assert M.cv_singular_values(mat, unbiased=True) == pytest.approx(math.sqrt(5 / 3) / 2.5, rel=1e-12)
        assert M.scaled_deviation(mat) == pytest.approx(cv / math.sqrt(1 + cv**2), rel=1e-12)
        lam = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
        assert M.cv_gram_eigenvalues(mat) == pytest.approx((lam.std(correction=0) / lam.mean()).item(), rel=1e-12)
        alpha = lam.sum() / lam.square().sum()
        assert M.scaled_gram_deviation(mat) == pytest.approx((alpha * lam - 1).square().mean().sqrt().item(), 1e-12)
        p = lam / lam.sum()
        assert M.svd_entropy(mat) == pytest.approx((-(p * p.log()).sum() / math.log(4)).item(), rel=1e-12)
        allm = M.orthogonality_metrics(mat)
        assert allm["cv"] == pytest.approx(cv, rel=1e-12)
        assert allm["svd_entropy"] == pytest.approx(M.svd_entropy(mat), rel=1e-12)
        assert allm["scaled_gram"] == pytest.approx(M.scaled_gram_deviation(mat), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(9, 9), (11, 4), (3, 17)])
def test_cv_is_scale_invariant_and_zero_for_scaled_orthogonal(shape, seed):
    torch.manual_seed(seed)
    a = torch.randn(shape, dtype=torch.float64)
    for c in (1e-3, 7.5):
        for f in (M.cv_singular_values, M.scaled_deviation, M.cv_gram_eigenvalues, M.svd_entropy):
            assert f(c * a) == pytest.approx(f(a), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), dtype=torch.float64))
    q = q if shape[0] >= shape[1] else q.T
    for c in (1.0, 3.7, -0.01):
        m = M.orthogonality_metrics(c * q)
        assert m["cv"] < 1e-12 and m["scaled_deviation"] < 1e-12 and m["cv_gram"] < 1e-12
        assert m["scaled_gram"] < 1e-12 and m["svd_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert M.cv_singular_values(a) > 0.05
    assert math.isnan(M.cv_singular_values(torch.zeros(3, 5)))


def test_update_cv_splits_qkv_and_skips_embeddings():
    model, opt, params = _trained(TinyBlock, "output", block_size=4)
    cvs = M.update_cv(opt)
    assert set(cvs) == {"c_attn.weight[q]", "c_attn.weight[k]", "c_attn.weight[v]"} | {
        f"{n}.weight" for n in ("c_proj", "c_fc", "mlp_proj")
    }
    a = M.update_matrix(opt, model.c_attn.weight)
    assert cvs["c_attn.weight[k]"] == pytest.approx(M.cv_singular_values(a[8:16]), rel=1e-12)
    assert cvs["c_fc.weight"] == pytest.approx(M.cv_singular_values(M.update_matrix(opt, model.c_fc.weight)), 1e-12)
    sample = M.update_cv(opt, unbiased=True)
    assert all(sample[k] > cvs[k] for k in cvs)
    assert set(M.update_cv(opt, split_qkv=False)) == {f"{n}.weight" for n in ("c_attn", "c_proj", "c_fc", "mlp_proj")}
    assert set(M.update_cv(opt, include=lambda n: "c_fc" in n)) == {"c_fc.weight"}
    ents = M.update_cv(opt, metric=M.svd_entropy)
    assert all(0 < e <= 1 for e in ents.values())


def test_update_cv_on_gpt_tiny_with_an_unnamed_optimizer():
    from rotkern.trainers.models import build_model, model_config

    model = build_model(model_config("gpt-tiny"))
    # Built from bare tensors: roles are only shapes, so names and embeddings come from the model.
    opt = RotatedAdamW(model.parameters(), lr=1e-3, rotation="output", block_size=64)
    idx = torch.randint(0, 256, (2, 17))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()
    cvs = M.update_cv(opt, model)
    assert len(cvs) == 12 and all(math.isfinite(v) and v > 0 for v in cvs.values())
    assert "transformer.h.1.attn.c_attn.weight[v]" in cvs and "transformer.wte.weight" not in cvs
    by_type = M.mean_over_depth(cvs)
    assert len(by_type) == 6
    key = "transformer.h.*.mlp.c_fc.weight"
    assert by_type[key] == pytest.approx(
        (cvs["transformer.h.0.mlp.c_fc.weight"] + cvs["transformer.h.1.mlp.c_fc.weight"]) / 2
    )


# -- gradient bound ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope, seed", [("none", 0), ("global", 1), ("layer", 2), ("output", 3), ("input", 4)])
def test_rotated_grad_inf_norm_matches_dense_rotation(scope, seed, device):
    model, opt, params = _trained(TinyBlock, scope, steps=1, seed=seed, device=device)
    torch.manual_seed(seed)
    grads = [torch.randn_like(p) * (i + 1) for i, p in enumerate(params)]
    want = (opt.rotation_matrix() @ _flat(grads)).abs().max().item()
    if scope == "none":
        assert want == max(g.abs().max().item() for g in grads)
    assert M.rotated_grad_inf_norm(opt, grads) == pytest.approx(want, rel=1e-12)
    assert M.rotated_grad_inf_norm(opt, dict(zip(params, grads, strict=True))) == pytest.approx(want, rel=1e-12)
    # None counts as a zero gradient.
    missing = [None] + grads[1:]
    want = (opt.rotation_matrix() @ _flat([torch.zeros_like(params[0])] + grads[1:])).abs().max().item()
    assert M.rotated_grad_inf_norm(opt, missing) == pytest.approx(want, rel=1e-12)


def test_gradient_bound_is_a_running_max():
    model, opt, params = _trained(MLP, "global", steps=1)
    bound = M.GradientBound(opt)
    gen = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(4):
        opt.zero_grad()
        loss_of(model, tuple(b.double() for b in batch_for(model, gen))).backward()
        before = [p.grad.clone() for p in params]
        norms.append(bound.update())
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
        assert norms[-1] == pytest.approx((opt.rotation_matrix() @ _flat(before)).abs().max().item(), rel=1e-12)
    assert bound.value == max(norms) and bound.count == 4


# -- Hessian rows -----------------------------------------------------------------------------------------


def _quadratic(seed, device, batches=1):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    params = [p.to(device).requires_grad_() for p in params]
    hs = []
    for _ in range(batches):
        b = torch.randn(22, 22, generator=gen, dtype=torch.float64)
        hs.append((b + b.T).to(device))

    def loss_fn(k):
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * x @ hs[k] @ x

    return params, hs, loss_fn


@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_rows_of_a_quadratic_are_exact(seed, device):
    params, hs, loss_fn = _quadratic(seed, device)
    idx = [0, 7, 14, 15, 21]
    rows = M.hessian_rows(loss_fn, params, idx)
    assert rows.shape == (5, 22) and rows.dtype == torch.float64
    torch.testing.assert_close(rows, hs[0][idx], rtol=0, atol=1e-12)
    assert all(p.grad is None for p in params)
    params, hs, loss_fn = _quadratic(seed, device, batches=3)
    row = M.hessian_row(loss_fn, params, 9, num_batches=3)
    torch.testing.assert_close(row, sum(hs)[9] / 3, rtol=0, atol=1e-12)


def _mlp_hessians(model, batches):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat, batch):
        ps = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        x, y = batch
        return nn.functional.mse_loss(torch.func.functional_call(model, ps, (x,)), y)

    return [torch.autograd.functional.hessian(lambda w, b=b: f(w, b), x0) for b in batches]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_rows_of_an_mlp_match_autograd_hessian(seed):
    torch.manual_seed(seed)
    model = MLP(d_in=3, hidden=5, d_out=2).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(3)]
    h = sum(_mlp_hessians(model, batches)) / 3
    params = list(model.parameters())
    idx = [0, 11, 17, 20, 31]  # fc1.weight, fc1.bias, fc2.weight, fc2.bias

    def loss_fn(k):
        return loss_of(model, batches[k])

    rows = M.hessian_rows(loss_fn, params, idx, num_batches=3)
    torch.testing.assert_close(rows, h[idx], rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("scope", ROTATED)
def test_hessian_rows_of_the_rotated_loss(scope):
    model = MLP(d_in=3, hidden=5, d_out=2).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(2)]
    h = sum(_mlp_hessians(model, batches)) / 2
    params = list(model.parameters())
    opt = RotatedAdamW(params, rotation=scope, block_size=4, seed=1, compute_dtype=torch.float64)
    d = opt.rotation_matrix()
    idx = [2, 16, 25]
    rows = M.hessian_rows(lambda k: loss_of(model, batches[k]), params, idx, num_batches=2, opt=opt)
    torch.testing.assert_close(rows, (d @ h @ d.T)[idx], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="optimizer's params"):
        M.hessian_rows(lambda k: loss_of(model, batches[k]), params[::-1], idx, opt=opt)


def _gpt2_124m_shapes():
    shapes = [("transformer.wte.weight", (50304, 768)), ("transformer.wpe.weight", (1024, 768))]
    for i in range(12):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (768,)),
            (h + "attn.c_attn.weight", (2304, 768)),
            (h + "attn.c_proj.weight", (768, 768)),
            (h + "ln_2.weight", (768,)),
            (h + "mlp.c_fc.weight", (3072, 768)),
            (h + "mlp.c_proj.weight", (768, 3072)),
        ]
    return shapes + [("transformer.ln_f.weight", (768,))]


def test_spec_hessian_row_ids_land_in_the_stated_tensors():
    layout = M.ParamLayout.from_shapes(_gpt2_124m_shapes())
    assert layout.numel == 124_373_760 == 161_945 * 768
    ids = {2: [53970691, 55680281, 57847212, 58790300], 8: [96585666, 97929821, 99845651, 102950588]}
    for block, rows in ids.items():
        got = [layout.locate(i).name for i in rows]
        assert got == [
            f"transformer.h.{block}.{t}.weight" for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ]
    pos = layout.locate(53970691)
    assert pos.row * 768 + pos.col == pos.offset and 0 <= pos.row < 2304
    # The hand-written shape list is nanoGPT's named_parameters() order (checked on meta tensors: no weights).
    from rotkern.trainers.models import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig())
    real = M.ParamLayout.from_model(model)
    assert list(zip(real.names, real.shapes, strict=True)) == _gpt2_124m_shapes()
    assert real.roles[0] == "embedding" and real.roles[3] == "qkv"


def _partition_oracle(layout, index, split_qkv=True):
    """Per flat coordinate: (layer id, neuron id), by plain loops."""
    layer, neuron = [], []
    for j, shape in enumerate(layout.shapes):
        rows = shape[0] if shape else 1
        w = math.prod(shape[1:]) if len(shape) > 1 else 1
        for k in range(math.prod(shape)):
            r, c = divmod(k, w)
            part = r // (rows // 3) if layout.roles[j] == "qkv" and split_qkv else 0
            layer.append((j, part))
            neuron.append((j, "col", c) if layout.roles[j] == "embedding" else (j, "row", r))
    return layer, neuron


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split_qkv", [True, False])
def test_row_partition_matches_index_sets(seed, split_qkv):
    shapes = [("fc.weight", (6, 4)), ("ln.weight", (5,)), ("attn.c_attn.weight", (9, 3)), ("wte.weight", (7, 2))]
    layout = M.ParamLayout.from_shapes(shapes, roles=["matrix", "vector", "qkv", "embedding"])
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(layout.numel, generator=gen, dtype=torch.float64)
    dw = torch.randn(layout.numel, generator=gen, dtype=torch.float64)
    layer, neuron = _partition_oracle(layout, 0, split_qkv)
    for index in [0, 5, 23, 24, 28, 29, 35, 40, 55, 56, 63, 69]:
        got = M.row_partition(r, dw, index, layout, split_qkv=split_qkv, embedding="transposed")
        want = {"neuron": 0.0, "layer": 0.0, "other": 0.0}
        for k in range(layout.numel):
            key = "other" if layer[k] != layer[index] else "neuron" if neuron[k] == neuron[index] else "layer"
            want[key] += (r[k] * dw[k]).item()
        for key, val in want.items():
            assert got[key] == pytest.approx(val, abs=1e-12), (index, key)
        assert got["neuron"] + got["layer"] + got["other"] == pytest.approx((r @ dw).item(), abs=1e-12)
        assert got["total"] == pytest.approx((r @ dw).item(), abs=1e-12)
    per_param = list(r.split([math.prod(s) for _, s in shapes]))
    assert M.row_partition(per_param, dw, 30, layout) == M.row_partition(r, dw, 30, layout)
    rowwise = M.row_partition(r, dw, 63, layout, embedding="as_linear")
    assert rowwise["neuron"] == pytest.approx((r[62:64] @ dw[62:64]).item(), abs=1e-12)


def test_l11_estimate():
    rows = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, -4.0]])
    assert M.l11_estimate(rows) == 5.0
    assert M.l11_estimate(list(rows)) == 5.0


# -- second moments ---------------------------------------------------------------------------------------


def test_second_moment_stats(device):
    _, opt, params = _trained(TinyBlock, "global", steps=3, device=device, dtype=torch.float32)
    stats = M.second_moment_stats(opt, bins=40, log10_range=(-16.0, -4.0))
    assert len(stats["edges"]) == 41 and stats["edges"][0] == -16.0
    v = torch.cat([moment(opt.state[p], "exp_avg_sq").reshape(-1).cpu() for p in params])
    pooled = stats["pooled"]
    assert pooled["numel"] == v.numel()
    assert sum(pooled["counts"]) + pooled["below"] + pooled["above"] + pooled["zeros"] == v.numel()
    qs = list(pooled["quantiles"])
    want = torch.quantile(v.double(), torch.tensor(qs, dtype=torch.float64))
    assert list(pooled["quantiles"].values()) == pytest.approx(want.tolist(), rel=1e-12)
    assert pooled["mean"] == pytest.approx(v.double().mean().item(), rel=1e-12)
    assert set(stats["per_param"]) == {n for n, _ in TinyBlock().named_parameters()}
    assert stats["per_param"]["c_fc.weight"]["numel"] == 256
    corrected = M.second_moment_stats(opt, bias_correction=True)
    assert corrected["pooled"]["quantiles"][0.5] == pytest.approx(pooled["quantiles"][0.5] / (1 - 0.95**3), 1e-6)


def test_metrics_have_no_side_effects():
    model, opt, params = _trained(TinyBlock, "global", steps=2)
    for p in params:
        p.grad = torch.randn_like(p)
    state = copy.deepcopy(opt.state_dict())
    snap = [(p.detach().clone(), p.grad.clone()) for p in params]
    M.update_cv(opt, model)
    M.rotated_grad_inf_norm(opt)
    M.second_moment_stats(opt)
    batch = torch.randint(0, 11, (2, 5))
    # Double backward needs SDPA's math backend (the paper ran without FlashAttention too).
    with sdpa_kernel([SDPBackend.MATH]):
        M.hessian_rows(lambda k: loss_of(model, batch), params, [3, 100], opt=opt)
    M.to_standard_basis(opt, M.to_rotated_basis(opt, [p.grad for p in params]))
    after = opt.state_dict()
    for pid, st in state["state"].items():
        for key, val in st.items():
            now = after["state"][pid][key]
            assert (torch.equal(val, now) if torch.is_tensor(val) else val == now), key
    for p, (w, g) in zip(params, snap, strict=True):
        assert torch.equal(p, w) and torch.equal(p.grad, g)


@pytest.mark.parametrize("scope", ROTATED)
def test_basis_round_trip(scope):
    _, opt, params = _trained(TinyBlock, scope, steps=1, block_size=3)
    xs = [torch.randn_like(p) for p in params]
    rot = M.to_rotated_basis(opt, xs)
    torch.testing.assert_close(_flat(rot), opt.rotation_matrix() @ _flat(xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_flat(M.to_standard_basis(opt, rot)), _flat(xs), rtol=1e-12, atol=1e-12)
