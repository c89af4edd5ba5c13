"""A group's rotation units, built from its options and cached per group, and the bookkeeping that keeps them
in step with the group: lists a ZeroRedundancyOptimizer copied in from another rank are put back, a param list
changed in place is followed (or refused where a unit with state would change members), and changed rotation
options are refused once the moments exist.
"""

from __future__ import annotations

from typing import Any

import torch

from ..scopes import DynamicRotation, Unit, build_units, infer_roles
from ._spec import PER_PARAM_KEYS, UNIT_KEYS, freeze, real_shape


class UnitCacheMixin:
    """Units per group (``units()``, ``rotated_params()``), cached in ``_unit_cache`` with the group's members
    and per-param lists (``_group_members``, ``_group_lists``) as they were when the units were built."""

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
        spec = tuple(freeze(v) for v in values)
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
        spec = tuple(freeze(v) for v in values)
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
