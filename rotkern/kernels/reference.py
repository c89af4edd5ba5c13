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

two_sided_adamw_ref — the Adam step of one dynamic unit with dense bases L, R (what the two-sided kernel
fuses), given the bases: g~ = L^T G R (or a given g~), Alg 4's moments and update, d = L u R^T.

rotated_sgdm_ref — rotated SGD with momentum (torch.optim.SGD semantics in the rotated basis):

    g   = g + wd p                      (coupled weight decay, as torch.optim.SGD)
    g~  = B(pi g)
    buf = g~ at the first step, else mu buf + (1 - dampening) g~
    d   = g~ + mu buf if nesterov else buf
    p   = p - lr pi^-1(B^T d)
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch

from ..bases import BasisOptions, DynamicRotation, step_dynamic_units
from ..scopes import Unit

__all__ = [
    "advance_steps",
    "flat_views",
    "rotated_adamw_ref",
    "rotated_sgdm_ref",
    "round_to_tf32",
    "two_sided_adamw_ref",
]


def flat_views(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Flat views of per-param tensors (None stays None), as the steps index them."""
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
    p_flat, g_flat = flat_views(params), flat_views(grads)
    m_flat, v_flat = flat_views(exp_avgs), flat_views(exp_avg_sqs)
    vmax_flat = flat_views(max_exp_avg_sqs) if amsgrad else None
    advance_steps(state_steps, units)
    flats = (p_flat, m_flat, v_flat, vmax_flat)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay_mask=decay_mask)
    dynamic = [u for u in units if isinstance(u.rotation, DynamicRotation)]
    if dynamic:  # their units cover whole params, none shared with a static unit: the order does not matter
        opts = BasisOptions(svd_every, precondition_every, shampoo_beta, basis_change, basis_stats)
        moment_flats = [m_flat, v_flat] + ([vmax_flat] if amsgrad else [])
        step_dynamic_units(dynamic, g_flat, moment_flats, state_steps, svd_bases, opts=opts, maximize=maximize,
                           adam=lambda s: _adam_unit(s.unit, s.g_rot, s.step, flats, s.bases, **hyper))  # fmt: skip
    for unit in units:
        if isinstance(unit.rotation, DynamicRotation):
            continue
        members = unit.params
        g = unit.view(g_flat).to(exp_avgs[members[0]].dtype)
        if maximize:
            g = -g
        if unit.rotation is not None:
            g = unit.rotation.rotate(g)
        _adam_unit(unit, g, float(state_steps[members[0]]), flats, None, **hyper)


def _adam_unit(
    unit: Unit,
    g: torch.Tensor,
    step: float,
    flats: tuple,
    bases: Mapping[str, torch.Tensor] | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_mask: Sequence[bool] | None,
) -> None:
    """Alg 4's Adam step of one unit on its rotated gradient ``g`` (g~), in place: moments, unrotate, decoupled
    decay and the update. ``bases``: a dynamic unit's current bases (None: a static unit); ``step``: the step
    count the bias corrections use."""
    p_flat, m_flat, v_flat, vmax_flat = flats
    rot = unit.rotation
    m = unit.view(m_flat)
    v = unit.view(v_flat)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if vmax_flat is not None:
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
    if bases is not None:
        if eps == 0:
            # v = 0 means every g~ so far was exactly 0 there (the zero padding of S at an SVD recompute), so m = 0
            # too: the eps -> 0 limit of 0 / (0 + eps) is 0, not NaN (the paper's beta1 = beta2 = eps = 0 link to
            # Muon, U V^T, needs it).
            update = torch.where(denom > 0, update, 0.0)
        update = rot.unrotate(update, bases)
    elif rot is not None:
        update = rot.unrotate(update)

    p = unit.view(p_flat)
    cdt = m.dtype
    # In place when the param already has the compute dtype (p32 then aliases it and write is a no-op).
    p32 = p if p.dtype == cdt else p.to(cdt)
    if weight_decay != 0:
        decay = _decay_row(unit, decay_mask, p32)
        p32.mul_(1 - lr * weight_decay * (1.0 if decay is None else decay))
    p32.add_(update, alpha=-lr / bias_correction1)
    unit.write(p_flat, p32.to(p.dtype))


def advance_steps(state_steps: Sequence[torch.Tensor], units: Sequence[Unit]) -> None:
    """Count one step for every param of ``units``, once per param however many units it has."""
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
    p_flat, g_flat, b_flat = flat_views(params), flat_views(grads), flat_views(momentum_buffers)
    advance_steps(state_steps, units)
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


def two_sided_adamw_ref(
    p: torch.Tensor,
    g: torch.Tensor | None,
    m: torch.Tensor,
    v: torch.Tensor,
    vmax: torch.Tensor | None,
    L: torch.Tensor | None,
    R: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    g_rot: torch.Tensor | None = None,
    precision: str = "ieee",
) -> None:
    """:func:`rotkern.kernels.two_sided_adamw.two_sided_adamw_step` in plain torch, in place, with
    :func:`rotated_adamw_ref`'s op order: the spec.

    Any device; the moments' dtype is the compute dtype (fp32, or fp64 for an fp64 anchor). ``precision`` is
    accepted for signature parity and ignored.
    """
    del precision
    lr = float(lr)
    cdt = m.dtype
    if g_rot is not None:
        gt = g_rot.to(cdt)
    else:
        gt = g.to(cdt)
        if maximize:
            gt = -gt
        if L is not None:
            gt = L.to(cdt).mT @ gt
        if R is not None:
            gt = gt @ R.to(cdt)
    step = float(step)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    m.lerp_(gt, 1 - beta1)
    v.mul_(beta2).addcmul_(gt, gt, value=1 - beta2)
    if amsgrad:
        torch.maximum(vmax, v, out=vmax)
        denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    update = m / denom
    if eps == 0:
        update = torch.where(denom > 0, update, 0.0)
    if R is not None:  # d = L (u R^T): DynamicRotation.unrotate's order
        update = update @ R.to(cdt).mT
    if L is not None:
        update = L.to(cdt) @ update
    p32 = p if p.dtype == cdt else p.to(cdt)
    if weight_decay != 0 and decay:
        p32.mul_(1 - lr * weight_decay)
    p32.add_(update, alpha=-lr / bias_correction1)
    if p32 is not p:
        p.copy_(p32)
