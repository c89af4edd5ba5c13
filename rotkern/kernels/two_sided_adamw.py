"""Triton Adam step of a dynamic unit with dense two-sided bases: the svd / eigen scopes' step, fused.

One (k, w) matrix unit with bases L (k, k) and R (w, w) (an eigen unit's Q_L, Q_R; an svd unit whose sides are
square, i.e. not kept as Householder reflectors) steps as :func:`rotkern.kernels.reference.rotated_adamw_ref`
steps it (:func:`rotkern.kernels.reference.two_sided_adamw_ref` is the spec), given the bases the lifecycle of
:mod:`rotkern.bases` (SVD / eigh / refresh / transport / reset) left:

    g~  = L^T G R                     (or a given g~: the padded S of an svd recompute step; negated G if maximize)
    m   = lerp(m, g~, 1 - b1)         moments in the rotated coordinates, fp32, in place
    v   = b2 v + (1 - b2) g~^2
    v'  = max(v_max, v) if amsgrad else v          (v_max in place)
    u   = m / (sqrt(v') / sqrt(1 - b2^t) + eps)    (eps == 0: u = 0 where the denominator is 0)
    d   = L u R^T
    p   = p (1 - lr wd) - lr / (1 - b1^t) d       (the param in its own dtype, the maths in fp32)

with t the step count minus ``basis_reset_at`` (the caller passes it as ``step``).

**Launches.** One tiled matmul kernel, ``_two_sided_kernel``, with an epilogue chosen per launch:

    1. T = L^T G          -> fp32 workspace A                        (skipped when L is None or g~ is given)
    2. g~ = T R           -> Adam epilogue: m, v (v_max) in place, u -> fp32 workspace B
                             (R None or g~ given: the "matmul" is a plain tile load of T / g~)
    3. W = u R^T          -> workspace A                             (skipped when R is None)
    4. d = L W            -> apply epilogue: decoupled decay and the update of p, rounded to p's dtype
                             (L None: a plain tile load of W); L (u R^T) is DynamicRotation.unrotate's order

so 4 launches per unit (3 at an svd recompute step; 2 with an identity side, where the Adam epilogue sits on
L^T G or G R directly and the apply epilogue on L u or u R^T). Why not fewer: every entry of
g~ needs a full row of T, i.e. all of G, and every entry of d needs all of u, i.e. every moment update of the
unit; with one output tile per program, a fused version would have each program either recompute whole row /
column panels of the intermediate products (O(k w (k + w)) redundant work per tile) or wait for all others.
A one-pass version would need a persistent kernel with grid-wide barriers between the four phases (a
cooperative launch, or atomics-based barriers with every program resident), or, for matrices small enough for
one program (k, w <= ~128), a single program per unit holding T, u and W in shared memory, as the block
kernel :mod:`rotkern.kernels.rotated_adamw_step` does for its blocks with in-program barriers.

**Batching.** Units of the same (k, w) go in one launch set when they are stacked: ``p, g, m, v, vmax, g_rot``
(B, k, w) and ``L`` (B, k, k), ``R`` (B, w, w) (a leading batch grid dimension; e.g. the pieces of a split qkv
weight, whose bases the optimizer state already stacks on dim 0). Units of different params are not batched
(their tensors are separate allocations; a pointer table as in the block kernel would do it): callers loop.

The workspaces are two fp32 (B, k, w) tensors allocated per call (the caching allocator reuses them on CUDA).
Hyperparameters and bias corrections are computed on the host in fp64 and passed as fp32 scalars, rounded where
the eager reference rounds them, so ``lr`` and ``step`` are host numbers here (a tensor lr is read once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import PRECISIONS, why_not_triton
from . import _triton_compat  # noqa: F401  (applies the Triton interpreter fix of triton#9171 where needed)
from ._tl import TL_DTYPES, adam_direction, adam_moments, device_guard, launch_kernel, round_tf32, round_to

__all__ = ["two_sided_adamw_step"]

# Epilogues of _two_sided_kernel.
_STORE, _ADAM, _APPLY = 0, 1, 2


# %% kernel -------------------------------------------------------------------------------------------
@triton.jit
def _two_sided_kernel(
    # operands: C = A @ B per batch entry (DOT), or C = A (not DOT: A read as an (M, N) tile)
    a_ptr,  # A, any float dtype (cast to fp32)
    b_ptr,  # B, any float dtype; unused when not DOT
    out_ptr,  # _STORE: fp32 C; _ADAM: fp32 u; _APPLY: unused
    # Adam state, (batch, M, N) row-major with batch stride M * N
    p_ptr,  # param (_APPLY), in P_DTYPE
    m_ptr,  # exp_avg, fp32 (_ADAM)
    v_ptr,  # exp_avg_sq, fp32 (_ADAM)
    vmax_ptr,  # max_exp_avg_sq, fp32 (_ADAM with AMSGRAD)
    # sizes and strides (elements); the batch strides of A and B may be 0 (shared operand)
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    # hyperparameters, fp32 (rounded on the host as the eager reference rounds them)
    w1,  # 1 - beta1
    beta2,
    omb2,  # 1 - beta2
    eps,
    bc2_sqrt,  # sqrt(1 - beta2^t)
    decay_factor,  # 1 - lr wd (1 when the param does not decay)
    step_size,  # lr / (1 - beta1^t)
    # meta
    EPILOGUE: tl.constexpr,  # _STORE | _ADAM | _APPLY
    DOT: tl.constexpr,  # C = A @ B; else C = A
    NEGATE: tl.constexpr,  # C = -C (maximize, applied to g~)
    AMSGRAD: tl.constexpr,
    P_DTYPE: tl.constexpr,  # param dtype (stores round to it)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" | "tf32x3" | "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of C for batch entry program_id(1), with its epilogue."""
    pid = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows[:, None] < M
    cmask = cols[None, :] < N
    mask = rmask & cmask
    a_base = a_ptr + batch * stride_ab

    if DOT:
        b_base = b_ptr + batch * stride_bb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            kmask = ks < K
            a = tl.load(a_base + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=rmask & kmask[None, :],
                        other=0.0).to(tl.float32)  # fmt: skip
            b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=kmask[:, None] & cmask,
                        other=0.0).to(tl.float32)  # fmt: skip
            if PRECISION == "tf32":
                # Nearest tf32 operands, as cuBLAS's TF32: Triton's tf32 dot alone truncates (see round_tf32).
                a = round_tf32(a)
                b = round_tf32(b)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.load(a_base + rows[:, None] * stride_am + cols[None, :] * stride_ak, mask=mask, other=0.0)
        acc = acc.to(tl.float32)
    if NEGATE:
        acc = -acc  # L^T (-G) R == -(L^T G R) exactly: rounding is sign-symmetric

    offs = batch * M * N + rows[:, None] * N + cols[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptr + offs, acc, mask=mask)
    elif EPILOGUE == 1:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m, v = adam_moments(acc, m, v, w1, beta2, omb2)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if AMSGRAD:
            v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(vmax_ptr + offs, v, mask=mask)
        u = adam_direction(m, v, bc2_sqrt, eps)
        # eps == 0: v = 0 means every g~ so far was 0 there (the padding of S), so m = 0: the limit is 0, not NaN.
        denom_pos = (tl.math.sqrt_rn(v) > 0) | (eps != 0.0)
        u = tl.where(denom_pos, u, 0.0)
        tl.store(out_ptr + offs, u, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p * decay_factor - step_size * acc
        tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=mask)


