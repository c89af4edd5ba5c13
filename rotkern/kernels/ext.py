"""The compiled extension's rotated AdamW step: :func:`rotated_adamw_ref`'s signature, in C++ (csrc/).

``torch.ops.rotkern.rotated_adamw_unit_`` steps one rotation unit; this launcher advances the steps and calls
it once per rotated unit, and once for all unrotated units of a step that share a dtype pair and a step count
(scope ``none`` is then a single call). The math is the reference's (paper App. A.1-A.3): per block of n
coordinates, gather the gradient through pi, rotate it (a BLAS GEMM over a tile of a few hundred blocks),
update Adam's moments in the rotated layout (vectorised: AVX-512, AVX2 or scalar, chosen at run time), rotate
the update back and scatter it through pi with decoupled weight decay. Tiles run in parallel over the CPU's
threads (``torch.get_num_threads()``); the result does not depend on the thread count.

Memory. A flat unit's permutation (global and layer scopes) is kept as streaming tables, 6 bytes per coordinate
(``torch.ops.rotkern.flat_perm_tables``: an int32 slot and a uint16 position per coordinate, built once per
unit and cached here instead of the int64 pi), and applied through one fp32 workspace as long as the largest
such unit (4 bytes per coordinate of it), allocated once per thread and reused by every later step: a random
gather of d coordinates misses the caches on every element, this way each pass streams (csrc/rotkern_ops.cpp).
:func:`release_workspace` frees it. Rows and columns units need only two tile buffers per thread.

The extension is optional: build it with ``python -m rotkern.build_ext`` (``make ext`` in a checkout). Today it
has a CPU path only; CUDA tensors use the Triton kernels (``rotkern.kernels.rotated_adamw_step``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .._backend import load_ext, why_not_ext
from ..scopes import Unit

__all__ = ["release_workspace", "rotated_adamw_step_ext"]

_LAYOUT = {"identity": 0, "flat": 0, "rows": 1, "cols": 2}


def rotated_adamw_step_ext(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    state_steps: Sequence[torch.Tensor],
    units: Sequence[Unit],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    decay_mask: Sequence[bool] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One rotated AdamW step in place, through the compiled extension (see the module docstring).

    (Long because every tensor is checked before the first unit is stepped: a refused call changes nothing.)

    Args: as :func:`rotkern.kernels.reference.rotated_adamw_ref`; ``lr``, ``beta1`` and ``beta2`` may be floats or
    one-element tensors. ``grad_scale`` and ``found_inf``: ``torch.amp.GradScaler``'s tensors, as torch's fused
    AdamW takes them; the op divides the gradient by ``grad_scale`` and writes nothing when ``found_inf`` is
    nonzero (the step counts are advanced, then ``found_inf`` is subtracted from them).
    Requirements: CPU tensors, contiguous params and grads, fp32 moments, fp32 scalar CPU steps; the members
    of one unit share their param dtype and their grad dtype.
    """
    units = list(units)
    if not units:
        return
    touched = list(dict.fromkeys(i for u in units for i in u.params))
    reason = why_not_ext(params[touched[0]])
    if reason is not None:
        raise RuntimeError(f"rotated_adamw_step_ext {reason}; got {params[touched[0]].device} params")
    load_ext()
    checked = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, state_steps, touched)
    if not _inputs_ok(*checked):
        _check_inputs(*checked)  # raises, naming the param and what is wrong
    for unit in units:
        # The op checks this too, but only after the steps below have advanced: refuse before any change.
        pairs = {(params[i].dtype, grads[i].dtype) for i in unit.params}
        if len(pairs) > 1:
            raise ValueError(
                f"rotated_adamw_step_ext: a {unit.layout} unit spans params of several (param, grad) dtypes "
                f"{sorted(map(str, pairs))}; the op needs one pair per unit (FusedRotatedAdamW stages such units in "
                "fp32 for it)"
            )
    lr_t = lr.detach().to("cpu", torch.float64) if torch.is_tensor(lr) else torch.tensor(float(lr), dtype=torch.float64)
    # Each param steps once, even when it is split over several units (q/k/v), as in the reference.
    # Tensors go to the op as tensors (read inside it), so that torch.compile never turns them into host floats.
    scaling = {
        name: x.detach().to("cpu", torch.float32 if name in ("grad_scale", "found_inf") else torch.float64).reshape(())
        for name, x in (("grad_scale", grad_scale), ("found_inf", found_inf), ("beta1_tensor", beta1),
                        ("beta2_tensor", beta2))
        if torch.is_tensor(x)
    }  # fmt: skip
    steps = [state_steps[i] for i in touched]
    torch._foreach_add_(steps, 1.0)
    op = torch.ops.rotkern.rotated_adamw_unit_
    hyper = tuple(0.0 if torch.is_tensor(b) else float(b) for b in (beta1, beta2)) + (
        float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
    )  # fmt: skip

    def call(members, segs, layout, width, shape, rot, tables=(None, None, None)):
        op(
            [params[i] for i in members],
            [grads[i] for i in members],
            [exp_avgs[i] for i in members],
            [exp_avg_sqs[i] for i in members],
            [max_exp_avg_sqs[i] for i in members] if amsgrad else [],
            state_steps[members[0]],
            lr_t,
            *segs,
            layout,
            width,
            *shape,
            *rot,
            *hyper,
            *tables,
            **scaling,
        )

    identity: dict[tuple, list[Unit]] = {}
    for unit in units:
        if unit.rotation is None:
            # Element-wise units batch into one call per (dtypes, step count): one parallel region for scope none.
            i = unit.params[0]
            # Batching needs equal step counts, read on the host; a compiled step (which must not read them) makes
            # one call per unit instead.
            count = i if torch.compiler.is_compiling() else float(state_steps[i])
            identity.setdefault((params[i].dtype, grads[i].dtype, count), []).append(unit)
            continue
        members, segs, layout, rot, tables = _describe(unit, decay_mask)
        if tables is not None:
            tables = (*tables, _workspace(unit.shape[1]))
        call(members, segs, layout, unit.width, unit.shape, rot, tables or (None, None, None))
    for batch in identity.values():
        members = list(dict.fromkeys(i for u in batch for i in u.params))
        local = {p: k for k, p in enumerate(members)}
        seg = [s for u in batch for s in u.segments]
        segs = (
            [local[s.param] for s in seg],
            [s.start for s in seg],
            [s.numel for s in seg],
            [1 if decay_mask is None or decay_mask[s.param] else 0 for s in seg],
        )
        call(members, segs, _LAYOUT["flat"], 0, (1, sum(s.numel for s in seg)), (1, None, None, None))
    if "found_inf" in scaling:
        torch._foreach_sub_(steps, [scaling["found_inf"]] * len(steps))


