"""Counting host reads of tensor values on the CPU: the calls that would synchronise with a GPU (``.item()``,
``bool()``, ``float()`` of a tensor all reach ``aten._local_scalar_dense``), seen by a dispatch mode. Ops that run
inside another op (a C++ kernel reading its own arguments) are not seen: the mode sees only what Python asks."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count`` (and ``reads.ops``: what was read, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
