"""FusedRotatedAdamW: RotatedAdamW with the step fused into Triton kernels (``rotated_adamw_step``), or into the
compiled extension's CPU kernel (``rotated_adamw_step_ext``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .._backend import BACKENDS, PRECISIONS, resolve_backend
from ..scopes import SvdRotation
from .rotated_adamw import RotatedAdamW

__all__ = ["FusedRotatedAdamW"]


class FusedRotatedAdamW(RotatedAdamW):
    """:class:`rotkern.RotatedAdamW` whose step runs as a few fused Triton launches per param group.

    Same arguments, defaults, state keys and ``state_dict`` format as :class:`RotatedAdamW`, so checkpoints
    move between the two both ways. Differences: ``state["step"]`` lives on the param's device (the
    kernels read it there), and a tensor ``lr`` is read on the device, so a step never syncs with the host.

    Args (keyword-only, beyond RotatedAdamW's):
        precision: ``tl.dot`` input precision of the rotations: ``tf32x3`` (default: fp32-level accuracy on
            tensor cores), ``ieee`` (true fp32, slow on tensor-core GPUs) or ``tf32`` (fastest; about 1e-3
            relative error in the rotated gradient).
        backend: ``auto`` (Triton where it can run, else the compiled extension where it is built and has a
            path for the device, else the eager reference; logged once), ``triton`` or ``ext`` (raise if it
            cannot run) or ``eager``. The ``ROTKERN_BACKEND`` environment variable overrides it.

    The Triton path needs every param of a group on one CUDA device (or the CPU under
    ``TRITON_INTERPRET=1``), contiguous params and grads, and fp32 moments (``compute_dtype=torch.float64``
    runs the eager reference under ``auto``).

    ``rotation="svd"`` (paper Alg 5): the svd units (the group's matrices) always run the eager reference,
    whatever ``backend`` says: their cost is the SVD and two matmuls / Householder products per matrix, torch
    ops that cuSOLVER / cuBLAS run anyway. The group's other units (1-D params) take the selected backend as
    in the other scopes; each param is stepped once. A step that ran svd units sets ``backend_used`` to
    ``"eager"``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        precision: str = "tf32x3",
        backend: str = "auto",
        **kwargs,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
        if backend in ("triton", "ext") and kwargs.get("compute_dtype", torch.float32) != torch.float32:
            raise ValueError(
                f"backend={backend!r} keeps fp32 moments; compute_dtype=torch.float64 needs backend='eager'"
            )
        self.precision = precision
        self.backend = backend
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self._plans = None  # per-optimizer cache of the kernels' metadata, made on the first Triton step
        self.backend_used: str | None = None  # what the last step ran: "triton", "ext" or "eager"

    def _step_device(self, p: torch.Tensor) -> torch.device:
        return p.device

    def _rotated_adamw(
        self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, **kwargs
    ) -> None:
        svd_kwargs = {k: kwargs.pop(k) for k in ("svd_bases", "svd_every") if k in kwargs}
        svd_units = [u for u in units if isinstance(u.rotation, SvdRotation)]
        if svd_units:
            # rotation="svd": the matrices run the eager reference (SVD, matmuls); the rest of the group goes on
            # below. svd units cover whole params, never shared with another unit: each param steps once.
            state = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            super()._rotated_adamw(group, *state, svd_units, **kwargs, **svd_kwargs)
            units = [u for u in units if not isinstance(u.rotation, SvdRotation)]
            self.backend_used = "eager"
            if not units:
                return
        args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units)
        backend = resolve_backend(self.backend, params[units[0].params[0]])
        if backend != "eager" and self.compute_dtype != torch.float32:
            if os.environ.get("ROTKERN_BACKEND") or self.backend != "auto":
                raise RuntimeError(
                    f"the {backend} step keeps fp32 moments; compute_dtype=torch.float64 needs the eager backend"
                )
            backend = "eager"  # only the reference keeps fp64 moments
        self.backend_used = "eager" if svd_units else backend
        if backend == "eager":
            super()._rotated_adamw(group, *args, **kwargs)
            return
        if backend == "ext":
            from ..kernels.ext import rotated_adamw_step_ext

            rotated_adamw_step_ext(*args, **kwargs)
            return
        from ..kernels._rotated_adamw_plan import PlanCache
        from ..kernels.rotated_adamw_step import rotated_adamw_step  # imports triton: only on this path

        if self._plans is None:
            self._plans = PlanCache()
        # A few plans per group: the set of units with grads can change from step to step.
        self._plans.maxsize = max(self._plans.maxsize, 4 * len(self.param_groups) + 4)
        rotated_adamw_step(*args, precision=self.precision, plan_cache=self._plans, **kwargs)
