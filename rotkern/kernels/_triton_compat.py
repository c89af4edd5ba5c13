"""Workarounds for bugs of supported Triton versions, each applied only where the bug is. Importing applies them.

Interpreter: a scalar tensor as a Python int (triton-lang/triton#9171). Under ``TRITON_INTERPRET=1`` a value
loaded from memory, such as the block size ``nb`` that bounds the kernels' K loops (``range(0, nb, BLOCK_K)``),
is a 1-element 1-D numpy array, and the interpreter's ``tensor.__index__`` is ``int(array)``. numpy 2.4 no
longer converts arrays of ndim > 0 to scalars, so on Triton 3.6 (the GPU machine's) every rotated launch raises
``TypeError: only 0-dimensional arrays can be converted to Python scalars``. Triton 3.9 squeezes first (#9172);
the shim does the same, through the interpreter's own patch scope, so it is undone with Triton's patches after
each launch. Applied only under the interpreter, with numpy >= 2.4, on Triton < 3.9 whose interpreter still has
the unsqueezed conversion; elsewhere importing this module changes nothing.
"""

from __future__ import annotations

import inspect
import re

import numpy as np

from .._backend import interpret_mode

__all__ = ["apply", "needs_scalar_index_fix"]

_UNFIXED_INDEX = '"__index__", lambda self: int(self.handle.data))'


def _version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string, ignoring local and pre-release suffixes."""
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def needs_scalar_index_fix() -> bool:
    """True when this process runs Triton's interpreter with the ``__index__`` of triton-lang/triton#9171."""
    if not interpret_mode() or _version(np.__version__) < (2, 4):
        return False
    import triton

    if _version(triton.__version__) >= (3, 9):
        return False
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_rotkern_fixed", False):
        return False
    try:
        source = inspect.getsource(patch)
    except (OSError, TypeError):  # no source (a frozen install): cannot tell, leave Triton alone
        return False
    # The scope-based patching of Triton 3.6 is the structure the shim extends.
    return _UNFIXED_INDEX in source and "scope" in inspect.signature(patch).parameters


def _fix_scalar_index() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Registered after Triton's own: the scope restores in reverse, so both are undone after the launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._rotkern_fixed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def apply() -> list[str]:
    """Apply every workaround this process needs (idempotent); the names of those applied now."""
    applied = []
    if needs_scalar_index_fix():
        _fix_scalar_index()
        applied.append("triton#9171: interpreter scalar __index__ under numpy >= 2.4")
    return applied


APPLIED = apply()
