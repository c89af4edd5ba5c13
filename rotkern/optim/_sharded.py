"""Rotated optimizers on DTensor parameters (FSDP2 ``fully_shard``: dim-0 sharding over a 1-D mesh).

Each rank steps its own shard: the parameter, its gradient and the moments (DTensors with the parameter's
placements, so ``torch.distributed.checkpoint`` saves them sharded) are used through their local tensors. What a
rotation unit needs decides how (``shard_mode`` of a param group, the paper's scopes, Sec. 3.1):

==========================  =================================================================================
unit                        sharded semantics
==========================  =================================================================================
identity (``none``; the     shard-local and exact: the same update as unsharded training (bit-for-bit up to
unrotated thirds, vectors)  the backend's rounding); no communication
rows (``output``)           each row is whole on one rank: the unit is cut to the rank's rows with the same
                            rotation, exact, no communication
cols, flat (``input``,      ``shard_mode="local"`` (default): the scope is applied to the rank's shards as if
``layer``, ``global``, an   they were the params (blocks and permutations drawn from the group's seed and the
embedding under output's    *local* shapes, qkv weights taken as one matrix): a different, still orthogonal,
``transposed`` reading)     rotation than unsharded training's, deterministic from the seed, the world size
                            and the shapes; no communication; checkpoints are tied to the world size.
                            ``shard_mode="gather"``: the unit's params, gradients and moments are all-gathered,
                            the unit steps as unsharded, each rank keeps its rows: exact, at 4 (5 with amsgrad)
                            all-gathers of the unit's params per step
svd, eigen                  always gathered as above (a two-sided rotation needs the whole matrix); the bases
                            are computed on every rank from the same full gradient and kept replicated
==========================  =================================================================================

The rows of a Shard(0) DTensor follow ``torch.chunk``: rank r holds rows [r c, min((r + 1) c, n)) with
c = ceil(n / world size) (the tail ranks may hold none). Replicated DTensors step as whole params on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..scopes import Segment, Unit, build_units

if TYPE_CHECKING:  # the planner imports this module; the mixin needs its GroupStep only for annotations
    from ._plan import GroupStep

SHARD_MODES = ("local", "gather")
# Scopes whose cross-shard units shard_mode decides; the others are exact (rows, identity) or always gathered.
LOCAL_SCOPES = ("input", "layer", "global")


def dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch lacks it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return DTensor


def is_dtensor(x: object) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(x, cls)


def local(x: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (a view of its storage: writes reach the DTensor), else x."""
    return x.to_local() if is_dtensor(x) else x


def check_group(params: Sequence[torch.Tensor], label) -> None:
    """Raise before anything changes unless the group's params are all plain tensors or all DTensors on one 1-D
    mesh, each sharded on dim 0 or replicated. ``label(i)`` names param i in messages."""
    from torch.distributed.tensor import Replicate, Shard

    flags = [is_dtensor(p) for p in params]
    if not any(flags):
        return
    if not all(flags):
        i = flags.index(False)
        raise ValueError(
            f"{label(i)} is a plain tensor in a param group of DTensors (FSDP2-sharded params); put sharded and "
            "unsharded params in separate param groups"
        )
    mesh = params[0].device_mesh
    for i, p in enumerate(params):
        if p.device_mesh != mesh:
            raise ValueError(f"{label(i)} lives on another device mesh than the group's first param; one per group")
        if p.device_mesh.ndim != 1 or tuple(p.placements) not in ((Shard(0),), (Replicate(),)):
            raise ValueError(
                f"{label(i)} has placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; rotkern steps "
                "DTensors sharded on dim 0 (FSDP2's fully_shard) or replicated, on a 1-D mesh (for HSDP, shard "
                "the optimizer per replica group)"
            )


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """[r0, r1): the global rows of ``p`` this rank holds (all of them for a plain or replicated tensor)."""
    from torch.distributed.tensor import Shard

    n = p.shape[0] if p.dim() else 1
    if not is_dtensor(p) or p.placements[0] != Shard(0) or p.dim() == 0:
        return 0, n
    ws, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = math.ceil(n / ws) if n else 0
    r0 = min(rank * chunk, n)
    r1 = min(r0 + chunk, n)
    got = p.to_local().shape[0] if p.to_local().dim() else 1
    if got != r1 - r0:
        raise ValueError(
            f"a DTensor of {n} rows holds {got} on rank {rank} of {ws}, not torch.chunk's {r1 - r0}; rotkern "
            "expects FSDP2's even dim-0 sharding"
        )
    return r0, r1


