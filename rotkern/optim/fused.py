"""FusedRotatedAdamW: RotatedAdamW with the step fused into Triton kernels (``rotated_adamw_step``), or into the
compiled extension's CPU kernel (``rotated_adamw_step_ext``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

from .._backend import BACKEND_TABLE, BACKENDS, PRECISIONS, resolve_backend, warn_fallback
from ..bases import DynamicRotation
from ..kernels._op_registry import StepContext
from ..kernels.dispatch import rotated_adamw
from ..scopes import DYNAMIC_SCOPES, Unit
from ._base import GroupStep
from .rotated_adamw import RotatedAdamW, _capturable

__all__ = ["FusedRotatedAdamW"]

class FusedRotatedAdamW(RotatedAdamW):
    """:class:`rotkern.RotatedAdamW` whose step runs as a few fused Triton launches per param group.

    Same arguments, defaults, state keys and ``state_dict`` format as :class:`RotatedAdamW`, so checkpoints
    move between the two both ways. Differences: ``state["step"]`` lives on the param's device (the
    kernels read it there), and a tensor ``lr`` is read on the device, so a step never syncs with the host.

    ``capturable=True`` (torch's meaning: the step can be captured in a CUDA graph and replayed): accepted for groups
    the Triton kernels step alone (static scopes, no stochastic rounding, no DTensors); lr and betas may be tensors
    on the params' device, read at every replay. Capture after a warm-up step (the state must exist) and keep the
    grads allocated (``zero_grad(set_to_none=False)``); a step that cannot be replayed raises RuntimeError naming
    why. Under ``torch.amp.GradScaler`` the kernels read ``grad_scale`` and ``found_inf`` on the device (no host
    sync), on the ext backend too.

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

    ``rotation="svd"`` (paper Alg 5) and ``rotation="eigen"`` (SOAP): the basis management (SVD, eigh, refresh,
    the moments' transport or reset, fallbacks) is always the eager reference's torch code. On the Triton backend
    the Adam step of an eigen unit (dense bases Q_L, Q_R, or an identity side) runs
    :func:`rotkern.kernels.two_sided_adamw.two_sided_adamw_step` (4 launches per unit; the units of a param, e.g.
    q, k, v pieces, one after the other); svd units run the eager reference (see ``_FUSED_SVD`` below), as do all
    dynamic units on the other backends. The group's other units (1-D params) take the
    selected backend as in the other scopes; each param is stepped once. ``backend_used`` is ``"eager"`` when a
    step ran any unit on the eager reference, and ``two_sided_steps`` counts the unit steps the kernel ran.
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
        kept = BACKEND_TABLE[backend].moment_dtypes if backend in BACKEND_TABLE else ()
        if kept and kwargs.get("compute_dtype") not in (None, *kept):
            raise ValueError(
                f"backend={backend!r} keeps fp32 moments; compute_dtype=torch.float64 needs backend='eager'"
            )
        self.precision = precision
        self.backend = backend
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        if backend in BACKEND_TABLE and self.compute_dtype not in BACKEND_TABLE[backend].moment_dtypes:
            raise ValueError(
                f"backend={backend!r} keeps fp32 moments, and float64 params compute in float64 by default: pass "
                "backend='eager' (or 'auto'), or compute_dtype=torch.float32 to step them in fp32"
            )
        self._plans = None  # per-optimizer cache of the kernels' metadata, made on the first Triton step
        self._context = StepContext(_UnitsByGroup(self._unit_cache))  # what the compiled step's op reads
        # what the last (uncompiled) step ran: "triton", "ext", or "eager" if any unit ran on the eager reference
        self.backend_used: str | None = None
        self.two_sided_steps = 0  # unit steps of dynamic units run by the two-sided Triton kernel
        # (id(param), piece) -> (the stored bases, their versions, (L, R)): see rotkern.kernels.dispatch
        self._svd_dense_cache: dict[tuple, tuple] = {}

    _config_attrs = ("compute_dtype", "state_dtype", "basis_stats", "precision", "backend")
    _supports_capturable = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("precision", "tf32x3")
        self.__dict__.setdefault("backend", "auto")
        self._plans = None
        self._context = StepContext(_UnitsByGroup(self._unit_cache))
        self.backend_used = None
        self.two_sided_steps = 0
        self._svd_dense_cache = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_context", None)  # a copy makes its own
        return state

    def _step_device(self, p: torch.Tensor) -> torch.device:
        return p.device

    def _plan_backend(self, plan: GroupStep) -> None:
        super()._plan_backend(plan)
        units = [u for u in plan.units if not isinstance(u.rotation, DynamicRotation)]
        # A group of dynamic units only: the backend matters when the Triton kernel can step them.
        units = units or [u for u in plan.units if u.rotation.fits_two_sided_kernel()]
        if not units:
            plan.backend = "eager"
            if _capturable(plan.group):
                self._check_capturable(plan)
            return
        params = plan.group["params"]
        explicit = bool(os.environ.get("ROTKERN_BACKEND")) or self.backend != "auto"
        backend = resolve_backend(self.backend, params[units[0].params[0]])
        reason = None
        if backend != "eager":
            devices = {params[i].device for u in units for i in u.params}
            if self.compute_dtype not in BACKEND_TABLE[backend].moment_dtypes:
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
        if _capturable(plan.group):
            self._check_capturable(plan)

    def _check_capturable(self, plan: GroupStep) -> None:
        """capturable=True: the step must be one that a CUDA graph can replay (nothing read or staged on the host),
        i.e. the Triton kernels alone on tensors whose state exists; RuntimeError naming the fix otherwise."""
        group, where = plan.group, f"param group {plan.gi} (capturable=True)"
        off = f"; or set optimizer.param_groups[{plan.gi}]['capturable'] = False (e.g. after loading a checkpoint)"
        if not BACKEND_TABLE[plan.backend].capturable:
            raise RuntimeError(
                f"{where} runs on the {plan.backend!r} backend, which reads values on the host; a capturable step "
                f"needs the Triton backend (CUDA params, or the CPU under TRITON_INTERPRET=1){off}"
            )
        if plan.extra.get("sharded") or any(isinstance(u.rotation, DynamicRotation) for u in plan.units):
            raise RuntimeError(
                f"{where}: rotation={group['rotation']!r} on DTensor params or with a dynamic basis (svd, eigen) "
                f"computes on the host side of the step{off}"
            )
        if self.state_dtype != self.compute_dtype or group.get("stochastic_rounding"):
            raise RuntimeError(
                f"{where}: state_dtype={self.state_dtype} or stochastic_rounding=True stages tensors or draws random "
                f"bits on the host each step, which a captured graph would replay unchanged{off}"
            )
        device = group["params"][plan.units[0].params[0]].device
        for name, x in (("lr", group["lr"]), ("betas[0]", group["betas"][0]), ("betas[1]", group["betas"][1])):
            if torch.is_tensor(x) and x.device != device:
                raise RuntimeError(
                    f"{where}: {name} is a tensor on {x.device}, the params are on {device}; a captured step reads "
                    f"it on the device: put it there (or pass a float, fixed at capture)"
                )
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            params = group["params"]
            if any(params[i] not in self.state for i in plan.touched):
                raise RuntimeError(
                    f"{where}: a param has no optimizer state yet, and creating it inside the graph would zero it "
                    "at every replay; run one step (a warm-up, as torch's capturable optimizers need) before "
                    "capturing"
                )

    def _may_scale_in_kernel(self) -> bool:
        return not any(g["rotation"] in DYNAMIC_SCOPES for g in self.param_groups)

    def _scales_in_kernel(self, plan: GroupStep) -> bool:
        return (
            BACKEND_TABLE[plan.backend].scales_in_kernel
            and not plan.extra.get("sharded")
            and not any(isinstance(u.rotation, DynamicRotation) for u in plan.units)
        )

    def _rotated_adamw(self, plan, *args, **kwargs) -> None:
        """The group's step through :func:`rotkern.kernels.dispatch.rotated_adamw` on the planned backend."""
        whole = len(args[-1]) == len(plan.units) and not plan.extra.get("sharded")  # the op takes a group's units
        run = rotated_adamw(
            *args, backend=plan.backend, precision=self.precision, plan_cache=self._plan_cache(),
            context=self._context if whole else None, group=plan.gi, active=plan.extra["unit_indices"],
            sides_cache=self._svd_dense_cache, **kwargs,
        )  # fmt: skip
        for backend in run.backends:
            self._note_backend(backend)
        self.two_sided_steps += run.two_sided_steps

    def _plan_cache(self):
        """The kernels' plan cache (made on the first fused step), sized for a few plans per group: the set of units
        with grads can change from step to step."""
        if self._plans is None:
            from ..kernels._rotated_adamw_plan import PlanCache

            self._plans = PlanCache()
            self._context.plans = self._plans
        self._plans.maxsize = max(self._plans.maxsize, 4 * len(self.param_groups) + 4)
        return self._plans

    def _plan_steps(self) -> list[GroupStep]:
        self.backend_used = None  # set by this step's groups (_note_backend)
        return super()._plan_steps()

    def _note_backend(self, backend: str) -> None:
        """``backend_used`` over a step's groups: "eager" as soon as one unit ran on the eager reference."""
        if self.backend_used != "eager":
            self.backend_used = backend


class _UnitsByGroup(Mapping):
    """The optimizer's unit cache seen as group -> units: live (shared by reference), what the compiled op reads."""

    def __init__(self, cache: dict) -> None:
        self._cache = cache

    def __getitem__(self, group: int) -> list[Unit]:
        return self._cache[group][2]

    def __iter__(self):
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)
