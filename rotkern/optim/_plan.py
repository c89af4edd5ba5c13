"""Step planning: before a step mutates anything, every group is checked and what its step does is decided
(which units have a gradient, which of their members lack one, which zero-size params only count the step, the
backend), as a :class:`GroupStep` per group that steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..scopes import Unit
from . import _sharded


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


class StepPlanMixin:
    """``_plan_steps`` (checks only, nothing mutated) and the ``_plan_backend`` hook subclasses fill in."""

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
