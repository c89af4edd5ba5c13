"""The one loop that steps the dynamic units of a param group: the eager and the fused step both run it.

Per step: the decompositions of every unit first, batched across units (:func:`prefetch_decompositions`), then
per unit :meth:`~rotkern.bases.DynamicRotation.before_step`, the caller's Adam step (``adam``), and
:meth:`~rotkern.bases.DynamicRotation.after_step`. The caller owns the Adam maths (the eager reference, or a
fused kernel); this module owns the order around it, which is the same for every family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._decompose import batched_decompositions
from ._dynamic import BasisOptions, DynamicRotation

if TYPE_CHECKING:  # a unit is duck-typed here (rotations and bases come before scopes in the layering)
    from ..scopes import Unit

__all__ = ["UnitStep", "prefetch_decompositions", "step_dynamic_units"]


@dataclasses.dataclass
class UnitStep:
    """One dynamic unit's Adam step, as :func:`step_dynamic_units` hands it to the caller.

    Attributes:
        unit: the unit (:class:`rotkern.scopes.Unit`); ``param`` its param's index in the group's lists.
        g: its (k, w) gradient in the compute dtype, negated under maximize.
        g_rot: g~ = L^T g R, or a g~ that is not that product (the padded S of an svd recompute); None where the
            caller asked for ``rotate=False`` and g~ is the product (a fused caller computes it).
        bases: the unit's current bases (views into the param's state).
        step: the step count for the bias corrections (the param's step minus ``basis_reset_at``).
        moments: [m, v] (+ amsgrad's max): views of the unit's moments, in the rotated layout.
    """

    unit: Any
    param: int
    g: torch.Tensor
    g_rot: torch.Tensor | None
    bases: dict[str, torch.Tensor]
    step: float
    moments: list[torch.Tensor]


def prefetch_decompositions(
    units: Sequence[Unit],
    grads: Sequence[torch.Tensor],
    stores: Sequence[MutableMapping[str, torch.Tensor]],
    steps: Sequence[float],
    opts: BasisOptions,
) -> list[dict | None]:
    """Every decomposition the dynamic ``units`` of one step will run (their :meth:`DynamicRotation.jobs`),
    computed up front, batched across units of equal shape (:func:`rotkern.bases.batched_decompositions`).

    Args (per unit, aligned with ``units``): ``grads``, the unit's (k, w) gradient as the step uses it (compute
    dtype, negated under maximize); ``stores``, its param's basis store; ``steps``, the param's step after this
    step's increment.
    Returns:
        per unit, None or the ``decomposed`` argument of its ``before_step`` / ``after_step``. Each holds the
        results of one unit, so what a step computes is the same as unbatched up to the batched call's rounding.
    """
    jobs: list = []
    plans: list[tuple[int, Callable[[dict], dict]]] = []
    for ui, unit in enumerate(units):
        planned = unit.rotation.jobs(grads[ui], stores[ui], int(steps[ui]), opts)
        if planned is None:
            continue
        keyed, assemble = planned
        jobs += [((ui, key), *job) for key, job in keyed.items()]
        plans.append((ui, assemble))
    out: list[dict | None] = [None] * len(units)
    if not jobs:
        return out
    per_unit: dict[int, dict] = {}
    for (ui, key), res in batched_decompositions(jobs, opts.stats).items():
        per_unit.setdefault(ui, {})[key] = res
    for ui, assemble in plans:
        out[ui] = assemble(per_unit.get(ui, {}))
    return out


def step_dynamic_units(
    units: Sequence[Unit],
    g_flat: Sequence[torch.Tensor],
    moment_flats: Sequence[Sequence[torch.Tensor]],
    state_steps: Sequence[torch.Tensor],
    stores: Sequence[MutableMapping[str, torch.Tensor] | None] | None,
    *,
    opts: BasisOptions,
    maximize: bool,
    adam: Callable[[UnitStep], None],
    rotate: bool = True,
) -> None:
    """Step the dynamic units of one param group: bases before, ``adam(UnitStep)``, bases after, per unit.

    Args:
        units: units whose rotation is a :class:`DynamicRotation`; they cover whole params, none shared with
            another unit of the step (the pieces of a param, e.g. q, k, v, each a unit, step one after the other).
        g_flat: per param, the flat gradient (any float dtype).
        moment_flats: [m, v] (+ amsgrad's max), each per param, flat, in the compute dtype.
        state_steps: per param, the step count, already advanced for this step.
        stores: per param, the mapping that holds its bases (the param's optimizer state).
        opts: the group's :class:`BasisOptions`; ``maximize``: g is negated before everything.
        adam: the Adam step of one unit (the eager reference's maths, or a fused kernel).
        rotate: False: ``UnitStep.g_rot`` is None wherever it would be ``L^T g R``.
    Raises:
        ValueError: a unit's param has no store, or an svd unit has no bases to continue from.
    """
    grads, unit_stores, steps = [], [], []
    for unit in units:
        i = unit.params[0]
        g = unit.view(g_flat).to(moment_flats[0][i].dtype)
        grads.append(-g if maximize else g)
        unit_stores.append(_store(stores, i))
        steps.append(float(state_steps[i]))
    pre = prefetch_decompositions(units, grads, unit_stores, steps, opts)
    reset_at: dict[int, float] = {}
    for ui, unit in enumerate(units):
        rot: DynamicRotation = unit.rotation
        i, g, store, step = unit.params[0], grads[ui], unit_stores[ui], steps[ui]
        moments = [unit.view(flat) for flat in moment_flats]
        rotated = rot.before_step(g, store, step, opts=opts, moments=moments, rotate=rotate, decomposed=pre[ui])
        if rotated is None:
            continue
        g_rot, bases = rotated
        # After a reset the bias corrections count from the basis change: read once per param and step, after an
        # svd recompute (which resets at the start of the step) and before an eigen refresh (at its end), so every
        # piece of a param counts alike.
        if i not in reset_at:
            reset_at[i] = float(store.get("basis_reset_at", 0.0))
        adam(UnitStep(unit, i, g, g_rot, bases, step - reset_at[i], moments))
        rot.after_step(g, bases, store, step, opts=opts, moments=moments, decomposed=pre[ui])


def _store(stores, param: int) -> MutableMapping[str, torch.Tensor]:
    store = None if stores is None else stores[param]
    if store is None:
        raise ValueError(
            "rotated_adamw_ref: svd and eigen units need svd_bases (a mapping per parameter to keep the bases in)"
        )
    return store
