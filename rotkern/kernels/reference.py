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

SVD units (rotation="svd", paper Alg 5; :class:`rotkern.scopes.SvdRotation`) replace B(pi .) by a two-sided
rotation of the unit's (k, w) matrix G, with bases recomputed from the current gradient at steps
t = 1, 1 + F, 1 + 2F, ... (F = svd_every):

    U, S, V = svd(G)  at a recompute step  (bases L = [U, U_perp], R = [V, V_perp], kept in param state)
    g~  = L^T G R                          (= S padded with zeros at a recompute step; see below)
    ... Adam as above on g~; m, v carried over unchanged when the bases change (no re-projection) ...
    d   = L u R^T

At a recompute step g~ is set to S (diagonal, zero elsewhere) instead of computing L^T G R: the two are
equal in exact arithmetic, and the product would leave fp32 rounding noise (~1e-7 sigma_1) in the zero
coordinates, which Adam's first step (v = 0 there) turns into full +-lr updates along random directions.

rotated_sgdm_ref — rotated SGD with momentum (torch.optim.SGD semantics in the rotated basis):

    g   = g + wd p                      (coupled weight decay, as torch.optim.SGD)
    g~  = B(pi g)
    buf = g~ at the first step, else mu buf + (1 - dampening) g~
    d   = g~ + mu buf if nesterov else buf
    p   = p - lr pi^-1(B^T d)
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch

from ..scopes import SvdRotation, Unit

__all__ = ["rotated_adamw_ref", "rotated_sgdm_ref"]


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
        svd_bases: needed when ``units`` has svd units: per parameter, a mutable mapping that holds its bases
            (the optimizer passes the param's state dict; keys ``svd_u``, ``svd_v``, ... as in
            :class:`~rotkern.scopes.SvdRotation`). Written at recompute steps, read at the others.
        svd_every: F; svd units recompute their bases at steps t with (t - 1) % F == 0.
    """
    p_flat, g_flat = _flat(params), _flat(grads)
    m_flat, v_flat = _flat(exp_avgs), _flat(exp_avg_sqs)
    vmax_flat = _flat(max_exp_avg_sqs) if amsgrad else None
    _advance_steps(state_steps, units)
    for unit in units:
        members = unit.params
        step = float(state_steps[members[0]])
        cdt = exp_avgs[members[0]].dtype
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5

        g = unit.view(g_flat).to(cdt)
        if maximize:
            g = -g
        rot = unit.rotation
        svd = isinstance(rot, SvdRotation)
        if svd:
            g, bases = _svd_rotate(rot, g, svd_bases, members[0], step, svd_every)
        elif rot is not None:
            g = rot.rotate(g)
        m = unit.view(m_flat)
        v = unit.view(v_flat)
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
        if svd:
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


def _svd_rotate(
    rot: SvdRotation,
    g: torch.Tensor,
    svd_bases: Sequence[MutableMapping[str, torch.Tensor] | None] | None,
    param: int,
    step: float,
    svd_every: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(g~, bases) of an svd unit at ``step``: new bases from g at a recompute step, else the stored ones."""
    store = None if svd_bases is None else svd_bases[param]
    if store is None:
        raise ValueError("rotated_adamw_ref: svd units need svd_bases (a mapping per parameter to keep the bases in)")
    if (int(step) - 1) % svd_every == 0:
        s, bases = rot.compute(g)
        rot.save(store, bases)
        g_rot = torch.zeros_like(g)
        g_rot.diagonal()[: rot.rank] = s  # = L^T g R exactly; see the module docstring
        return g_rot, rot.load(store)
    bases = rot.load(store)
    if bases is None:
        raise ValueError(
            f"svd unit {rot!r} has no bases at step {int(step)}: they are computed at steps 1, 1 + F, ... "
            "(F = svd_every); a checkpoint that lacks them cannot continue"
        )
    return rot.rotate(g, bases), bases


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
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """One rotated SGD-with-momentum step, in place (see the module docstring for the math)."""
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
            g = g.add(p.to(cdt), alpha=weight_decay)
        if isinstance(unit.rotation, SvdRotation):
            raise ValueError("rotated_sgdm_ref: rotation='svd' is implemented for AdamW only")
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
