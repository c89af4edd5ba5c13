"""The Triton rotated AdamW step against the eager reference (rotkern.kernels.reference), over many steps.

Runs on CUDA when there is a GPU, else on the CPU through the Triton interpreter (TRITON_INTERPRET=1,
set before Python starts) with tiny shapes and fewer steps.
"""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rotkern.kernels.reference import rotated_adamw_ref
from rotkern.scopes import SCOPES, build_units
from rotkern.testing import assert_close_to_ref, sign_ties, tf32_matmuls

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not (INTERPRET or ON_GPU), reason="needs a CUDA GPU, or TRITON_INTERPRET=1 for the CPU"),
]
if INTERPRET or ON_GPU:
    pytest.importorskip("triton", reason="triton is not installed")
    from rotkern.kernels import rotated_adamw_step as kernel_module
    from rotkern.kernels.rotated_adamw_step import rotated_adamw_step

    from ._round_kernel import _round_kernel

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
STEPS = 100 if ON_GPU else 10
BLOCK_SIZES = [1, 16, 64] + ([768] if ON_GPU else [])

# Odd shapes: a residual block everywhere, a 1-D vector, a conv kernel, a fused qkv and an embedding.
SHAPES = [(13, 7), (5,), (33, 17), (6, 3, 3, 3), (9, 3), (10, 4)]
ROLES = ["matrix", "vector", "matrix", "matrix", "qkv", "embedding"]
DECAY = [True, False, True, True, True, False]
if ON_GPU:
    # Rows and columns longer than 768: full blocks plus residuals at the paper's n.
    SHAPES += [(800, 1000), (2304, 768), (1030,)]
    ROLES += ["matrix", "qkv", "vector"]
    DECAY += [True, True, False]

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _poison_workspace(monkeypatch):
    # NaN in every workspace slot before each call: a read of a slot the kernel did not write shows up.
    monkeypatch.setattr(kernel_module, "POISON_WORKSPACE", True)


class State:
    """Params, moments and steps of one optimizer over ``shapes``, on ``device``."""

    def __init__(self, params, amsgrad, moment_dtype=torch.float32, step_device=DEVICE):
        self.params = params
        self.exp_avgs = [torch.zeros(p.shape, dtype=moment_dtype, device=p.device) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in self.exp_avgs]
        self.max_exp_avg_sqs = [torch.zeros_like(m) for m in self.exp_avgs] if amsgrad else None
        self.steps = [torch.zeros((), dtype=torch.float32, device=step_device) for _ in params]

    def clone(self, dtype=None, step_device=DEVICE):
        params = [p.detach().clone() if dtype is None else p.detach().to(dtype) for p in self.params]
        other = State(params, self.max_exp_avg_sqs is not None, dtype or torch.float32, step_device)
        for mine, theirs in self.moment_lists(other):
            for a, b in zip(mine, theirs, strict=True):
                b.copy_(a)
        for a, b in zip(self.steps, other.steps, strict=True):
            b.copy_(a)
        return other

    def moment_lists(self, other):
        pairs = [(self.exp_avgs, other.exp_avgs), (self.exp_avg_sqs, other.exp_avg_sqs)]
        if self.max_exp_avg_sqs is not None:
            pairs.append((self.max_exp_avg_sqs, other.max_exp_avg_sqs))
        return pairs

    def step(self, fn, grads, units, **kw):
        fn(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.steps, units, **kw)

    def named(self):
        out = {f"param {i}": p for i, p in enumerate(self.params)}
        out |= {f"exp_avg {i}": m for i, m in enumerate(self.exp_avgs)}
        out |= {f"exp_avg_sq {i}": v for i, v in enumerate(self.exp_avg_sqs)}
        if self.max_exp_avg_sqs is not None:
            out |= {f"max_exp_avg_sq {i}": v for i, v in enumerate(self.max_exp_avg_sqs)}
        return out


def _units(scope, block_size, seed, shapes=SHAPES, roles=ROLES):
    return build_units([torch.Size(s) for s in shapes], scope, block_size=block_size, seed=seed, roles=roles)


def _grads(params, dtype=None):
    return [torch.randn(p.shape, device=p.device, dtype=dtype or p.dtype) for p in params]


