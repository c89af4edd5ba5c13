"""Eager references of the fused ops: the spec, in plain torch. Tests and benchmarks import them from here.

rotated_adamw_ref — one step of rotated AdamW (paper Alg 4) over one parameter group's units:

    g~  = B(pi g)                       (gather + block rotate; g negated when maximize)
    m   = b1 m + (1 - b1) g~            (moments live in the permuted-rotated layout)
    v   = b2 v + (1 - b2) g~^2
    v'  = max(v_max, v) if amsgrad else v
    u   = m / (sqrt(v') / sqrt(1 - b2^t) + eps)
    d   = pi^-1(B^T u)                  (unrotate + scatter)
    p   = p (1 - lr wd) - lr / (1 - b1^t) d

The operation order is torch.optim.AdamW's (single-tensor path), so identity units reproduce it.

SVD units (rotation="svd", paper Alg 5; :class:`rotkern.bases.SvdRotation`) replace B(pi .) by a two-sided
rotation of the unit's (k, w) matrix G, with bases recomputed from the current gradient at steps
t = 1, 1 + F, 1 + 2F, ... (F = svd_every):

    U, S, V = svd(G)  at a recompute step  (bases L = [U, U_perp], R = [V, V_perp], kept in param state)
    g~  = L^T G R                          (= S padded with zeros at a recompute step; see below)
    ... Adam as above on g~; m, v carried over unchanged when the bases change (no re-projection) ...
    d   = L u R^T

At a recompute step g~ is set to S (diagonal, zero elsewhere) instead of computing L^T G R: the two are
equal in exact arithmetic, and the product would leave fp32 rounding noise (~1e-7 sigma_1) in the zero
coordinates, which Adam's first step (v = 0 there) turns into full +-lr updates along random directions.

Eigen units (rotation="eigen", SOAP; :class:`rotkern.bases.EigenRotation`) rotate by the eigenbases Q_L, Q_R of
EMAs of G G^T and G^T G: step 1 only sets the factors to G G^T, G^T G and Q from eigh (SOAP's skipped first step;
bias corrections then count from step 2); later steps run Adam on g~ = Q_L^T G Q_R with d = Q_L u Q_R^T, after
the update the factors take in G, and at multiples of precondition_every Q is refreshed by one power iteration
and a QR.

At a basis change (every recompute after the first, every refresh), the moments follow ``basis_change``
(:data:`rotkern.bases.BASIS_CHANGES`): kept, transported (m exactly, v by the squared change of basis), m
transported and v kept, or reset (zeroed, bias correction counted from the change: state ``basis_reset_at``).

rotated_sgdm_ref — rotated SGD with momentum (torch.optim.SGD semantics in the rotated basis):

    g   = g + wd p                      (coupled weight decay, as torch.optim.SGD)
    g~  = B(pi g)
    buf = g~ at the first step, else mu buf + (1 - dampening) g~
    d   = g~ + mu buf if nesterov else buf
    p   = p - lr pi^-1(B^T d)
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from ..bases import DEFAULT_BASIS_CHANGE, DynamicRotation, EigenRotation, SvdRotation, batched_decompositions
from ..scopes import Unit

__all__ = ["dynamic_bases_after", "dynamic_bases_before", "rotated_adamw_ref", "rotated_sgdm_ref"]


def _flat(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    # detach: in-place writes through views of a leaf that requires grad trip torch.compile's view checks.
    return [None if t is None else t.detach().view(-1) for t in ts]


def rotated_adamw_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    state_steps: Sequence[torch.Tensor],
    units: Sequence[Unit],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_mask: Sequence[bool] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    svd_bases: Sequence[MutableMapping[str, torch.Tensor] | None] | None = None,
    svd_every: int = 250,
    precondition_every: int = 10,
    shampoo_beta: float = 0.95,
    basis_change: str = "auto",
    basis_stats: MutableMapping[str, int] | None = None,
) -> None:
    """One rotated AdamW step, in place, for the given units of one parameter group.

    Args:
        params, grads: per-parameter tensors of any float dtype; grads of unit members must exist.
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs: per-parameter state, the parameter's shape, in the compute
            dtype (fp32, or fp64 for tests), holding moments in the rotated layout.
        state_steps: per-parameter scalar step tensors; each parameter of the units is incremented once
            (a parameter split into several units, e.g. q/k/v, still counts one step).
        units: the units to step (``Unit.segments`` index into the lists above).
        decay_mask: per-parameter bool; parameters with False get no weight decay.
        svd_bases: needed when ``units`` has svd or eigen units: per parameter, a mutable mapping that holds its
            bases (the optimizer passes the param's state dict; keys as in :mod:`rotkern.bases`), and
            ``basis_reset_at`` after a reset. Written at basis changes, read at the other steps.
        svd_every: F; svd units recompute their bases at steps t with (t - 1) % F == 0.
        precondition_every, shampoo_beta: eigen units: refresh period and the factors' EMA coefficient.
        basis_change: ``auto`` (svd: ``keep``; eigen: ``transport_m``) or one of
            :data:`rotkern.bases.BASIS_CHANGES`.
        basis_stats: counts of decomposition fallbacks (see :func:`rotkern.bases.robust_decomposition`).
    """
    p_flat, g_flat = _flat(params), _flat(grads)
    m_flat, v_flat = _flat(exp_avgs), _flat(exp_avg_sqs)
    vmax_flat = _flat(max_exp_avg_sqs) if amsgrad else None
    _advance_steps(state_steps, units)
    pre = _prefetch(units, g_flat, exp_avgs, state_steps, svd_bases, maximize, svd_every=svd_every,
                    precondition_every=precondition_every, shampoo_beta=shampoo_beta, stats=basis_stats)  # fmt: skip
    reset_at: dict[int, float] = {}
    for ui, unit in enumerate(units):
        members = unit.params
        step = float(state_steps[members[0]])
        cdt = exp_avgs[members[0]].dtype

        g = unit.view(g_flat).to(cdt)
        if maximize:
            g = -g
        rot = unit.rotation
        m = unit.view(m_flat)
        v = unit.view(v_flat)
        dynamic = isinstance(rot, DynamicRotation)
        if dynamic:
            store = _basis_store(svd_bases, members[0])
            change = DEFAULT_BASIS_CHANGE[unit.layout] if basis_change == "auto" else basis_change
            moments = [m, v] + ([unit.view(vmax_flat)] if amsgrad else [])
            g_in = g
            rotated = dynamic_bases_before(rot, g, store, step, svd_every=svd_every, change=change, moments=moments,
                                           stats=basis_stats, decomposed=pre[ui])  # fmt: skip
            if rotated is None:
                continue
            g, bases = rotated
            # After a reset the bias corrections count from the basis change: read once per param and step, after
            # an svd recompute (which resets at the start of the step) and before an eigen refresh (at its end), so
            # every piece of a param counts alike.
            if members[0] not in reset_at:
                reset_at[members[0]] = float(store.get("basis_reset_at", 0.0))
            step -= reset_at[members[0]]
        elif rot is not None:
            g = rot.rotate(g)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = unit.view(vmax_flat)
            torch.maximum(vmax, v, out=vmax)
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
            unit.write(vmax_flat, vmax)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        # Global units gather copies, so moments are written back; for views this is a no-op copy.
        unit.write(m_flat, m)
        unit.write(v_flat, v)
        update = m / denom
        if dynamic:
            if eps == 0:
                # v = 0 means every g~ so far was exactly 0 there (the zero padding of S at an SVD recompute), so
                # m = 0 too: the eps -> 0 limit of 0 / (0 + eps) is 0, not NaN (the paper's beta1 = beta2 = eps = 0
                # link to Muon, U V^T, needs it).
                update = torch.where(denom > 0, update, 0.0)
            update = rot.unrotate(update, bases)
        elif rot is not None:
            update = rot.unrotate(update)

        p = unit.view(p_flat)
        # In place when the param already has the compute dtype (p32 then aliases it and write is a no-op).
        p32 = p if p.dtype == cdt else p.to(cdt)
        if weight_decay != 0:
            decay = _decay_row(unit, decay_mask, p32)
            p32.mul_(1 - lr * weight_decay * (1.0 if decay is None else decay))
        p32.add_(update, alpha=-lr / bias_correction1)
        unit.write(p_flat, p32.to(p.dtype))

        if dynamic:
            dynamic_bases_after(rot, g_in, bases, store, float(state_steps[members[0]]), change=change,
                                moments=moments, precondition_every=precondition_every, shampoo_beta=shampoo_beta,
                                stats=basis_stats, decomposed=pre[ui])  # fmt: skip


def dynamic_bases_before(
    rot: DynamicRotation,
    g: torch.Tensor,
    store: MutableMapping[str, torch.Tensor],
    step: float,
    *,
    svd_every: int,
    change: str,
    moments: list[torch.Tensor],
    stats: MutableMapping[str, int] | None = None,
    rotate: bool = True,
    decomposed: Any = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]] | None:
    """The basis management of a dynamic unit before its Adam step: (g~, bases), or None when the step takes no
    Adam step (an eigen unit's step 1, which only builds the first factors and basis).

    Args:
        g: the unit's (k, w) gradient in the compute dtype, already negated under maximize.
        step: the param's step count after this step's increment (not offset by ``basis_reset_at``).
        change: the resolved basis change (not ``auto``); moments: [m, v] (+ amsgrad's max), views, carried
            across a basis change in place.
        rotate: False: g~ is None wherever it would be ``L^T g R`` (a fused caller computes it), and only a g~
            that is not that product (S padded at an svd recompute step) is returned.
        decomposed: this unit's entry of :func:`prefetch_decompositions` (None: decompose here).
    """
    pre = (decomposed or {}).get("before")
    if isinstance(rot, SvdRotation):
        return _svd_rotate(rot, g, store, step, svd_every, change, moments, stats, rotate, pre)
    return _eigen_rotate(rot, g, store, step, stats, rotate, pre)


def dynamic_bases_after(
    rot: DynamicRotation,
    g: torch.Tensor,
    bases: dict[str, torch.Tensor],
    store: MutableMapping[str, torch.Tensor],
    step: float,
    *,
    change: str,
    moments: list[torch.Tensor],
    precondition_every: int,
    shampoo_beta: float,
    stats: MutableMapping[str, int] | None = None,
    decomposed: Any = None,
) -> None:
    """The basis management of a dynamic unit after its Adam step (eigen units: the factors take in g, then maybe a
    refresh, the moments carried across in place). Arguments as :func:`dynamic_bases_before`."""
    if isinstance(rot, EigenRotation):
        # SOAP's order: the factors take in this step's gradient after it was applied, then maybe a refresh.
        rot.accumulate(bases, g, shampoo_beta)
        if int(step) % precondition_every == 0:
            new, order = rot.refresh(bases, stats, (decomposed or {}).get("after"))
            _change_moments(rot, moments, bases, new, change, store, step, order)  # views: in place
            rot.save(store, new)


def _prefetch(units, g_flat, exp_avgs, state_steps, svd_bases, maximize, **kwargs) -> list[dict | None]:
    """:func:`prefetch_decompositions` for a step of :func:`rotated_adamw_ref` (flat grads, per-param state)."""
    if not any(isinstance(u.rotation, DynamicRotation) for u in units):
        return [None] * len(units)
    grads, stores, steps = [], [], []
    for unit in units:
        i = unit.params[0]
        dynamic = isinstance(unit.rotation, DynamicRotation)
        g = unit.view(g_flat).to(exp_avgs[i].dtype) if dynamic else None
        grads.append(-g if dynamic and maximize else g)
        stores.append(_basis_store(svd_bases, i) if dynamic else None)
        steps.append(float(state_steps[i]))
    return prefetch_decompositions(units, grads, stores, steps, **kwargs)


def prefetch_decompositions(
    units: Sequence[Unit],
    grads: Sequence[torch.Tensor],
    stores: Sequence[MutableMapping[str, torch.Tensor]],
    steps: Sequence[float],
    *,
    svd_every: int,
    precondition_every: int,
    shampoo_beta: float,
    stats: MutableMapping[str, int] | None = None,
) -> list[dict | None]:
    """Every decomposition the dynamic units of one step will run, computed up front, batched across units of equal
    shape (:func:`rotkern.bases.batched_decompositions`): an svd recompute's SVD of g, an eigen unit's first
    ``eigh`` of G G^T (and G^T G), an eigen refresh's QR (of the factors after this step's update).

    Args (per unit, aligned with ``units``; None / ignored for static units): ``grads``, the unit's (k, w) gradient
    as the step uses it (compute dtype, negated under maximize); ``stores``, its param's basis store; ``steps``,
    the param's step after this step's increment.
    Returns:
        per unit, None or {"before": ..., "after": ...} for the ``decomposed`` argument of
        :func:`dynamic_bases_before` / :func:`dynamic_bases_after`. Each holds the results of one unit, so what a
        step computes is the same as unbatched up to the batched call's rounding.
    """
    jobs: list = []
    plans: list[tuple[int, str, Any]] = []  # (unit, "svd" | "initial" | "refresh", orders)
    for ui, unit in enumerate(units):
        rot = unit.rotation
        if not isinstance(rot, DynamicRotation):
            continue
        g, store, step = grads[ui], stores[ui], int(steps[ui])
        if isinstance(rot, SvdRotation):
            if (step - 1) % svd_every == 0:
                jobs.append(((ui, None), *rot.compute_job(g)))
                plans.append((ui, "svd", None))
            continue
        bases = rot.load(store)
        if bases is None or step == 1:
            jobs += [((ui, side), *job) for side, job in rot.initial_jobs(g).items()]
            plans.append((ui, "initial", None))
        elif step % precondition_every == 0:
            refresh = rot.refresh_jobs(bases, g, shampoo_beta)
            jobs += [((ui, side), *job) for side, (_, job) in refresh.items()]
            plans.append((ui, "refresh", {side: s for side, (s, _) in refresh.items()}))
    if not jobs:
        return [None] * len(units)
    done = batched_decompositions(jobs, stats)
    out: list[dict | None] = [None] * len(units)
    for ui, kind, orders in plans:
        if kind == "svd":
            out[ui] = {"before": (done[(ui, None)],)}
        elif kind == "initial":
            out[ui] = {"before": {side: done[(ui, side)] for side, _ in units[ui].rotation._sides()}}
        else:
            out[ui] = {"after": {side: (s, done[(ui, side)]) for side, s in orders.items()}}
    return out


def _basis_store(svd_bases, param: int) -> MutableMapping[str, torch.Tensor]:
    store = None if svd_bases is None else svd_bases[param]
    if store is None:
        raise ValueError(
            "rotated_adamw_ref: svd and eigen units need svd_bases (a mapping per parameter to keep the bases in)"
        )
    return store


def _svd_rotate(
    rot: SvdRotation,
    g: torch.Tensor,
    store: MutableMapping[str, torch.Tensor],
    step: float,
    svd_every: int,
    change: str,
    moments: list[torch.Tensor],
    stats: MutableMapping[str, int] | None,
    rotate: bool = True,
    pre: Any = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(g~, bases) of an svd unit at ``step``: new bases from g at a recompute step (the moments carried across
    per ``change``), else the stored ones. ``pre``: the SVD of g already computed, as a 1-tuple."""
    old = rot.load(store)
    if (int(step) - 1) % svd_every == 0:
        computed = rot.compute(g, stats) if pre is None else rot.compute(g, stats, pre[0])
        if computed is not None:
            s, bases = computed
            if old is not None:
                _change_moments(rot, moments, old, bases, change, store, step - 1)
            rot.save(store, bases)
            g_rot = torch.zeros_like(g)
            g_rot.diagonal()[: rot.rank] = s  # = L^T g R exactly; see the module docstring
            return g_rot, rot.load(store)
        if old is None:  # failed at the very first recompute: the standard basis until the next one
            rot.save(store, rot.identity_bases(g.dtype, g.device))
            old = rot.load(store)
    if old is None:
        raise ValueError(
            f"svd unit {rot!r} has no bases at step {int(step)}: they are computed at steps 1, 1 + F, ... "
            "(F = svd_every); a checkpoint that lacks them cannot continue"
        )
    return (rot.rotate(g, old) if rotate else None), old


def _eigen_rotate(
    rot: EigenRotation,
    g: torch.Tensor,
    store: MutableMapping[str, torch.Tensor],
    step: float,
    stats,
    rotate: bool = True,
    pre: Mapping | None = None,
) -> tuple[torch.Tensor | None, dict] | None:
    """(g~, bases) of an eigen unit, or None at step 1, which only builds the first factors and basis (SOAP's
    skipped first step; see :class:`~rotkern.bases.EigenRotation`). The pieces of a param share its state
    tensors, so the step, not the tensors' presence, says whether this piece has a basis yet."""
    bases = rot.load(store)
    if bases is None or int(step) == 1:
        rot.save(store, rot.initial(g, stats, pre))
        store["basis_reset_at"] = torch.tensor(float(step), dtype=torch.float32, device=g.device)
        return None
    return (rot.rotate(g, bases) if rotate else None), bases


def _change_moments(
    rot: DynamicRotation,
    moments: list[torch.Tensor],
    old: dict,
    new: dict,
    change: str,
    store: MutableMapping[str, torch.Tensor],
    done_steps: float,
    order: dict | None = None,
) -> None:
    """Carry m, v (and amsgrad's max) from the ``old`` bases into the ``new`` ones, in place, per ``change``.

    ``order``: the slot order of an eigen refresh (what ``keep`` follows); ``done_steps``: steps taken before the
    change (a reset counts the bias corrections from there).
    """
    m, *second = moments
    if change == "reset":
        for t in moments:
            t.zero_()
        store["basis_reset_at"] = torch.tensor(float(done_steps), dtype=torch.float32, device=m.device)
        return
    old = {k: t.clone() for k, t in old.items()}  # views into the store, which the caller overwrites next
    if change in ("transport", "transport_m"):
        m.copy_(rot.change_basis(m, old, new))
    elif order is not None:
        m.copy_(rot.reorder(m, order))
    for t in second:
        if change == "transport":
            t.copy_(rot.change_basis(t, old, new, squared=True).clamp_(min=0))
        elif order is not None:
            t.copy_(rot.reorder(t, order))


def _advance_steps(state_steps: Sequence[torch.Tensor], units: Sequence[Unit]) -> None:
    for i in dict.fromkeys(i for u in units for i in u.params):
        state_steps[i] += 1


def _decay_row(unit: Unit, decay_mask: Sequence[bool] | None, like: torch.Tensor) -> torch.Tensor | None:
    """None when every member decays; else a 0/1 row matching the unit's layout."""
    if decay_mask is None or all(decay_mask[i] for i in unit.params):
        return None
    if len(unit.segments) == 1:
        return like.new_tensor(1.0 if decay_mask[unit.segments[0].param] else 0.0)
    return torch.cat([like.new_full((s.numel,), 1.0 if decay_mask[s.param] else 0.0) for s in unit.segments])


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest tf32 value (10-bit mantissa, ties away from zero: PTX's
    ``cvt.rna.tf32.f32``, what cuBLAS's TF32 does to its inputs), returned as fp32; NaN and inf pass through.

    The kernels' ``precision="tf32"`` rounds its dot operands so (Triton's ``tf32`` dot alone truncates them);
    :func:`rotkern.testing.tf32_matmuls` uses it to emulate TF32 matmuls on a CPU.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_tf32 takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)  # -0x2000 == 0xFFFFE000 as int32
    return torch.where(torch.isnan(x), x, rounded).view(x.shape)


def rotated_sgdm_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    units: Sequence[Unit],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    decay_mask: Sequence[bool] | None = None,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """One rotated SGD-with-momentum step, in place (see the module docstring for the math); ``decay_mask`` as in
    :func:`rotated_adamw_ref` (False: no weight decay for that parameter)."""
    p_flat, g_flat, b_flat = _flat(params), _flat(grads), _flat(momentum_buffers)
    _advance_steps(state_steps, units)
    for unit in units:
        members = unit.params
        first = float(state_steps[members[0]]) == 1
        cdt = momentum_buffers[members[0]].dtype
        p = unit.view(p_flat)
        g = unit.view(g_flat).to(cdt)
        if maximize:
            g = -g
        if weight_decay != 0:
            decay = _decay_row(unit, decay_mask, g)
            g = g.add(p.to(cdt) * (1.0 if decay is None else decay), alpha=weight_decay)
        if isinstance(unit.rotation, DynamicRotation):
            raise ValueError(f"rotated_sgdm_ref: rotation={unit.layout!r} is implemented for AdamW only")
        if unit.rotation is not None:
            g = unit.rotation.rotate(g)
        buf = unit.view(b_flat)
        if momentum != 0:
            if first:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            unit.write(b_flat, buf)
            d = g.add(buf, alpha=momentum) if nesterov else buf
        else:
            d = g
        if unit.rotation is not None:
            d = unit.rotation.unrotate(d)
        unit.write(p_flat, p.to(cdt).add(d, alpha=-lr).to(p.dtype))
