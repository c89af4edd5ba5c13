"""Backend selection: which implementation of a fused op runs for a given tensor.

``ROTKERN_BACKEND`` (``auto`` | ``triton`` | ``eager``) overrides what the caller asked for. ``auto``
picks Triton when it can run on the tensor and the eager reference otherwise, and logs that choice once;
an explicit ``triton`` that cannot run raises and says why. Triton is imported lazily, so ``import
rotkern`` works on machines without it.

Triton runs on CUDA tensors, or on CPU tensors under the interpreter (``TRITON_INTERPRET=1``, set before
triton is imported). The interpreter is never used for CUDA tensors: rotkern's kernels read pointer
tables, which only hold valid addresses for the memory the program actually runs on.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "can_run_triton",
    "interpret_mode",
    "resolve_backend",
    "triton_available",
    "why_not_triton",
]

BACKENDS = ("auto", "triton", "eager")
# tl.dot input precisions of the fused rotations (here so that callers need not import triton).
PRECISIONS = ("ieee", "tf32x3", "tf32")

log = logging.getLogger("rotkern")
_logged: set[tuple] = set()


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else at import
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not_triton(t: torch.Tensor) -> str | None:
    """None when Triton can run on ``t``'s device, else the reason it cannot."""
    if not triton_available():
        return "needs triton, which is not installed (pip install triton)"
    if t.device.type == "cuda":
        if interpret_mode():
            return "cannot use CUDA tensors under TRITON_INTERPRET=1 (the interpreter runs on the CPU)"
        return None
    if t.device.type == "cpu":
        return None if interpret_mode() else "needs CUDA tensors (or TRITON_INTERPRET=1)"
    return f"needs CUDA tensors (or TRITON_INTERPRET=1); {t.device.type} is not supported"


def can_run_triton(t: torch.Tensor) -> bool:
    """True for CUDA tensors when triton imports, or for CPU tensors under ``TRITON_INTERPRET=1``."""
    return why_not_triton(t) is None


def resolve_backend(requested: str, example: torch.Tensor) -> str:
    """The backend that runs: ``"triton"`` or ``"eager"``.

    Args:
        requested: ``auto`` | ``triton`` | ``eager``; the ``ROTKERN_BACKEND`` environment variable wins.
        example: a tensor the op will run on (its device decides).
    """
    env = os.environ.get("ROTKERN_BACKEND")
    source = "ROTKERN_BACKEND" if env else "backend"
    choice = env.strip().lower() if env else requested
    if choice not in BACKENDS:
        raise ValueError(f"{source}={choice!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if choice == "eager":
        return "eager"
    reason = why_not_triton(example)
    if choice == "triton":
        if reason is not None:
            raise RuntimeError(f"{source}='triton' {reason}; got {example.device} params")
        return "triton"
    picked = "triton" if reason is None else "eager"
    key = (picked, example.device.type, reason)
    if key not in _logged:
        _logged.add(key)
        why = f" ({reason})" if reason else ""
        log.info("rotkern: backend 'auto' picked %s for %s tensors%s", picked, example.device.type, why)
    return picked
