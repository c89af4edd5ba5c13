"""Machinery shared by the rotated optimizers: the torch.optim contract kept in one place (param groups,
validation before mutation, frozen and zero-size params, odd layouts, copies, state_dict round-trips) and the
dense-matrix testing oracle. Backends only compute: they receive contiguous tensors, one dtype pair per unit
where they need it, and a gradient for every member of every unit they step.

Rules a user can observe (each is a test in tests/optim/test_torch_parity.py):

- A parameter whose ``.grad`` is None at a step is not modified (no update, no weight decay). When no member of
  a unit has a gradient the unit is skipped and its state is untouched, exactly as torch.optim.AdamW skips the
  parameter. In the global scope, where one unit holds many parameters, a member without a gradient while
  others have one takes a zero gradient inside the shared rotation (the gradient of a loss that does not depend
  on it): the unit's moments, stored in chunks under every member's state, advance as one vector with one step
  count, and the member's values stay as they were.
- Frozen parameters (an ``nn.Parameter`` with ``requires_grad=False`` when its group is added, or a group's
  explicit ``frozen`` list) are invisible to the others: they stay outside the shared global rotation and their
  units come last, so the rotations the other parameters see, and their trajectory, are those of an optimizer
  built without them. Each keeps the units its scope gives it (in the global scope, a rotation of its own),
  which act if it is unfrozen later. Plain tensors are never taken as frozen: optimizers are routinely handed
  plain tensors whose ``.grad`` is set by hand.
- Zero-size parameters (what FSDP2 leaves on tail ranks) belong to no unit: their state is created and their
  step counted as torch does, nothing else happens.
- Non-contiguous parameters (transposed views, ``channels_last`` kernels) are optimised on their logical shape:
  the result equals that of a contiguous copy. Moments are stored contiguous.
- Every check of a call runs before anything is changed, so a refused ``add_param_group``, ``step`` or
  ``load_state_dict`` leaves the optimizer exactly as it was.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from ..bases import BASIS_CHANGES
from ..rotations import check_block_size, check_structure
from ..scopes import (
    ALL_SCOPES,
    EMBEDDING_ORIENTATIONS,
    ROLES,
    VECTOR_POLICIES,
    DynamicRotation,
    Unit,
    build_units,
    check_qkv_pieces,
    infer_roles,
    unit_index_map,
)
from . import _sharded
from ._spec import (  # noqa: F401  (re-exported: rotkern.optim.moment, convert, fused)
    MOMENT_KEYS,
    PER_PARAM_KEYS,
    ROTATED_PREFIX,
    SPEC_KEYS,
    UNIT_KEYS,
    _freeze,
    _label,
    _real_numel,
    _zero_state_like,
    as_real,
    has_moment,
    logical_keys,
    moment,
    moment_dtype,
    real_shape,
    stored_key,
    stored_keys,
)

log = logging.getLogger("rotkern")
_warned: set[tuple] = set()

# Options of the dynamic scopes, checked for every group that has them.
DYNAMIC_KEYS = ("svd_every", "precondition_every", "shampoo_beta", "max_precond_dim", "basis_change")
_COMPUTE_DTYPES = (torch.float32, torch.float64)
# Scopes whose units depend on roles that only names reveal (fused QKV, embeddings).
_ROLE_SCOPES = ("layer", "output", "input", "svd", "eigen")


@dataclass
class GroupStep:
    """What one param group's step will do, decided (and checked) before anything is mutated."""

    gi: int
    group: dict
    grads: list  # per param: its grad, or None
    units: list[Unit]  # units with at least one gradient
    touched: list[int]  # members of those units, in order
    absent: list[int]  # touched members without a gradient (zero gradient, values kept)
    empty: list[int]  # zero-size params with a gradient (state and step only)
    backend: str = "eager"
    extra: dict = field(default_factory=dict)