_local = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """This thread's fp32 workspace of at least ``numel`` elements (grown on demand, then reused)."""
    ws = getattr(_local, "workspace", None)
    if ws is None or ws.numel() < numel:
        _local.workspace = None  # drop the old one before allocating the larger
        ws = _local.workspace = torch.empty(numel, dtype=torch.float32)
    return ws


def release_workspace() -> None:
    """Free this thread's workspace (4 bytes per coordinate of the largest permuted flat unit stepped so far);
    the next step that needs it allocates it again."""
    _local.workspace = None


_DESCRIPTIONS: OrderedDict = OrderedDict()


def _describe(unit: Unit, decay_mask: Sequence[bool] | None):
    """The op's per-unit arguments (cached: units and their rotations do not change between steps)."""
    decays = tuple(1 if decay_mask is None or decay_mask[s.param] else 0 for s in unit.segments)
    key = (id(unit), decays)
    hit = _DESCRIPTIONS.get(key)
    if hit is not None and hit[0] is unit:
        _DESCRIPTIONS.move_to_end(key)
        return hit[1]
    desc = _build_description(unit, decays)
    _DESCRIPTIONS[key] = (unit, desc)
    if len(_DESCRIPTIONS) > 4096:
        _DESCRIPTIONS.popitem(last=False)
    return desc


