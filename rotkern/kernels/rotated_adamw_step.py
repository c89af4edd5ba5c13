"""Triton rotated AdamW step: the same op as :func:`rotkern.kernels.reference.rotated_adamw_ref`, fused.

Per unit vector x (a row of the unit's (num_vectors, L) view), per block of n coordinates [paper App. A.1]:

    g~  = R (pi g)[block]                 gather through pi, rotate with tl.dot (row form g R^T)
    m   = lerp(m, g~, 1 - b1)              moments stored in the rotated layout
    v   = b2 v + (1 - b2) g~^2
    v'  = max(v_max, v) if amsgrad else v
    u   = m / (sqrt(v') / sqrt(1 - b2^t) + eps)
    d   = R^T u                            tl.dot against the same row-major R
    p[pi[block]] = p (1 - lr wd mask) - lr / (1 - b1^t) d      scatter through pi

Every rotated block of every unit of a call is one *block-row* of a batched GEMM against its own R
(R_n, or the residual R_p of a unit). Block-rows of equal size are packed into tiles of BLOCK_M rows;
one program runs one tile through all three phases:

    phase 0  (permuted or strided units) gather g into the fp32 workspace, so the K loops re-read it
             from contiguous, cache-hot memory instead of repeating a random gather per output tile;
    phase 1  Y = X R^T tile by tile, Adam on Y, store m, v (and max v); unpermuted row units also
             store u in the workspace;
    phase 2  Z = U R tile by tile (U read back from the workspace, or recomputed from the stored
             moments when the workspace holds X), then the decoupled-decay update, scattered.

A barrier separates the phases inside a program (each program only reads back what it wrote itself);
``single_pass=False`` splits phases 0+1 and 2 into two launches instead. Memory beyond the caller's
tensors: one fp32 workspace of at most d elements (kept per plan cache and device, i.e. per optimizer), the
cached plan tables, and a pointer/hyperparameter table with its pinned staging, all reused: a call after the
first allocates nothing, and uploads the table only when an address or a float hyperparameter changed.
Identity units (rotation none) take a plain element-wise AdamW kernel. Launches per call: at most one
host-to-device copy (pointers and hyperparameters), one foreach step increment, one element-wise launch
and one launch per class of block-rows: block size in 1-16, 17-32, 33-64 or 65-4096; staged or direct;
block size a multiple of 16 or not; (param, grad) dtypes. GPT-2 at n = 768 needs 1 (global, layer) or 2
(output, input) rotated launches.

Addressing. A unit's coordinate is a virtual position ``rbase + es * j`` (j in [0, L)); for
single-tensor units that is the flat offset in the parameter, for a global unit the position in the
concatenation of its segments, mapped back to (parameter, offset) by a vectorised binary search over the
segment table. Pointers of params, grads and state are read from a table uploaded every call (grads move
between steps); everything else is cached per (units, device, dtypes, decay mask). lr and the step are
read on the device, and the bias corrections computed there in fp64, so nothing syncs with the host and
nothing recompiles when lr changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .._backend import PRECISIONS, why_not_triton
from ..scopes import Unit
from . import _rotated_adamw_plan as plan_tables
from . import _triton_compat  # noqa: F401  (applies the Triton interpreter fix of triton#9171 where needed)
from ._rotated_adamw_plan import PlanCache, get_plan
from ._tl import TL_DTYPES, adam_direction, adam_moments, device_guard, launch_kernel, round_tf32, round_to
from .reference import round_to_tf32

__all__ = ["PRECISIONS", "rotated_adamw_step"]

_HYPER = 6  # float64: lr, beta1, beta2, eps, weight_decay, 0.0 (the found_inf of a call without one)
# Rows of the per-call pointer table, and the metadata layouts (constexpr: kernels read only those globals).
_P, _G, _M, _V, _VMAX, _STEP = (tl.constexpr(k) for k in range(6))
_KINDS = 6
TILE_FIELDS = tl.constexpr(plan_tables.TILE_FIELDS)
ROW_FIELDS = tl.constexpr(plan_tables.ROW_FIELDS)
SEG_FIELDS = tl.constexpr(plan_tables.SEG_FIELDS)
CHUNK_FIELDS = tl.constexpr(plan_tables.CHUNK_FIELDS)



# %% kernels ------------------------------------------------------------------------------------------
@triton.jit
def _bias_corrections(lr, beta1, beta2, step):
    """(lr / (1 - beta1^t), sqrt(1 - beta2^t)) in fp64, rounded to fp32; t: (BLOCK,) fp64 steps.

    Square and multiply over t's bits: accurate to a few fp64 ulp and portable (no fp64 libdevice pow).
    """
    k = step.to(tl.int64)
    p1 = tl.zeros_like(step) + 1.0
    p2 = tl.zeros_like(step) + 1.0
    b1 = tl.zeros_like(step) + beta1
    b2 = tl.zeros_like(step) + beta2
    while tl.max(k, axis=0) > 0:
        bit = (k & 1) != 0
        p1 = tl.where(bit, p1 * b1, p1)
        p2 = tl.where(bit, p2 * b2, p2)
        b1 = b1 * b1
        b2 = b2 * b2
        k = k >> 1
    return (lr / (1.0 - p1)).to(tl.float32), tl.sqrt(1.0 - p2).to(tl.float32)


@triton.jit
def _unscale(g, scale_ptr):
    # IEEE division, as torch's fused AdamW and the eager path unscale (g * (1 / s) differs unless s is 2^k).
    return tl.math.div_rn(g, tl.zeros_like(g) + tl.load(scale_ptr).to(tl.float32))


@triton.jit
def _locate(pos, lo, hi, mask, row_mask, seg_ptr, STEPS: tl.constexpr):
    """(param index, flat offset, segment, mask) of virtual positions pos; [lo, hi) bounds the segment.

    STEPS = ceil(log2(max(hi - lo))) over the launch; 0 for single-tensor units, whose segment is per row.
    """
    if STEPS == 0:
        m = row_mask
    else:
        m = mask
        # Invariant key[lo] <= pos < key[hi]; once hi - lo == 1, mid == lo and nothing moves.
        for _ in tl.static_range(STEPS):
            mid = (lo + hi) // 2
            right = tl.load(seg_ptr + mid * SEG_FIELDS, mask=m, other=0) <= pos
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
    local = pos + tl.load(seg_ptr + lo * SEG_FIELDS + 1, mask=m, other=0).to(pos.dtype)
    pidx = tl.load(seg_ptr + lo * SEG_FIELDS + 2, mask=m, other=0)
    return pidx, local, lo, m


@triton.jit
def _ptr(ptr_table, num_params, KIND: tl.constexpr, pidx, offset, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    # Per-tensor pointer tables, as in Triton's grouped-GEMM tutorial: grads move between steps.
    base = tl.load(ptr_table + KIND * num_params + pidx, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)  # on the pointer: a hint on the int64 is lost in the cast
    return base + offset


@triton.jit
def _row(rp, field: tl.constexpr, row_mask, IDX: tl.constexpr):
    """One field of the tile's block-rows as an (BLOCK_M, 1) column of IDX."""
    return tl.load(rp + field, mask=row_mask, other=0).to(IDX)[:, None]