class RotatedOptimizerBase(Optimizer):
    """Base class: a torch Optimizer whose param groups carry rotation options.

    Group keys beyond the optimizer's hyperparameters:
        rotation: scope name (``none``, ``global``, ``layer``, ``output``, ``input``, and the dynamic ``svd`` and
            ``eigen`` where the subclass sets ``_supports_dynamic``).
        svd_every: F, the SVD basis period of the ``svd`` scope (optimizers that support it).
        precondition_every, shampoo_beta, max_precond_dim: the ``eigen`` scope's refresh period, factor EMA
            coefficient and largest side with a basis.
        basis_change: what the moments do at a basis change of a dynamic scope (:mod:`rotkern.bases`).
        block_size, seed: Haar block size n and the rotation seed.
        structure: ``haar`` (Haar-random blocks, the paper's) or ``hadamard`` (randomized Walsh-Hadamard blocks).
        split_qkv, embedding, vectors: scope options (see :mod:`rotkern.scopes`).
        qkv_pieces: which thirds of fused QKV weights the scope rotates (a subset of ``"qkv"``, e.g. ``"v"``; the
            others step as plain AdamW). Stored in the group only when it is not the default ``"qkv"``, so
            checkpoints from before the option load unchanged.
        shard_mode: DTensor (FSDP2) params only: ``local`` (default) or ``gather``, what the ``input``, ``layer``
            and ``global`` scopes do with units that span shards (see :mod:`rotkern.optim._sharded`); recorded
            only when not the default. A group of DTensors under a shard-local rotation also records
            ``shard_layout`` ([world size]), which a checkpoint must match.
        names, roles: optional per-parameter names and roles (see :func:`rotkern.param_groups_for`); params
            given as ``(name, tensor)`` pairs also get torch's ``param_names``.
        decay_mask: optional per-parameter bools; False disables weight decay for that parameter.
        frozen: per-parameter bools, recorded when the group is added (``nn.Parameter`` with
            ``requires_grad=False``) unless given; frozen params stay outside the global scope's shared unit.
        shapes: recorded when the group is added; a parameter that changes shape afterwards is an error.
    """

    understands_decay_mask = True  # param groups may carry a per-parameter decay_mask (param_groups_for)

    _moment_keys: tuple[str, ...] = ()
    # Whether the step implements the dynamic scopes (svd, eigen: the basis changes happen in the step).
    _supports_dynamic = False
    # Attributes beyond torch's defaults/state/param_groups that copies (deepcopy, pickle) must keep.
    _config_attrs: tuple[str, ...] = ("compute_dtype", "state_dtype", "basis_stats")

    def __init__(self, params: Iterable, defaults: dict[str, Any], compute_dtype: torch.dtype) -> None:
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        # The dtype moments are stored in between steps (state_dtype=): the compute dtype unless a subclass lowers it.
        self.__dict__.setdefault("state_dtype", compute_dtype)
        # Decomposition fallbacks of the dynamic scopes (rotkern.bases.robust_decomposition): kind -> count.
        self.basis_stats: dict[str, int] = {}
        self._unit_cache: dict[int, tuple[tuple, tuple, list[Unit]]] = {}
        self._shard_unit_cache: dict[int, tuple] = {}
        self._group_members: dict[int, list] = {}  # each group's params when its units were built
        self._group_lists: dict[int, dict[str, Any]] = {}  # each group's per-param lists then (see _reclaim_lists)
        super().__init__(_normalise_params(params), defaults)

    # -- copies ---------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._config_attrs})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compute_dtype", torch.float32)
        self.__dict__.setdefault("state_dtype", self.compute_dtype)
        self.__dict__.setdefault("basis_stats", {})
        # Units hold caches bound to this object's state (svd bases); copies rebuild their own.
        self._unit_cache = {}
        self._shard_unit_cache = {}
        self._group_members = {}
        self._group_lists = {}
        for group in self.param_groups:
            group.setdefault("frozen", [False] * len(group["params"]))
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=self._step_device(p))

    # -- groups ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics), with rotkern's options checked first.

        Every check runs, and the group's rotation units are built, before the group is added: a refused group
        leaves the optimizer as it was. The caller's dict is not modified.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
                "in sets will change between runs. Please use a list instead."
            )
        else:
            params = list(params)
        if any(isinstance(p, tuple) for p in params):
            if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            group["param_names"] = [n for n, _ in params]
            group.setdefault("names", list(group["param_names"]))
            params = [p for _, p in params]
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
            if not self.defaults.get("differentiable", None) and not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        group["params"] = params
        gi = len(self.param_groups)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self._check_group_options(gi, group)
        units = self._build_units(gi, group)
        super().add_param_group(group)  # torch's own checks (a param in two groups ...) run before it appends
        self._cache_units(gi, group, units)

    def _check_group_options(self, gi: int, group: dict[str, Any]) -> None:
        """Validate a candidate group's hyperparameters and rotation options and fill in its recorded keys."""
        params = group["params"]
        self._check_hyperparameters(group, f"param group {gi}: ")
        for key in ("names", "roles", "decay_mask", "frozen"):
            if group.get(key) is not None:
                group[key] = list(group[key])
                if len(group[key]) != len(params):
                    raise ValueError(
                        f"param group {gi}: '{key}' has {len(group[key])} entries for {len(params)} params"
                    )
        names = group.get("names")
        for i, p in enumerate(params):
            if p.is_complex():
                # A complex element is two real coordinates (torch.optim steps torch.view_as_real(p)).
                if self.state_dtype == torch.bfloat16:
                    raise ValueError(
                        f"{_label(names, gi, i)}: complex params keep complex moments; state_dtype=torch.bfloat16 has "
                        "no complex counterpart (put them in another optimizer, or leave state_dtype=None)"
                    )
                if _sharded.is_dtensor(p):
                    raise ValueError(f"{_label(names, gi, i)}: complex DTensor params are not supported")
                continue
            if not p.is_floating_point():
                raise ValueError(f"{_label(names, gi, i)}: dtype {p.dtype} is not a floating-point dtype")
        if group["rotation"] not in ALL_SCOPES:
            raise ValueError(f"param group {gi}: unknown rotation {group['rotation']!r}; choose one of {ALL_SCOPES}")
        if group["rotation"] in ("svd", "eigen") and not self._supports_dynamic:
            raise ValueError(
                f"param group {gi}: rotation={group['rotation']!r} (a dynamic basis) is implemented for RotatedAdamW "
                f"and FusedRotatedAdamW only, not {type(self).__name__}"
            )
        _check_dynamic_options(group, f"param group {gi}: ")
        check_block_size(group["block_size"], f"param group {gi}: block_size")
        check_structure(group.get("structure", "haar"), group["block_size"], f"param group {gi}: structure")
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], numbers.Integral):
            raise ValueError(f"param group {gi}: seed must be an int, got {group['seed']!r}")
        if group["embedding"] not in EMBEDDING_ORIENTATIONS:
            raise ValueError(f"param group {gi}: embedding={group['embedding']!r}, not one of {EMBEDDING_ORIENTATIONS}")
        if group["vectors"] not in VECTOR_POLICIES:
            raise ValueError(f"param group {gi}: vectors={group['vectors']!r}, not one of {VECTOR_POLICIES}")
        if isinstance(group["split_qkv"], torch.Tensor) or not isinstance(group["split_qkv"], bool):
            raise ValueError(f"param group {gi}: split_qkv must be a bool, got {group['split_qkv']!r}")
        if "qkv_pieces" in group:
            pieces = check_qkv_pieces(group["qkv_pieces"], f"param group {gi}: qkv_pieces")
            if pieces == "qkv":
                del group["qkv_pieces"]  # the default is recorded by its absence (older checkpoints lack the key)
            elif group["rotation"] in ("svd", "eigen"):
                raise ValueError(
                    f"param group {gi}: qkv_pieces={pieces!r} is for the static scopes; rotation={group['rotation']!r} "
                    "rotates every third of a fused QKV weight (put the weights to leave alone in a group of their own)"
                )
            elif not group["split_qkv"] and group["rotation"] not in ("none", "global"):
                raise ValueError(
                    f"param group {gi}: qkv_pieces={pieces!r} rotates some thirds of fused QKV weights; it needs "
                    "split_qkv=True"
                )
            else:
                group["qkv_pieces"] = pieces
        _sharded.check_group(params, lambda i: _label(names, gi, i))
        if "shard_mode" in group:
            if group["shard_mode"] not in _sharded.SHARD_MODES:
                raise ValueError(
                    f"param group {gi}: shard_mode={group['shard_mode']!r} is not one of {_sharded.SHARD_MODES}"
                )
            if group["shard_mode"] == "local":
                del group["shard_mode"]  # the default is recorded by its absence
        if group["rotation"] in _sharded.LOCAL_SCOPES and group.get("shard_mode", "local") == "local":
            layout = _sharded.shard_layout(params)
            if layout:
                group["shard_layout"] = layout
        group["shapes"] = [list(p.shape) for p in params]
        if group.get("frozen") is None:
            group["frozen"] = [isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in params]
        group["frozen"] = [bool(f) for f in group["frozen"]]
        if group.get("roles") is None:
            group["roles"] = infer_roles([p.shape for p in params], names)
            if names is None and group["rotation"] in _ROLE_SCOPES:
                _warn_roles_guessed(gi, group)
        for i, r in enumerate(group["roles"]):
            if r not in ROLES:
                raise ValueError(f"{_label(names, gi, i)}: unknown role {r!r}; choose one of {ROLES}")
        group.setdefault("names", None)
        group.setdefault("decay_mask", None)

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        """Subclasses check their hyperparameters (torch.optim's messages) for every group."""

    def _build_units(self, gi: int, group: dict[str, Any]) -> list[Unit]:
        units = build_units(
            [real_shape(s, p.is_complex()) for s, p in zip(group["shapes"], group["params"], strict=True)],
            group["rotation"],
            block_size=group["block_size"],
            seed=group["seed"],
            roles=group["roles"],
            names=group["names"],
            split_qkv=group["split_qkv"],
            embedding=group["embedding"],
            vectors=group["vectors"],
            frozen=group["frozen"],
            max_precond_dim=group.get("max_precond_dim", 10000),
            structure=group.get("structure", "haar"),
            qkv_pieces=group.get("qkv_pieces", "qkv"),
        )
        return units

    def _cache_units(self, gi: int, group: dict[str, Any], units: list[Unit]) -> None:
        values = [group.get(k) for k in UNIT_KEYS]
        quick = tuple(id(v) if isinstance(v, list) else v for v in values)
        spec = tuple(_freeze(v) for v in values)
        # Dynamic units read their current bases from this optimizer's state (for rotate(x) outside the step).
        for unit in units:
            if isinstance(unit.rotation, DynamicRotation):
                unit.rotation.bind(self.state, group["params"][unit.params[0]])
        self._unit_cache[gi] = (quick, spec, units)
        self._group_members[gi] = list(group["params"])
        self._group_lists[gi] = {k: group[k] for k in PER_PARAM_KEYS if k in group}

    def _reclaim_lists(self, gi: int, group: dict[str, Any]) -> None:
        """Put back this group's per-param lists when another group's replaced them.

        ZeroRedundancyOptimizer treats every group key as a hyperparameter shared by all ranks: its
        ``load_state_dict`` copies the checkpoint's group keys (rank 0's local optimizer's lists, as its
        ``state_dict`` saved them) into each rank's local optimizer, whose params are another subset. The lists
        recorded when this group's units were built describe its params; ``shapes`` is never set by a user, so
        a replaced ``shapes`` list means the lists came from elsewhere, and all of them are put back. (This
        optimizer's own ``load_state_dict`` records the lists it loads.) A param whose shape really changed is
        still refused: the recorded shapes are the ones it had when the optimizer first saw it."""
        own = self._group_lists.get(gi)
        if own is None or group.get("shapes") is own.get("shapes"):
            return
        if self._group_members.get(gi) is None or len(self._group_members[gi]) != len(group["params"]):
            return  # a changed param list: _resync_members follows it
        if any(a is not b for a, b in zip(self._group_members[gi], group["params"], strict=True)):
            return
        for key in PER_PARAM_KEYS:
            if key in own:
                group[key] = own[key]
            else:
                group.pop(key, None)

    def _resync_members(self, gi: int, group: dict[str, Any]) -> None:
        """Follow a param list changed in place (append, delete, replace, as continual-learning code does to
        ``group["params"]``), as torch.optim does: the new list trains. The per-param keys (shapes, roles,
        names, frozen, decay mask, param_names) follow their params; a new param gets a role from its shape,
        no name and the group's weight decay; removed params' state is dropped. Refused, before anything
        changes, when a unit with state would change members (its moments live in a basis of the old ones)."""
        self._reclaim_lists(gi, group)
        params = group["params"]
        known = self._group_members.get(gi)
        if known is None:  # a copy or a fresh unpickle: the recorded shapes tell whether the list is the same
            if len(params) == len(group["shapes"]):
                self._group_members[gi] = list(params)
                return
            raise ValueError(
                f"param group {gi}: its param list changed in place after the optimizer was copied; build a new "
                "optimizer for the new params"
            )
        if len(known) == len(params) and all(a is b for a, b in zip(known, params, strict=True)):
            return
        old = {id(p): i for i, p in enumerate(known)}
        cand = {k: v for k, v in group.items() if k != "params"}
        cand["params"] = list(params)
        for key in ("names", "roles", "decay_mask", "frozen", "param_names", "shapes"):
            if group.get(key) is None:
                continue
            fill = {"names": None, "param_names": None, "decay_mask": True, "frozen": None, "roles": None}
            cand[key] = [group[key][old[id(p)]] if id(p) in old else fill.get(key) for p in params]
        if cand.get("roles") is not None and any(r is None for r in cand["roles"]):
            guessed = infer_roles([p.shape for p in params], None)
            cand["roles"] = [r if r is not None else guessed[i] for i, r in enumerate(cand["roles"])]
        frozen = cand.get("frozen")
        if frozen is not None:
            cand["frozen"] = [
                f if f is not None else isinstance(p, torch.nn.Parameter) and not p.requires_grad
                for p, f in zip(params, frozen, strict=True)
            ]
        shapes = cand.pop("shapes", None)
        self._check_group_options(gi, cand)
        # Shapes recorded when the optimizer first saw a param: a later change of shape is still an error.
        cand["shapes"] = [shapes[i] if id(p) in old else list(p.shape) for i, p in enumerate(params)]
        units = self._build_units(gi, cand)
        before = {frozenset(id(known[i]) for i in u.params) for u in self._unit_cache[gi][2]}
        for u in units:
            members = frozenset(id(params[i]) for i in u.params)
            if members not in before and any(self.state.get(params[i]) for i in u.params if id(params[i]) in old):
                raise ValueError(
                    f"param group {gi}: its param list changed in place, and rotation={group['rotation']!r} puts "
                    "params that already have state into a unit with new members: their moments live in the old "
                    "unit's basis. Add new params with add_param_group(), or build a new optimizer (rotkern."
                    "to_adamw_state / from_adamw_state convert the moments)"
                )
        for p in known:
            if not any(p is q for q in params):
                self.state.pop(p, None)
        group.update({k: v for k, v in cand.items() if k != "params"})
        self._cache_units(gi, group, units)

    def units(self, group_index: int) -> list[Unit]:
        """The rotation units of a param group (cached; rebuilt only if its rotation options change)."""
        group = self.param_groups[group_index]
        self._reclaim_lists(group_index, group)
        values = [group.get(k) for k in UNIT_KEYS]
        # Fast path by the identity of list-valued keys (this runs every step); when a list was replaced
        # (load_state_dict does that), fall back to comparing contents.
        quick = tuple(id(v) if isinstance(v, list) else v for v in values)
        cached = self._unit_cache.get(group_index)
        if cached is not None and cached[0] == quick:
            return cached[2]
        spec = tuple(_freeze(v) for v in values)
        if cached is not None and cached[1] == spec:
            self._unit_cache[group_index] = (quick, spec, cached[2])
            return cached[2]
        if cached is not None and any(p in self.state for p in group["params"]):
            raise ValueError(
                f"param group {group_index}: rotation options changed after the optimizer took a step; the "
                "moments live in the old basis. Build a new optimizer instead."
            )
        units = self._build_units(group_index, group)
        self._cache_units(group_index, group, units)
        return units

    def rotated_params(self, group_index: int) -> set[int]:
        """Indices of the group's params whose state lives in a rotated basis (members of a rotated unit)."""
        group = self.param_groups[group_index]
        if group["rotation"] == "none":
            return set()
        return {i for u in self.units(group_index) if u.rotation is not None for i in u.params}

    # -- step: plan (checks only), then run --------------------------------------------------------------
    def _plan_steps(self) -> list[GroupStep]:
        """Check every group and decide what its step does; nothing is mutated here."""
        plans = []
        for gi, group in enumerate(self.param_groups):
            plan = self._plan_group(gi, group)
            if plan is not None:
                plans.append(plan)
        return plans

    def _plan_group(self, gi: int, group: dict) -> GroupStep | None:
        self._resync_members(gi, group)
        grads = self._check_group(gi, group)
        params = group["params"]
        empty = [i for i, g in enumerate(grads) if g is not None and params[i].numel() == 0]
        active, touched, indices = [], {}, []
        k = -1
        for unit in self.units(gi):
            k += 1
            members = unit.params
            if all(grads[i] is None for i in members):
                continue
            indices.append(k)
            if len(members) > 1:
                devices = {params[i].device for i in members}
                if len(devices) > 1:
                    raise ValueError(
                        f"param group {gi}: a '{group['rotation']}' rotation spans params on several devices "
                        f"({', '.join(sorted(map(str, devices)))}); put them on one device or in separate param "
                        "groups"
                    )
            active.append(unit)
            touched.update(dict.fromkeys(members))
        if not active and not empty:
            return None
        absent = [i for i in touched if grads[i] is None]
        plan = GroupStep(gi, group, grads, active, list(touched), absent, empty)
        plan.extra["unit_indices"] = indices  # positions of the active units in self.units(gi)
        if params and _sharded.is_dtensor(params[0]):
            plan.extra["sharded"] = True
        if active:
            self._plan_backend(plan)
        return plan

    def _plan_backend(self, plan: GroupStep) -> None:
        """Subclasses pick (and check) the backend of a group's step here, before anything is mutated."""

    # -- DTensor (FSDP2) params: see rotkern.optim._sharded ---------------------------------------------
    def _shard_units(self, plan: GroupStep) -> tuple[list[Unit], list[Unit]]:
        """(local units, gathered units) of a group of DTensors for this step's active units (cached)."""
        key = tuple(id(u) for u in plan.units)
        cached = self._shard_unit_cache.get(plan.gi)
        if cached is not None and cached[0] == key:
            return cached[1]
        params = plan.group["params"]
        local_shapes = [_sharded.local(p).shape for p in params]
        local_units, gathered = _sharded.plan_units(plan.units, params, plan.group, local_shapes)
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
        loc = [None if xs is None else [_sharded.local(x) for x in xs] for xs in lists]
        if local_units:
            self._rotated_adamw(plan, *loc, state_steps, local_units, **kwargs)
        if gathered:
            members = list(dict.fromkeys(i for u in gathered for i in u.params))
            full = [None if xs is None else [None] * len(params) for xs in lists]
            for i in members:
                for k, xs in enumerate(loc):
                    if xs is not None:
                        full[k][i] = _sharded.all_gather_rows(xs[i], params[i])
            self._rotated_adamw(plan, *full, state_steps, gathered, **kwargs)
            for i in members:
                r0, r1 = _sharded.row_range(params[i])
                for k in (0, 2, 3, 4):  # the param and its moments; the gathered grad is dropped
                    if loc[k] is not None:
                        loc[k][i].copy_(full[k][i][r0:r1])
        stepped = {i for u in (*local_units, *gathered) for i in u.params}
        for i in plan.touched:
            if i not in stepped:  # an empty shard: counts the step, as every other rank's shard does
                state_steps[i] += 1

    def _run_group(self, plan: GroupStep, extra_keys: tuple[str, ...] = ()) -> tuple[list, list, list] | None:
        """Create state, stage the tensors the backend needs, and return (params, grads, states) to step.

        ``states[i]`` is None for params outside the active units. Params staged into a temporary (non-contiguous
        layouts, members without a gradient, units of mixed dtypes for backends that need one dtype pair) are
        written back by :meth:`_finish_group`.
        """
        params = plan.group["params"]
        rotated = self.rotated_params(plan.gi)
        for i in plan.empty:
            self._init_state(params[i], extra_keys, i in rotated)["step"] += 1
        if not plan.units:
            return None
        touched = set(plan.touched)
        self._refill_emptied_members(plan)
        states = [self._init_state(p, extra_keys, i in rotated) if i in touched else None for i, p in enumerate(params)]
        # Complex params and grads step as their real coordinates (views of their storage; a non-contiguous
        # complex param is staged first and written back last, after any staging of its real view below).
        run_params, run_grads = list(params), [as_real(g) for g in plan.grads]
        complex_writeback = []
        for i in plan.touched:
            if params[i].is_complex():
                src = params[i].detach()
                if not src.is_contiguous():
                    src = src.contiguous()
                    complex_writeback.append((params[i], src, None))
                run_params[i] = as_real(src)
        uniform = self._needs_uniform_dtypes(plan.backend)
        widen = _mixed_dtype_members(plan.units, run_params, run_grads) if uniform else set()
        absent = set(plan.absent)
        writeback = []
        # Stochastic rounding: the step runs on an fp32 copy, rounded into the param afterwards (_finish_group).
        sr = plan.group.get("stochastic_rounding", False)
        for i in plan.touched:
            p, g = run_params[i], run_grads[i]
            rounded = sr and p.dtype in (torch.bfloat16, torch.float16) and i not in absent
            if rounded:
                widen = widen | {i}
            dtype = torch.float32 if i in widen else p.dtype
            if i in absent:
                # Values are kept: the backend writes this member's update into a temporary that is dropped.
                run_params[i] = p.detach().to(dtype, memory_format=torch.contiguous_format, copy=True)
                # fp32 when the others' grads are unscaled into fp32 copies below (one dtype pair per unit)
                scaled = getattr(self, "_grad_scale", None) is not None
                zero_dtype = torch.float32 if scaled else _absent_grad_dtype(plan, i, widen)
                run_grads[i] = torch.zeros(p.shape, dtype=zero_dtype, device=p.device)
                continue
            if dtype != p.dtype or not p.is_contiguous():
                run_params[i] = p.detach().to(dtype, memory_format=torch.contiguous_format, copy=True)
                seed = _rounding_seed(plan.group["seed"], plan.gi, i, float(states[i]["step"]) + 1) if rounded else None
                writeback.append((p, run_params[i], seed))
            if (i in widen and g.dtype != torch.float32) or not g.is_contiguous():
                # .contiguous() as well: Tensor.to(memory_format=contiguous_format) keeps a transposed tensor as it is
                # when the dtype does not change (a transposed param's autograd grad is transposed too).
                run_grads[i] = g.to(torch.float32 if i in widen else g.dtype).contiguous()
            scale = getattr(self, "_grad_scale", None)
            if scale is not None:  # GradScaler's scaled grads: unscaled copies, as torch's fused AdamW (fp32 division)
                # kept in fp32, not rounded back to a bf16 grad's dtype: what the fused kernels compute
                run_grads[i] = run_grads[i].float() / scale.to(g.device)
        plan.extra["writeback"] = writeback + complex_writeback
        return run_params, run_grads, states

    @staticmethod
    def _finish_group(plan: GroupStep) -> None:
        for p, staged, seed in plan.extra.get("writeback", ()):
            p.detach().copy_(staged if seed is None else stochastic_round(staged, p.dtype, seed))

    def _needs_uniform_dtypes(self, backend: str) -> bool:
        """Whether ``backend`` needs one (param, grad) dtype pair per unit (the fused ones do)."""
        return backend != "eager"

    def _check_group(self, gi: int, group: dict[str, Any]) -> list[torch.Tensor | None]:
        """Validate the group's params and grads; returns grads (None where absent)."""
        grads: list[torch.Tensor | None] = []
        for i, (p, shape) in enumerate(zip(group["params"], group["shapes"], strict=True)):
            g = p.grad
            # One cheap combined test per param; the messages are built only on failure.
            if p.shape != tuple(shape) or (
                g is not None
                and (g.is_sparse or g.shape != p.shape or g.device != p.device or g.is_complex() != p.is_complex())
            ):
                self._raise_bad_param(gi, group, i)
            grads.append(g)
        return grads

    @staticmethod
    def _raise_bad_param(gi: int, group: dict[str, Any], i: int) -> None:
        p, g, shape = group["params"][i], group["params"][i].grad, tuple(group["shapes"][i])
        label = _label(group["names"], gi, i)
        if p.shape != shape:
            raise ValueError(
                f"{label} changed shape from {shape} to {tuple(p.shape)} after the optimizer was built; build a "
                "new optimizer for the new shapes"
            )
        if g.is_sparse:
            raise RuntimeError(
                f"{label} has a sparse gradient, which rotated optimizers do not support (a rotation makes it "
                "dense); use nn.Embedding(sparse=False) or convert with grad.to_dense()"
            )
        if g.shape != p.shape:
            raise ValueError(f"{label}: grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
        if g.is_complex() != p.is_complex():
            raise ValueError(f"{label}: grad has dtype {g.dtype}; the param is {p.dtype}")
        raise ValueError(f"{label}: grad is on {g.device} but the param is on {p.device}")

    def _step_device(self, p: torch.Tensor) -> torch.device:
        """Where ``state["step"]`` of ``p`` lives: the CPU here; fused subclasses keep it on ``p``'s device
        so that kernels read it without a host sync. Checkpoints load onto this device either way."""
        return torch.device("cpu")

    def _refill_emptied_members(self, plan: GroupStep) -> None:
        """A member of a multi-param unit whose state was emptied (``opt.state[p] = {}``, as continual-learning
        code does) while the others kept theirs restarts with zero moments at the unit's step: the unit's
        members share one step count."""
        params = plan.group["params"]
        for unit in plan.units:
            if len(unit.params) < 2 or isinstance(unit.rotation, DynamicRotation):
                continue
            states = [self.state.get(params[i]) for i in unit.params]
            model = next((st for st in states if st), None)
            if model is None or all(states):
                continue
            for i, st in zip(unit.params, states, strict=True):
                if not st:
                    self.state[params[i]] = _zero_state_like(model, params[i])

    def _init_state(self, p: torch.Tensor, extra_keys: tuple[str, ...] = (), rotated: bool = False) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(p))
        for key in self._moment_keys + extra_keys:
            key = stored_key(key, rotated)
            if key not in state:
                dtype = moment_dtype(self.state_dtype, p)
                if _sharded.is_dtensor(p):  # sharded like the param (what torch.distributed.checkpoint saves)
                    state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                else:
                    state[key] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return state

    # -- state_dict -----------------------------------------------------------------------------------
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict (hooks, param ids, references to the live state tensors), plus rotkern's
        metadata. The saved per-param entries have the live state's keys: the moments of params whose state
        lives in a rotated basis are kept (live and saved) as ``rotated_exp_avg``, ``rotated_exp_avg_sq``, ...,
        which torch.optim optimizers do not find. See :mod:`rotkern.optim._state_dict`."""
        from . import _state_dict

        return _state_dict.pack(self)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (torch semantics: pre-hooks, then the state, then post-hooks).

        Accepts what a rotated optimizer saved with the same rotation settings (any rotkern version), and torch
        optimizers' state for params this optimizer does not rotate (``rotation="none"``); tensors are copied
        onto the params' devices (never shared with ``state_dict``), ``step`` becomes a float32 tensor whatever
        number type it was saved as. Raises ValueError, naming the difference, before anything changes when the
        checkpoint's scope, seed, block size, roles, names (up to wrapper prefixes such as ``module.`` or
        ``_orig_mod.``), parameter shapes or state tensors do not match; the input dict is never modified.
        """
        from . import _state_dict

        state_dict = _state_dict.run_pre_hooks(self, state_dict)
        state, groups = _state_dict.unpack(self, state_dict)
        # In place: svd units stay bound to this state mapping, and the cached units (and the fused kernels'
        # plans built from them) stay valid, since the checkpoint's rotation spec equals this optimizer's.
        self.state.clear()
        self.state.update(state)
        self.param_groups[:] = groups
        for gi, group in enumerate(groups):  # the checkpoint's lists are this group's now (see _reclaim_lists)
            if gi in self._group_lists:
                self._group_lists[gi] = {k: group[k] for k in PER_PARAM_KEYS if k in group}
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _basis_state_shapes(self) -> dict[int, dict[str, tuple[int, ...]]]:
        """id(param) -> {state key: shape} of the bases its dynamic units keep (params of svd/eigen groups only)."""
        out: dict[int, dict[str, tuple[int, ...]]] = {}
        for gi, g in enumerate(self.param_groups):
            if g["rotation"] not in ("svd", "eigen"):
                continue
            for unit in self.units(gi):
                if isinstance(unit.rotation, DynamicRotation):
                    out.setdefault(id(g["params"][unit.params[0]]), {}).update(unit.rotation.state_shapes())
        return out

    # -- testing oracle -------------------------------------------------------------------------------
    def rotation_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense (d, d) orthogonal matrix D with ``vec(state-layout g~) = D vec(g)`` for all groups.

        ``vec`` concatenates every param's flattened values in param-group order; moments are stored in
        the same order, so AdamW run on ``D vec(g)`` with updates mapped back by ``D^T`` is the oracle for
        this optimizer. Only for small models (d <= 4096). svd and eigen units contribute their current bases
        (``kron(L^T, R^T)`` on the matrix's row-major entries), which change every ``svd_every`` /
        ``precondition_every`` steps, and the identity before their first step.
        """
        numels = [_real_numel(p) for g in self.param_groups for p in g["params"]]
        d = sum(numels)
        if d > 4096:
            raise ValueError(f"rotation_matrix(): d={d} > 4096; the dense oracle is for small models only")
        out = torch.zeros(d, d, dtype=dtype)
        offset = 0
        for gi, g in enumerate(self.param_groups):
            gn = [_real_numel(p) for p in g["params"]]
            for unit in self.units(gi):
                idx = unit_index_map(unit, gn) + offset
                if isinstance(unit.rotation, DynamicRotation):
                    flat = idx.reshape(-1)
                    out[flat.unsqueeze(1), flat.unsqueeze(0)] = unit.rotation.dense(dtype)
                    continue
                length = unit.shape[1]
                block = unit.rotation.dense(dtype) if unit.rotation is not None else torch.eye(length, dtype=dtype)
                for row in idx:
                    out[row.unsqueeze(1), row.unsqueeze(0)] = block
            offset += sum(gn)
        return out


def _mixed_dtype_members(units: list[Unit], params: list, grads: list) -> set[int]:
    """Members of multi-param units whose (param, grad) dtypes are not all one pair: they run in fp32."""
    out: set[int] = set()
    for unit in units:
        members = unit.params
        if len(members) < 2:
            continue
        pairs = {(params[i].dtype, None if grads[i] is None else grads[i].dtype) for i in members}
        p_dtypes = {p for p, _ in pairs}
        g_dtypes = {g for _, g in pairs if g is not None}
        if len(p_dtypes) > 1 or len(g_dtypes) > 1:
            out.update(members)
    return out


def _absent_grad_dtype(plan: GroupStep, i: int, widen: set[int]) -> torch.dtype:
    """The dtype of the zero gradient of a member without one: its unit's other grads' (one pair per unit)."""
    if i in widen:
        return torch.float32
    for unit in plan.units:
        if i in unit.params:
            for j in unit.params:
                if plan.grads[j] is not None:
                    return plan.grads[j].dtype.to_real()
    return plan.group["params"][i].dtype.to_real()


def _warn_roles_guessed(gi: int, group: dict) -> None:
    roles = group["roles"]
    counts = {r: roles.count(r) for r in dict.fromkeys(roles)}
    key = ("roles",)
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "rotkern: param group %d (rotation=%r) has no parameter names, so roles were guessed from shapes (%s). "
        "A fused QKV weight or an embedding cannot be recognised without names, and they rotate differently "
        "(paper Sec. 3.1). Pass model.named_parameters(), rotkern.param_groups_for(model), or a 'roles' list. "
        "(Said once per process.)",
        gi,
        group["rotation"],
        ", ".join(f"{r} x{n}" for r, n in counts.items()),
    )


def _normalise_params(params: Iterable) -> list:
    """torch.optim's accepted forms (tensors, dicts, (name, tensor) pairs), without touching the caller's dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + torch.typename(params)
        )
    params = list(params)
    if len(params) == 0:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        return [{"params": params}]
    return [dict(g) if isinstance(g, dict) else g for g in params]


