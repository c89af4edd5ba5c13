"""The compiled extension's rotated AdamW step (CPU path) against the eager reference, over many steps.

Needs ``rotkern._C`` (``make ext``). ``make test`` builds it and sets ROTKERN_REQUIRE_EXT=1, so a failed build
fails these tests instead of skipping them.
"""

import os

import pytest
import torch

from rotkern._backend import ext_available, why_not_ext
from rotkern.kernels.ext import rotated_adamw_step_ext
from rotkern.kernels.reference import rotated_adamw_ref
from rotkern.scopes import SCOPES, build_units
from rotkern.testing import assert_close_to_ref

if os.environ.get("ROTKERN_REQUIRE_EXT") == "1" and not ext_available():
    raise RuntimeError(f"ROTKERN_REQUIRE_EXT=1 but the extension is unusable: {why_not_ext(torch.zeros(1))}")
pytestmark = [
    pytest.mark.ext,
    pytest.mark.skipif(not ext_available(), reason="rotkern._C is not built (make ext)"),
]

STEPS = 10
# Odd shapes: residual blocks, a 1-D vector, a conv kernel, a fused qkv, an embedding, and a matrix with
# enough rows that output-wise work spans several tiles (so several threads).
SHAPES = [(13, 7), (5,), (33, 17), (6, 3, 3, 3), (9, 3), (10, 4), (1500, 21)]
ROLES = ["matrix", "vector", "matrix", "matrix", "qkv", "embedding", "matrix"]
DECAY = [True, False, True, True, True, False, True]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


class State:
    """Params, fp32 (or fp64) moments and CPU steps of one optimizer over ``params``."""

    def __init__(self, params, amsgrad, moment_dtype=torch.float32):
        self.params = params
        self.exp_avgs = [torch.zeros(p.shape, dtype=moment_dtype) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in self.exp_avgs]
        self.max_exp_avg_sqs = [torch.zeros_like(m) for m in self.exp_avgs] if amsgrad else None
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]

    def clone(self, dtype=None):
        params = [p.detach().clone() if dtype is None else p.detach().to(dtype) for p in self.params]
        return State(params, self.max_exp_avg_sqs is not None, dtype or torch.float32)

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
    return [torch.randn(p.shape, dtype=dtype or p.dtype) for p in params]


