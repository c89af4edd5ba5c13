"""Converters between torch.optim.AdamW state and rotkern state in any scope, so that a running job can switch
into or out of a rotated basis without restarting Adam's moments.

With D the rotation of a unit (``B P`` for a permuted block rotation, ``kron(L^T, R^T)`` for an svd unit):

- the first moment is carried exactly: ``m~ = D m`` into the basis, ``m = D^T m~`` out of it;
- the second moment (and AMSGrad's running max) by the element-wise square of D: ``v~ = (D o D) v``,
  ``v = (D o D)^T v~``. This is an approximation: v is an average of squared gradients, and
  ``(D g)^2 = (D o D) g^2`` only when the cross terms ``g_i g_j`` (i != j) average out. It keeps v non-negative,
  is exact for D a signed permutation, and its error on a small model is measured in
  tests/optim/test_convert.py (``test_second_moment_transport_error``);
- ``step``: the members of one rotated unit share one step count, the largest of theirs (members the source has
  no state for contribute zero moments); bias correction continues from there;
- svd units (paper Alg 5) get the identity as their current bases: the moments stay as they are, in the
  standard basis, until the next basis recompute, where they carry over unchanged as Alg 5 carries them.

The target optimizer keeps its own param groups and hyperparameters: only the state moves. One-liners::

    rotated.load_state_dict(rotkern.from_adamw_state(rotated, adamw))   # torch AdamW -> rotated basis
    adamw.load_state_dict(rotkern.to_adamw_state(rotated, adamw))       # rotated basis -> torch AdamW

Sources and targets may be live optimizers (params are then matched by identity, whatever their grouping) or
state_dicts (matched by position in param-group order, with shapes checked).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..bases import DynamicRotation
from ..scopes import Unit, build_units
from . import _state_dict
from ._base import RotatedOptimizerBase
from ._spec import logical_keys, param_label

__all__ = ["from_adamw_state", "to_adamw_state"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SQUARED = {"exp_avg": False, "exp_avg_sq": True, "max_exp_avg_sq": True}
# torch.optim.AdamW's group keys beyond the hyperparameters rotkern shares with it.
_ADAMW_GROUP = dict(foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)
_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "initial_lr")


def from_adamw_state(optimizer: RotatedOptimizerBase, source: Optimizer | Mapping) -> dict[str, Any]:
    """AdamW moments carried into ``optimizer``'s rotated basis, as a state_dict for ``optimizer.load_state_dict``.

    Args:
        optimizer: the target, a :class:`rotkern.RotatedAdamW` or :class:`rotkern.FusedRotatedAdamW` (any scope);
            its param groups and hyperparameters are kept.
        source: a torch Adam-family optimizer (``torch.optim.AdamW``, ``Adam``), its state_dict, or a rotkern
            optimizer or state_dict in any scope (converted to the standard basis first).
    Returns:
        A rotkern state_dict (format of :meth:`RotatedAdamW.state_dict`) with moments in ``optimizer``'s
        compute dtype on its params' devices. Raises TypeError for other optimizers, ValueError when the params
        cannot be matched (count, shapes) or the source state is not Adam's.
    """
    if not isinstance(optimizer, RotatedOptimizerBase) or "exp_avg" not in optimizer._moment_keys:
        raise TypeError(f"from_adamw_state: the target must be a rotkern RotatedAdamW, got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for k, p in enumerate(params):
        if p.is_complex():
            _refuse_complex(f"param {k} of the target")
    std = _standard_states(params, source)
    new_state: dict = {}
    offset = 0
    for gi, group in enumerate(optimizer.param_groups):
        gparams = group["params"]
        local = std[offset : offset + len(gparams)]
        offset += len(gparams)
        keys = [k for k in _MOMENTS if k != "max_exp_avg_sq" or group["amsgrad"]]
        # A source without AMSGrad's max starts it from v (max(v, v) = v).
        src = {k: _flats(gparams, [None if s is None else s.get(k, s["exp_avg_sq"]) for s in local]) for k in keys}
        out = {k: [None] * len(gparams) for k in keys}
        steps: dict[int, float] = {}
        for unit in optimizer.units(gi):
            have = [i for i in unit.params if local[i] is not None]
            if not have:
                continue
            step = max(local[i]["step"] for i in have)
            for i in unit.params:
                steps[i] = max(steps.get(i, 0.0), step)
            rot = unit.rotation
            for key in keys:
                dst = out[key]
                for i in unit.params:
                    if dst[i] is None:
                        dst[i] = torch.zeros(gparams[i].numel(), dtype=torch.float64, device=gparams[i].device)
                x = unit.view(src[key])
                if rot is not None and not isinstance(rot, DynamicRotation):  # dynamic units start from L = R = I
                    x = rot.rotate(x, squared=_SQUARED[key])
                unit.write(dst, x)
        for i, p in enumerate(gparams):
            if i in steps:
                st = {"step": torch.tensor(steps[i], dtype=torch.float32, device=optimizer._step_device(p))}
                for key in keys:
                    st[key] = out[key][i].view(p.shape).to(optimizer.compute_dtype)
                new_state[p] = st
            elif local[i] is not None and p.numel() == 0:
                st = {"step": torch.tensor(local[i]["step"], dtype=torch.float32, device=optimizer._step_device(p))}
                new_state[p] = {**st, **{k: torch.zeros(p.shape, dtype=optimizer.compute_dtype) for k in keys}}
        for unit in optimizer.units(gi):
            if isinstance(unit.rotation, DynamicRotation) and gparams[unit.params[0]] in new_state:
                p = gparams[unit.params[0]]
                unit.rotation.save(new_state[p], unit.rotation.identity_bases(optimizer.compute_dtype, p.device))
    return _state_dict.pack(optimizer, new_state, hooks=False)


def to_adamw_state(source: RotatedOptimizerBase | Mapping, target: Optimizer | None = None) -> dict[str, Any]:
    """A rotkern optimizer's moments carried back to the standard basis, as a torch.optim.AdamW state_dict.

    Args:
        source: a rotkern RotatedAdamW / FusedRotatedAdamW (any scope), or its state_dict.
        target: the optimizer that will load the result (its param groups and hyperparameters are used, and its
            params matched to the source's by identity, or by position when ``source`` is a state_dict). Without
            it, one AdamW group per source group, with the source's hyperparameters (a group with a mixed
            ``decay_mask`` then raises: torch.optim.AdamW has no per-param decay; pass a target).
    Returns:
        ``{"state": ..., "param_groups": ...}`` as ``torch.optim.AdamW.state_dict()`` writes it: per param
        ``step`` (float32 scalar tensor on the CPU), ``exp_avg``, ``exp_avg_sq`` and, where the group uses
        AMSGrad, ``max_exp_avg_sq``.
    """
    view = _RotatedView.of(source)
    std = view.standard_states()
    if target is None:
        groups, start = [], 0
        for gi, g in enumerate(view.groups):
            n = len(g["shapes"])
            mask = g.get("decay_mask")
            wd = g["weight_decay"]
            if mask is not None and len(set(map(bool, mask))) > 1:
                raise ValueError(
                    f"to_adamw_state: param group {gi} has a per-param decay_mask, which torch.optim.AdamW cannot "
                    "express; pass target=<the AdamW you will load it into> (e.g. with nanoGPT's decay groups)"
                )
            if mask is not None and not any(mask):
                wd = 0.0
            group = {k: copy.deepcopy(g[k]) for k in _HYPER if k in g}
            groups.append({**group, "weight_decay": wd, **_ADAMW_GROUP, "params": list(range(start, start + n))})
            start += n
        state = {i: st for i, st in enumerate(std) if st is not None}
        amsgrad = [g.get("amsgrad", False) for g in groups for _ in g["params"]]
    else:
        if not isinstance(target, Optimizer):
            raise TypeError(f"to_adamw_state: target must be a torch.optim.Optimizer, got {type(target).__name__}")
        tparams = [p for g in target.param_groups for p in g["params"]]
        if view.live is not None:
            by_id = {id(p): st for p, st in zip(view.live, std, strict=True)}
            aligned = [by_id.get(id(p)) for p in tparams]
        else:
            _check_positional(tparams, view.shapes(), "to_adamw_state")
            aligned = std
        groups, start = [], 0
        for g in target.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        state = {i: st for i, st in enumerate(aligned) if st is not None}
        amsgrad = [g.get("amsgrad", False) for g in target.param_groups for _ in g["params"]]
    out = {}
    for i, st in state.items():
        st = dict(st)
        step = st.pop("step")
        if not amsgrad[i]:
            st.pop("max_exp_avg_sq", None)
        elif "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()  # torch's AMSGrad needs it; max(v, v) = v
        out[i] = {"step": torch.tensor(step, dtype=torch.float32), **st}
    return {"state": out, "param_groups": groups}


# -- sources ---------------------------------------------------------------------------------------------


class _RotatedView:
    """A rotkern optimizer's groups, units and states, from the live object or from its state_dict."""

    def __init__(self, groups: list[dict], units: list[list[Unit]], states: list[dict | None], live) -> None:
        self.groups, self.units, self.states, self.live = groups, units, states, live
        for k, st in enumerate(states):
            if st and any(torch.is_tensor(v) and v.is_complex() for v in st.values()):
                _refuse_complex(f"param {k} of the source")

    @classmethod
    def of(cls, source: RotatedOptimizerBase | Mapping) -> _RotatedView:
        if isinstance(source, RotatedOptimizerBase):
            if "exp_avg" not in source._moment_keys:
                raise TypeError(f"to_adamw_state: {type(source).__name__} keeps no Adam moments")
            live = [p for g in source.param_groups for p in g["params"]]
            units = [source.units(gi) for gi in range(len(source.param_groups))]
            states = [logical_keys(source.state[p]) if source.state.get(p) else None for p in live]
            return cls(source.param_groups, units, states, live)
        if not isinstance(source, Mapping):
            raise TypeError(
                f"to_adamw_state: source must be a rotkern optimizer or its state_dict, got {type(source).__name__}"
            )
        if _state_dict.read_format(source) is None:
            raise ValueError("to_adamw_state: this state_dict has no rotkern metadata; it is in the standard basis")
        groups = list(source["param_groups"])
        units, states = [], []
        for gi, g in enumerate(groups):
            gu = build_units(
                g["shapes"],
                g["rotation"],
                block_size=g["block_size"],
                seed=g["seed"],
                roles=g["roles"],
                names=g.get("names", g.get("param_names")),
                split_qkv=g["split_qkv"],
                embedding=g["embedding"],
                vectors=g["vectors"],
                frozen=g.get("frozen"),
                max_precond_dim=g.get("max_precond_dim", 10000),
                structure=g.get("structure", "haar"),
            )
            units.append(gu)
            rotated = {i for u in gu if u.rotation is not None for i in u.params} if g["rotation"] != "none" else set()
            fmt = _state_dict.read_format(source)
            for i, pid in enumerate(g["params"]):
                st = source["state"].get(pid)
                label = param_label(g.get("names", g.get("param_names")), gi, i)
                scope = g["rotation"] if i in rotated else None
                states.append(None if not st else _state_dict.decode_state(st, fmt, scope, label))
        return cls(groups, units, states, None)

    def shapes(self) -> list[list[int]]:
        return [s for g in self.groups for s in g["shapes"]]

    def standard_states(self) -> list[dict | None]:
        """Per param (all groups), {step: float, moments in the standard basis (param shape)} or None."""
        out: list[dict | None] = []
        offset = 0
        for gi, g in enumerate(self.groups):
            shapes = [torch.Size(s) for s in g["shapes"]]
            local = self.states[offset : offset + len(shapes)]
            offset += len(shapes)
            res: list[dict | None] = [None] * len(shapes)
            for i, st in enumerate(local):
                if st is not None:
                    label = param_label(g.get("names", g.get("param_names")), gi, i)
                    res[i] = {"step": _state_dict.step_value(st["step"], label)}
            for key in _MOMENTS:
                if not any(st is not None and key in st for st in local):
                    continue
                src = [None if st is None else st[key].reshape(-1).double() for st in local]
                dst: list[torch.Tensor | None] = [None] * len(shapes)
                for unit in self.units[gi]:
                    if any(src[i] is None for i in unit.params):
                        continue
                    for i in unit.params:
                        if dst[i] is None:
                            dst[i] = torch.zeros_like(src[i])
                    y = unit.view(src)
                    rot = unit.rotation
                    if isinstance(rot, DynamicRotation):
                        y = rot.unrotate(y, _svd_bases(rot, local[unit.params[0]]), squared=_SQUARED[key])
                    elif rot is not None:
                        y = rot.unrotate(y, squared=_SQUARED[key])
                    unit.write(dst, y)
                for i, st in enumerate(local):
                    if st is not None and key in st:
                        moment = dst[i] if dst[i] is not None else src[i]  # zero-size params: no unit
                        res[i][key] = moment.view(shapes[i]).to(st[key].dtype)
            out.extend(res)
        return out