# %% launcher -----------------------------------------------------------------------------------------
# Tests set this to fill the workspaces with NaN before every call: nothing may read a slot it did not write.
POISON_WORKSPACE = False


def _block(n: int, cap: int) -> int:
    """Tile size for a dimension of length n: a power of two in [16, cap] (tl.dot needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _hyper(lr, beta1, beta2, eps, weight_decay, step, decay) -> dict[str, float]:
    """The kernel's fp32 scalars, computed in fp64 as the reference computes them."""
    if step <= 0:
        raise ValueError(f"step must be >= 1 (the step count minus basis_reset_at), got {step}")
    bc1 = 1 - beta1**step
    return dict(
        w1=1.0 - beta1,
        beta2=beta2,
        omb2=1.0 - beta2,
        eps=eps,
        bc2_sqrt=(1 - beta2**step) ** 0.5,
        decay_factor=1.0 - lr * weight_decay if (decay and weight_decay != 0) else 1.0,
        step_size=lr / bc1,
    )


def _as_batched(t: torch.Tensor | None, name: str, shape: tuple[int, ...], batched: bool) -> torch.Tensor | None:
    if t is None:
        return None
    want = shape if batched else shape[1:]
    if tuple(t.shape) != want:
        raise ValueError(f"two_sided_adamw_step: {name} has shape {tuple(t.shape)}, expected {want}")
    return t if batched else t.unsqueeze(0)


