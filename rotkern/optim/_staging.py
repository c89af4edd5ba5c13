"""Staging of a group's step: its state is created, and the tensors handed to the backend are what it needs:
contiguous, real (complex params as their real coordinates), one (param, grad) dtype pair per unit where the
backend needs one (mixed units run in fp32), fp32 copies for stochastic rounding, a zero gradient for members
of a stepped unit that have none (their values kept), and GradScaler's grads unscaled. Whatever was staged into
a temporary is written back after the step (``_finish_group``).
"""

from __future__ import annotations

import torch

from ..scopes import DynamicRotation, Unit
from . import _sharded
from ._plan import GroupStep
from ._spec import as_real, moment_dtype, stored_key, zero_state_like


class StagingMixin:
    """``_run_group`` / ``_finish_group`` around a backend's step, and the state they create (``_init_state``,
    ``_step_device``, ``_needs_uniform_dtypes`` are hooks subclasses override)."""

    def _run_group(self, plan: GroupStep, extra_keys: tuple[str, ...] = ()) -> tuple[list, list, list] | None:
        """Create state, stage the tensors the backend needs, and return (params, grads, states) to step.

        ``states[i]`` is None for params outside the active units. Params staged into a temporary (non-contiguous
        layouts, members without a gradient, units of mixed dtypes for backends that need one dtype pair) are
        written back by :meth:`_finish_group`.
        """
        params = plan.group["params"]
        rotated = self.rotated_params(plan.gi)
        for i in plan.empty:
            self._init_state(params[i], extra_keys, i in rotated)["step"] += 1
        if not plan.units:
            return None
        touched = set(plan.touched)
        self._refill_emptied_members(plan)
        states = [self._init_state(p, extra_keys, i in rotated) if i in touched else None for i, p in enumerate(params)]
        run_params, run_grads, complex_writeback = _real_views(plan)
        writeback = self._stage_members(plan, run_params, run_grads, states)
        plan.extra["writeback"] = writeback + complex_writeback
        return run_params, run_grads, states

    def _stage_members(self, plan: GroupStep, run_params: list, run_grads: list, states: list) -> list:
        """Stage the touched members in place in ``run_params`` / ``run_grads``; returns the params to write back
        as (param, staged, rounding seed or None)."""
        uniform = self._needs_uniform_dtypes(plan.backend)
        widen = mixed_dtype_members(plan.units, run_params, run_grads) if uniform else set()
        absent = set(plan.absent)
        writeback = []
        # Stochastic rounding: the step runs on an fp32 copy, rounded into the param afterwards (_finish_group).
        sr = plan.group.get("stochastic_rounding", False)
        for i in plan.touched:
            p, g = run_params[i], run_grads[i]
            rounded = sr and p.dtype in (torch.bfloat16, torch.float16) and i not in absent
            if rounded:
                widen = widen | {i}
            dtype = torch.float32 if i in widen else p.dtype
            if i in absent:
                # Values are kept: the backend writes this member's update into a temporary that is dropped.
                run_params[i] = p.detach().to(dtype, memory_format=torch.contiguous_format, copy=True)
                # fp32 when the others' grads are unscaled into fp32 copies below (one dtype pair per unit)
                scaled = getattr(self, "_grad_scale", None) is not None
                zero_dtype = torch.float32 if scaled else absent_grad_dtype(plan, i, widen)
                run_grads[i] = torch.zeros(p.shape, dtype=zero_dtype, device=p.device)
                continue
            if dtype != p.dtype or not p.is_contiguous():
                run_params[i] = p.detach().to(dtype, memory_format=torch.contiguous_format, copy=True)
                seed = rounding_seed(plan.group["seed"], plan.gi, i, float(states[i]["step"]) + 1) if rounded else None
                writeback.append((p, run_params[i], seed))
            if (i in widen and g.dtype != torch.float32) or not g.is_contiguous():
                # .contiguous() as well: Tensor.to(memory_format=contiguous_format) keeps a transposed tensor as it is
                # when the dtype does not change (a transposed param's autograd grad is transposed too).
                run_grads[i] = g.to(torch.float32 if i in widen else g.dtype).contiguous()
            scale = getattr(self, "_grad_scale", None)
            if scale is not None:  # GradScaler's scaled grads: unscaled copies, as torch's fused AdamW (fp32 division)
                # kept in fp32, not rounded back to a bf16 grad's dtype: what the fused kernels compute
                run_grads[i] = run_grads[i].float() / scale.to(g.device)
        return writeback

    @staticmethod
    def _finish_group(plan: GroupStep) -> None:
        for p, staged, seed in plan.extra.get("writeback", ()):
            p.detach().copy_(staged if seed is None else stochastic_round(staged, p.dtype, seed))

    def _needs_uniform_dtypes(self, backend: str) -> bool:
        """Whether ``backend`` needs one (param, grad) dtype pair per unit (the fused ones do)."""
        return backend != "eager"

    def _step_device(self, p: torch.Tensor) -> torch.device:
        """Where ``state["step"]`` of ``p`` lives: the CPU here; fused subclasses keep it on ``p``'s device
        so that kernels read it without a host sync. Checkpoints load onto this device either way."""
        return torch.device("cpu")

    def _refill_emptied_members(self, plan: GroupStep) -> None:
        """A member of a multi-param unit whose state was emptied (``opt.state[p] = {}``, as continual-learning
        code does) while the others kept theirs restarts with zero moments at the unit's step: the unit's
        members share one step count."""
        params = plan.group["params"]
        for unit in plan.units:
            if len(unit.params) < 2 or isinstance(unit.rotation, DynamicRotation):
                continue
            states = [self.state.get(params[i]) for i in unit.params]
            model = next((st for st in states if st), None)
            if model is None or all(states):
                continue
            for i, st in zip(unit.params, states, strict=True):
                if not st:
                    self.state[params[i]] = zero_state_like(model, params[i])

    def _init_state(self, p: torch.Tensor, extra_keys: tuple[str, ...] = (), rotated: bool = False) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(p))
        for key in self._moment_keys + extra_keys:
            key = stored_key(key, rotated)
            if key not in state:
                dtype = moment_dtype(self.state_dtype, p)
                if _sharded.is_dtensor(p):  # sharded like the param (what torch.distributed.checkpoint saves)
                    state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                else:
                    state[key] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return state