@torch.compiler.disable  # built once per unit and cached; host work (numpy streams, the tables' O(L) pass)
def _build_description(unit: Unit, decays: tuple[int, ...]):
    members = unit.params
    local = {p: k for k, p in enumerate(members)}
    segs = (
        [local[s.param] for s in unit.segments],
        [s.start for s in unit.segments],
        [s.numel for s in unit.segments],
        list(decays),
    )
    r = unit.rotation
    blocks = (r.block(torch.float32, "cpu"), r.residual_block(torch.float32, "cpu"))
    perm, tables = None, None
    if unit.layout == "flat" and r.perm_stream is not None:
        # Streaming tables instead of the int64 pi (6 bytes per coordinate, not 8); pi itself is not kept.
        pi = r.permutation("cpu", cache=False)
        tables = tuple(torch.ops.rotkern.flat_perm_tables(pi, r.block_size)[:2])
        del pi
    else:
        perm = r.permutation("cpu")  # rows / columns: one pi as long as a row, shared by all rows
    return members, segs, _LAYOUT[unit.layout], (r.block_size, perm, *blocks), tables


def _inputs_ok(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, touched) -> bool:
    """The checks of :func:`_check_inputs` in one cheap pass (every step runs it; the messages only on failure)."""
    dev, f32 = params[touched[0]].device, torch.float32
    for i in touched:
        p, g, m, v, s = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        ts = (p, g, m, v) if max_exp_avg_sqs is None else (p, g, m, v, max_exp_avg_sqs[i])
        if g is None or m is None or v is None or s is None or ts[-1] is None:
            return False
        shape = p.shape
        for t in ts:
            if t.shape != shape or t.device != dev or not t.is_contiguous():
                return False
        if p.dtype not in _DTYPES or g.dtype not in _DTYPES or any(t.dtype != f32 for t in ts[2:]):
            return False
        if s.dtype != f32 or s.device.type != "cpu" or s.numel() != 1:
            return False
    return True


def _check_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, touched) -> None:
    """Clear errors naming the param; the op re-checks what it relies on, with terser messages."""
    first = params[touched[0]]
    for i in touched:
        checks = [("param", params[i], None), ("grad", grads[i], params[i].shape)]
        checks += [(n, ts[i], params[i].shape) for n, ts in
                   (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs), ("max_exp_avg_sq", max_exp_avg_sqs))
                   if ts is not None]  # fmt: skip
        for name, t, shape in checks:
            if t is None:
                raise ValueError(f"param {i}: {name} is None; every member of a stepped unit needs one")
            if t.device != first.device:
                raise ValueError(f"param {i}: {name} is on {t.device} but param {touched[0]} is on {first.device}")
            if shape is not None and t.shape != shape:
                raise ValueError(f"param {i}: {name} has shape {tuple(t.shape)}, the param {tuple(shape)}")
            if not t.is_contiguous():
                raise ValueError(
                    f"param {i}: {name} is not contiguous; the extension indexes flat memory "
                    "(make the param contiguous, or use backend='eager')"
                )
            if not t.is_floating_point() or t.dtype not in _DTYPES:
                raise ValueError(f"param {i}: {name} has dtype {t.dtype}; expected one of {sorted(map(str, _DTYPES))}")
            if name.startswith(("exp_", "max_")) and t.dtype != torch.float32:
                raise ValueError(
                    f"param {i}: {name} is {t.dtype}; the extension keeps fp32 moments (compute_dtype=torch.float64 "
                    "needs backend='eager')"
                )
        s = state_steps[i]
        if s is None or s.device.type != "cpu" or s.dtype != torch.float32 or s.numel() != 1:
            got = "None" if s is None else f"{s.dtype} on {s.device} with {s.numel()} elements"
            raise ValueError(f"param {i}: state step must be a float32 CPU scalar; got {got}")


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