def _compare(kernel: State, ref: State, name: str, what: str, skip_params=False):
    for key, actual in kernel.named().items():
        if skip_params and key.startswith("param"):
            continue
        assert_close_to_ref(actual, ref.named()[key], name, what=f"{what}: {key}")


def _dao(kernel: State, ref: State, ref64: State, what: str, ties: int, lr: float, floor="fp32_floor"):
    """The float64-anchored rule (rotkern.testing): moments per element, params on norms with the allowance
    for the first step's sign ties."""
    for key, actual in kernel.named().items():
        if key.startswith("param"):
            assert_close_to_ref(actual, ref64.named()[key], floor, eager=ref.named()[key], norm=True,
                                allowance=2 * lr * ties**0.5, what=f"{what}: {key}")  # fmt: skip
        else:
            assert_close_to_ref(actual, ref64.named()[key], floor, eager=ref.named()[key], what=f"{what}: {key}")


@contextlib.contextmanager
def _eager_matmuls(precision, monkeypatch):
    """The eager baseline of a kernel precision: fp32 matmuls, or TF32 ones for ``tf32`` (cuBLAS's on a GPU, the
    emulation of rotkern.testing on a CPU, where the interpreted kernel's tf32 dots are TF32 too)."""
    if precision != "tf32":
        yield
    elif ON_GPU:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        yield
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        with tf32_matmuls():
            yield


def _run(units, kw, steps, grads_fn=None, amsgrad=False, shapes=SHAPES, eager=contextlib.nullcontext, **kernel_kw):
    """kernel, eager fp32 and eager fp64 states after ``steps`` steps on the same grads; and the first step's
    sign ties. ``eager``: the context of the eager fp32 steps (TF32 matmuls for a tf32 kernel)."""
    kernel = State([torch.randn(s, device=DEVICE) for s in shapes], amsgrad)
    ref, ref64 = kernel.clone(), kernel.clone(torch.float64)
    ties = 0
    for t in range(steps):
        grads = grads_fn(kernel.params) if grads_fn is not None else _grads(kernel.params)
        if t == 0:
            ties = sign_ties(units, grads)
        kernel.step(rotated_adamw_step, grads, units, **kw, **kernel_kw)
        with eager():
            ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    return kernel, ref, ref64, ties


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(
    "variant, seed",
    [("plain", 0), ("amsgrad+maximize", 7)],
)
def test_matches_reference(scope, block_size, variant, seed):
    amsgrad = maximize = variant != "plain"
    units = _units(scope, block_size, seed)
    kw = dict(HYPER, decay_mask=DECAY, amsgrad=amsgrad, maximize=maximize)
    kernel, ref, ref64, ties = _run(units, kw, STEPS, amsgrad=amsgrad)
    what = f"{scope} n={block_size} {variant}"
    if ties == 0:
        # No rotated coordinate near an fp32 sign tie: the fixed rtol against eager is stable here.
        _compare(kernel, ref, "fused_fp32", what)
    _dao(kernel, ref, ref64, what, ties, HYPER["lr"])
    assert all(float(s) == STEPS for s in kernel.steps)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("scope", ["global", "output", "input"])
def test_precisions_and_launch_modes(scope, precision, single_pass, monkeypatch):
    units = _units(scope, 16 if not ON_GPU else 768, seed=3)
    kw = dict(HYPER, decay_mask=DECAY, amsgrad=True)
    kernel, ref, ref64, ties = _run(units, kw, STEPS // 2, amsgrad=True, precision=precision, single_pass=single_pass,
                                    eager=lambda: _eager_matmuls(precision, monkeypatch))  # fmt: skip
    what = f"{scope} {precision}"
    if not ON_GPU and ties == 0:
        # Under the interpreter the kernel and the (emulated TF32) eager step multiply the same rounded operands,
        # exactly: they differ by fp32 summation order only, also in tf32 (a missed operand rounding is ~1e-3).
        _compare(kernel, ref, "fused_fp32", what)
    _dao(kernel, ref, ref64, what, ties, HYPER["lr"], floor="fp32_floor" if precision != "tf32" else "tf32_floor")


