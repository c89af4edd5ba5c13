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
from rotkern.testing import assert_close_to_ref, sign_ties

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
    before = p.clone()
    with pytest.raises(RuntimeError, match="perm holds indices outside"):
        call(L=6, n=3, perm=torch.tensor([0, 1, 2, 3, 4, 60]))
    # A flat unit's tables are checked before anything but the workspace is written.
    pf, gf, mf, vf = torch.randn(100), torch.randn(100), torch.zeros(100), torch.zeros(100)
    slot, local, _ = torch.ops.rotkern.flat_perm_tables(torch.randperm(100), 4)

    def flat(slot, local, ws=None):
        ws = torch.empty(100) if ws is None else ws
        op([pf], [gf], [mf], [vf], [], step, lr, [0], [0], [100], [1], 0, 0, 1, 100, 4, None, torch.eye(4), None,
           0.9, 0.999, 1e-8, 0.0, False, False, slot, local, ws)  # fmt: skip

    before = (pf.clone(), mf.clone())
    for bad_slot, bad_local in ((slot.clone().fill_(100), local), (slot, local.clone().fill_(100))):
        with pytest.raises(RuntimeError, match="out-of-range entries"):
            flat(bad_slot, bad_local)
        assert torch.equal(pf, before[0]) and torch.equal(mf, before[1])
    with pytest.raises(RuntimeError, match="workspace must be"):
        flat(slot, local, torch.empty(99))
    with pytest.raises(RuntimeError, match="come together"):
        flat(slot, None)
    with pytest.raises(RuntimeError, match="needs a rotation"):
        op([p], [g], [m], [v], [], step, lr, [0], [0], [24], [1], 1, 6, 4, 6, 3, torch.arange(6), None, None,
           0.9, 0.999, 1e-8, 0.0, False, False)  # fmt: skip
    flat(slot, local)
    assert not torch.equal(pf, before[0])


# %% the streaming permutation, tiles, instruction sets -------------------------------------------------------
def _isas():
    if not ext_available():
        return ["scalar"]
    from rotkern import _C

    return _C.supported_isas()


@pytest.fixture
def isa(request):
    from rotkern import _C

    previous = _C.set_simd_isa(request.param)
    yield request.param
    _C.set_simd_isa(previous)


@pytest.mark.parametrize("isa", _isas(), indirect=True)
@pytest.mark.parametrize("scope", SCOPES)
def test_every_instruction_set_matches_the_reference(isa, scope):
    # The element-wise kernels exist once per instruction set (AVX-512, AVX2+FMA, scalar); each must follow the
    # reference, including amsgrad's NaN-propagating max and maximize, on lengths that leave masked tails.
    torch.manual_seed(3)
    units = _units(scope, 5, seed=3)
    kw = dict(HYPER, decay_mask=DECAY, amsgrad=True, maximize=True)
    kernel = State([torch.randn(s) for s in SHAPES], amsgrad=True)
    ref, ref64 = kernel.clone(), kernel.clone(torch.float64)
    for _ in range(4):
        grads = _grads(kernel.params)
        kernel.step(rotated_adamw_step_ext, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    _compare(kernel, ref, "fused_fp32", f"{isa} {scope}")
    for key, actual in kernel.named().items():
        assert_close_to_ref(actual, ref64.named()[key], "fp32_floor", eager=ref.named()[key], what=f"{isa}: {key}")


def test_unknown_instruction_set_is_refused():
    from rotkern import _C

    with pytest.raises(RuntimeError, match="not available"):
        _C.set_simd_isa("sse9")
    assert _C.simd_isa() in _C.supported_isas()


# Big enough for several buckets (2^16 coordinates at most) and several tiles of a flat unit, several row and
# column tiles, and residual blocks: the shapes where the streaming permutation and tiling have edges.
BIG_SHAPES = [(700, 512), (333,), (96, 1100), (1000, 300)]
BIG_ROLES = ["matrix", "vector", "matrix", "embedding"]


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [1, 5, 384, 768])
@pytest.mark.parametrize("scope", ["global", "layer", "output", "input"])
def test_multi_tile_units_match_the_reference(scope, block_size):
    # n = 1 gives buckets of exactly 2^16 (the uint16 edge); 5 a bucket of 65535; 384 / 768 the real tiles.
    torch.manual_seed(11)
    units = _units(scope, block_size, seed=11, shapes=BIG_SHAPES, roles=BIG_ROLES)
    if scope in ("global", "layer"):
        assert max(u.shape[1] for u in units) > 2**18  # several tiles of a flat unit
    kw = dict(HYPER, decay_mask=[True, False, True, False])
    kernel = State([torch.randn(s) for s in BIG_SHAPES], amsgrad=False)
    ref, ref64 = kernel.clone(), kernel.clone(torch.float64)
    ties = 0
    for t in range(3):
        grads = _grads(kernel.params)
        if t == 0:
            ties = sign_ties(units, grads)
        kernel.step(rotated_adamw_step_ext, grads, units, **kw)
        ref.step(rotated_adamw_ref, grads, units, **kw)
        ref64.step(rotated_adamw_ref, [g.double() for g in grads], units, **kw)
    # Moments carry no sign-tie amplification: the fixed rule holds. Parameters take it only without fp32 sign
    # ties on Adam's first step (rotkern.testing); with ties, the float64-anchored rule and its allowance judge them.
    _compare(kernel, ref, "fused_fp32", f"{scope} n={block_size}", skip_params=ties > 0)
    for i, (p, p_ref, p64) in enumerate(zip(kernel.params, ref.params, ref64.params, strict=True)):
        assert_close_to_ref(p, p64, "fp32_floor", eager=p_ref, norm=True, allowance=2 * HYPER["lr"] * ties**0.5,
                            what=f"{scope} n={block_size} param {i} ({ties} sign ties)")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "output", "input"])
