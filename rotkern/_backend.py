"""Backend selection: which implementation of a fused op runs for a given tensor, from one table.

:data:`BACKEND_TABLE` has, per backend, why it cannot run on a tensor, its launcher (imported on first use), and
what it can do (capturable, GradScaler's tensors in the kernel, moment dtypes, the two-sided kernel of the
dynamic bases); :func:`rotkern.kernels.dispatch.rotated_adamw` reads it. ``auto`` tries :data:`AUTO_ORDER` in
order. A new backend is one kernels file (its launcher, with :func:`rotkern.kernels.reference.rotated_adamw_ref`'s
signature), one :class:`Backend` entry here and its test.

``ROTKERN_BACKEND`` (``auto`` | ``triton`` | ``ext`` | ``eager``) overrides what the caller asked for.
``auto`` picks Triton when it can run on the tensor, else the compiled extension ``rotkern._C`` when it is
built and has a path for the tensor's device, else the eager reference, and logs that choice once; an
explicit ``triton`` or ``ext`` that cannot run raises and says why. Triton and the extension are imported
lazily, so ``import rotkern`` works on machines with neither.

Triton runs on CUDA tensors, or on CPU tensors under the interpreter (``TRITON_INTERPRET=1``, set before
triton is imported). The interpreter is never used for CUDA tensors: rotkern's kernels read pointer
tables, which only hold valid addresses for the memory the program actually runs on.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable

import torch

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_TABLE",
    "Backend",
    "PRECISIONS",
    "can_run_triton",
    "ext_available",
    "interpret_mode",
    "load_ext",
    "resolve_backend",
    "warn_fallback",
    "triton_available",
    "why_not_ext",
    "why_not_triton",
]

# tl.dot input precisions of the fused rotations (here so that callers need not import triton).
PRECISIONS = ("ieee", "tf32x3", "tf32")

log = logging.getLogger("rotkern")
_logged: set[tuple] = set()

# Probed once per process. A plain dict read, not functools.cache: torch.compile ignores that cache and would trace
# (and re-run) the probe inside a compiled step; this way it reads the stored answer as a constant.
_PROBED: dict[str, object] = {}


def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    if "triton" in _PROBED:
        return bool(_PROBED["triton"])
    return _probe_triton()


@torch.compiler.disable
def _probe_triton() -> bool:
    _PROBED["triton"] = ok = _triton_imports()
    return ok


# How to get the extension, whichever way rotkern was installed (a checkout's `make ext` runs the same build).
BUILD_HINT = "build it with: python -m rotkern.build_ext"


def _triton_imports() -> bool:
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


def _ext_import_error() -> str | None:
    if "ext" in _PROBED:
        return _PROBED["ext"]  # type: ignore[return-value]
    return _probe_ext()


@torch.compiler.disable
def _probe_ext() -> str | None:
    _PROBED["ext"] = reason = _ext_probe()
    return reason


def _ext_probe() -> str | None:
    if importlib.util.find_spec("rotkern._C") is None:
        return f"needs the compiled extension rotkern._C, which is not built ({BUILD_HINT})"
    try:
        from . import _C  # noqa: F401  (importing registers torch.ops.rotkern.*)
    except ImportError as e:  # built against another torch, or a missing shared library
        log.warning("rotkern: the compiled extension rotkern._C fails to import: %s", e)
        return f"needs the compiled extension rotkern._C, which fails to import ({e}); rebuild it ({BUILD_HINT})"
    if hasattr(torch.library, "register_fake"):
        # Shape-free and returns nothing: lets torch.compile trace a step that calls the op.
        torch.library.register_fake("rotkern::rotated_adamw_unit_")(lambda *args, **kwargs: None)
    return None


def ext_available() -> bool:
    """True when the compiled extension ``rotkern._C`` imports."""
    return _ext_import_error() is None


def load_ext() -> None:
    """Import ``rotkern._C`` (registering ``torch.ops.rotkern.*``); raise RuntimeError if it cannot."""
    reason = _ext_import_error()
    if reason is not None:
        raise RuntimeError(f"rotkern {reason}")


def why_not_ext(t: torch.Tensor) -> str | None:
    """None when the compiled extension can run on ``t``'s device, else the reason it cannot."""
    reason = _ext_import_error()
    if reason is not None:
        return reason
    if t.device.type != "cpu":
        return f"has a CPU path only; {t.device.type} tensors use the Triton kernels"
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the rotated AdamW step.

    Attributes:
        name: what ``backend=`` and ``ROTKERN_BACKEND`` call it; ``label``: how a fallback message names it.
        why_not: a tensor -> None when the backend can run on its device, else the reason it cannot.
        launcher: ``"module:function"`` of its step, :func:`rotkern.kernels.reference.rotated_adamw_ref`'s
            signature (imported on first use, so that choosing a backend imports neither triton nor the extension).
        options: the keyword arguments beyond the reference's that the launcher takes (the dispatch passes them).
        two_sided: ``"module:function"`` of its step of a dynamic unit with dense bases, or None (such units take
            the eager reference).
        capturable: a CUDA graph can replay its step (it reads nothing on the host).
        scales_in_kernel: it takes GradScaler's ``grad_scale`` / ``found_inf`` as device tensors.
        tensor_hypers: it reads tensor ``lr`` / betas as tensors (else the dispatch passes floats).
        moment_dtypes: the compute dtypes of the moments it keeps.
        op: ``"module:function"`` of its step as a torch.library op, which torch.compile calls without a graph
            break (None: the launcher is called, traced or not per ``in_graph``).
        in_graph: torch.compile may trace into the launcher (False: it runs outside the graph).
    """

    name: str
    label: str
    why_not: Callable[[torch.Tensor], str | None]
    launcher: str
    options: tuple[str, ...] = ()
    two_sided: str | None = None
    capturable: bool = False
    scales_in_kernel: bool = False
    tensor_hypers: bool = False
    moment_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    op: str | None = None
    in_graph: bool = True

    def load(self, which: str = "launcher") -> Callable:
        """The launcher (or ``which="two_sided"`` / ``"op"``: the two-sided step, the op), imported now."""
        path = getattr(self, which)
        fn = _LOADED.get(path)  # a plain dict read: torch.compile takes the loaded function as a constant
        return fn if fn is not None else _import(path)


_LOADED: dict[str, Callable] = {}


@torch.compiler.disable
def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    _LOADED[path] = fn = getattr(importlib.import_module(module), name)
    return fn


def _runs_anywhere(t: torch.Tensor) -> str | None:
    return None


BACKEND_TABLE: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("triton", "Triton", why_not_triton, "rotkern.kernels.rotated_adamw_step:rotated_adamw_step",
                options=("precision", "plan_cache"), two_sided="rotkern.kernels.two_sided_adamw:two_sided_adamw_step",
                capturable=True, scales_in_kernel=True, tensor_hypers=True,
                op="rotkern.kernels.rotated_adamw_step:rotated_adamw_step_op"),
        Backend("ext", "the extension", why_not_ext, "rotkern.kernels.ext:rotated_adamw_step_ext",
                scales_in_kernel=True, tensor_hypers=True),
        Backend("eager", "the eager reference", _runs_anywhere, "rotkern.kernels.reference:rotated_adamw_ref",
                moment_dtypes=(torch.float32, torch.float64), in_graph=False),
    )
}  # fmt: skip
# What backend="auto" tries, in order: the first that can run on the params' device runs.
AUTO_ORDER = ("triton", "ext", "eager")
BACKENDS = ("auto", *BACKEND_TABLE)


def resolve_backend(requested: str, example: torch.Tensor) -> str:
    """The backend that runs: ``"triton"``, ``"ext"`` or ``"eager"``.

    Args:
        requested: ``auto`` | ``triton`` | ``ext`` | ``eager``; the ``ROTKERN_BACKEND`` environment variable
            wins.
        example: a tensor the op will run on (its device decides).
    """
    env = os.environ.get("ROTKERN_BACKEND")
    source = "ROTKERN_BACKEND" if env else "backend"
    choice = env.strip().lower() if env else requested
    if choice not in BACKENDS:
        raise ValueError(f"{source}={choice!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if choice != "auto":
        reason = BACKEND_TABLE[choice].why_not(example)
        if reason is not None:
            raise RuntimeError(f"{source}={choice!r} {reason}; got {example.device} params")
        return choice
    reasons = []  # why the backends before the picked one cannot run
    for name in AUTO_ORDER:
        backend = BACKEND_TABLE[name]
        why = backend.why_not(example)
        if why is None:
            picked = name
            break
        reasons.append(why if not reasons else f"{backend.label} {why}")
    reason = "; ".join(reasons) or None
    if picked == "eager":
        warn_fallback("auto", reason, example.device.type)
        return picked
    key = (picked, example.device.type, reason)
    if key not in _logged:
        _logged.add(key)
        why = f" ({reason})" if reason else ""
        log.info("rotkern: backend 'auto' picked %s for %s tensors%s", picked, example.device.type, why)
    return picked


def warn_fallback(wanted: str, reason: str | None, device: str = "") -> None:
    """Say once, at WARNING, that ``backend='auto'`` runs the eager reference instead of ``wanted``, and why."""
    key = ("eager", wanted, device, reason)
    if key in _logged:
        return
    _logged.add(key)
    where = f" for {device} tensors" if device else ""
    log.warning(
        "rotkern: backend 'auto' runs the eager reference%s instead of %s: %s. The result is the same, slower; "
        "pass backend='eager' to choose it explicitly (and silence this).",
        where,
        "a fused backend" if wanted == "auto" else wanted,
        reason,
    )