# GPU-size shapes with planted sign ties: a reduced but real one under the interpreter (one 96 x 768 matrix and a
# 1000-vector at the paper's n = 768, ~30 s per scope here), the GPT-2 shapes on a GPU.
SCALE_SHAPES = [(96, 768), (1000,)] if not ON_GPU else [(3072, 768), (2304, 768), (768, 3072), (50304 // 8, 768)]
SCALE_ROLES = ["matrix", "vector"] if not ON_GPU else ["matrix", "qkv", "matrix", "embedding"]


def _planted(units, gen, ties_per_unit=16):
    """Gradients whose rotated coordinates include ``ties_per_unit`` values at 1e-9 of the others (per rotated
    unit): after the cast to fp32 their sign is below the rotation's rounding, as happens naturally a few times
    per step in a GPT-2-size unit."""

    def make(params):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device) for p in params]
        flats = [g.view(-1) for g in grads]
        for unit in units:
            if unit.rotation is None:
                continue
            y = unit.rotation.rotate(unit.view(flats))
            pick = torch.randperm(y.numel(), generator=gen)[:ties_per_unit].to(y.device)
            y.view(-1)[pick] = 1e-9 * torch.sign(y.view(-1)[pick])
            unit.write(flats, unit.rotation.unrotate(y))
        return [g.float() for g in grads]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"] if not ON_GPU else ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("scope", ["output", "global", "input", "layer"] if ON_GPU else ["output", "global"])
def test_gpu_scale_shapes_meet_the_float64_rule(scope, precision, monkeypatch):
    units = _units(scope, 768, seed=1, shapes=SCALE_SHAPES, roles=SCALE_ROLES)
    kw = dict(HYPER, amsgrad=False)
    gen = torch.Generator().manual_seed(11)
    eager = lambda: _eager_matmuls(precision, monkeypatch)  # noqa: E731
    kernel, ref, ref64, ties = _run(units, kw, 2, grads_fn=_planted(units, gen), shapes=SCALE_SHAPES,
                                    precision=precision, eager=eager)  # fmt: skip
    assert ties >= 8  # the planted ties are there: the fixed rtol would be meaningless on this input
    _dao(kernel, ref, ref64, f"{scope} {precision} GPU-size", ties, HYPER["lr"],
         floor="fp32_floor" if precision != "tf32" else "tf32_floor")  # fmt: skip


