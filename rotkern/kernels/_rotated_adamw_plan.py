"""Host-side plan of the Triton rotated AdamW step: the per-(units, device, dtypes) metadata, built once.

Everything here is invariant across steps and cached; only the pointer table (grads move between steps),
lr and the hyperparameters are uploaded per call (see :mod:`rotkern.kernels.rotated_adamw_step`).

Tables (int64 unless noted), as the kernels read them:

- rows (block-rows, ROW_FIELDS): one per rotated block of one unit vector: ``rbase`` and ``es`` (the
  vector's coordinate j sits at virtual position ``rbase + es * j``), ``q0`` (the block's first j), the
  segment ranges searched for gathered and for moment positions, the offset of the unit's permutation in
  ``perm`` (-1: none) and the param whose step counts for the unit.
- segments (SEG_FIELDS): ``key`` (first virtual position), ``delta`` (flat offset in the param minus
  virtual position), ``param`` (index), ``decays`` (0/1). A single-tensor unit has one segment and
  virtual position = flat offset; a global unit has one segment per member, keyed by its offset in the
  concatenation.
- perm: every permuted unit's pi, concatenated (int32 while lengths fit).
- rot: every distinct R (one per block size, shared by all units of a seed), fp32 row-major, row stride
  padded to a multiple of 16 so the kernels may assume aligned rows.
- tiles (per launch, TILE_FIELDS): runs of equal-size block-rows, at most BLOCK_M each, with their R and
  workspace offsets. chunks (identity launch, CHUNK_FIELDS): param, base, first element, stop, decay. A chunk
  covers [base, base + ID_BLOCK) of its param, base an absolute multiple of ID_BLOCK, intersected with the unit's
  [first, stop): an identity piece that starts inside a param (an unrotated third of a fused QKV weight) begins
  with a partial, masked chunk, so that every full chunk starts 16-byte aligned in an aligned param, as the
  element-wise kernel's vector loads assume.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .._backend import interpret_mode
from ..scopes import Unit

TILE_FIELDS = 6  # first row, rows, block size nb, offset of R, row stride of R, workspace offset
ROW_FIELDS = 9  # rbase, q0, es, gather segs [lo, hi), moment segs [lo, hi), pi offset (-1: none), step param
SEG_FIELDS = 4  # first virtual position, flat offset in the param minus virtual position, param, decays (0/1)
CHUNK_FIELDS = 5  # param, base (a multiple of ID_BLOCK), first element, stop, decay (0/1)
ID_BLOCK = 1024  # elements per program of the element-wise kernel


@dataclass
class Launch:
    rotated: bool
    table: torch.Tensor  # tiles (rotated) or chunks (identity)
    grid: int
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    meta: dict  # constexprs
    num_warps: int
    num_stages: int


@dataclass
class Plan:
    launches: list[Launch]
    touched: list[int]  # params the call steps
    wide: bool  # some position reaches 2^31: index math in int64
    identity_params: list[int]  # params of identity units (alignment is checked per call)
    rows: torch.Tensor
    segments: torch.Tensor  # (segments, SEG_FIELDS)
    perm: torch.Tensor
    rot: torch.Tensor
    ws_numel: int

    @property
    def metadata_bytes(self) -> int:
        ts = [self.rows, self.segments, self.perm, self.rot]
        return sum(t.numel() * t.element_size() for t in ts + [x.table for x in self.launches])


def width_class(nb: int) -> int:
    """Block-size class of a block: tiles of 16, 32, 64, or 128 (K-looped) columns."""
    return 16 if nb <= 16 else 32 if nb <= 32 else 64 if nb <= 64 else 128


def tile_config(width: int) -> tuple[dict, int, int]:
    """(BLOCK_M/N/K, num_warps, num_stages) of a block-size class: 64 block-rows by 32 columns, 8 warps.

    Chosen from ptxas' figures, without a GPU (``python benchmarks/compile_report.py`` prints them;
    tests/kernels/test_kernel_compile.py checks them). The 48 variants that GPT-2 124M, ViT-S/16 and ResNet-50
    launch at n = 768 (every scope, fp32/bf16, ieee/tf32x3/tf32) need, on sm_90a, 142-247 registers with
    Triton 3.9 (ptxas 13.4) and 125-242 with Triton 3.6 (ptxas 12.8), and none spills, but on 3.6 the two ieee
    variants of ResNet-50's conv1 rows (147 long: the output scope's one unaligned launch, one program of 731):
    16 B at 255 registers, which the test tolerates as a negligible share of the step. Shared memory <= 44 KB;
    one CTA (8 warps) per SM, two where ptxas stays at 128 registers. Not yet timed on a GPU.

    Why not wider: the previous 64x64 tiles (16 outputs per thread) need more than the 255 registers a thread
    can have: ptxas spilled 4-44 B in 13 of the 48 sm_90 variants on Triton 3.9 (GPT-2's tf32x3 global step:
    28 B) and up to 28 B in 11 on 3.6. 4 warps spill the same way (64x32 tiles: up to 76 B at 255). Why not
    narrower, or BLOCK_K = 16: 32x32 tiles and K = 16 bring some variants to just above 128 (or 80) registers,
    where ptxas caps them at that occupancy step and spills to get there (5 and 10 sm_90 variants on 3.9).
    ``maxnreg`` would stop that cap, but ptxas then fills whatever budget it is given and the ieee variants
    spill at any cap (GPT-2's global ieee step: 188 registers without it, 28-32 B spilled at 200 to 255).
    sm_80 (compiled, not the project's GPU) keeps such occupancy spills: 7 variants on 3.9 and 4 on 3.6, 4-84 B
    at 128 registers, mostly the ViT/ResNet global steps; the test reports them (all spills: 8 and 5 variants,
    down from 29 and 21, up to 188 and 376 B, with 64x64 tiles).

    Block sizes up to 32 take the same shape with BLOCK_N = BLOCK_K = their class (16 or 32; so 32 compiles to
    the variants above): the previous 4-warp 64x32 tiles spilled up to 60 B at 255 registers, the 8-warp ones
    stay at <= 128 registers without a spill on sm_90. For the largest class,
    ``ROTKERN_TILE_CONFIG="BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,num_warps=8,num_stages=2"`` overrides the choice
    (benchmarking aid). Under the interpreter, cost is per op rather than per element, so programs are
    large; BLOCK_N/K stay at 32 so that CPU tests run the K loops more than once and with ragged last tiles.
    """
    if interpret_mode():
        return dict(BLOCK_M=256, BLOCK_N=min(width, 32), BLOCK_K=min(width, 32)), 4, 1
    cfg = dict(BLOCK_M=64, BLOCK_N=min(width, 32), BLOCK_K=min(width, 32), num_warps=8, num_stages=2)
    override = os.environ.get("ROTKERN_TILE_CONFIG")
    if width > 64 and override:
        for item in override.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in cfg:
                raise ValueError(f"ROTKERN_TILE_CONFIG: unknown key {key!r}; expected {', '.join(cfg)}")
            cfg[key.strip()] = int(value)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    return cfg, warps, stages


def _search_steps(span: int) -> int:
    return math.ceil(math.log2(span)) if span > 1 else 0


@dataclass
class _Tables:
    """The tables that grow unit by unit while a plan is built (segments, permutations, rotation matrices)."""

    decay_mask: Sequence[bool] | None
    device: torch.device
    segs: list[tuple[int, int, int, int]] = field(default_factory=list)  # key, delta, param, decays
    perms: list[torch.Tensor] = field(default_factory=list)
    perm_len: int = 0
    rots: dict[tuple, tuple[int, int, torch.Tensor]] = field(default_factory=dict)  # (seed, nb, structure) ->
    rot_len: int = 0  # (offset, stride, R)

    def decays(self, i: int) -> int:
        return 1 if self.decay_mask is None or self.decay_mask[i] else 0


def _identity_chunks(u: Unit, tables: _Tables) -> np.ndarray:
    """The chunks (CHUNK_FIELDS) of an identity unit's single segment."""
    s = u.segments[0]
    bases = np.arange(s.start // ID_BLOCK * ID_BLOCK, s.stop, ID_BLOCK, dtype=np.int64)
    return np.stack(
        [
            np.full_like(bases, s.param),
            bases,
            np.maximum(bases, s.start),
            np.full_like(bases, s.stop),
            np.full_like(bases, tables.decays(s.param)),
        ],
        axis=1,
    )


def _add_segments(u: Unit, tables: _Tables) -> tuple[np.ndarray | None, np.ndarray, int]:
    """Appends a rotated unit's segments; returns the members' cumulative offsets (None for a single-tensor
    unit), the virtual bases ``rbase`` of its vectors and their element stride ``es``."""
    num_vectors = u.shape[0]
    if len(u.segments) > 1:
        cum = np.cumsum([0] + [s.numel for s in u.segments])[:-1]
        for s, key in zip(u.segments, cum, strict=True):
            tables.segs.append((int(key), s.start - int(key), s.param, tables.decays(s.param)))
        return cum, np.zeros(1, np.int64), 1
    s = u.segments[0]
    tables.segs.append((0, 0, s.param, tables.decays(s.param)))
    if u.layout == "rows":
        return None, s.start + np.arange(num_vectors, dtype=np.int64) * u.width, 1
    if u.layout == "cols":
        return None, s.start + np.arange(num_vectors, dtype=np.int64), u.width
    return None, np.array([s.start], np.int64), 1


def _add_permutation(u: Unit, tables: _Tables) -> int:
    """Appends the unit's permutation, if any; returns its offset in ``perm`` (-1: none)."""
    perm = u.rotation.permutation(tables.device, cache=False)
    if perm is None:
        return -1
    poff = tables.perm_len
    length = u.shape[1]
    tables.perms.append(perm.to(torch.int32) if length < 2**31 else perm)
    tables.perm_len += length
    return poff


def _add_blocks(u: Unit, tables: _Tables) -> tuple[np.ndarray, np.ndarray]:
    """The first coordinate and size of each of the unit's blocks; registers each R not yet in ``rot``."""
    rot = u.rotation
    n = rot.block_size
    q0 = np.arange(rot.num_blocks, dtype=np.int64) * n
    nbs = np.full(rot.num_blocks, n, np.int64)
    if rot.residual:
        q0 = np.r_[q0, rot.num_blocks * n]
        nbs = np.r_[nbs, rot.residual]
    for nb in np.unique(nbs).tolist():
        if (rot.seed, nb, rot.structure) not in tables.rots:
            r = rot.block() if nb == n else rot.residual_block()
            stride = -(-nb // 16) * 16
            tables.rots[(rot.seed, nb, rot.structure)] = (tables.rot_len, stride, r)
            tables.rot_len += stride * nb
    return q0, nbs


def _rotated_part(u: Unit, dkey: tuple, tables: _Tables) -> tuple:
    """One rotated unit's block-rows: rows, block sizes, R offsets, R strides, dtype pair, staged, segment span."""
    rot = u.rotation
    glo = len(tables.segs)
    cum, rbase, es = _add_segments(u, tables)
    ghi = len(tables.segs)
    poff = _add_permutation(u, tables)
    q0, nbs = _add_blocks(u, tables)
    multi = cum is not None
    if multi:
        mlo = glo + np.searchsorted(cum, q0, side="right") - 1
        mhi = glo + np.searchsorted(cum, q0 + nbs - 1, side="right")
    else:
        mlo, mhi = np.full_like(q0, glo), np.full_like(q0, ghi)
    rows = np.empty((len(rbase), len(q0), ROW_FIELDS), np.int64)
    rows[..., 0] = rbase[:, None]
    rows[..., 1] = q0
    rows[..., 2] = es
    rows[..., 3] = glo
    rows[..., 4] = ghi
    rows[..., 5] = mlo
    rows[..., 6] = mhi
    rows[..., 7] = poff
    rows[..., 8] = u.params[0]
    reps = len(rbase)
    offs = np.array([tables.rots[(rot.seed, nb, rot.structure)][0] for nb in nbs.tolist()], np.int64)
    strides = np.array([tables.rots[(rot.seed, nb, rot.structure)][1] for nb in nbs.tolist()], np.int64)
    # Gathers through pi, strided columns and multi-tensor units go through the workspace first.
    staged = poff >= 0 or es != 1 or multi
    return (
        rows.reshape(-1, ROW_FIELDS),
        np.tile(nbs, reps),
        np.tile(offs, reps),
        np.tile(strides, reps),
        dkey,
        staged,
        ghi - glo,
    )


def _class_rows(parts: list[tuple], members: list[int], width: int, aligned: bool) -> tuple[np.ndarray, ...]:
    """The members' block-rows of one (width, aligned) class, with their block sizes, R offsets and strides,
    stably sorted by block size."""
    sel = []
    for idx in members:
        rows, nbs, offs, strides = parts[idx][:4]
        keep = np.array([(width_class(nb), nb % 16 == 0) == (width, aligned) for nb in nbs.tolist()])
        sel.append((rows[keep], nbs[keep], offs[keep], strides[keep]))
    rows, nbs, offs, strides = (np.concatenate([s[k] for s in sel]) for k in range(4))
    order = np.argsort(nbs, kind="stable")
    return rows[order], nbs[order], offs[order], strides[order]


def _tiles(nbs, offs, strides, bm: int, n_rows: int, ws_numel: int) -> tuple[list[tuple], int]:
    """Runs of equal-size block-rows, at most ``bm`` each (TILE_FIELDS); returns them and the new workspace size."""
    bounds = np.flatnonzero(np.diff(nbs)) + 1
    tiles = []
    for lo, hi in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(nbs)].tolist(), strict=True):
        nb = int(nbs[lo])
        for t0 in range(lo, hi, bm):
            cnt = min(bm, hi - t0)
            tiles.append((n_rows + t0, cnt, nb, int(offs[t0]), int(strides[t0]), ws_numel))
            ws_numel += cnt * nb
    return tiles, ws_numel


def _rotated_launches(parts: list[tuple], device: torch.device) -> tuple[list[Launch], list[np.ndarray], int]:
    """Rotated block-rows: classes (dtypes, staged, width, aligned) -> one launch each; sorted by block size
    and tiled. Aligned classes (block sizes multiples of 16) come first, so their workspace offsets are too.
    Returns the launches, their block-rows in table order and the workspace size."""
    classes: dict[tuple, list[int]] = {}
    for idx, part in enumerate(parts):
        for cls in sorted({(width_class(nb), nb % 16 == 0) for nb in part[1].tolist()}):
            classes.setdefault((part[4], part[5], *cls), []).append(idx)
    launches: list[Launch] = []
    all_rows = []
    n_rows = ws_numel = 0
    for (dkey, staged, width, aligned), members in sorted(classes.items(), key=lambda kv: not kv[0][3]):
        meta, warps, stages = tile_config(width)
        rows, nbs, offs, strides = _class_rows(parts, members, width, aligned)
        tiles, ws_numel = _tiles(nbs, offs, strides, meta["BLOCK_M"], n_rows, ws_numel)
        meta = dict(
            meta,
            STAGED=staged,
            ALIGNED=aligned,
            GATHER_STEPS=_search_steps(max(parts[idx][6] for idx in members)),
            MOMENT_STEPS=_search_steps(int((rows[:, 6] - rows[:, 5]).max())),
        )
        table = torch.tensor(tiles, dtype=torch.int64).to(device)
        launches.append(Launch(True, table, len(tiles), dkey[0], dkey[1], meta, warps, stages))
        all_rows.append(rows)
        n_rows += len(rows)
    return launches, all_rows, ws_numel


def _rot_table(tables: _Tables) -> np.ndarray:
    """Every registered R, fp32 row-major with padded row stride, in one flat table."""
    rot_table = np.zeros(max(tables.rot_len, 1), np.float32)
    for off, stride, r in tables.rots.values():
        nb = r.shape[0]
        rot_table[off : off + stride * nb].reshape(nb, stride)[:, :nb] = r.cpu().numpy()
    return rot_table


def build_plan(
    units: Sequence[Unit],
    p_dtypes: Sequence[torch.dtype | None],
    g_dtypes: Sequence[torch.dtype | None],
    decay_mask: Sequence[bool] | None,
    device: torch.device,
) -> Plan:
    """Tables and launches for one call's units (see the module docstring)."""
    touched = list(dict.fromkeys(i for u in units for i in u.params))
    tables = _Tables(decay_mask, device)
    parts = []  # per rotated unit: rows, block sizes, R offsets, R strides, dtype pair, staged, segment span
    chunks: dict[tuple, list[np.ndarray]] = {}
    identity_params = []
    for u in units:
        dkey = _dtype_key(u, p_dtypes, g_dtypes)
        if u.rotation is None:
            chunks.setdefault(dkey, []).append(_identity_chunks(u, tables))
            identity_params.append(u.segments[0].param)
        else:
            parts.append(_rotated_part(u, dkey, tables))

    launches, all_rows, ws_numel = _rotated_launches(parts, device)
    for (pdt, gdt), cs in chunks.items():
        table = torch.from_numpy(np.concatenate(cs)).to(device)
        launches.append(Launch(False, table, len(table), pdt, gdt, dict(BLOCK=ID_BLOCK), 4, 1))

    def upload(values) -> torch.Tensor:
        # Empty tables still get one row: kernels take a valid base pointer and never read it.
        values = np.asarray(values, dtype=np.int64) if len(values) else np.zeros(1, np.int64)
        return torch.from_numpy(values).to(device)

    # int32 index math unless some flat offset, unit position or permutation-table offset reaches 2^31.
    largest = max([s.stop for u in units for s in u.segments] + [u.shape[1] for u in units] + [tables.perm_len])
    return Plan(
        launches=launches,
        wide=largest >= 2**31,
        touched=touched,
        identity_params=identity_params,
        rows=upload(np.concatenate(all_rows) if all_rows else []),
        segments=upload(tables.segs),
        perm=torch.cat(tables.perms) if tables.perms else torch.zeros(1, dtype=torch.int32, device=device),
        rot=torch.from_numpy(_rot_table(tables)).to(device),
        ws_numel=ws_numel,
    )


def _dtype_key(u: Unit, p_dtypes, g_dtypes) -> tuple[torch.dtype, torch.dtype]:
    keys = {(p_dtypes[i], g_dtypes[i]) for i in u.params}
    if len(keys) > 1:
        raise ValueError(
            f"a {u.layout} rotation unit spans parameters of several (param, grad) dtypes "
            f"{sorted(map(str, keys))}; the Triton step needs one dtype pair per unit: put them in separate "
            "param groups or use backend='eager'"
        )
    return keys.pop()


class PlanCache(OrderedDict):
    """A small LRU of plans. Optimizers keep their own (sized to their param groups), so plans live exactly
    as long as the optimizer; the functional op otherwise shares the module-level one."""

    def __init__(self, maxsize: int = 8) -> None:
        super().__init__()
        self.maxsize = maxsize


_PLANS = PlanCache()  # a global plan holds a d-long int32 permutation: keep few


def get_plan(
    units: Sequence[Unit],
    params: Sequence[torch.Tensor | None],
    grads: Sequence[torch.Tensor | None],
    decay_mask: Sequence[bool] | None,
    device: torch.device,
    cache: PlanCache | None = None,
) -> Plan:
    """The cached plan for these units (units compare by value, their rotations by identity)."""
    cache = _PLANS if cache is None else cache
    p_dtypes = tuple(None if p is None else p.dtype for p in params)
    g_dtypes = tuple(None if g is None else g.dtype for g in grads)
    mask = None if decay_mask is None else tuple(bool(x) for x in decay_mask)
    key = (
        tuple(units),
        len(params),
        device,
        p_dtypes,
        g_dtypes,
        mask,
        interpret_mode(),
        os.environ.get("ROTKERN_TILE_CONFIG"),
    )
    plan = cache.get(key)
    if plan is None:
        plan = build_plan(units, p_dtypes, g_dtypes, decay_mask, device)
        cache[key] = plan
        while len(cache) > cache.maxsize:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return plan


def clear_plan_cache() -> None:
    """Drop every plan of the module-level cache (and the device tables it holds)."""
    _PLANS.clear()
