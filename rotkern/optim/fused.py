"""FusedRotatedAdamW: RotatedAdamW with the step fused into Triton kernels (``rotated_adamw_step``), or into the
compiled extension's CPU kernel (``rotated_adamw_step_ext``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .._backend import BACKENDS, PRECISIONS, resolve_backend, warn_fallback
from ..bases import DEFAULT_BASIS_CHANGE, DynamicRotation, EigenRotation, SvdRotation
from ..kernels import _op_registry
from ..scopes import Unit
from ._base import GroupStep
from .rotated_adamw import RotatedAdamW, _capturable

__all__ = ["FusedRotatedAdamW"]

# The reference's arguments that only its dynamic-basis units read.
_DYNAMIC_ARGS = ("svd_bases", "svd_every", "precondition_every", "shampoo_beta", "basis_change", "basis_stats")


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
        if backend in ("triton", "ext") and kwargs.get("compute_dtype") not in (None, torch.float32):
            raise ValueError(
                f"backend={backend!r} keeps fp32 moments; compute_dtype=torch.float64 needs backend='eager'"
            )
        self.precision = precision
        self.backend = backend
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        if backend in ("triton", "ext") and self.compute_dtype != torch.float32:
            raise ValueError(
                f"backend={backend!r} keeps fp32 moments, and float64 params compute in float64 by default: pass "
                "backend='eager' (or 'auto'), or compute_dtype=torch.float32 to step them in fp32"
            )
        self._plans = None  # per-optimizer cache of the kernels' metadata, made on the first Triton step
        self._op_handle = _op_registry.register(self)  # how the compiled step's op finds this optimizer
        # what the last (uncompiled) step ran: "triton", "ext", or "eager" if any unit ran on the eager reference
        self.backend_used: str | None = None
        self.two_sided_steps = 0  # unit steps of dynamic units run by the two-sided Triton kernel
        # (id(param), piece) -> (the stored reflectors, their version, (L, R)): see _svd_dense
        self._svd_dense_cache: dict[tuple, tuple] = {}

    _config_attrs = ("compute_dtype", "state_dtype", "basis_stats", "precision", "backend")
    _supports_capturable = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("precision", "tf32x3")
        self.__dict__.setdefault("backend", "auto")
        self._plans = None
        self._op_handle = _op_registry.register(self)
        self.backend_used = None
        self.two_sided_steps = 0
        self._svd_dense_cache = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_op_handle", None)  # a copy registers itself
        return state

    def _step_device(self, p: torch.Tensor) -> torch.device:
        return p.device

    def _plan_backend(self, plan: GroupStep) -> None:
        super()._plan_backend(plan)
        units = [u for u in plan.units if not isinstance(u.rotation, DynamicRotation)]
        # A group of dynamic units only: the backend matters when the Triton kernel can step them.
        units = units or [u for u in plan.units if _dense_bases(u)]
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
        if _capturable(plan.group):
            self._check_capturable(plan)

    def _check_capturable(self, plan: GroupStep) -> None:
        """capturable=True: the step must be one that a CUDA graph can replay (nothing read or staged on the host),
        i.e. the Triton kernels alone on tensors whose state exists; RuntimeError naming the fix otherwise."""
        group, where = plan.group, f"param group {plan.gi} (capturable=True)"
        off = f"; or set optimizer.param_groups[{plan.gi}]['capturable'] = False (e.g. after loading a checkpoint)"
        if plan.backend != "triton":
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
        return not any(g["rotation"] in ("svd", "eigen") for g in self.param_groups)

    def _scales_in_kernel(self, plan: GroupStep) -> bool:
        return (
            plan.backend in ("triton", "ext")
            and not plan.extra.get("sharded")
            and not any(isinstance(u.rotation, DynamicRotation) for u in plan.units)
        )

    def _rotated_adamw(
        self, plan, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, **kwargs
    ) -> None:
        dyn_kwargs = {k: kwargs.pop(k) for k in _DYNAMIC_ARGS if k in kwargs}
        svd_units = [u for u in units if isinstance(u.rotation, DynamicRotation)]
        state = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        self._note_backend(plan.backend)
        if svd_units:
            # Dynamic scopes: their units cover whole params, never shared with another unit (pieces of one param
            # all alike): each steps once. Dense bases on Triton: the kernel; the rest: the eager reference.
            fused = [u for u in svd_units if plan.backend == "triton" and _dense_bases(u)]
            eager = [u for u in svd_units if not (plan.backend == "triton" and _dense_bases(u))]
            if fused:
                self._two_sided(*state, fused, **kwargs, **dyn_kwargs)
            if eager:
                super()._rotated_adamw(plan, *state, eager, **kwargs, **dyn_kwargs)
                self._note_backend("eager")
            units = [u for u in units if not isinstance(u.rotation, DynamicRotation)]
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
        if torch.compiler.is_compiling() and len(units) == len(plan.units) and not plan.extra.get("sharded"):
            self._triton_op(plan, *args, **kwargs)
            return
        from ..kernels.rotated_adamw_step import rotated_adamw_step  # imports triton: only on this path

        _, precision, cache = self.op_context(plan.gi)
        rotated_adamw_step(*args, precision=precision, plan_cache=cache, **kwargs)

    def op_context(self, gi: int) -> tuple[list[Unit], str, object]:
        """(units of group ``gi``, precision, the kernels' plan cache): what the Triton op reads from its caller."""
        from ..kernels._rotated_adamw_plan import PlanCache

        if self._plans is None:
            self._plans = PlanCache()
        # A few plans per group: the set of units with grads can change from step to step.
        self._plans.maxsize = max(self._plans.maxsize, 4 * len(self.param_groups) + 4)
        return self.units(gi), self.precision, self._plans

    def _triton_op(
        self, plan, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, *, lr, beta1, beta2,
        eps, weight_decay, decay_mask=None, amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
    ) -> None:  # fmt: skip
        """The Triton step under torch.compile: one torch.library op (rotkern::rotated_adamw_step), so the
        compiled step has no graph break here and reads lr, betas and GradScaler's tensors in the kernels."""
        from ..kernels.rotated_adamw_step import rotated_adamw_step_op

        touched = list(dict.fromkeys(i for u in units for i in u.params))

        def pick(xs):
            return [xs[i] for i in touched] if xs is not None else []

        scalars = [x if torch.is_tensor(x) else None for x in (lr, beta1, beta2)] + [grad_scale, found_inf]
        floats = [0.0 if torch.is_tensor(x) else float(x) for x in (lr, beta1, beta2)] + [eps, weight_decay]
        rotated_adamw_step_op(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else [],
            pick(state_steps), scalars, [float(f) for f in floats], self._op_handle, plan.gi,
            list(plan.extra["unit_indices"]), len(params),
            [] if decay_mask is None else [int(bool(d)) for d in decay_mask], bool(amsgrad), bool(maximize),
        )  # fmt: skip

    def _plan_steps(self) -> list[GroupStep]:
        self.backend_used = None  # set by this step's groups (_note_backend)
        return super()._plan_steps()

    def _note_backend(self, backend: str) -> None:
        """``backend_used`` over a step's groups: "eager" as soon as one unit ran on the eager reference."""
        if self.backend_used != "eager":
            self.backend_used = backend

    # Under torch.compile the dynamic units' step runs outside the graph (their basis management is host code, and
    # the two-sided kernel is not a torch.library op): a graph break, not a trace into the Triton launcher.
    @torch.compiler.disable
    def _two_sided(
        self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, units, *, lr, beta1, beta2, eps,
        weight_decay, decay_mask=None, amsgrad=False, maximize=False, svd_bases=None, svd_every=250,
        precondition_every=10, shampoo_beta=0.95, basis_change="auto", basis_stats=None,
    ) -> None:  # fmt: skip
        """:func:`rotated_adamw_ref` for dynamic units with dense bases: its basis management, then the Adam step
        in the two-sided Triton kernel."""
        from ..kernels.reference import (
            _advance_steps,
            _basis_store,
            _flat,
            _prefetch,
            dynamic_bases_after,
            dynamic_bases_before,
        )
        from ..kernels.two_sided_adamw import two_sided_adamw_step  # imports triton: only on this path

        lr, beta1, beta2 = (x.item() if torch.is_tensor(x) else float(x) for x in (lr, beta1, beta2))
        p_flat, g_flat = _flat(params), _flat(grads)
        m_flat, v_flat = _flat(exp_avgs), _flat(exp_avg_sqs)
        vmax_flat = _flat(max_exp_avg_sqs) if amsgrad else None
        _advance_steps(state_steps, units)
        pre = _prefetch(units, g_flat, exp_avgs, state_steps, svd_bases, maximize, svd_every=svd_every,
                        precondition_every=precondition_every, shampoo_beta=shampoo_beta,
                        stats=basis_stats)  # fmt: skip
        reset_at: dict[int, float] = {}
        for ui, unit in enumerate(units):
            i = unit.params[0]
            rot = unit.rotation
            step = float(state_steps[i])
            g_raw = unit.view(g_flat)
            g = g_raw.to(exp_avgs[i].dtype)
            if maximize:
                g = -g
            store = _basis_store(svd_bases, i)
            change = DEFAULT_BASIS_CHANGE[unit.layout] if basis_change == "auto" else basis_change
            m, v = unit.view(m_flat), unit.view(v_flat)
            vmax = unit.view(vmax_flat) if amsgrad else None
            moments = [m, v] + ([vmax] if amsgrad else [])
            rotated = dynamic_bases_before(rot, g, store, step, svd_every=svd_every, change=change, moments=moments,
                                           stats=basis_stats, rotate=False, decomposed=pre[ui])  # fmt: skip
            if rotated is None:
                continue
            g_rot, bases = rotated
            if i not in reset_at:  # read once per param and step, as the reference does
                reset_at[i] = float(store.get("basis_reset_at", 0.0))
            if isinstance(rot, SvdRotation):
                left, right = self._svd_dense(rot, params[i], store, bases)
            else:
                left, right = bases.get("eigen_q_l"), bases.get("eigen_q_r")
            two_sided_adamw_step(
                unit.view(p_flat), g_raw.contiguous(), m, v, vmax, left, right, lr=lr, beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=weight_decay, step=step - reset_at[i],
                decay=decay_mask is None or bool(decay_mask[i]),
                amsgrad=amsgrad, maximize=maximize, g_rot=g_rot, precision=self.precision,
            )  # fmt: skip
            self.two_sided_steps += 1
            dynamic_bases_after(rot, g, bases, store, step, change=change, moments=moments,
                                precondition_every=precondition_every, shampoo_beta=shampoo_beta,
                                stats=basis_stats, decomposed=pre[ui])  # fmt: skip

    def _svd_dense(self, rot: SvdRotation, param: torch.Tensor, store, bases) -> tuple[torch.Tensor, torch.Tensor]:
        """The svd unit's dense L, R for the kernel; a side kept as Householder reflectors is formed once per
        recompute. The cache entry holds the stored tensor itself and its version counter, so a recompute (an in
        place copy) or a load_state_dict (new tensors) misses, and a stale entry is never mistaken for a new one."""
        if not (rot.left_implicit or rot.right_implicit):
            return bases["svd_u"], bases["svd_v"]
        key = (id(param), rot.piece)  # one entry per param piece: replaced, never piled up
        full = store["svd_u"] if rot.left_implicit else store["svd_v"]
        hit = self._svd_dense_cache.get(key)
        if hit is not None and hit[0] is full and hit[1] == full._version:
            return hit[2]
        sides = rot.dense_sides(bases)
        self._svd_dense_cache[key] = (full, full._version, sides)
        return sides


# svd units with dense bases run the kernel too. An svd recompute turns a 1-ulp difference in the params into a
# ~lr one (the singular vectors of near-equal / near-zero singular values are ill-conditioned: a 3e-8 nudge of one
# weight moves a TinyBlock's params by 2.5e-2 two steps later, with the eager reference alone), so the kernel is
# judged against a float64 run by the Dao rule across recomputes (tests/optim/test_svd_scope.py), not at a fixed
# fp32 tolerance against the eager fp32 optimizer. Off: every svd unit on the eager reference.
_FUSED_SVD = True
# An svd side longer than the rank is kept as Householder reflectors (O(n r)); the kernel takes it as a dense
# (n, n) matrix formed once per recompute and cached (n^2 floats: 36 MB at n = 3072, GPT-2's MLP). Longer sides
# (a 50304-token embedding) stay on the eager reference, which applies the reflectors with ormqr.
SVD_DENSE_SIDE_MAX = 4096


def _dense_bases(unit: Unit) -> bool:
    """Whether the two-sided kernel steps a dynamic unit: its bases are dense matrices (or identity sides), or svd
    sides it may form densely (at most ``SVD_DENSE_SIDE_MAX`` long)."""
    rot = unit.rotation
    if isinstance(rot, EigenRotation):
        return True
    return _FUSED_SVD and isinstance(rot, SvdRotation) and max(rot.rows, rot.cols) <= SVD_DENSE_SIDE_MAX