def _svd_bases(rot: DynamicRotation, st: Mapping) -> dict[str, torch.Tensor] | None:
    bases = rot.load(st)
    return None if bases is None else {k: v.double() for k, v in bases.items()}


def _standard_states(params: Sequence[torch.Tensor], source: Any) -> list[dict | None]:
    """Per target param, the source's Adam state in the standard basis ({step: float, moments}) or None."""
    if isinstance(source, RotatedOptimizerBase) or (
        isinstance(source, Mapping) and _state_dict.read_format(source) is not None
    ):
        view = _RotatedView.of(source)
        std = view.standard_states()
        if view.live is not None:
            by_id = {id(p): st for p, st in zip(view.live, std, strict=True)}
            return [by_id.get(id(p)) for p in params]
        _check_positional(params, view.shapes(), "from_adamw_state")
        return std
    if isinstance(source, Optimizer):
        return [_adam_state(source.state.get(p), f"param {k}") for k, p in enumerate(params)]
    if isinstance(source, Mapping):
        _state_dict.read_format(source)  # checks the top-level structure
        ids = [pid for g in source["param_groups"] for pid in g["params"]]
        if len(ids) != len(params):
            raise ValueError(f"from_adamw_state: the source has {len(ids)} params, the target {len(params)}")
        out = []
        for k, (pid, p) in enumerate(zip(ids, params, strict=True)):
            st = _adam_state(source["state"].get(pid), f"param {k}")
            if st is not None and st["exp_avg"].numel() != p.numel():
                raise ValueError(
                    f"from_adamw_state: param {k} has {p.numel()} elements, its source state "
                    f"{tuple(st['exp_avg'].shape)}"
                )
            out.append(st)
        return out
    raise TypeError(f"from_adamw_state: source must be an optimizer or a state_dict, got {type(source).__name__}")


