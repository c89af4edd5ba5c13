"""The Triton two-sided Adam step (rotkern.kernels.two_sided_adamw) against its eager twin, and the twin
against rotated_adamw_ref on real svd / eigen units.

Runs on CUDA when there is a GPU, else on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set before
Python starts). Shapes are tiny: the fixed fp32 tolerance holds there (no rotated coordinate near a sign tie).
"""

import os

import pytest
import torch

from rotkern.kernels.reference import rotated_adamw_ref
from rotkern.scopes import build_units
from rotkern.testing import assert_close_to_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not (INTERPRET or ON_GPU), reason="needs a CUDA GPU, or TRITON_INTERPRET=1 for the CPU"),
]
if INTERPRET or ON_GPU:
    pytest.importorskip("triton", reason="triton is not installed")
    from rotkern.kernels import two_sided_adamw as kernel_module
    from rotkern.kernels.reference import two_sided_adamw_ref
    from rotkern.kernels.two_sided_adamw import two_sided_adamw_step

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
SHAPES = [(5, 7), (7, 5), (16, 16), (33, 9)]


@pytest.fixture(autouse=True)
def _poison_workspace(monkeypatch):
    # NaN in every workspace slot before each call: a read of a slot the kernel did not write shows up.
    monkeypatch.setattr(kernel_module, "POISON_WORKSPACE", True)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().to(DEVICE)


class _State:
    def __init__(self, p: torch.Tensor, amsgrad: bool) -> None:
        shape = p.shape
        self.p = p
        self.m = torch.zeros(shape, device=DEVICE)
        self.v = torch.zeros(shape, device=DEVICE)
        self.vmax = torch.zeros(shape, device=DEVICE) if amsgrad else None

    def clone(self) -> "_State":
        other = _State(self.p.clone(), self.vmax is not None)
        for a, b in zip(self.tensors().values(), other.tensors().values(), strict=True):
            b.copy_(a)
        return other

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"param": self.p, "exp_avg": self.m, "exp_avg_sq": self.v}
        if self.vmax is not None:
            out["max_exp_avg_sq"] = self.vmax
        return out

    def step(self, fn, g, L, R, **kw):
        fn(self.p, g, self.m, self.v, self.vmax, L, R, **kw)


def _compare(kernel: _State, ref: _State, what: str, param_tol: str = "fused_fp32") -> None:
    want = ref.tensors()
    for key, actual in kernel.tensors().items():
        assert_close_to_ref(actual, want[key], param_tol if key == "param" else "fused_fp32", what=f"{what}: {key}")


