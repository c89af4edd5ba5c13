"""``rotated_adamw``: the functional rotated AdamW step that every optimizer calls (paper Alg 4, and Alg 5 /
SOAP for the dynamic bases), with the implementation chosen from :data:`rotkern._backend.BACKEND_TABLE`.

The optimizers (:class:`rotkern.RotatedAdamW`, :class:`rotkern.FusedRotatedAdamW`) own the state and the checks;
this function owns which code steps which unit:

- static units (none, global, layer, output, input, hadamard scopes): the backend's launcher; under
  ``torch.compile`` with a :class:`~rotkern.kernels._op_registry.StepContext`, the backend's torch.library op;
- dynamic units (svd, eigen): the bases' lifecycle (:func:`rotkern.bases.step_dynamic_units`) around the
  backend's two-sided step where it has one and the unit fits it, else the eager reference.

The signature is :func:`rotkern.kernels.reference.rotated_adamw_ref`'s plus ``backend`` and the fused options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from .._backend import BACKEND_TABLE, Backend, resolve_backend
from ..bases import BasisOptions, DynamicRotation, UnitStep, step_dynamic_units
from ..scopes import Unit
from ._op_registry import StepContext
from .reference import advance_steps, flat_views

__all__ = ["StepRun", "rotated_adamw"]


@dataclasses.dataclass
class StepRun:
    """What one call ran: the backends, in order (``"eager"`` where any unit took the eager reference), and the
    unit steps of the two-sided kernel."""

    backends: list[str] = dataclasses.field(default_factory=list)
    two_sided_steps: int = 0


def rotated_adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    state_steps: Sequence[torch.Tensor],
    units: Sequence[Unit],
    *,
    backend: str = "eager",
    svd_bases: Sequence[MutableMapping[str, torch.Tensor] | None] | None = None,
    svd_every: int = 250,
    precondition_every: int = 10,
    shampoo_beta: float = 0.95,
    basis_change: str = "auto",
    basis_stats: MutableMapping[str, int] | None = None,
    precision: str = "tf32x3",
    plan_cache: Any = None,
    context: StepContext | None = None,
    group: int = 0,
    active: Sequence[int] | None = None,
    sides_cache: dict | None = None,
    **hyper: Any,
) -> StepRun:
    """One rotated AdamW step, in place, for ``units`` of one param group.

    Args:
        params ... units, svd_bases ... basis_stats, and ``hyper`` (lr, beta1, beta2, eps, weight_decay,
            decay_mask, amsgrad, maximize, and grad_scale / found_inf where the backend scales in its kernels):
            as :func:`rotkern.kernels.reference.rotated_adamw_ref` (lr and the betas may be tensors; backends
            that read them on the host get floats).
        backend: a name of :data:`rotkern._backend.BACKENDS` (``auto`` is resolved on ``params``' first member).
        precision, plan_cache: the Triton kernels' ``tl.dot`` precision and their plan cache (backends whose
            ``options`` name them).
        context, group, active: under ``torch.compile``, the optimizer's step context, the group's index and the
            indices of ``units`` in ``context.units[group]``: the static units then run as the backend's
            torch.library op (one op, no graph break). Pass them only when ``units`` are all the group's active
            units of one device (not DTensor shards).
        sides_cache: a dict the caller keeps, where dense bases the two-sided step forms (svd sides kept as
            reflectors) are cached until the bases change.
    Returns:
        :class:`StepRun`.
    Raises:
        RuntimeError / ValueError: as the chosen launcher (nothing is checked twice here).
    """
    if backend == "auto":
        backend = resolve_backend("auto", params[units[0].params[0]])
    entry = BACKEND_TABLE[backend]
    run = StepRun([entry.name])
    state = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    dynamic = [u for u in units if isinstance(u.rotation, DynamicRotation)]
    if dynamic:
        opts = BasisOptions(svd_every, precondition_every, shampoo_beta, basis_change, basis_stats)
        fits = [entry.two_sided is not None and u.rotation.fits_two_sided_kernel() for u in dynamic]
        fused = [u for u, ok in zip(dynamic, fits, strict=True) if ok]
        eager = [u for u, ok in zip(dynamic, fits, strict=True) if not ok]
        if fused:
            run.two_sided_steps += _two_sided(entry, *state, fused, opts=opts, svd_bases=svd_bases,
                                              precision=precision, sides_cache=sides_cache, **hyper)  # fmt: skip
        if eager:
            dyn = dict(svd_bases=svd_bases, svd_every=svd_every, precondition_every=precondition_every,
                       shampoo_beta=shampoo_beta, basis_change=basis_change, basis_stats=basis_stats)  # fmt: skip
            _launch(BACKEND_TABLE["eager"], *state, eager, **hyper, **dyn)
            run.backends.append("eager")
        units = [u for u in units if not isinstance(u.rotation, DynamicRotation)]
    if not units:
        return run
    if entry.op is not None and context is not None and not dynamic and torch.compiler.is_compiling():
        _compiled_op(entry, *state, units, context=context, group=group, active=active, precision=precision,
                     **hyper)  # fmt: skip
    else:
        options = {"precision": precision, "plan_cache": plan_cache}
        _launch(entry, *state, units, **hyper, **{k: options[k] for k in entry.options})
    return run


def _launch(entry: Backend, *args: Any, lr: Any, beta1: Any, beta2: Any, **kwargs: Any) -> None:
    if not entry.tensor_hypers:
        lr, beta1, beta2 = (x.item() if torch.is_tensor(x) else float(x) for x in (lr, beta1, beta2))
    fn = entry.load()
    call = _outside_graph if not entry.in_graph else _call
    call(fn, *args, lr=lr, beta1=beta1, beta2=beta2, **kwargs)


def _call(fn, *args: Any, **kwargs: Any) -> None:
    fn(*args, **kwargs)


# Under torch.compile(opt.step) the eager reference runs outside the graph: it reads each unit's step count and
# builds rotations on the host (a graph break per unit), and Dynamo's automatic dynamic shapes over those many
# small frames fail in torch's guard code ("sources must not be empty") once two optimizers compile their steps.
_outside_graph = torch._disable_dynamo(_call)


def _compiled_op(
    entry: Backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, *, context, group,
    active, precision, lr, beta1, beta2, eps, weight_decay, decay_mask=None, amsgrad=False, maximize=False,
    grad_scale=None, found_inf=None,
) -> None:  # fmt: skip
    """The step as one torch.library op (``entry.op``): the compiled step reads lr, betas and GradScaler's tensors
    in the kernels, and finds the units and plan cache in ``context`` by its key."""
    op = entry.load("op")
    touched = list(dict.fromkeys(i for u in units for i in u.params))

    def pick(xs):
        return [xs[i] for i in touched] if xs is not None else []

    scalars = [x if torch.is_tensor(x) else None for x in (lr, beta1, beta2)] + [grad_scale, found_inf]
    floats = [0.0 if torch.is_tensor(x) else float(x) for x in (lr, beta1, beta2)] + [eps, weight_decay]
    op(
        pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else [],
        pick(state_steps), scalars, [float(f) for f in floats], context.key, group, precision, list(active),
        len(params),
        [] if decay_mask is None else [int(bool(d)) for d in decay_mask], bool(amsgrad), bool(maximize),
    )  # fmt: skip


# Under torch.compile the dynamic units' step runs outside the graph (their basis management is host code, and the
# two-sided kernel is not a torch.library op): a graph break, not a trace into the launcher.
@torch.compiler.disable
def _two_sided(
    entry: Backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, *, opts, svd_bases,
    precision, sides_cache, lr, beta1, beta2, eps, weight_decay, decay_mask=None, amsgrad=False, maximize=False,
) -> int:  # fmt: skip
    """The dynamic units with dense bases: the bases' lifecycle around ``entry``'s two-sided step; returns the
    number of unit steps it ran."""
    step_fn = entry.load("two_sided")
    lr, beta1, beta2 = (x.item() if torch.is_tensor(x) else float(x) for x in (lr, beta1, beta2))
    p_flat, g_flat = flat_views(params), flat_views(grads)
    moment_flats = [flat_views(exp_avgs), flat_views(exp_avg_sqs)] + ([flat_views(max_exp_avg_sqs)] if amsgrad else [])
    advance_steps(state_steps, units)
    steps = 0

    def adam(s: UnitStep) -> None:
        nonlocal steps
        left, right = _kernel_sides(s, params[s.param], svd_bases[s.param], sides_cache)
        step_fn(
            s.unit.view(p_flat), s.unit.view(g_flat).contiguous(), s.moments[0], s.moments[1],
            s.moments[2] if amsgrad else None, left, right, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=s.step, decay=decay_mask is None or bool(decay_mask[s.param]),
            amsgrad=amsgrad, maximize=maximize, g_rot=s.g_rot, precision=precision,
        )  # fmt: skip
        steps += 1

    step_dynamic_units(units, g_flat, moment_flats, state_steps, svd_bases, opts=opts, maximize=maximize,
                       adam=adam, rotate=False)  # fmt: skip
    return steps


def _kernel_sides(s: UnitStep, param: torch.Tensor, store, cache: dict | None):
    """The unit's dense L, R for the two-sided kernel. Sides the rotation forms (svd reflectors) are formed once
    per basis change: the cache entry holds the stored tensors themselves and their version counters, so a
    recompute (an in-place copy) or a load_state_dict (new tensors) misses, and a stale entry is never reused."""
    rot = s.unit.rotation
    if not rot.kernel_sides_formed or cache is None:
        return rot.kernel_sides(s.bases)
    key = (id(param), rot.piece)  # one entry per param piece: replaced, never piled up
    stored = tuple(store[k] for k in rot.state_shapes())
    versions = tuple(t._version for t in stored)
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(stored) and all(a is b for a, b in zip(hit[0], stored, strict=True)) \
            and hit[1] == versions:  # fmt: skip
        return hit[2]
    sides = rot.kernel_sides(s.bases)
    cache[key] = (stored, versions, sides)
    return sides