@triton.jit
def _gather_ptr(
    ptr_table,
    num_params,
    KIND: tl.constexpr,
    rp,
    row_mask,
    q,
    mask,
    perm_ptr,
    seg_ptr,
    DTYPE: tl.constexpr,
    IDX: tl.constexpr,
    STEPS: tl.constexpr,
):
    """Pointers to the coordinates pi[q] of the rows' vectors (gather of g, scatter of p)."""
    rm = row_mask[:, None]
    poff = _row(rp, 7, row_mask, IDX)
    has_perm = poff >= 0
    pi = tl.load(perm_ptr + poff + q, mask=mask & has_perm, other=0).to(IDX)
    pi = tl.where(has_perm, pi, q)
    pos = _row(rp, 0, row_mask, IDX) + _row(rp, 2, row_mask, IDX) * pi
    pidx, local, seg, lm = _locate(
        pos,
        _row(rp, 3, row_mask, IDX),
        _row(rp, 4, row_mask, IDX),
        mask,
        rm,
        seg_ptr,
        STEPS,
    )
    return _ptr(ptr_table, num_params, KIND, pidx, local, lm, DTYPE, False), seg, lm


@triton.jit
def _moment_loc(rp, row_mask, a, mask, seg_ptr, IDX: tl.constexpr, STEPS: tl.constexpr):
    """(param, offset, mask) of the rotated coordinates q0 + a of the rows' vectors: where m, v live."""
    pos = _row(rp, 0, row_mask, IDX) + _row(rp, 2, row_mask, IDX) * (_row(rp, 1, row_mask, IDX) + a)
    pidx, local, _, lm = _locate(
        pos,
        _row(rp, 5, row_mask, IDX),
        _row(rp, 6, row_mask, IDX),
        mask,
        row_mask[:, None],
        seg_ptr,
        STEPS,
    )
    return pidx, local, lm