def _run_pair(shape, seed, *, steps=3, sides="both", p_dtype=torch.float32, batch=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    k, w = shape
    lead = () if batch is None else (batch,)

    def basis(n):
        if batch is None:
            return _orthogonal(n, gen)
        return torch.stack([_orthogonal(n, gen) for _ in range(batch)])

    L = basis(k) if sides in ("both", "left") else None
    R = basis(w) if sides in ("both", "right") else None
    p0 = torch.randn(*lead, k, w, generator=gen).to(device=DEVICE, dtype=p_dtype)
    amsgrad = kw.get("amsgrad", False)
    kernel, ref = _State(p0.clone(), amsgrad), _State(p0.clone(), amsgrad)
    for t in range(1, steps + 1):
        g = torch.randn(*lead, k, w, generator=gen).to(device=DEVICE, dtype=p_dtype)
        args = dict(HYPER, step=t, **kw)
        kernel.step(two_sided_adamw_step, g, L, R, **args)
        ref.step(two_sided_adamw_ref, g, L, R, **args)
    return kernel, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_eager_twin(shape, seed):
    kernel, ref = _run_pair(shape, seed, steps=4)
    _compare(kernel, ref, f"{shape} seed {seed}")


@pytest.mark.parametrize("sides", ["left", "right", "none"])
@pytest.mark.parametrize("shape", [(5, 7), (33, 9)])
def test_identity_side(shape, sides):
    kernel, ref = _run_pair(shape, 2, sides=sides)
    _compare(kernel, ref, f"{shape} sides={sides}")


@pytest.mark.parametrize("shape", [(7, 5), (16, 16)])
@pytest.mark.parametrize("variant", ["amsgrad", "maximize", "no_decay", "both"])
def test_variants(shape, variant):
    kw = dict(
        amsgrad=variant in ("amsgrad", "both"),
        maximize=variant in ("maximize", "both"),
        decay=variant != "no_decay",
    )
    kernel, ref = _run_pair(shape, 3, **kw)
    _compare(kernel, ref, f"{shape} {variant}")


@pytest.mark.parametrize("shape", [(5, 7), (33, 9)])
def test_bf16_params(shape):
    # Both compute in fp32 and round to bf16 once per step: at most one bf16 ulp apart.
    kernel, ref = _run_pair(shape, 4, p_dtype=torch.bfloat16)
    assert kernel.p.dtype == torch.bfloat16
    _compare(kernel, ref, f"{shape} bf16", param_tol="bf16_one_ulp")


def test_batched_units_match_one_by_one():
    """Stacked (B, k, w) units with stacked bases: one launch set, the same as the twin per unit."""
    kernel, ref = _run_pair((7, 5), 5, batch=3, amsgrad=True)
    _compare(kernel, ref, "batched")


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the interpreter's 0/0
@pytest.mark.parametrize("shape", [(5, 7), (16, 16), (9, 33)])
def test_given_g_rot_and_eps_zero(shape):
    """An svd recompute step: g~ = S padded with zeros, eps = 0 (u = 0 where v = 0, not NaN), then plain steps."""
    gen = torch.Generator().manual_seed(6)
    k, w = shape
    L, R = _orthogonal(k, gen), _orthogonal(w, gen)
    p0 = torch.randn(k, w, generator=gen).to(DEVICE)
    kernel, ref = _State(p0.clone(), True), _State(p0.clone(), True)
    kw = dict(HYPER, eps=0.0, amsgrad=True, maximize=True)
    for t in range(1, 4):
        g = torch.randn(k, w, generator=gen).to(DEVICE)
        g_rot = None
        if t == 1:
            g_rot = torch.zeros(k, w, device=DEVICE)
            g_rot.diagonal()[:] = torch.linspace(3.0, 0.5, min(k, w))
        kernel.step(two_sided_adamw_step, g, L, R, step=t, g_rot=g_rot, **kw)
        ref.step(two_sided_adamw_ref, g, L, R, step=t, g_rot=g_rot, **kw)
        for key, x in kernel.tensors().items():
            assert torch.isfinite(x).all(), f"step {t}: non-finite {key}"
        _compare(kernel, ref, f"{shape} step {t}")
    # The off-diagonal slots of the first step stayed 0 in v until real gradients arrived: only the diagonal moved
    # p at step 1 (checked above through the twin); nothing became NaN.


def test_launch_counts(monkeypatch):
    calls = []
    original = kernel_module.launch_kernel
    monkeypatch.setattr(
        kernel_module, "launch_kernel", lambda *a, **k: (calls.append(k["EPILOGUE"]), original(*a, **k))
    )
    k, w = 5, 7
    gen = torch.Generator().manual_seed(7)
    L, R = _orthogonal(k, gen), _orthogonal(w, gen)
    st = _State(torch.randn(k, w, device=DEVICE), False)
    g = torch.randn(k, w, device=DEVICE)
    for sides, g_rot, want in [((L, R), None, 4), ((L, R), g, 3), ((None, R), None, 2), ((L, None), None, 2)]:
        calls.clear()
        st.step(two_sided_adamw_step, g, *sides, step=1, g_rot=g_rot, **HYPER)
        assert len(calls) == want, (sides[0] is None, sides[1] is None, g_rot is None, calls)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(m=torch.zeros(5, 6)), "exp_avg has shape"),
        (dict(L=torch.eye(4)), "L has shape"),
        (dict(R=torch.eye(5)), "R has shape"),
        (dict(v=torch.zeros(5, 7, dtype=torch.float64)), "fp32 moments"),
        (dict(g=torch.zeros(7, 5).t()), "grad is not contiguous"),
        (dict(precision="fp16"), "precision"),
        (dict(g=None), "needs g or g_rot"),
        (dict(step=0), "step must be"),
    ],
)
def test_bad_inputs_are_refused(change, match):
    args = dict(p=torch.zeros(5, 7), g=torch.zeros(5, 7), m=torch.zeros(5, 7), v=torch.zeros(5, 7), vmax=None,
                L=torch.eye(5), R=torch.eye(7), step=1, **HYPER)  # fmt: skip
    args.update(change)
    args = {key: val.to(DEVICE) if torch.is_tensor(val) else val for key, val in args.items()}
    p0 = args["p"].clone()
    with pytest.raises(ValueError, match=match):
        two_sided_adamw_step(**args)
    assert torch.equal(args["p"], p0)


