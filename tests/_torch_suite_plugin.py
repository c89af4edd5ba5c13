"""A pytest plugin that registers rotkern's optimizers in PyTorch's own optimizer test database, before
pytorch's ``test/test_optim.py`` is collected (its ``@optims(optim_db)`` tests are generated at import).

Each entry is derived from torch's ``torch.optim.AdamW`` ``OptimizerInfo`` (same inputs, error inputs,
schedulers, decorators and skips); only the class differs: ``RotatedAdamW`` and ``FusedRotatedAdamW`` with
``rotation="none"``, ``"global"`` (block size 4, so the suite's small params are really rotated) and
``"output"``, and ``supported_impls`` without ``differentiable``. Used by ``tests/test_torch_optim_suite.py``;
load it with ``-p tests._torch_suite_plugin``.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch.testing._internal import common_optimizers

from rotkern import FusedRotatedAdamW, RotatedAdamW

# Entry name -> (class, rotation options). The names are single tokens (no "_"), as the suite's test names
# join the optimizer's class name to the test's with underscores.
VARIANTS = {
    "RotatedAdamWNone": (RotatedAdamW, {"rotation": "none"}),
    "RotatedAdamWGlobal": (RotatedAdamW, {"rotation": "global", "block_size": 4}),
    "RotatedAdamWOutput": (RotatedAdamW, {"rotation": "output", "block_size": 4}),
    "FusedRotatedAdamWNone": (FusedRotatedAdamW, {"rotation": "none"}),
    "FusedRotatedAdamWGlobal": (FusedRotatedAdamW, {"rotation": "global", "block_size": 4}),
    "FusedRotatedAdamWOutput": (FusedRotatedAdamW, {"rotation": "output", "block_size": 4}),
}


def _variant(name: str, base: type, fixed: dict) -> type:
    """A subclass of ``base`` whose rotation options default to ``fixed`` (module-level, so it pickles)."""

    def __init__(self, params, *args, **kwargs):
        for key, value in fixed.items():
            kwargs.setdefault(key, value)
        base.__init__(self, params, *args, **kwargs)

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    setattr(sys.modules[__name__], name, cls)
    return cls


def _register() -> None:
    db = common_optimizers.optim_db
    if any(info.optim_cls.__name__ in VARIANTS for info in db):
        return
    adamw = next(info for info in db if info.optim_cls is torch.optim.AdamW)
    for name, (base, fixed) in VARIANTS.items():
        info = copy.copy(adamw)
        info.optim_cls = _variant(name, base, fixed)
        # Autograd through the step is not offered (differentiable=True is refused, naming the flag): the suite
        # then generates no differentiable inputs for these entries, as for torch optimizers without it.
        info.supported_impls = tuple(i for i in adamw.supported_impls if i != "differentiable")
        db.append(info)


_register()
