"""FusedRotatedAdamW: RotatedAdamW with the step fused into Triton kernels (``rotated_adamw_step``), or into the
compiled extension's CPU kernel (``rotated_adamw_step_ext``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .._backend import BACKENDS, PRECISIONS, resolve_backend, warn_fallback
from ..bases import DynamicRotation
from ._base import GroupStep
from .rotated_adamw import RotatedAdamW

__all__ = ["FusedRotatedAdamW"]

# The reference's arguments that only its dynamic-basis units read.
_DYNAMIC_ARGS = ("svd_bases", "svd_every", "precondition_every", "shampoo_beta", "basis_change", "basis_stats")


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

    The fused backends run one device per param group (CUDA for Triton, or the CPU under ``TRITON_INTERPRET=1``;
    the CPU for the extension) and fp32 moments. Under ``auto`` a group they cannot run (params on several
    devices, ``compute_dtype=torch.float64``) takes the eager reference, said once at WARNING; an explicit
    backend raises before anything changes. Non-contiguous params and global units that mix dtypes are staged
    through contiguous (fp32) temporaries by the shared base class, so every backend runs them.

    ``rotation="svd"`` (paper Alg 5) and ``rotation="eigen"`` (SOAP): their units (the group's matrices) run
    the eager reference, whatever ``backend`` says: their cost is the decomposition and two matmuls /
    Householder products per matrix, torch ops that cuSOLVER / cuBLAS run anyway. The group's other units (1-D
    params) take the selected backend as in the other scopes; each param is stepped once. A step that ran such
    units sets ``backend_used`` to ``"eager"``.
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

    _config_attrs = ("compute_dtype", "precision", "backend")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("precision", "tf32x3")
        self.__dict__.setdefault("backend", "auto")
        self._plans = None
        self.backend_used = None

    def _step_device(self, p: torch.Tensor) -> torch.device:
        return p.device

    def _plan_backend(self, plan: GroupStep) -> None:
        super()._plan_backend(plan)
        units = [u for u in plan.units if not isinstance(u.rotation, DynamicRotation)]
        if not units:
            plan.backend = "eager"
            return
        params = plan.group["params"]
        explicit = bool(os.environ.get("ROTKERN_BACKEND")) or self.backend != "auto"
        backend = resolve_backend(self.backend, params[units[0].params[0]])
        reason = None
        if backend != "eager":
            devices = {params[i].device for u in units for i in u.params}
            if self.compute_dtype != torch.float32:
                reason = "the fused steps keep fp32 moments; compute_dtype=torch.float64 needs the eager reference"
            elif len(devices) > 1:
                reason = (
                    f"param group {plan.gi} has params on several devices ({', '.join(sorted(map(str, devices)))}) "
                    "and one fused step runs on one device (use one param group per device)"
                )
        if reason is not None:
            if explicit:
                raise RuntimeError(f"backend {backend!r} cannot run this step: {reason}; use backend='eager'")
            warn_fallback(backend, reason)
            backend = "eager"
        plan.backend = backend

    def _rotated_adamw(
        self, plan, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, **kwargs
    ) -> None:
        dyn_kwargs = {k: kwargs.pop(k) for k in _DYNAMIC_ARGS if k in kwargs}
        svd_units = [u for u in units if isinstance(u.rotation, DynamicRotation)]
        state = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if svd_units:
            # Dynamic scopes: the matrices run the eager reference (decompositions, matmuls); the rest of the group
            # goes on below. Their units cover whole params, never shared with another unit: each steps once.
            super()._rotated_adamw(plan, *state, svd_units, **kwargs, **dyn_kwargs)
            units = [u for u in units if not isinstance(u.rotation, DynamicRotation)]
        self.backend_used = "eager" if svd_units else plan.backend
        if not units:
            return
        args = (*state, units)
        if plan.backend == "eager":
            super()._rotated_adamw(plan, *args, **kwargs)
            return
        if plan.backend == "ext":
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