def test_multi_tile_result_does_not_depend_on_threads(scope):
    units = _units(scope, 384, seed=4, shapes=BIG_SHAPES, roles=BIG_ROLES)
    start = [torch.randn(s) for s in BIG_SHAPES]
    grads = _grads(start)
    results = []
    old = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            state = State([p.clone() for p in start], amsgrad=False)
            state.step(rotated_adamw_step_ext, grads, units, **HYPER)
            results.append(state.params + state.exp_avgs)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("length", [7, 200_003, 590_592])
@pytest.mark.parametrize("block_size", [1, 5, 768, 4096])
def test_flat_perm_tables_describe_the_permutation(block_size, length):
    torch.manual_seed(0)
    pi = torch.randperm(length)
    slot, local, starts = torch.ops.rotkern.flat_perm_tables(pi, block_size)
    assert slot.dtype == torch.int32 and local.dtype == torch.int16
    assert starts[0] == 0 and starts[-1] == length and bool((starts.diff() >= 0).all())
    sizes = starts.diff()
    assert int(sizes.max()) <= 2**16  # positions inside a bucket fit uint16
    # Buckets hold whole blocks (the residual block last), and their sizes differ by at most one block.
    assert bool((starts[:-1] % block_size == 0).all())
    full = sizes[starts[1:] <= length // block_size * block_size]
    assert full.numel() == 0 or int(full.max() - full.min()) <= block_size
    # Gathering through the tables is gathering through pi: x[i] = g[pi[i]].
    g = torch.randn(length)
    ws = torch.empty(length)
    ws[slot.long()] = g
    bucket = torch.searchsorted(starts, torch.arange(length), right=True) - 1
    pos = starts[bucket] + (local.long() & 0xFFFF)
    assert bool((pos < starts[bucket + 1]).all())
    x = torch.empty(length)
    x[pos] = ws
    assert torch.equal(x, g[pi])
    # Each bucket's slots hold its sources in increasing order (the gather pass writes them in memory order).
    src = torch.empty(length, dtype=torch.long)
    src[slot.long()] = torch.arange(length)
    for b in range(starts.numel() - 1):
        assert bool((src[starts[b] : starts[b + 1]].diff() > 0).all())


def test_flat_perm_tables_refuse_a_non_permutation():
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.rotkern.flat_perm_tables(torch.tensor([0, 1, 1, 3]), 2)
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.rotkern.flat_perm_tables(torch.tensor([0, 4, 1, 2]), 2)


def test_flat_unit_given_pi_alone_equals_the_cached_tables():
    # The op builds the tables itself when handed pi (a direct call); the launcher passes cached ones.
    torch.manual_seed(2)
    unit = next(u for u in _units("layer", 16, seed=2) if u.shape[1] > 100)
    members = unit.params
    p0 = [torch.randn(SHAPES[i]) for i in range(len(SHAPES))]
    g = _grads(p0)
    results = []
    for given in ("pi", "tables"):
        ps = [p.clone() for p in p0]
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        rot = unit.rotation
        pi = rot.permutation("cpu")
        tables = torch.ops.rotkern.flat_perm_tables(pi, 16)[:2]
        extra = (None, None, None) if given == "pi" else (*tables, torch.empty(10**6))
        s = unit.segments[0]
        torch.ops.rotkern.rotated_adamw_unit_(
            [ps[i] for i in members], [g[i] for i in members], [m[i] for i in members], [v[i] for i in members], [],
            torch.ones(()), torch.tensor(1e-2), [0], [s.start], [s.numel], [1], 0, 0, 1, unit.shape[1], 16,
            pi if given == "pi" else None, rot.block(), rot.residual_block(), 0.9, 0.95, 1e-8, 0.1, False, False,
            *extra,
        )  # fmt: skip
        results.append(ps + m + v)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_identity_units_with_different_step_counts():
    # Unrotated units are batched into one call per step count: a param that skipped a step keeps its own t.
    torch.manual_seed(6)
    units = _units("none", 16, seed=6)
    kernel = State([torch.randn(s) for s in SHAPES], amsgrad=False)
    ref = kernel.clone()
    for step in range(4):
        grads = _grads(kernel.params)
        active = units if step != 1 else units[2:]
        kernel.step(rotated_adamw_step_ext, grads, active, **HYPER)
        ref.step(rotated_adamw_ref, grads, active, **HYPER)
    assert {float(s) for s in kernel.steps} == {3.0, 4.0}
    _compare(kernel, ref, "fused_fp32", "identity, mixed step counts")


def test_workspace_is_reused_and_can_be_released():
    from rotkern.kernels import ext

    ext.release_workspace()
    units = _units("global", 16, seed=0)
    state = State([torch.randn(s) for s in SHAPES], amsgrad=False)
    state.step(rotated_adamw_step_ext, _grads(state.params), units, **HYPER)
    ws = ext._local.workspace
    assert ws.numel() == sum(torch.Size(s).numel() for s in SHAPES)
    state.step(rotated_adamw_step_ext, _grads(state.params), units, **HYPER)
    assert ext._local.workspace is ws  # no allocation per step
    ext.release_workspace()
    assert ext._local.workspace is None