def _rounding_seed(seed: int, gi: int, i: int, step: float) -> int:
    """The seed of one param's stochastic rounding at one step (a SplitMix64-style mix; fits torch's int64)."""
    x = (seed * 0x9E3779B97F4A7C15 + gi * 0xBF58476D1CE4E5B9 + i * 0x94D049BB133111EB + int(step)) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``x`` (fp32) rounded to ``dtype`` stochastically: to the neighbour above with probability
    ``(x - lo) / (hi - lo)``, else to the one below, so that ``E[result] = x``; exact values, inf and NaN are
    kept. Draws from a CPU generator seeded with ``seed`` (the same bits on every device)."""
    nearest = x.to(dtype)
    back = nearest.to(x.dtype)
    toward = torch.where(back > x, torch.full_like(nearest, -float("inf")), torch.full_like(nearest, float("inf")))
    other = torch.nextafter(nearest, toward)
    lo = torch.where(back > x, other, nearest).to(x.dtype)
    hi = torch.where(back > x, nearest, other).to(x.dtype)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(x.shape, generator=gen, dtype=torch.float32).to(x.device)
    p_hi = ((x - lo) / (hi - lo)).nan_to_num(0.0)
    out = torch.where(u < p_hi, hi, lo).to(dtype)
    exact = (back == x) | ~torch.isfinite(x) | ~torch.isfinite(other.to(x.dtype))
    return torch.where(exact, nearest, out)


def _check_dynamic_options(group: dict[str, Any], where: str) -> None:
    """The dynamic scopes' group options, where present (ValueError naming the option and the fix)."""
    for key in ("svd_every", "precondition_every"):
        if key in group:
            check_svd_every(group[key], f"{where}{key}")
    if "max_precond_dim" in group:
        v = group["max_precond_dim"]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{where}max_precond_dim must be a positive int (SOAP's default is 10000), got {v!r}")
    if "shampoo_beta" in group:
        check_hyper("shampoo_beta", group["shampoo_beta"], 0.0, 1.0, where=where)
    if "basis_change" in group and group["basis_change"] not in ("auto",) + BASIS_CHANGES:
        raise ValueError(
            f"{where}basis_change={group['basis_change']!r} is not one of {('auto',) + BASIS_CHANGES} "
            "(what the moments do when a dynamic basis changes; see rotkern.bases)"
        )


def check_svd_every(value: object, name: str = "svd_every") -> int:
    """Validate F, the SVD basis period (a positive int); returns it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int (steps between SVD basis recomputes), got {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1 (the paper uses F = 250)")
    return int(value)


def check_hyper(
    name: str,
    value: float,
    low: float | None = 0.0,
    high: float | None = None,
    high_open: bool = True,
    *,
    where: str = "",
    tensor_name: str | None = None,
) -> None:
    """Raise ValueError for an out-of-range hyperparameter (torch.optim's messages, after ``where``; a tensor
    of more than one element is named ``tensor_name``, torch's name for it, e.g. ``lr``, ``betas[0]``)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{where}Tensor {tensor_name or name} must be 1-element, got {value.numel()} elements")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}Invalid {name}: {value!r} (must be a real number)")
    if low is not None and not value >= low:
        raise ValueError(f"{where}Invalid {name}: {value} (must be >= {low})")
    if high is not None and not (value < high if high_open else value <= high):
        raise ValueError(f"{where}Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