@triton.jit
def _rotated_adamw_kernel(
    # per-call tables
    ptr_table,  # int64 (6, P): data pointers of params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step
    hyper_ptr,  # float64 (_HYPER,): lr, beta1, beta2, eps, weight_decay, 0.0 (no inf found)
    lr_ptr,  # the learning rate on the device: hyper_ptr, or the caller's lr tensor
    b1_ptr,  # beta1: hyper_ptr + 1, or the caller's tensor
    b2_ptr,  # beta2: hyper_ptr + 2, or the caller's tensor
    scale_ptr,  # GradScaler's grad_scale (read only when UNSCALE)
    inf_ptr,  # GradScaler's found_inf, or hyper_ptr + 5: nonzero skips the whole step
    # cached metadata (rotkern.kernels._rotated_adamw_plan)
    tile_ptr,  # int64 (tiles, TILE_FIELDS): first row, rows, nb, R offset, R row stride, workspace offset
    row_ptr,  # int64 (block-rows, ROW_FIELDS): rbase, q0, es, gather segs, moment segs, pi offset, step param
    seg_ptr,  # int64 (segments, 4): first virtual position, offset in the param - position, param, decays (0/1)
    perm_ptr,  # int32: the units' permutations, concatenated
    rot_ptr,  # fp32: the R blocks, row-major, row stride a multiple of 16
    ws_ptr,  # fp32 workspace, one slot per rotated coordinate of the call
    # sizes
    num_params,
    # meta
    P_DTYPE: tl.constexpr,  # param dtype (stores cast to it)
    G_DTYPE: tl.constexpr,  # grad dtype
    IDX: tl.constexpr,  # positions: tl.int32, or tl.int64 when a unit or param passes 2^31 elements
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr,  # divide the gradient by *scale_ptr (GradScaler's scaled grads)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" | "tf32x3" | "tf32"
    STAGED: tl.constexpr,  # gather g into the workspace first (permuted / strided / multi-tensor units)
    ALIGNED: tl.constexpr,  # every block size and workspace offset of the launch is a multiple of 16
    GATHER_STEPS: tl.constexpr,  # segment-search steps for gathered positions (0: single-tensor units)
    MOMENT_STEPS: tl.constexpr,  # segment-search steps for moment positions
    PHASE: tl.constexpr,  # 0: all phases (barriers between); 1: gather + rotate + Adam; 2: unrotate + apply
    BLOCK_M: tl.constexpr,  # block-rows per program
    BLOCK_N: tl.constexpr,  # output columns per dot tile
    BLOCK_K: tl.constexpr,  # reduction columns per dot tile
):
    """One tile of block-rows, (BLOCK_M, nb) coordinates: gradient -> moments and params, in place."""
    pid = tl.program_id(0).to(tl.int64)
    tile = tile_ptr + pid * TILE_FIELDS
    row_start = tl.load(tile)
    row_count = tl.load(tile + 1)
    nb = tl.load(tile + 2).to(tl.int32)  # <= MAX_BLOCK_SIZE
    r_off = tl.multiple_of(tl.load(tile + 3), 16)
    r_stride = tl.multiple_of(tl.load(tile + 4).to(tl.int32), 16)
    ws_off = tl.load(tile + 5)
    if ALIGNED:
        nb = tl.multiple_of(nb, 16)
        ws_off = tl.multiple_of(ws_off, 16)

    # A step GradScaler found inf/NaN in has no rows: every access is masked off, nothing is written.
    row_count = tl.where(tl.load(inf_ptr).to(tl.float32) == 0.0, row_count, 0)

    i = tl.arange(0, BLOCK_M)
    row_mask = i < row_count
    rm = row_mask[:, None]
    rp = row_ptr + (row_start + i) * ROW_FIELDS  # lazily read row fields: long-lived columns cost registers
    ws_rows = ws_ptr + ws_off + i[:, None] * nb  # this tile's workspace, row-major (BLOCK_M, nb)
    rot = rot_ptr + r_off

    # Hyperparameters in fp64, rounded to fp32 where the eager reference rounds them.
    lr = tl.load(lr_ptr).to(tl.float64)
    beta1 = tl.load(b1_ptr).to(tl.float64)
    beta2 = tl.load(b2_ptr).to(tl.float64)
    eps = tl.load(hyper_ptr + 3).to(tl.float32)
    decay_factor = (1.0 - lr * tl.load(hyper_ptr + 4)).to(tl.float32)
    step_param = tl.load(rp + 8, mask=row_mask, other=0)
    step = tl.load(
        _ptr(ptr_table, num_params, _STEP, step_param, 0, row_mask, tl.float32, False), mask=row_mask, other=1.0
    )
    step_size, bc2_sqrt = _bias_corrections(lr, beta1, beta2, step.to(tl.float64))
    step_size = step_size[:, None]
    bc2_sqrt = bc2_sqrt[:, None]

    if PHASE != 2:
        if STAGED:
            for k0 in range(0, nb, BLOCK_K):
                c = k0 + tl.arange(0, BLOCK_K)[None, :]
                mask = rm & (c < nb)
                g_p, _, _ = _gather_ptr(
                    ptr_table,
                    num_params,
                    _G,
                    rp,
                    row_mask,
                    _row(rp, 1, row_mask, IDX) + c,
                    mask,
                    perm_ptr,
                    seg_ptr,
                    G_DTYPE,
                    IDX,
                    GATHER_STEPS,
                )
                x = tl.load(g_p, mask=mask, other=0.0).to(tl.float32)
                if UNSCALE:
                    x = _unscale(x, scale_ptr)
                if PRECISION == "tf32":
                    x = round_tf32(x)  # the staged X feeds only the dots below
                tl.store(ws_rows + c, x, mask=mask)
            tl.debug_barrier()  # the K loops below read slots other threads of this program wrote
        else:
            # Unpermuted contiguous rows: read g in place. Per-row base pointers, offsets added per tile.
            gpidx, goff, _, gm = _locate(
                _row(rp, 0, row_mask, IDX) + _row(rp, 1, row_mask, IDX),
                _row(rp, 3, row_mask, IDX),
                _row(rp, 4, row_mask, IDX),
                rm,
                rm,
                seg_ptr,
                0,
            )
            g_rows = _ptr(ptr_table, num_params, _G, gpidx, goff, gm, G_DTYPE, False)
        for n0 in range(0, nb, BLOCK_N):
            a = n0 + tl.arange(0, BLOCK_N)[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, nb, BLOCK_K):
                c = k0 + tl.arange(0, BLOCK_K)
                xmask = rm & (c[None, :] < nb)
                if STAGED:
                    x = tl.load(ws_rows + c[None, :], mask=xmask, other=0.0)
                else:
                    x = tl.load(g_rows + c[None, :], mask=xmask, other=0.0).to(tl.float32)
                    if UNSCALE:
                        x = _unscale(x, scale_ptr)
                    if PRECISION == "tf32":
                        x = round_tf32(x)
                # R^T tile, rt[c, a] = R[a, c], straight from row-major R (rounded on the host for tf32).
                rt = tl.load(rot + a * r_stride + c[:, None], mask=(c[:, None] < nb) & (a < nb), other=0.0)
                acc = tl.dot(x, rt, acc, input_precision=PRECISION)
            if MAXIMIZE:
                acc = -acc  # R(-g) == -(R g) exactly: rounding is sign-symmetric
            mask = rm & (a < nb)
            pidx, local, lm = _moment_loc(rp, row_mask, a, mask, seg_ptr, IDX, MOMENT_STEPS)
            m_p = _ptr(ptr_table, num_params, _M, pidx, local, lm, tl.float32, False)
            v_p = _ptr(ptr_table, num_params, _V, pidx, local, lm, tl.float32, False)
            m, v = adam_moments(
                acc,
                tl.load(m_p, mask=mask, other=0.0),
                tl.load(v_p, mask=mask, other=0.0),
                (1.0 - beta1).to(tl.float32),
                beta2.to(tl.float32),
                (1.0 - beta2).to(tl.float32),
            )
            tl.store(m_p, m, mask=mask)
            tl.store(v_p, v, mask=mask)
            if AMSGRAD:
                vmax_p = _ptr(ptr_table, num_params, _VMAX, pidx, local, lm, tl.float32, False)
                v = tl.maximum(tl.load(vmax_p, mask=mask, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
                tl.store(vmax_p, v, mask=mask)
            if not STAGED:
                u = adam_direction(m, v, bc2_sqrt, eps)
                if PRECISION == "tf32":
                    u = round_tf32(u)  # u feeds only phase 2's dot
                tl.store(ws_rows + a, u, mask=mask)

    if PHASE == 0:
        tl.debug_barrier()  # phase 2 reads moments / u that other threads of this program stored

    if PHASE != 1:
        for n0 in range(0, nb, BLOCK_N):
            c = n0 + tl.arange(0, BLOCK_N)[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, nb, BLOCK_K):
                a = k0 + tl.arange(0, BLOCK_K)
                umask = rm & (a[None, :] < nb)
                if STAGED:
                    # The workspace holds X: recompute u from the moments stored in phase 1.
                    pidx, local, lm = _moment_loc(rp, row_mask, a[None, :], umask, seg_ptr, IDX, MOMENT_STEPS)
                    m = tl.load(
                        _ptr(ptr_table, num_params, _M, pidx, local, lm, tl.float32, False), mask=umask, other=0.0
                    )
                    vv_p = _ptr(ptr_table, num_params, _VMAX if AMSGRAD else _V, pidx, local, lm, tl.float32, False)
                    u = adam_direction(m, tl.load(vv_p, mask=umask, other=0.0), bc2_sqrt, eps)
                    if PRECISION == "tf32":
                        u = round_tf32(u)
                else:
                    u = tl.load(ws_rows + a[None, :], mask=umask, other=0.0)
                # Padding must be exactly 0: with eps = 0 it is 0/0, which would leak NaN through the dot.
                u = tl.where(umask, u, 0.0)
                r = tl.load(rot + a[:, None] * r_stride + c, mask=(a[:, None] < nb) & (c < nb), other=0.0)
                acc = tl.dot(u, r, acc, input_precision=PRECISION)
            mask = rm & (c < nb)
            p_p, seg, lm = _gather_ptr(
                ptr_table,
                num_params,
                _P,
                rp,
                row_mask,
                _row(rp, 1, row_mask, IDX) + c,
                mask,
                perm_ptr,
                seg_ptr,
                P_DTYPE,
                IDX,
                GATHER_STEPS,
            )
            decay = tl.load(seg_ptr + seg * SEG_FIELDS + 3, mask=lm, other=0)
            p = tl.load(p_p, mask=mask, other=0.0).to(tl.float32)
            p = p * tl.where(decay != 0, decay_factor, 1.0) - step_size * acc
            tl.store(p_p, round_to(p, P_DTYPE), mask=mask)


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _adamw_elements(
    p_p,
    g_p,
    m_p,
    v_p,
    vmax_p,
    mask,
    beta1,
    beta2,
    eps,
    step_size,
    bc2_sqrt,
    decay_factor,
    scale_ptr,
    P_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr,
    MASKED: tl.constexpr,
):
    g = _load(g_p, mask, MASKED).to(tl.float32)
    if UNSCALE:
        g = _unscale(g, scale_ptr)
    if MAXIMIZE:
        g = -g
    m, v = adam_moments(
        g,
        _load(m_p, mask, MASKED),
        _load(v_p, mask, MASKED),
        (1.0 - beta1).to(tl.float32),
        beta2.to(tl.float32),
        (1.0 - beta2).to(tl.float32),
    )
    _store(m_p, m, mask, MASKED)
    _store(v_p, v, mask, MASKED)
    if AMSGRAD:
        v = tl.maximum(_load(vmax_p, mask, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        _store(vmax_p, v, mask, MASKED)
    p = _load(p_p, mask, MASKED).to(tl.float32) * decay_factor
    p = p - step_size * adam_direction(m, v, bc2_sqrt, eps)
    _store(p_p, round_to(p, P_DTYPE), mask, MASKED)


@triton.jit
def _adamw_kernel(
    # per-call tables
    ptr_table,  # int64 (6, P): as in _rotated_adamw_kernel
    hyper_ptr,  # float64 (_HYPER,): as in _rotated_adamw_kernel
    lr_ptr,  # the learning rate on the device
    b1_ptr,  # beta1
    b2_ptr,  # beta2
    scale_ptr,  # GradScaler's grad_scale (read only when UNSCALE)
    inf_ptr,  # GradScaler's found_inf: nonzero skips the step
    # cached metadata
    chunk_ptr,  # int64 (chunks, CHUNK_FIELDS): param, base (a multiple of BLOCK), first element, stop, decay
    # sizes
    num_params,
    # meta
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr,  # divide the gradient by *scale_ptr
    ALIGNED: tl.constexpr,  # every tensor of the launch is 16-byte aligned: full chunks vectorise
    BLOCK: tl.constexpr,
):
    """Plain AdamW on one chunk of BLOCK elements of one identity unit (rotation none)."""
    pid = tl.program_id(0).to(tl.int64)
    chunk = chunk_ptr + pid * CHUNK_FIELDS
    pidx = tl.load(chunk)
    # The plan puts every base on an absolute multiple of BLOCK (a piece starting inside a param begins with a
    # partial chunk): with a 16-byte aligned param, the hint below is true and full chunks load 16 B vectors.
    base = tl.multiple_of(tl.load(chunk + 1), BLOCK)
    first = tl.load(chunk + 2)
    stop = tl.load(chunk + 3)
    # found_inf: an empty chunk (every access masked off) instead of an early return.
    stop = tl.where(tl.load(inf_ptr).to(tl.float32) == 0.0, stop, first)
    decay = tl.load(chunk + 4)
    offs = base + tl.arange(0, BLOCK)

    lr = tl.load(lr_ptr).to(tl.float64)
    beta1 = tl.load(b1_ptr).to(tl.float64)
    beta2 = tl.load(b2_ptr).to(tl.float64)
    eps = tl.load(hyper_ptr + 3).to(tl.float32)
    one = pidx + tl.zeros([1], tl.int64)  # (1,)-shaped: _bias_corrections reduces over its argument
    valid = one >= 0
    step = tl.load(_ptr(ptr_table, num_params, _STEP, one, 0, valid, tl.float32, False), mask=valid, other=1.0)
    step_size, bc2_sqrt = _bias_corrections(lr, beta1, beta2, step.to(tl.float64))
    decay_factor = tl.where(decay != 0, (1.0 - lr * tl.load(hyper_ptr + 4)).to(tl.float32), 1.0)

    ok = pidx >= 0  # scalar reads of the pointer table: always in bounds
    p_p = _ptr(ptr_table, num_params, _P, pidx, offs, ok, P_DTYPE, ALIGNED)
    g_p = _ptr(ptr_table, num_params, _G, pidx, offs, ok, G_DTYPE, ALIGNED)
    m_p = _ptr(ptr_table, num_params, _M, pidx, offs, ok, tl.float32, ALIGNED)
    v_p = _ptr(ptr_table, num_params, _V, pidx, offs, ok, tl.float32, ALIGNED)
    vmax_p = _ptr(ptr_table, num_params, _VMAX, pidx, offs, ok, tl.float32, ALIGNED)
    if (first == base) & (base + BLOCK <= stop):
        # A full chunk needs no mask, so aligned pointers give 16-byte vector loads and stores.
        _adamw_elements(
            p_p,
            g_p,
            m_p,
            v_p,
            vmax_p,
            None,
            beta1,
            beta2,
            eps,
            step_size,
            bc2_sqrt,
            decay_factor,
            scale_ptr,
            P_DTYPE,
            AMSGRAD,
            MAXIMIZE,
            UNSCALE,
            False,
        )
    else:
        _adamw_elements(
            p_p,
            g_p,
            m_p,
            v_p,
            vmax_p,
            (offs >= first) & (offs < stop),
            beta1,
            beta2,
            eps,
            step_size,
            bc2_sqrt,
            decay_factor,
            scale_ptr,
            P_DTYPE,
            AMSGRAD,
            MAXIMIZE,
            UNSCALE,
            True,
        )


# %% launcher -----------------------------------------------------------------------------------------
# Tests set this to fill the workspace with NaN before every call: nothing may read a slot it did not write.
POISON_WORKSPACE = False


def rotated_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    state_steps: Sequence[torch.Tensor],
    units: Sequence[Unit],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    decay_mask: Sequence[bool] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    precision: str = "tf32x3",
    single_pass: bool = True,
    plan_cache: PlanCache | None = None,
) -> None:
    """One rotated AdamW step in place: :func:`rotated_adamw_ref`'s signature and semantics, in Triton.

    (Long because the launcher checks every tensor before it writes the table and launches, in the kernels' order.)

    Args (beyond the reference's):
        lr, beta1, beta2: floats, or one-element tensors on the params' device (read in the kernel: no sync, no
            recompile when they change); a CPU tensor is read on the host.
        grad_scale, found_inf: ``torch.amp.GradScaler``'s one-element float32 tensors, as torch's fused AdamW
            takes them: the kernels divide the gradient by ``grad_scale`` (IEEE division) and, when ``found_inf``
            is nonzero, write nothing (the step counts are advanced, then ``found_inf`` is subtracted from them),
            all on the device: no host sync.
        precision: ``tl.dot`` input precision for the rotations: ``ieee`` (true fp32, slow on tensor-core
            GPUs), ``tf32x3`` (fp32-level accuracy on tensor cores; default) or ``tf32`` (fastest; operands rounded
            to the nearest tf32 first, as cuBLAS's TF32 does: ~1e-3 relative error in the rotated gradient, no
            bias).
        single_pass: one launch per block-size class with in-program barriers (default), or two (rotate +
            Adam, then unrotate + apply).
        plan_cache: where the per-units metadata is cached (an optimizer passes its own); default: a small
            module-level LRU.

    Requirements: every touched tensor on one device where Triton runs (CUDA, or CPU under
    TRITON_INTERPRET=1), contiguous; moments fp32; steps fp32 scalars on the same device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
    units = list(units)
    if not units:
        return
    touched = list(dict.fromkeys(i for u in units for i in u.params))
    device = params[touched[0]].device
    _check_inputs(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, state_steps, touched, device
    )
    lr, beta1, beta2 = (_on_device(x, name, device) for x, name in ((lr, "lr"), (beta1, "beta1"), (beta2, "beta2")))
    grad_scale, found_inf = (
        None if x is None else _on_device(x, name, device, move=True)
        for x, name in ((grad_scale, "grad_scale"), (found_inf, "found_inf"))
    )
    cache = plan_tables._PLANS if plan_cache is None else plan_cache
    plan = get_plan(units, params, grads, decay_mask, device, cache)
    calls = _calls(plan, len(params), device)
    table = calls.table
    host = [0.0 if torch.is_tensor(x) else float(x) for x in (lr, beta1, beta2)]
    table[:_HYPER].view(np.float64)[:] = (*host, eps, weight_decay, 0.0)
    ptrs = table[_HYPER:].reshape(_KINDS, len(params))
    state = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, state_steps)
    for kind, tensors in enumerate(state):
        if tensors is not None:
            for i in touched:
                ptrs[kind, i] = tensors[i].data_ptr()

    with device_guard(device):
        steps = [state_steps[i] for i in touched]
        torch._foreach_add_(steps, 1.0)
        calls.upload()
        hyper, ptr_table = calls.hyper, calls.ptr_table
        scalars = (
            lr if torch.is_tensor(lr) else hyper,
            beta1 if torch.is_tensor(beta1) else hyper[1:],
            beta2 if torch.is_tensor(beta2) else hyper[2:],
            hyper if grad_scale is None else grad_scale,  # not read without UNSCALE
            hyper[5:] if found_inf is None else found_inf,
        )
        ws = _workspace(cache, device, plan.ws_numel)
        if ws is not None and POISON_WORKSPACE:
            ws.fill_(float("nan"))
        for launch in plan.launches:
            common = dict(
                P_DTYPE=TL_DTYPES[launch.p_dtype],
                G_DTYPE=TL_DTYPES[launch.g_dtype],
                AMSGRAD=amsgrad,
                MAXIMIZE=maximize,
                UNSCALE=grad_scale is not None,
                num_warps=launch.num_warps,
                num_stages=launch.num_stages,
                **launch.meta,
            )
            grid = (launch.grid,)
            if not launch.rotated:
                aligned = _aligned(state, plan.identity_params)
                launch_kernel(_adamw_kernel, grid, ptr_table, hyper, *scalars, launch.table, len(params),
                              ALIGNED=aligned, **common)  # fmt: skip
                continue
            rot = plan.rot if precision != "tf32" else _rot_tf32(plan)
            args = (ptr_table, hyper, *scalars, launch.table, plan.rows, plan.segments, plan.perm, rot, ws)
            idx = tl.int64 if plan.wide else tl.int32
            for phase in (0,) if single_pass else (1, 2):
                launch_kernel(_rotated_adamw_kernel, grid, *args, len(params), IDX=idx, PRECISION=precision,
                              PHASE=phase, **common)  # fmt: skip
        if found_inf is not None:
            # torch's fused AdamW does the same: the skipped step's increment is taken back on the device.
            torch._foreach_sub_(steps, [found_inf.reshape(())] * len(steps))


def _on_device(x, name: str, device: torch.device, move: bool = False):
    """A float, or a one-element tensor the kernels read on ``device``: a tensor elsewhere is read on the host
    when it is on the CPU (no GPU sync), or copied to ``device`` where ``move`` (GradScaler's tensors live on the
    scale's device, as torch's fused AdamW allows); otherwise ValueError."""
    if not torch.is_tensor(x):
        return float(x)
    if x.numel() != 1 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float or a one-element floating tensor, got {tuple(x.shape)} {x.dtype}")
    if x.device == device:
        return x if x.dtype in (torch.float32, torch.float64) else x.float()
    if move:
        return x.to(device, torch.float32, non_blocking=True)
    if x.device.type == "cpu":
        return float(x)
    raise ValueError(f"{name} is a tensor on {x.device} but the params are on {device}")


class _CallBuffers:
    """Per-plan buffers reused by every call, so that a step allocates nothing after its first call.

    ``table`` (numpy, host) is filled each call with the hyperparameters and the tensors' addresses; it is
    uploaded only when it differs from the last upload (grads freed and reallocated move), from one of two
    pinned staging buffers whose previous copy must have finished before it is rewritten (a CUDA event per
    buffer, queried first so that the host waits only when the GPU is two uploads behind). A step whose
    table is unchanged issues no copy at all: what CUDA-graph capture needs (static addresses, tensor lr).
    On the CPU (the interpreter) the host table is the one the kernels read.
    """

    def __init__(self, numel: int, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._staging = [torch.zeros(numel, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._events = [None, None]
            self._next = 0
            self.device_table = torch.zeros(numel, dtype=torch.int64, device=device)
            self.table = np.zeros(numel, np.int64)
            self._uploaded = np.full(numel, -1, np.int64)
        else:
            self.device_table = torch.zeros(numel, dtype=torch.int64)
            self.table = self.device_table.numpy()  # the kernels read the host table itself
        self.hyper = self.device_table[:_HYPER].view(torch.float64)
        self.ptr_table = self.device_table[_HYPER:]

    def upload(self) -> torch.Tensor:
        if not self.cuda or np.array_equal(self.table, self._uploaded):
            return self.device_table
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "rotated_adamw_step: the pointer table changed during CUDA-graph capture (a param, grad or state "
                "tensor moved, or a float lr changed): keep grads allocated (zero_grad(set_to_none=False)), use a "
                "tensor lr, and run one step before capturing"
            )
        k = self._next
        event = self._events[k]
        if event is not None and not event.query():
            event.synchronize()  # the GPU is two uploads behind: the staging buffer is still being read
        host = self._staging[k]
        host.numpy()[:] = self.table
        self.device_table.copy_(host, non_blocking=True)
        if event is None:
            event = self._events[k] = torch.cuda.Event()
        event.record()
        self._next = 1 - k
        self._uploaded[:] = self.table
        return self.device_table


def _rot_tf32(plan) -> torch.Tensor:
    """The plan's R blocks rounded to tf32 (nearest; see ``round_tf32``), made once per plan: R is read in every
    dot tile, so it is rounded here rather than in the K loops."""
    rot = getattr(plan, "rot_tf32", None)
    if rot is None:
        rot = plan.rot_tf32 = round_to_tf32(plan.rot)
    return rot


def _workspace(cache: PlanCache, device: torch.device, numel: int) -> torch.Tensor | None:
    """The fp32 workspace, one per plan cache (an optimizer's) and device, grown to the largest plan's need:
    plans of one optimizer (the set of units with grads may change between steps) share it."""
    if not numel:
        return None
    store = cache.__dict__.setdefault("workspaces", {})
    ws = store.get(device)
    if ws is None or ws.numel() < numel:
        ws = store[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return ws[:numel]


def _calls(plan, num_params: int, device: torch.device) -> _CallBuffers:
    numel = _HYPER + _KINDS * num_params
    buffers = getattr(plan, "calls", None)
    if buffers is None or buffers.table.size != numel:
        buffers = plan.calls = _CallBuffers(numel, device)
    return buffers


def _aligned(state, indices) -> bool:
    return all(ts[i].data_ptr() % 16 == 0 for ts in state[:5] if ts is not None for i in indices)


def _check_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, touched, device) -> None:
    reason = why_not_triton(params[touched[0]])
    if reason is not None:
        raise RuntimeError(f"rotated_adamw_step (Triton) {reason}; got {device} params")
    # Params and grads change every step (grads are new tensors); the state tensors usually do not, so their
    # checks run once per set of state tensors (keyed by identity and address).
    for i in touched:
        p, g = params[i], grads[i]
        if g is None or not (
            p.device == device and g.device == device and g.shape == p.shape and p.is_contiguous()
            and g.is_contiguous() and p.dtype in TL_DTYPES and g.dtype in TL_DTYPES
        ):  # fmt: skip
            _check_tensors(i, [("param", p, None), ("grad", g, p.shape)], device, touched[0])
    moments = [m for m in (exp_avgs, exp_avg_sqs, max_exp_avg_sqs) if m is not None]
    key = (device, tuple((id(ts[i]), ts[i].data_ptr()) for ts in [*moments, state_steps] for i in touched))
    if key in _VALIDATED_STATE:
        return
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for i in touched:
        checks = [(n, ts[i], params[i].shape) for n, ts in zip(names, moments, strict=False)]
        _check_tensors(i, checks, device, touched[0])
        s = state_steps[i]
        if s is None or s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            got = "None" if s is None else f"{s.dtype} on {s.device} with {s.numel()} elements"
            raise ValueError(
                f"param {i}: state step must be a float32 scalar on {device} (the kernel reads it); got {got}"
            )
    if len(_VALIDATED_STATE) > 64:
        _VALIDATED_STATE.clear()
    _VALIDATED_STATE.add(key)


_VALIDATED_STATE: set = set()


def _check_tensors(i: int, checks: list, device: torch.device, first: int) -> None:
    """Raise a clear error for the first bad tensor of param i: (name, tensor, expected shape or None)."""
    for name, t, shape in checks:
        if t is None:
            raise ValueError(f"param {i}: {name} is None; every member of a stepped unit needs one")
        if t.device != device:
            raise ValueError(
                f"param {i}: {name} is on {t.device} but param {first} is on {device}; the Triton step "
                "runs one device per call (use one device per param group)"
            )
        if shape is not None and t.shape != shape:
            raise ValueError(f"param {i}: {name} has shape {tuple(t.shape)}, the param {tuple(shape)}")
        if not t.is_contiguous():
            raise ValueError(
                f"param {i}: {name} is not contiguous; the Triton step indexes flat memory "
                "(make the param contiguous, or use backend='eager')"
            )
        if t.dtype not in TL_DTYPES:
            raise ValueError(f"param {i}: {name} has dtype {t.dtype}; expected a floating-point dtype")
        if name.startswith(("exp_", "max_")) and t.dtype != torch.float32:
            raise ValueError(f"param {i}: {name} is {t.dtype}; the Triton step keeps fp32 moments")


# %% torch.library op --------------------------------------------------------------------------------------
# torch.compile sees the step as this one opaque op (with a fake implementation: it returns nothing and mutates
# its inputs), instead of tracing into the launcher's host code (numpy tables, data pointers), which would break
# the graph. The units and the plan cache come as data, a StepContext found by its key (kernels._op_registry).
@torch.library.custom_op(
    "rotkern::rotated_adamw_step",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)
def rotated_adamw_step_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    scalars: list[torch.Tensor | None],
    floats: list[float],
    context: int,
    group: int,
    precision: str,
    active: list[int],
    num_params: int,
    decay: list[int],
    amsgrad: bool,
    maximize: bool,
) -> None:
    """:func:`rotated_adamw_step` as a torch.library op. Tensors come for the touched params only, in the order the
    active units first name them; ``scalars`` = [lr, beta1, beta2, grad_scale, found_inf] (None: not a tensor),
    ``floats`` = [lr, beta1, beta2, eps, weight_decay] (the values used where ``scalars`` has None); ``context``:
    the key of the optimizer's :class:`~rotkern.kernels._op_registry.StepContext` (units per group, plan
    cache); ``active``: indices of the stepped units in ``units[group]``; ``decay``: the group's decay mask (empty:
    none)."""
    from ._op_registry import lookup

    step_context = lookup(context)
    all_units = step_context.units[group]
    units = [all_units[k] for k in active]
    touched = list(dict.fromkeys(i for u in units for i in u.params))

    def full(xs):
        out = [None] * num_params
        for i, x in zip(touched, xs, strict=True):
            out[i] = x
        return out

    lr, beta1, beta2, grad_scale, found_inf = scalars
    rotated_adamw_step(
        full(params), full(grads), full(exp_avgs), full(exp_avg_sqs), full(max_exp_avg_sqs) if amsgrad else None,
        full(state_steps), units,
        lr=floats[0] if lr is None else lr, beta1=floats[1] if beta1 is None else beta1,
        beta2=floats[2] if beta2 is None else beta2, eps=floats[3], weight_decay=floats[4],
        decay_mask=[bool(d) for d in decay] if decay else None, amsgrad=amsgrad, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf, precision=precision, plan_cache=step_context.plans,
    )  # fmt: skip


@rotated_adamw_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, scalars, floats, context, group, precision,
      active,
      num_params, decay, amsgrad, maximize) -> None:  # fmt: skip
    return None