def _check(
    p: torch.Tensor,
    tensors: dict[str, torch.Tensor | None],
    sides: dict[str, torch.Tensor | None],
) -> tuple[int, int, int]:
    """(B, k, w) after validating shapes, dtypes, devices and contiguity; raises ValueError / RuntimeError."""
    if p.dim() not in (2, 3):
        raise ValueError(f"two_sided_adamw_step: param must be (k, w) or (B, k, w), got shape {tuple(p.shape)}")
    reason = why_not_triton(p)
    if reason is not None:
        raise RuntimeError(f"two_sided_adamw_step (Triton) {reason}; got {p.device} params")
    batched = p.dim() == 3
    b, k, w = p.shape if batched else (1, *p.shape)
    for name, t in {"param": p, **tensors, **sides}.items():
        if t is None:
            continue
        if t.device != p.device:
            raise ValueError(f"two_sided_adamw_step: {name} is on {t.device}, the param on {p.device}")
        if t.dtype not in TL_DTYPES or not t.dtype.is_floating_point:
            raise ValueError(f"two_sided_adamw_step: {name} has dtype {t.dtype}; expected a floating-point dtype")
        if name not in ("L", "R") and not t.is_contiguous():  # the bases may have any strides
            raise ValueError(f"two_sided_adamw_step: {name} is not contiguous")
        if name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and t.dtype != torch.float32:
            raise ValueError(f"two_sided_adamw_step: {name} is {t.dtype}; the kernel keeps fp32 moments")
    for name, t in tensors.items():
        _as_batched(t, name, (b, k, w), batched)
    _as_batched(sides["L"], "L", (b, k, k), batched)
    _as_batched(sides["R"], "R", (b, w, w), batched)
    return b, k, w


