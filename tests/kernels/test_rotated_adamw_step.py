"""The Triton rotated AdamW step against the eager reference (rotkern.kernels.reference), over many steps.

Runs on CUDA when there is a GPU, else on the CPU through the Triton interpreter (TRITON_INTERPRET=1,
set before Python starts) with tiny shapes and fewer steps.
"""

import os

import pytest
import torch

from rotkern.kernels.reference import rotated_adamw_ref
from rotkern.scopes import SCOPES, build_units
from rotkern.testing import assert_close_to_ref

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
    kernel = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad)
    ref = kernel.clone()
    ref64 = kernel.clone(torch.float64)
    for _ in range(STEPS):
        grads = _grads(kernel.params)
        kernel.step(rotated_adamw_step, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    what = f"{scope} n={block_size} {variant}"
    _compare(kernel, ref, "fused_fp32", what)
    # Dao rule: no further from the float64 reference than twice the eager fp32 path.
    for key, actual in kernel.named().items():
        assert_close_to_ref(actual, ref64.named()[key], "fp32_floor", eager=ref.named()[key], what=f"{what}: {key}")
    assert all(float(s) == STEPS for s in kernel.steps)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("scope", ["global", "output", "input"])
def test_precisions_and_launch_modes(scope, precision, single_pass):
    units = _units(scope, 16 if not ON_GPU else 768, seed=3)
    kw = dict(HYPER, decay_mask=DECAY, amsgrad=True)
    kernel = State([torch.randn(s, device=DEVICE) for s in SHAPES], amsgrad=True)
    ref = kernel.clone()
    for _ in range(STEPS // 2):
        grads = _grads(kernel.params)
        kernel.step(rotated_adamw_step, grads, units, precision=precision, single_pass=single_pass, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
    _compare(kernel, ref, "fused_tf32" if precision == "tf32" else "fused_fp32", f"{scope} {precision}")


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