def cut_to_rows(unit: Unit, ranges: Sequence[tuple[int, int]], widths: Sequence[int]) -> Unit | None:
    """An identity or rows unit restricted to this rank's rows of its one param, indices local to the shard (None
    when it holds none of them). The rotation object is the unsharded unit's: rows keep their rotation."""
    (seg,) = unit.segments
    r0, r1 = ranges[seg.param]
    w = widths[seg.param]
    lo, hi = max(seg.start, r0 * w), min(seg.stop, r1 * w)
    if unit.layout == "rows":
        lo, hi = -(-lo // w) * w, hi // w * w  # rows lie whole in a segment
    if hi <= lo:
        return None
    new_seg = Segment(seg.param, lo - r0 * w, hi - r0 * w)
    shape = (1, hi - lo) if unit.layout == "identity" else ((hi - lo) // w, unit.shape[1])
    return replace(unit, segments=(new_seg,), shape=shape)


def plan_units(
    units: Sequence[Unit], params: Sequence[torch.Tensor], group: dict, local_shapes: Sequence[torch.Size]
) -> tuple[list[Unit], list[Unit]]:
    """(local units, gathered units) for one step of a group of DTensors: local units index the local shards
    (see the module docstring), gathered ones are the group's unsharded units."""
    ranges = [row_range(p) for p in params]
    widths = [p.numel() // p.shape[0] if p.dim() and p.shape[0] else 1 for p in params]
    scope, mode = group["rotation"], group.get("shard_mode", "local")
    if scope in LOCAL_SCOPES and mode == "local":
        roles = ["matrix" if r == "qkv" else r for r in group["roles"]]  # thirds do not align with shards
        built = build_units(
            local_shapes,
            scope,
            block_size=group["block_size"],
            seed=group["seed"],
            roles=roles,
            names=group["names"],
            split_qkv=False,
            embedding=group["embedding"],
            vectors=group["vectors"],
            frozen=group["frozen"],
            structure=group.get("structure", "haar"),
        )
        return built, []
    local_units, gathered = [], []
    for unit in units:
        if unit.layout in ("identity", "rows") and len(unit.segments) == 1:
            cut = cut_to_rows(unit, ranges, widths)
            if cut is not None:
                local_units.append(cut)
        else:
            gathered.append(unit)
    return local_units, gathered


def all_gather_rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) tensor of ``like``'s global shape from each rank's rows ``x`` (a local shard)."""
    mesh = like.device_mesh
    ws = mesh.size()
    n = like.shape[0]
    chunk = math.ceil(n / ws) if n else 0
    rest = tuple(like.shape[1:])
    padded = x.new_zeros((chunk, *rest))
    padded[: x.shape[0]].copy_(x)
    out = x.new_empty((chunk * ws, *rest))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=mesh.get_group())
    return out[:n]


def shard_layout(params: Sequence[torch.Tensor]) -> list[int]:
    """[world size] of the group's mesh (what a shard-local rotation depends on beyond the global shapes)."""
    return [params[0].device_mesh.size()] if params and is_dtensor(params[0]) else []


class ShardedStepMixin:
    """The step of a group of DTensor params (FSDP2): its units on the local shards or all-gathered, by
    ``shard_mode``, through the subclass's ``_rotated_adamw`` (the unit caches are in ``_shard_unit_cache``)."""

    def _shard_units(self, plan: GroupStep) -> tuple[list[Unit], list[Unit]]:
        """(local units, gathered units) of a group of DTensors for this step's active units (cached)."""
        key = tuple(id(u) for u in plan.units)
        cached = self._shard_unit_cache.get(plan.gi)
        if cached is not None and cached[0] == key:
            return cached[1]
        params = plan.group["params"]
        local_shapes = [local(p).shape for p in params]
        local_units, gathered = plan_units(plan.units, params, plan.group, local_shapes)
        touched = set(plan.touched)
        local_units = [u for u in local_units if any(i in touched for i in u.params)]
        self._shard_unit_cache[plan.gi] = (key, (local_units, gathered))
        return local_units, gathered

    def _sharded_adamw(self, plan: GroupStep, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                       units, **kwargs) -> None:  # fmt: skip
        """The step of a group of DTensors: local units on the local shards, gathered units on all-gathered full
        tensors (each rank keeping its rows), in the functional step's signature."""
        local_units, gathered = self._shard_units(plan)
        lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
        loc = [None if xs is None else [local(x) for x in xs] for xs in lists]
        if local_units:
            self._rotated_adamw(plan, *loc, state_steps, local_units, **kwargs)
        if gathered:
            members = list(dict.fromkeys(i for u in gathered for i in u.params))
            full = [None if xs is None else [None] * len(params) for xs in lists]
            for i in members:
                for k, xs in enumerate(loc):
                    if xs is not None:
                        full[k][i] = all_gather_rows(xs[i], params[i])
            self._rotated_adamw(plan, *full, state_steps, gathered, **kwargs)
            for i in members:
                r0, r1 = row_range(params[i])
                for k in (0, 2, 3, 4):  # the param and its moments; the gathered grad is dropped
                    if loc[k] is not None:
                        loc[k][i].copy_(full[k][i][r0:r1])
        stepped = {i for u in (*local_units, *gathered) for i in u.params}
        for i in plan.touched:
            if i not in stepped:  # an empty shard: counts the step, as every other rank's shard does
                state_steps[i] += 1
