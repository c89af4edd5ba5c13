"""Handles by which a torch.library op finds its caller's Python-side context (rotation units, plan caches).

A compiled graph can only carry tensors and plain scalars; the fused step also needs the units and the caller's
cached kernel tables. The caller (an optimizer) registers itself once and passes the integer handle to the op,
which looks the caller up here at run time. Entries are weak: a collected caller's handle disappears with it.
"""

from __future__ import annotations

import itertools
import weakref

_OWNERS: dict[int, weakref.ref] = {}
_NEXT = itertools.count(1)


def register(owner: object) -> int:
    """A new handle for ``owner`` (held weakly)."""
    handle = next(_NEXT)
    _OWNERS[handle] = weakref.ref(owner, lambda _, h=handle: _OWNERS.pop(h, None))
    return handle


def lookup(handle: int) -> object:
    """The live owner of ``handle``; RuntimeError if it was collected (a graph outliving its optimizer)."""
    ref = _OWNERS.get(handle)
    owner = None if ref is None else ref()
    if owner is None:
        raise RuntimeError(
            f"rotkern op handle {handle} has no live optimizer: a compiled step was run after its optimizer was "
            "deleted; compile the new optimizer's step"
        )
    return owner