# %% the twin is the reference's maths ----------------------------------------------------------------------
def _reference_unit_steps(scope, shape, steps, *, amsgrad, maximize, change):
    """Run rotated_adamw_ref on one real svd / eigen unit; before each step, predict it with the twin from the
    state the previous step left (bases, basis_reset_at), and compare the param (and the moments, where no
    basis change follows the Adam step)."""
    torch.manual_seed(8)
    units = build_units([torch.Size(shape)], scope, roles=["matrix"])
    (unit,) = units
    rot = unit.rotation
    p = torch.randn(shape)
    m, v = torch.zeros(shape), torch.zeros(shape)
    vmax = torch.zeros(shape) if amsgrad else None
    steps_t = [torch.zeros(())]
    store: dict = {}
    every = 3
    kw = dict(HYPER, amsgrad=amsgrad, maximize=maximize)
    checked = 0
    for t in range(1, steps + 1):
        g = torch.randn(shape)
        before = dict(p=p.clone(), m=m.clone(), v=v.clone(), vmax=None if vmax is None else vmax.clone())
        rotated_adamw_ref([p], [g], [m], [v], [vmax] if amsgrad else None, steps_t, units, svd_bases=[store],
                          svd_every=every, precondition_every=every, basis_change=change, **kw)  # fmt: skip
        if scope == "eigen" and t == 1:
            continue  # SOAP's skipped first step: only the bases are built
        g_rot = None
        if scope == "svd":
            recompute = (t - 1) % every == 0
            if recompute:  # the bases after the step are the ones the step used; g~ = S padded
                s = torch.linalg.svd(-g if maximize else g, full_matrices=False)[1]
                g_rot = torch.zeros(shape)
                g_rot.diagonal()[:] = s
                if change != "keep" and t > 1:
                    continue  # the moments were carried across before the Adam step
            L, R = rot.matrices(rot.load(store), dtype=torch.float32)
            moments_follow = True
        else:
            refresh = t % every == 0
            if refresh:
                continue  # the bases the step used were replaced after it
            L, R = store["eigen_q_l"][0], store["eigen_q_r"][0]
            moments_follow = True
        reset_at = float(store.get("basis_reset_at", 0.0))
        twin = {key: None if x is None else x.clone() for key, x in before.items()}
        two_sided_adamw_ref(twin["p"], g, twin["m"], twin["v"], twin["vmax"], L, R, step=t - reset_at,
                            g_rot=g_rot, **kw)  # fmt: skip
        got = dict(p=p, m=m, v=v, vmax=vmax)
        for key, want in twin.items():
            if want is not None and (key == "p" or moments_follow):
                assert_close_to_ref(want, got[key], "fused_fp32", what=f"{scope} {change} step {t}: {key}")
        checked += 1
    assert checked >= 3
    return checked


@pytest.mark.parametrize("shape", [(6, 6), (5, 7)])
@pytest.mark.parametrize("change", ["auto", "reset"])
def test_twin_is_the_reference_on_eigen_units(shape, change):
    _reference_unit_steps("eigen", shape, 8, amsgrad=True, maximize=False, change=change)


@pytest.mark.parametrize("change", ["keep", "reset"])
@pytest.mark.parametrize("maximize", [False, True])
def test_twin_is_the_reference_on_square_svd_units(change, maximize):
    # k == w: both sides are square, stored densely (no Householder reflectors).
    _reference_unit_steps("svd", (6, 6), 8, amsgrad=False, maximize=maximize, change=change)


# %% FusedRotatedAdamW on the Triton backend --------------------------------------------------------------------
@pytest.mark.parametrize(
    "scope, extra",
    [
        ("eigen", dict(precondition_every=3)),
        ("eigen", dict(precondition_every=2, amsgrad=True, maximize=True, basis_change="reset")),
        # svd: the gradients are random, not the params', so both optimizers see the same ones and recomputes
        # (every 3 steps; the non-square sides' dense forms are rebuilt from their new reflectors) stay comparable.
        ("svd", dict(svd_every=100, amsgrad=True)),
        ("svd", dict(svd_every=3, basis_change="transport")),
    ],
)
def test_fused_optimizer_runs_dynamic_units_through_the_kernel(scope, extra):
    from rotkern import FusedRotatedAdamW, RotatedAdamW

    shapes, roles = [(6, 6), (5, 7), (9, 3), (8,)], ["matrix", "matrix", "qkv", "vector"]
    torch.manual_seed(9)
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    ref = [p.clone() for p in params]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, rotation=scope, **extra)
    decay = [len(s) == 2 and i != 1 for i, s in enumerate(shapes)]  # (5, 7) without weight decay
    fused = FusedRotatedAdamW([{"params": params, "roles": roles, "decay_mask": decay}], backend="triton",
                              precision="ieee", **kw)  # fmt: skip
    eager = RotatedAdamW([{"params": ref, "roles": roles, "decay_mask": decay}], **kw)
    for _ in range(6):
        for p, r in zip(params, ref, strict=True):
            p.grad = torch.randn(p.shape, device=DEVICE)
            r.grad = p.grad.clone()
        fused.step()
        eager.step()
    # eigen: every matrix unit on the kernel from step 2 (step 1 only builds the bases): 5 pieces x 5 steps.
    # svd: every matrix unit, every step ((5, 7)'s right side formed densely from its reflectors).
    want = 5 * 5 if scope == "eigen" else 5 * 6
    assert fused.two_sided_steps == want
    assert fused.backend_used == "triton"
    for i, (p, r) in enumerate(zip(params, ref, strict=True)):
        assert_close_to_ref(p, r, "fused_fp32", what=f"{scope} param {i}")
        for key, val in eager.state[r].items():
            if torch.is_tensor(val) and val.is_floating_point():
                assert_close_to_ref(fused.state[p][key], val, "fused_fp32", what=f"{scope} param {i}: {key}")