def _real_views(plan: GroupStep) -> tuple[list, list, list]:
    """(params, grads, writeback) with complex params and grads as their real coordinates (views of their storage;
    a non-contiguous complex param is staged first and written back last, after any staging of its real view)."""
    params = plan.group["params"]
    run_params, run_grads = list(params), [as_real(g) for g in plan.grads]
    complex_writeback = []
    for i in plan.touched:
        if params[i].is_complex():
            src = params[i].detach()
            if not src.is_contiguous():
                src = src.contiguous()
                complex_writeback.append((params[i], src, None))
            run_params[i] = as_real(src)
    return run_params, run_grads, complex_writeback


def mixed_dtype_members(units: list[Unit], params: list, grads: list) -> set[int]:
    """Members of multi-param units whose (param, grad) dtypes are not all one pair: they run in fp32."""
    out: set[int] = set()
    for unit in units:
        members = unit.params
        if len(members) < 2:
            continue
        pairs = {(params[i].dtype, None if grads[i] is None else grads[i].dtype) for i in members}
        p_dtypes = {p for p, _ in pairs}
        g_dtypes = {g for _, g in pairs if g is not None}
        if len(p_dtypes) > 1 or len(g_dtypes) > 1:
            out.update(members)
    return out


def absent_grad_dtype(plan: GroupStep, i: int, widen: set[int]) -> torch.dtype:
    """The dtype of the zero gradient of a member without one: its unit's other grads' (one pair per unit)."""
    if i in widen:
        return torch.float32
    for unit in plan.units:
        if i in unit.params:
            for j in unit.params:
                if plan.grads[j] is not None:
                    return plan.grads[j].dtype.to_real()
    return plan.group["params"][i].dtype.to_real()


def rounding_seed(seed: int, gi: int, i: int, step: float) -> int:
    """The seed of one param's stochastic rounding at one step (a SplitMix64-style mix; fits torch's int64)."""
    x = (seed * 0x9E3779B97F4A7C15 + gi * 0xBF58476D1CE4E5B9 + i * 0x94D049BB133111EB + int(step)) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``x`` (fp32) rounded to ``dtype`` stochastically: to the neighbour above with probability
    ``(x - lo) / (hi - lo)``, else to the one below, so that ``E[result] = x``; exact values, inf and NaN are
    kept. Draws from a CPU generator seeded with ``seed`` (the same bits on every device)."""
    nearest = x.to(dtype)
    back = nearest.to(x.dtype)
    toward = torch.where(back > x, torch.full_like(nearest, -float("inf")), torch.full_like(nearest, float("inf")))
    other = torch.nextafter(nearest, toward)
    lo = torch.where(back > x, other, nearest).to(x.dtype)
    hi = torch.where(back > x, nearest, other).to(x.dtype)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(x.shape, generator=gen, dtype=torch.float32).to(x.device)
    p_hi = ((x - lo) / (hi - lo)).nan_to_num(0.0)
    out = torch.where(u < p_hi, hi, lo).to(dtype)
    exact = (back == x) | ~torch.isfinite(x) | ~torch.isfinite(other.to(x.dtype))
    return torch.where(exact, nearest, out)