def _adam_state(st: Mapping | None, label: str) -> dict | None:
    if not st:
        return None
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
    if missing:
        raise ValueError(f"from_adamw_state: the source state of {label} lacks {missing}; it is not an Adam state")
    out = {"step": _state_dict.step_value(st["step"], label)}
    for key in _MOMENTS:
        if key in st:
            out[key] = st[key]
    return out


def _refuse_complex(what: str) -> None:
    raise ValueError(
        f"{what} is complex; the AdamW <-> rotated converters handle real params only (the optimizers step complex "
        "params as their real coordinates, but a checkpoint does not record which params were complex)"
    )


def _flats(params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Flat float64 views (zeros where a param has no source state) for Unit.view."""
    return [
        torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
        if t is None
        else t.detach().reshape(-1).to(device=p.device, dtype=torch.float64)
        for p, t in zip(params, tensors, strict=True)
    ]


def _check_positional(params: Sequence[torch.Tensor], shapes: Sequence, where: str) -> None:
    if len(params) != len(shapes):
        raise ValueError(f"{where}: the source has {len(shapes)} params, the target {len(params)}")
    for k, (p, s) in enumerate(zip(params, shapes, strict=True)):
        if tuple(p.shape) != tuple(s):
            raise ValueError(f"{where}: param {k} has shape {tuple(p.shape)} in the target, {tuple(s)} in the source")
