"""Matrix decompositions of the dynamic bases, with fallbacks and batching (see :mod:`rotkern.bases`).

:func:`robust_decomposition` retries a failed decomposition in float64, then on the CPU, and counts every
fallback; :func:`batched_decompositions` runs those of equal kind and shape as one batched call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, MutableMapping

import torch

__all__ = ["BATCH_ON_CPU", "DECOMPOSITIONS", "batched_decompositions", "count_fallback", "robust_decomposition"]

log = logging.getLogger("rotkern")


def robust_decomposition(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    x: torch.Tensor,
    what: str,
    stats: MutableMapping[str, int] | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """``fn(x)`` in x's dtype, else in float64, else in float64 on the CPU; None when all three fail.

    Results come back in x's dtype and device. A result with non-finite values counts as a failure (cuSOLVER can
    return NaN instead of raising). ``stats`` gets ``fallback_float64``, ``fallback_cpu`` or ``basis_kept`` counted
    up; every fallback is logged at WARNING with ``what`` (the unit) in the message.
    """
    tries = [(x.dtype, x.device, None), (torch.float64, x.device, "fallback_float64")]
    if x.device.type != "cpu":
        tries.append((torch.float64, torch.device("cpu"), "fallback_cpu"))
    elif x.dtype == torch.float64:
        tries = tries[:1]
    reason = ""
    for dtype, device, counter in tries:
        try:
            out = fn(x.to(dtype=dtype, device=device))
        except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
            reason = str(err).splitlines()[0]
            continue
        if not all(bool(torch.isfinite(t).all()) for t in out):
            reason = "non-finite result"
            continue
        if counter is not None:
            count_fallback(stats, counter)
            log.warning("rotkern: %s: decomposition failed (%s); succeeded in %s on %s", what, reason, dtype, device)
        return tuple(t.to(dtype=x.dtype, device=x.device) for t in out)
    count_fallback(stats, "basis_kept")
    log.warning("rotkern: %s: decomposition failed in every dtype and device (%s); the previous basis is kept", what,
                reason)  # fmt: skip
    return None


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.linalg.svd(a, full_matrices=False)


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.linalg.eigh(a)


def _qr_q(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (torch.linalg.qr(a)[0],)


# The decompositions the dynamic bases run, by kind; each takes (..., k, w) and returns a tuple of tensors.
DECOMPOSITIONS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "svd": _svd,
    "eigh": _eigh,
    "qr": _qr_q,
}


# LAPACK loops over a batch anyway, and stacking costs a copy: on the CPU a batched QR of 8 1024 x 1024 matrices
# took 636 ms against 591 ms for a loop (1 thread), and an eigen refresh step 13 % longer. Batches run on GPUs
# only (one cuSOLVER call instead of one launch per matrix); the CPU decomposes one by one.
BATCH_ON_CPU = False


def batched_decompositions(
    jobs: list[tuple[Hashable, str, torch.Tensor, str]], stats: MutableMapping[str, int] | None = None
) -> dict[Hashable, tuple[torch.Tensor, ...] | None]:
    """Run decompositions, those of equal kind, shape, dtype and device as one batched call (not on the CPU unless
    :data:`BATCH_ON_CPU`).

    Args:
        jobs: (key, kind, x, what): ``kind`` one of :data:`DECOMPOSITIONS`, ``x`` a (k, w) matrix, ``what`` the
            unit, for log messages.
    Returns:
        {key: the decomposition's tensors (views into the batch's results), or None where it failed
        everywhere}. A job alone in its batch, and any item of a batch that raised or came back non-finite, runs
        :func:`robust_decomposition` (same fallbacks, same ``stats`` counts as unbatched).
    """
    groups: dict[tuple, list[tuple[Hashable, str, torch.Tensor, str]]] = {}
    for job in jobs:
        x = job[2]
        groups.setdefault((job[1], tuple(x.shape), x.dtype, x.device), []).append(job)
    out: dict[Hashable, tuple[torch.Tensor, ...] | None] = {}
    for (kind, _, _, device), items in groups.items():
        fn = DECOMPOSITIONS[kind]
        if len(items) > 1 and (device.type != "cpu" or BATCH_ON_CPU):
            try:
                res = fn(torch.stack([x for _, _, x, _ in items]))
            except RuntimeError:  # one bad matrix fails the whole call: every item retries alone below
                res = None
            if res is not None:
                finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in res]).all(0).tolist()
                for i, (key, *_rest) in enumerate(items):
                    if finite[i]:
                        out[key] = tuple(t[i] for t in res)
                items = [item for item, ok in zip(items, finite, strict=True) if not ok]
        for key, _, x, what in items:
            out[key] = robust_decomposition(fn, x, what, stats)
    return out


def count_fallback(stats: MutableMapping[str, int] | None, key: str) -> None:
    """Count one ``key`` fallback in ``stats`` (the optimizer's ``basis_stats``; None: not counted)."""
    if stats is not None:
        stats[key] = stats.get(key, 0) + 1