def test_svd_sides_longer_than_the_dense_limit_run_eagerly(monkeypatch):
    from rotkern import FusedRotatedAdamW, RotatedAdamW
    from rotkern.bases import svd as fused_module

    monkeypatch.setattr(fused_module, "SVD_DENSE_SIDE_MAX", 6)
    torch.manual_seed(3)
    params = [torch.randn(s, device=DEVICE) for s in [(6, 6), (5, 7)]]
    ref = [p.clone() for p in params]
    kw = dict(lr=3e-3, rotation="svd", svd_every=2)
    fused = FusedRotatedAdamW(params, backend="triton", precision="ieee", **kw)
    eager = RotatedAdamW(ref, **kw)
    for _ in range(4):
        for p, r in zip(params, ref, strict=True):
            p.grad = torch.randn(p.shape, device=DEVICE)
            r.grad = p.grad.clone()
        fused.step()
        eager.step()
    assert fused.two_sided_steps == 4 and fused.backend_used == "eager"  # (5, 7): its 7-long side is eager
    for i, (p, r) in enumerate(zip(params, ref, strict=True)):
        assert_close_to_ref(p, r, "fused_fp32", what=f"param {i}")


def test_dense_svd_side_cache_follows_recomputes_and_loads():
    from rotkern import FusedRotatedAdamW

    torch.manual_seed(4)
    w = torch.randn(5, 9, device=DEVICE)
    opt = FusedRotatedAdamW([w], backend="triton", precision="ieee", rotation="svd", svd_every=2)
    sides = []
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
        (entry,) = opt._svd_dense_cache.values()
        sides.append(entry[2][1])
    assert sides[0] is sides[1] and sides[2] is not sides[1]  # formed at steps 1 and 3 (recomputes), reused at 2
    r = sides[2]
    assert torch.allclose(r.T @ r, torch.eye(9, device=DEVICE), atol=1e-5)
    opt.load_state_dict(opt.state_dict())  # new state tensors: the next step forms the side again
    w.grad = torch.randn_like(w)
    opt.step()
    (entry,) = opt._svd_dense_cache.values()
    assert entry[2][1] is not r and torch.equal(entry[2][1], r)  # same reflectors (no recompute at step 4)


@pytest.mark.parametrize("shape", [(33, 9), (16, 16)])
def test_tf32_rounds_the_operands_to_nearest(shape, monkeypatch):
    """precision="tf32": the kernel rounds its dot operands to the nearest tf32 value, as cuBLAS's TF32 does
    (Triton's tf32 dot alone truncates: a bias). Under the interpreter the kernel's dots are then exactly TF32, so
    it equals the eager twin under emulated TF32 matmuls to fp32 rounding; on a GPU it is judged against the twin
    under allow_tf32."""
    from rotkern.testing import tf32_matmuls

    if ON_GPU:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        kernel, ref = _run_pair(shape, 4, precision="tf32")
        _compare(kernel, ref, f"{shape} tf32", param_tol="fused_tf32")
        return
    gen = torch.Generator().manual_seed(4)
    L, R = _orthogonal(shape[0], gen), _orthogonal(shape[1], gen)
    p0 = torch.randn(shape, generator=gen)
    kernel, ref = _State(p0.clone(), False), _State(p0.clone(), False)
    for t in range(1, 4):
        g = torch.randn(shape, generator=gen)
        kernel.step(two_sided_adamw_step, g, L, R, **HYPER, step=t, precision="tf32")
        with tf32_matmuls():
            ref.step(two_sided_adamw_ref, g, L, R, **HYPER, step=t)
    _compare(kernel, ref, f"{shape} tf32 (emulated)")