def _compare(kernel: State, ref: State, name: str, what: str, skip_params=False):
    for key, actual in kernel.named().items():
        if not (skip_params and key.startswith("param")):
            assert_close_to_ref(actual, ref.named()[key], name, what=f"{what}: {key}")


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("variant, seed", [("plain", 0), ("amsgrad+maximize", 7), ("plain", 11)])
def test_matches_reference(scope, block_size, variant, seed):
    torch.manual_seed(seed)
    amsgrad = maximize = variant != "plain"
    units = _units(scope, block_size, seed)
    kw = dict(HYPER, decay_mask=DECAY, amsgrad=amsgrad, maximize=maximize)
    kernel = State([torch.randn(s) for s in SHAPES], amsgrad)
    ref, ref64 = kernel.clone(), kernel.clone(torch.float64)
    for _ in range(STEPS):
        grads = _grads(kernel.params)
        kernel.step(rotated_adamw_step_ext, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    what = f"{scope} n={block_size} {variant} seed={seed}"
    _compare(kernel, ref, "fused_fp32", what)
    # Dao rule: no further from the float64 reference than twice the eager fp32 path.
    for key, actual in kernel.named().items():
        assert_close_to_ref(actual, ref64.named()[key], "fp32_floor", eager=ref.named()[key], what=f"{what}: {key}")
    assert all(float(s) == STEPS for s in kernel.steps)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_the_result(threads):
    # Tiles are independent (pi is a bijection), so any split over threads gives the same bits.
    units = _units("global", 16, seed=4)
    start = [torch.randn(s) for s in SHAPES]
    grads = _grads(start)
    results = []
    old = torch.get_num_threads()
    try:
        for n in (threads, 1):
            torch.set_num_threads(n)
            state = State([p.clone() for p in start], amsgrad=False)
            state.step(rotated_adamw_step_ext, grads, units, **HYPER)
            results.append(state.params)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scope", ["global", "layer", "output", "input", "none"])
def test_low_and_high_precision_params(scope, dtype):
    torch.manual_seed(5)
    units = _units(scope, 16, seed=5)
    kw = dict(HYPER, decay_mask=DECAY)
    kernel = State([torch.randn(s).to(dtype) for s in SHAPES], amsgrad=False)
    ref, ref64 = kernel.clone(), kernel.clone(torch.float64)
    for _ in range(5):
        grads = _grads(kernel.params)
        kernel.step(rotated_adamw_step_ext, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    assert all(p.dtype == dtype for p in kernel.params)
    # Moments depend on the (shared) grads only; params round to their dtype, so the Dao rule judges them.
    _compare(kernel, ref, "fused_fp32", f"{scope} {dtype}", skip_params=True)
    floor = "fp32_floor" if dtype == torch.float64 else "bf16_floor"
    for i, (p, p_ref, p64) in enumerate(zip(kernel.params, ref.params, ref64.params, strict=True)):
        assert_close_to_ref(p, p64, floor, eager=p_ref, what=f"{scope} {dtype} param {i}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("scope", ["global", "layer", "output", "none"])
def test_nan_and_inf_propagate_like_the_reference(scope):
    torch.manual_seed(1)
    units = _units(scope, 16, seed=1)
    kw = dict(HYPER, decay_mask=DECAY, amsgrad=True)
    kernel = State([torch.randn(s) for s in SHAPES], amsgrad=True)
    ref = kernel.clone()
    for step in range(3):
        grads = _grads(kernel.params)
        if step == 1:
            grads[0].view(-1)[3] = float("nan")
            grads[2].view(-1)[40] = float("inf")
        kernel.step(rotated_adamw_step_ext, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
    for key, actual in kernel.named().items():
        expected = ref.named()[key]
        assert torch.equal(torch.isnan(actual), torch.isnan(expected)), key
        assert torch.equal(torch.isinf(actual), torch.isinf(expected)), key
        finite = torch.isfinite(expected)
        assert_close_to_ref(actual[finite], expected[finite], "fused_fp32", what=f"{scope} {key}")
    assert not torch.isfinite(kernel.params[0]).all()


def test_lr_as_tensor_and_changing_lr():
    units = _units("output", 16, seed=2)
    kernel = State([torch.randn(s) for s in SHAPES], amsgrad=False)
    ref = kernel.clone()
    lr = torch.tensor(0.0)
    kw = {k: v for k, v in HYPER.items() if k != "lr"}
    for step in range(4):
        grads = _grads(kernel.params)
        lr.fill_(1e-2 / (step + 1))
        kernel.step(rotated_adamw_step_ext, grads, units, lr=lr, decay_mask=DECAY, **kw)
        ref.step(rotated_adamw_ref, grads, units, lr=1e-2 / (step + 1), decay_mask=DECAY, **kw)
    _compare(kernel, ref, "fused_fp32", "tensor lr")


def test_units_on_a_subset_of_params_leave_the_rest_alone():
    units = [u for u in _units("output", 16, seed=0) if 0 not in u.params]
    kernel = State([torch.randn(s) for s in SHAPES], amsgrad=False)
    before = kernel.params[0].clone()
    grads = _grads(kernel.params)
    grads[0] = None
    kernel.step(rotated_adamw_step_ext, grads, units, **HYPER)
    assert torch.equal(kernel.params[0], before) and float(kernel.steps[0]) == 0
    assert all(float(kernel.steps[i]) == 1 for i in range(1, len(SHAPES)))


def test_bad_inputs_raise_clear_errors():
    units = _units("output", 16, seed=0)
    state = State([torch.randn(s) for s in SHAPES], amsgrad=False)
    grads = _grads(state.params)
    bad = list(grads)
    bad[2] = torch.randn(17, 33).t()
    with pytest.raises(ValueError, match="param 2: grad is not contiguous"):
        state.step(rotated_adamw_step_ext, bad, units, **HYPER)
    fp64 = state.clone(torch.float64)
    with pytest.raises(ValueError, match="fp32 moments"):
        fp64.step(rotated_adamw_step_ext, [g.double() for g in grads], units, **HYPER)
    ints = list(grads)
    ints[0] = torch.zeros(SHAPES[0], dtype=torch.int32)
    with pytest.raises(ValueError, match="param 0: grad has dtype torch.int32"):
        state.step(rotated_adamw_step_ext, ints, units, **HYPER)
    # A global unit spanning params of two dtypes: refused before the step counters advance (the optimizer
    # stages such units in fp32; tests/optim/test_torch_parity.py).
    mixed = State([torch.randn(3, 4), torch.randn(5).bfloat16()], amsgrad=False)
    gunits = _units("global", 4, seed=0, shapes=[(3, 4), (5,)], roles=["matrix", "vector"])
    with pytest.raises(ValueError, match="several \\(param, grad\\) dtypes"):
        mixed.step(rotated_adamw_step_ext, _grads(mixed.params), gunits, **HYPER)
    assert all(float(s) == 0 for s in mixed.steps)


def test_op_checks_its_own_arguments():
    # The op is public (torch.ops.rotkern.rotated_adamw_unit_): malformed descriptions must not write memory.
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    m, v, step, lr = torch.zeros(4, 6), torch.zeros(4, 6), torch.ones(()), torch.tensor(1e-3)
    op = torch.ops.rotkern.rotated_adamw_unit_
    good = dict(seg=([0], [0], [24], [1]), layout=1, width=6, nv=4, L=6, n=3, rot=torch.eye(3))

    def call(seg=good["seg"], layout=1, width=6, nv=4, L=6, n=3, rot=good["rot"], perm=None):
        op([p], [g], [m], [v], [], step, lr, *seg, layout, width, nv, L, n, perm, rot, None,
           0.9, 0.999, 1e-8, 0.0, False, False)  # fmt: skip

    call()
    with pytest.raises(RuntimeError, match="outside params"):
        call(seg=([0], [1], [24], [1]))
    with pytest.raises(RuntimeError, match="rot_n must be"):
        call(rot=torch.eye(4))
    with pytest.raises(RuntimeError, match="non-contiguous"):
        call(rot=torch.randn(3, 6)[:, :3])  # a column-major or sliced R would be read as the wrong matrix
    with pytest.raises(RuntimeError, match="perm must be"):
        call(perm=torch.arange(5))
    with pytest.raises(RuntimeError, match="segments cover"):
        call(nv=3)