@pytest.mark.parametrize("pieces", ["qv", "k"])
@pytest.mark.parametrize("scope", ["output", "layer", "global"])
def test_unrotated_qkv_thirds_starting_inside_a_param(scope, pieces):
    """qkv_pieces leaves some thirds of a (99, 33) fused QKV weight to the element-wise kernel: pieces that start at
    elements 1089 and 2178, inside the param and off any 16-byte boundary (chunks of 1024 from there would be
    misaligned vector accesses on a GPU). The step matches the reference, and the rotated thirds' neighbours too."""
    shapes, roles = [(99, 33), (13, 7), (1030,)], ["qkv", "matrix", "vector"]
    units = build_units([torch.Size(s) for s in shapes], scope, block_size=16, seed=2, roles=roles, qkv_pieces=pieces)
    assert any(u.rotation is None and u.segments[0].start % 4 for u in units)  # an unaligned identity piece
    kw = dict(HYPER, decay_mask=[True, True, False])
    kernel, ref, ref64, ties = _run(units, kw, STEPS // 2, shapes=shapes)
    if ties == 0:
        _compare(kernel, ref, "fused_fp32", f"{scope} qkv_pieces={pieces}")
    _dao(kernel, ref, ref64, f"{scope} qkv_pieces={pieces}", ties, HYPER["lr"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("scope", ["global", "output"])
def test_zero_eps_and_zero_grads(scope):
    # eps = 0 makes u = 0/0 on padding and on all-zero blocks: neither may leak NaN into real coordinates.
    units = _units(scope, 16, seed=9)
    kw = dict(HYPER, eps=0.0, decay_mask=DECAY, amsgrad=True)
    kernel = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=True)
    ref = kernel.clone()
    for _ in range(3):
        grads = _grads(kernel.params)
        grads[4].zero_()
        kernel.step(rotated_adamw_step, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
    for key, actual in kernel.named().items():
        expected = ref.named()[key]
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), key
        keep = ~torch.isnan(expected)
        assert_close_to_ref(actual[keep], expected[keep], "fused_fp32", what=f"{scope} eps=0 {key}")


@pytest.mark.parametrize("scope", ["global", "layer", "output", "input", "none"])
def test_bf16_params(scope):
    units = _units(scope, 16, seed=5)
    kw = dict(HYPER, decay_mask=DECAY)
    kernel = State([torch.randn(s, device=DEVICE).bfloat16() for s in SHAPES], amsgrad=False)
    ref = kernel.clone()
    ref64 = kernel.clone(torch.float64)
    for _ in range(STEPS // 2):
        grads = _grads(kernel.params)
        kernel.step(rotated_adamw_step, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    assert all(p.dtype == torch.bfloat16 for p in kernel.params)
    # Moments depend on the (shared) grads only; params round to bf16, so the Dao rule judges them.
    _compare(kernel, ref, "fused_fp32", f"{scope} bf16", skip_params=True)
    for i, (p, p_ref, p64) in enumerate(zip(kernel.params, ref.params, ref64.params, strict=True)):
        assert_close_to_ref(p, p64, "bf16_floor", eager=p_ref, what=f"{scope} bf16 param {i}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("scope", ["global", "layer", "output", "none"])
def test_nan_and_inf_propagate_like_the_reference(scope):
    units = _units(scope, 16, seed=1)
    kw = dict(HYPER, decay_mask=DECAY)
    kernel = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=False)
    ref = kernel.clone()
    for step in range(3):
        grads = _grads(kernel.params)
        if step == 1:
            grads[0].view(-1)[3] = float("nan")
            grads[2].view(-1)[40] = float("inf")
        kernel.step(rotated_adamw_step, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
    for key, actual in kernel.named().items():
        expected = ref.named()[key]
        # tf32x3 turns an Inf operand into NaN (Inf - Inf in its split), so moments may differ in kind:
        # what must agree is where the non-finite values are.
        assert torch.equal(torch.isfinite(actual), torch.isfinite(expected)), key
        finite = torch.isfinite(expected)
        assert_close_to_ref(actual[finite], expected[finite], "fused_fp32", what=f"{scope} {key}")
    assert not torch.isfinite(kernel.params[0]).all()


def test_lr_as_device_tensor_and_changing_lr():
    units = _units("output", 16, seed=2)
    kernel = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=False)
    ref = kernel.clone()
    lr = torch.tensor(0.0, device=DEVICE)
    kw = dict(HYPER, decay_mask=DECAY)
    del kw["lr"]
    for step in range(4):
        grads = _grads(kernel.params)
        lr.fill_(1e-2 / (step + 1))
        kernel.step(rotated_adamw_step, grads, units, lr=lr, **kw)
        ref.step(rotated_adamw_ref, grads, units, lr=1e-2 / (step + 1), **kw)
    _compare(kernel, ref, "fused_fp32", "tensor lr")


def test_units_on_a_subset_of_params_leave_the_rest_alone():
    units = [u for u in _units("output", 16, seed=0) if 0 not in u.params]
    kernel = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=False)
    before = kernel.params[0].clone()
    grads = _grads(kernel.params)
    grads[0] = None
    kernel.step(rotated_adamw_step, grads, units, **HYPER)
    assert torch.equal(kernel.params[0], before) and float(kernel.steps[0]) == 0
    assert all(float(kernel.steps[i]) == 1 for i in range(1, len(SHAPES)))


def test_bad_inputs_raise_clear_errors():
    units = _units("output", 16, seed=0)
    state = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=False)
    grads = _grads(state.params)
    with pytest.raises(ValueError, match="precision"):
        state.step(rotated_adamw_step, grads, units, precision="fp8", **HYPER)
    bad = list(grads)
    bad[2] = torch.randn(17, 33, device=DEVICE).t()
    with pytest.raises(ValueError, match="not contiguous"):
        state.step(rotated_adamw_step, bad, units, **HYPER)
    fp64 = state.clone(torch.float64)
    with pytest.raises(ValueError, match="fp32 moments"):
        fp64.step(rotated_adamw_step, [g.double() for g in grads], units, **HYPER)
    if ON_GPU:
        cpu_steps = state.clone(step_device="cpu")
        with pytest.raises(ValueError, match="state step"):
            cpu_steps.step(rotated_adamw_step, grads, units, **HYPER)


class _Allocations(TorchDispatchMode):
    """Records every op whose output owns new storage (views and in-place ops do not)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("scope", ["global", "output", "none"])
def test_no_allocation_in_a_step_after_the_first(scope, monkeypatch):
    # The Triton interpreter itself converts tensors to numpy, so launches are recorded, not run, while counting:
    # on a GPU a launch allocates nothing through torch.
    from rotkern import FusedRotatedAdamW

    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in SHAPES]
    opt = FusedRotatedAdamW(params, rotation=scope, block_size=16, backend="triton", lr=torch.tensor(1e-2))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the plan, the state and the buffers
    launches = []
    monkeypatch.setattr(kernel_module, "launch_kernel", lambda kernel, grid, *a, **k: launches.append(kernel))
    with _Allocations() as counter:
        opt.step()
        opt.step()
    assert counter.ops == [] and len(launches) >= 2


def test_every_launch_runs_under_the_params_device_guard(monkeypatch):
    # No second GPU here: the guard is checked to wrap every launch, and to be torch.cuda.device for CUDA params.
    active, launches = [], []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        yield
        active.pop()

    monkeypatch.setattr(kernel_module, "device_guard", guard)
    monkeypatch.setattr(kernel_module, "launch_kernel", lambda kernel, grid, *a, **k: launches.append(list(active)))
    state = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=False)
    state.step(rotated_adamw_step, _grads(state.params), _units("output", 16, seed=0), **HYPER)
    assert launches and all(a == [state.params[0].device] for a in launches)
    monkeypatch.undo()
    g = kernel_module.device_guard(torch.device("cuda", 1))  # constructing it needs no GPU; entering would
    assert isinstance(g, torch.cuda.device) and g.idx == 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="host syncs only exist with a CUDA device")
@pytest.mark.parametrize("scope", ["global", "output"])
def test_step_never_syncs_with_the_host(scope, monkeypatch):
    monkeypatch.setattr(kernel_module, "POISON_WORKSPACE", False)
    units = _units(scope, 768, seed=0)
    state = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=False)
    lr = torch.tensor(1e-3, device=DEVICE)
    for _ in range(2):  # first call builds and uploads the cached plan
        state.step(rotated_adamw_step, _grads(state.params), units, **dict(HYPER, lr=lr))
    grads = _grads(state.params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state.step(rotated_adamw_step, grads, units, **dict(HYPER, lr=lr))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_tf32_rounding_is_to_nearest_ties_away_on_host_and_in_the_kernels():
    """round_to_tf32 (host) and round_tf32 (in the kernels) agree bit for bit, and are the nearest tf32 value with
    ties away from zero (cvt.rna.tf32.f32): checked against the two tf32 neighbours of each value."""
    import triton

    from rotkern.kernels.reference import round_to_tf32

    x = torch.randn(4000, dtype=torch.float64).float() * torch.logspace(-30, 30, 4000).float()
    ties = torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 2**-20 * (1 + 2**-11)])
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38])])
    host = round_to_tf32(x)
    dev = torch.empty_like(x, device=DEVICE)
    _round_kernel[(1,)](x.to(DEVICE), dev, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(host.view(torch.int32), dev.cpu().view(torch.int32))
    finite = torch.isfinite(x) & (x.abs() < 3e38)
    bits = x[finite].view(torch.int32)
    down = (bits & -0x2000).view(torch.float32).double()  # toward zero
    up = ((bits & -0x2000) + 0x2000).view(torch.float32).double()  # away from zero
    xd, got = x[finite].double(), host[finite].double()
    nearer_up = (up - xd).abs() <= (xd - down).abs()  # ties go away from zero
    assert torch.equal(got, torch.where(nearer_up, up, down))
    assert torch.equal(host[-4:-2], x[-4:-2]) and torch.isnan(host[-2])
    assert torch.equal(host[-10:-6], torch.tensor([1 + 2**-10, -(1 + 2**-10), 1 + 2**-9, 2**-20 * (1 + 2**-10)]))
