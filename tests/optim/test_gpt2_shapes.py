"""FusedRotatedAdamW at nanoGPT GPT-2 124M's shapes: the correctness phase of ``benchmarks/gpu_run.sh``.

The first thing a GPU loan must answer: in every static scope, at the default precision (tf32x3) and the paper's
n = 768, does the Triton step equal the textbook one? Three optimizers step the same params on the same grads: the
fused one, the eager fp32 reference (RotatedAdamW) and the eager reference in float64; the fused step is judged
against float64 by the float64-anchored rule of :mod:`rotkern.testing` (per element for the moments, on norms
for the params with the allowance for the first step's sign ties). Also: the step never synchronises with the host
and a changing lr recompiles nothing.

On a GPU: the 124,373,760 parameters of GPT-2 124M (tied head, no biases). On a CPU (the dry run of gpu_run.sh and
CI, TRITON_INTERPRET=1): one block of a tiny GPT at n = 24 (every row and column has a residual block), with the
host reads counted instead of the device syncs.
"""

import os

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import triton_available
from rotkern.optim._base import moment
from rotkern.testing import assert_close_to_ref, sign_ties

from ._host_reads import HostReads
from .test_fused_rotated_adamw import GPT2_SHAPES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        not (triton_available() and (INTERPRET or ON_GPU)), reason="needs a CUDA GPU, or TRITON_INTERPRET=1"
    ),
]
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
STATIC_SCOPES = ("none", "global", "layer", "output", "input")
TINY = [((64, 32), "embedding"), ((16, 32), "embedding")] + [
    ((32,), "vector"), ((96, 32), "qkv"), ((32, 32), "matrix"), ((32,), "vector"), ((128, 32), "matrix"),
    ((32, 128), "matrix"), ((32,), "vector"),
]  # fmt: skip
SHAPES, BLOCK = (GPT2_SHAPES, 768) if ON_GPU else (TINY, 24)
STEPS = 3
HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # nanoGPT's


def _group(params):
    return {"params": params, "roles": [r for _, r in SHAPES], "decay_mask": [p.dim() >= 2 for p in params]}


def _optimizers(scope):
    gen = torch.Generator().manual_seed(0)
    init = [(torch.randn(s, generator=gen) * 0.02).to(DEVICE) for s, _ in SHAPES]
    fused_p = [p.clone() for p in init]
    eager_p = [p.clone() for p in init]
    p64 = [p.double() for p in init]
    kw = dict(HYPER, rotation=scope, block_size=BLOCK, seed=0)
    fused = FusedRotatedAdamW([_group(fused_p)], backend="triton", **kw)
    eager = RotatedAdamW([_group(eager_p)], **kw)
    exact = RotatedAdamW([_group(p64)], compute_dtype=torch.float64, **kw)
    return (fused, fused_p), (eager, eager_p), (exact, p64)


def _set_grads(runs, gen):
    grads = [torch.randn(s, generator=gen).to(DEVICE) for s, _ in SHAPES]
    for _, params in runs:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype)
    return grads


@pytest.mark.parametrize("scope", STATIC_SCOPES)
def test_fused_step_meets_the_float64_rule(scope):
    runs = _optimizers(scope)
    (fused, fused_p), (eager, eager_p), (exact, p64) = runs
    if ON_GPU:
        assert sum(p.numel() for p in fused_p) == 124_373_760  # nanoGPT GPT-2 124M (tied head, no biases)
    gen = torch.Generator().manual_seed(1)
    ties = 0
    for t in range(STEPS):
        grads = _set_grads(runs, gen)
        if t == 0:
            ties = sign_ties(fused.units(0), grads)
        for opt, _ in runs:
            opt.step()
    lr = HYPER["lr"]
    for i, (q, p, p_64) in enumerate(zip(fused_p, eager_p, p64, strict=True)):
        what = f"{scope} param {i} {tuple(q.shape)}"
        assert_close_to_ref(q, p_64, "fp32_floor", eager=p, norm=True, allowance=2 * lr * ties**0.5, what=what)
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = moment(fused.state[q], key), moment(eager.state[p], key)
            assert_close_to_ref(got, moment(exact.state[p_64], key), "fp32_floor", eager=want, what=f"{what} {key}")
        assert float(fused.state[q]["step"]) == STEPS
    print(f"\n[{scope}] {sum(p.numel() for p in fused_p):,} params, n={BLOCK}, {STEPS} steps, {ties} sign ties: ok")


@pytest.mark.parametrize("scope", ["none", "global", "output"])
def test_fused_step_never_syncs_with_the_host(scope):
    """After the first step (plans, state), a step with a tensor lr reads nothing on the host: on a GPU,
    ``set_sync_debug_mode("error")`` turns any sync into an error; on a CPU the host reads are counted."""
    params = [(torch.randn(s) * 0.02).to(DEVICE) for s, _ in SHAPES]
    lr = torch.tensor(HYPER["lr"], device=DEVICE)
    opt = FusedRotatedAdamW(
        [_group(params)], **dict(HYPER, lr=lr), rotation=scope, block_size=BLOCK, backend="triton"
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        _set_grads([(opt, params)], gen)
        opt.step()
    _set_grads([(opt, params)], gen)
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            lr.fill_(3e-4)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    else:
        with HostReads() as reads:
            lr.fill_(3e-4)
            opt.step()
        assert reads.count == 0, reads.ops
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


@pytest.mark.parametrize("scope", ["global", "output"])
def test_a_changing_lr_compiles_nothing_new(scope):
    """A float lr that changes every step is uploaded with the hyperparameters, never a constexpr: after the first
    step the Triton kernels' compile caches do not grow."""
    from rotkern.kernels.rotated_adamw_step import _adamw_kernel, _rotated_adamw_kernel

    def compiled():
        total = 0
        for kernel in (_rotated_adamw_kernel, _adamw_kernel):
            caches = getattr(kernel, "device_caches", None)
            if caches is None:
                pytest.skip("this Triton keeps no device_caches to count compiled kernels")
            total += sum(len(v[0]) for v in caches.values())
        return total

    if not ON_GPU:
        pytest.skip("the interpreter compiles nothing: compile caches exist on a GPU only")
    params = [(torch.randn(s) * 0.02).to(DEVICE) for s, _ in SHAPES]
    opt = FusedRotatedAdamW([_group(params)], **HYPER, rotation=scope, block_size=BLOCK, backend="triton")
    gen = torch.Generator().manual_seed(3)
    _set_grads([(opt, params)], gen)
    opt.step()
    before = compiled()
    for k in range(4):
        opt.param_groups[0]["lr"] = HYPER["lr"] / (k + 2)
        _set_grads([(opt, params)], gen)
        opt.step()
    torch.cuda.synchronize()
    assert compiled() == before
