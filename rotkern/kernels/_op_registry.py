"""Step contexts by key: what the compiled step's torch.library op needs besides tensors and numbers.

A compiled graph can only carry tensors and plain scalars; the fused step also needs a param group's units and
the cache of its kernel tables (:class:`rotkern.kernels._rotated_adamw_plan.PlanCache`). The caller keeps one
:class:`StepContext` holding both, its ``units`` a live mapping group -> units (the caller's own unit cache, shared
by reference, so units rebuilt later are the ones read), and passes its integer key and the group to the op, which
reads the context here: data, not a call back into the caller. Entries are weak: a context that its owner dropped
disappears with it.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["StepContext", "lookup"]

_CONTEXTS: weakref.WeakValueDictionary[int, StepContext] = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


class StepContext:
    """An optimizer's units per group (``units[group]``) and kernel plan cache, under a key the op carries (``key``,
    given at creation)."""

    def __init__(self, units: Mapping[int, Sequence] | None = None, plans: Any = None) -> None:
        self.units = units if units is not None else {}
        self.plans = plans
        self.key = next(_NEXT)
        _CONTEXTS[self.key] = self

    def __deepcopy__(self, memo: dict) -> StepContext:
        return StepContext()  # a copy gets its own key; its owner refills it before its first launch

    def __reduce__(self):
        return (StepContext, ())


def lookup(key: int) -> StepContext:
    """The live context of ``key``; RuntimeError if its owner dropped it (a graph outliving its optimizer)."""
    context = _CONTEXTS.get(key)
    if context is None:
        raise RuntimeError(
            f"rotkern step context {key} is gone: a compiled step was run after its optimizer was deleted; compile "
            "the new optimizer's step"
        )
    return context