def two_sided_adamw_step(
    p: torch.Tensor,
    g: torch.Tensor | None,
    m: torch.Tensor,
    v: torch.Tensor,
    vmax: torch.Tensor | None,
    L: torch.Tensor | None,
    R: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    g_rot: torch.Tensor | None = None,
    precision: str = "ieee",
) -> None:
    """One Adam step of a dense two-sided unit, in place (see the module docstring for the math and launches).

    (Long because its four launches differ only in operands and epilogue, written out in order.)

    Args:
        p: the param view (k, w), or (B, k, w) for B stacked units of one shape; any float dtype, contiguous.
        g: the gradient, p's shape, any float dtype; unused (may be None) when ``g_rot`` is given.
        m, v, vmax: exp_avg, exp_avg_sq and (amsgrad) max_exp_avg_sq, p's shape, fp32, in the rotated coordinates.
        L, R: the bases, (k, k) / (w, w) (or stacked (B, k, k) / (B, w, w)), any float dtype; None: the identity.
        lr, beta1, beta2, eps, weight_decay: AdamW's; a tensor lr is read on the host.
        step: the step count minus ``basis_reset_at`` (what the bias corrections count), >= 1.
        decay: whether this param decays (False: ``weight_decay`` is ignored).
        maximize: negate the rotated gradient L^T G R; a given ``g_rot`` is used as is (the reference builds it
            from the already negated gradient).
        g_rot: the rotated gradient g~ (p's shape, any float dtype), e.g. S padded with zeros at an svd recompute
            step; L^T G R is not computed then.
        precision: ``tl.dot`` input precision, ``ieee`` | ``tf32`` | ``tf32x3``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
    if g is None and g_rot is None:
        raise ValueError("two_sided_adamw_step: needs g or g_rot")
    if amsgrad and vmax is None:
        raise ValueError("two_sided_adamw_step: amsgrad=True needs vmax (max_exp_avg_sq)")
    tensors = {"grad": g, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax if amsgrad else None, "g_rot": g_rot}
    b, k, w = _check(p, tensors, {"L": L, "R": R})
    lr = float(lr)
    hyper = _hyper(lr, beta1, beta2, eps, weight_decay, float(step), decay)
    dev = p.device
    batched = p.dim() == 3

    def bat(t):
        return None if t is None else (t if batched else t.unsqueeze(0))

    p3, g3, m3, v3, vmax3, gr3, l3, r3 = map(bat, (p, g, m, v, vmax if amsgrad else None, g_rot, L, R))
    if g3.dtype != torch.float32 and gr3 is None:
        # A bf16/fp16 B operand beside the transposed fp32 basis spills at ieee (AOT for sm_90 / sm_80: 255
        # registers, ~620 B of spills); one fp32 copy of G is a k x w pass and keeps every GEMM fp32 x fp32.
        with device_guard(p.device):
            g3 = g3.float()
    dummy = m3  # for pointer arguments an epilogue does not read
    bm, bn, bk = _block(k, 64), _block(w, 64), 32

    def run(a, a_strides, bmat, b_strides, out, kk, epilogue, dot, negate=False):
        grid = (triton.cdiv(k, bm) * triton.cdiv(w, bn), b)
        launch_kernel(
            _two_sided_kernel, grid,
            a, dummy if bmat is None else bmat, dummy if out is None else out,
            p3, m3, v3, dummy if vmax3 is None else vmax3,
            k, w, kk, *a_strides, *b_strides,
            EPILOGUE=epilogue, DOT=dot, NEGATE=negate, AMSGRAD=amsgrad, P_DTYPE=TL_DTYPES[p.dtype],
            PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **hyper,
        )  # fmt: skip

    kw = k * w

    def mat(t, transpose=False):
        """(batch, row, col) strides of a basis (any strides) read as itself or transposed."""
        bs, rs, cs = t.stride()
        return (bs, cs, rs) if transpose else (bs, rs, cs)

    with device_guard(dev):
        ws_a = torch.empty((b, k, w), dtype=torch.float32, device=dev) if (l3 is not None and r3 is not None) else None
        ws_u = torch.empty((b, k, w), dtype=torch.float32, device=dev)
        if POISON_WORKSPACE:
            for ws in (ws_a, ws_u):
                if ws is not None:
                    ws.fill_(float("nan"))
        # 1 + 2: g~ and the Adam epilogue (one launch when g~ is given or a side is the identity).
        if gr3 is not None:
            run(gr3, (kw, w, 1), None, (0, 0, 0), ws_u, w, _ADAM, dot=False)
        elif l3 is not None and r3 is not None:
            run(l3, mat(l3, transpose=True), g3, (kw, w, 1), ws_a, k, _STORE, dot=True)  # T = L^T G
            run(ws_a, (kw, w, 1), r3, mat(r3), ws_u, w, _ADAM, dot=True, negate=maximize)  # g~ = T R
        elif l3 is not None:  # g~ = L^T G
            run(l3, mat(l3, transpose=True), g3, (kw, w, 1), ws_u, k, _ADAM, dot=True, negate=maximize)
        elif r3 is not None:  # g~ = G R
            run(g3, (kw, w, 1), r3, mat(r3), ws_u, w, _ADAM, dot=True, negate=maximize)
        else:
            run(g3, (kw, w, 1), None, (0, 0, 0), ws_u, w, _ADAM, dot=False, negate=maximize)
        # 3 + 4: d = L (u R^T), DynamicRotation.unrotate's order, and the apply epilogue.
        if l3 is not None and r3 is not None:
            run(ws_u, (kw, w, 1), r3, mat(r3, transpose=True), ws_a, w, _STORE, dot=True)  # W = u R^T
            run(l3, mat(l3), ws_a, (kw, w, 1), None, k, _APPLY, dot=True)  # d = L W
        elif l3 is not None:  # d = L u
            run(l3, mat(l3), ws_u, (kw, w, 1), None, k, _APPLY, dot=True)
        elif r3 is not None:  # d = u R^T
            run(ws_u, (kw, w, 1), r3, mat(r3, transpose=True), None, w, _APPLY, dot=True)
        else:
            run(ws_u, (kw, w, 1), None, (0, 0, 0), None, w, _APPLY, dot=False)
