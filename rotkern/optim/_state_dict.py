"""The rotated optimizers' checkpoint format, and its loader.

``state_dict()`` is torch.optim's (state-dict hooks, params numbered in group order, the live state tensors
by reference) plus two rotkern additions:

- ``"rotkern"``: ``{"format": 2, "optimizer": "rotated", "moments": [...], "rotated_prefix": "rotated_"}``.
- The state of a param that belongs to a rotated unit (its moments live in a rotated basis) is saved under
  ``rotated_``-prefixed keys (``rotated_step``, ``rotated_exp_avg``, ...), and its ``step`` entry holds a
  bytes message instead of a number. A torch.optim optimizer given this state would apply the moments in the
  wrong basis; torch's Adam-family ``load_state_dict`` converts ``step`` with ``float()``, so it fails at load
  with this message, and no torch optimizer finds its moment keys. Bytes, not str: torch's loader rebuilds
  every str value from a generator (dropping the text); bytes survive it and ``torch.load(weights_only=True)``.
  Params that no rotation touches (``rotation="none"``, unrotated vectors) keep torch's keys, so a
  ``rotation="none"`` state loads into torch.optim.AdamW and back.

``load_state_dict`` accepts formats 1 (rotkern before the prefix) and 2, and torch optimizers' state for
params this optimizer does not rotate; :mod:`rotkern.optim.convert` moves AdamW state into and out of a
rotated basis. Everything is checked before the optimizer changes; tensors are copied, never shared with the
input, which is never modified.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from ..bases import DynamicRotation
from ._base import SPEC_KEYS, RotatedOptimizerBase, _freeze, _label, _zero_state_like

FORMAT = 2
READABLE_FORMATS = (1, 2)
PREFIX = "rotated_"
# Module wrappers that prefix parameter names without changing the model: torch.compile, DDP / DataParallel,
# FSDP1 and activation checkpointing.
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def marker(scope: str) -> bytes:
    """The ``step`` entry of a rotated param's saved state (see the module docstring)."""
    return (
        f"rotkern: this optimizer state holds Adam moments in a rotated basis (rotation={scope!r}); a torch.optim "
        "optimizer would apply them in the wrong basis. Load it into rotkern.RotatedAdamW / FusedRotatedAdamW, "
        "or convert it: torch_opt.load_state_dict(rotkern.to_adamw_state(state_dict, torch_opt))"
    ).encode()


def rotated_scopes(opt: RotatedOptimizerBase) -> dict[int, str]:
    """id(param) -> scope name, for the params whose state lives in a rotated basis."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for i in opt.rotated_params(gi):
            out[id(group["params"][i])] = group["rotation"]
    return out


def pack(opt: RotatedOptimizerBase, state: Mapping | None = None, hooks: bool = True) -> dict[str, Any]:
    """``opt``'s state_dict; with ``state`` (param -> state dict), that state in ``opt``'s format (converters)."""
    if hooks:
        for hook in opt._optimizer_state_dict_pre_hooks.values():
            hook(opt)
    mapping: dict[int, int] = {}
    groups, start = [], 0
    for group in opt.param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        # rotkern's names are saved only where they add to torch's param_names: an optimizer built from named
        # params saves what one built from plain params does, plus torch's own key.
        if packed.get("names") is None or packed.get("names") == packed.get("param_names"):
            packed.pop("names", None)
        mapping.update({id(p): i for i, p in enumerate(group["params"], start) if id(p) not in mapping})
        packed["params"] = [mapping[id(p)] for p in group["params"]]
        start += len(packed["params"])
        groups.append(packed)
    rotated = rotated_scopes(opt)
    packed_state = {}
    for p, st in (opt.state if state is None else state).items():
        if not isinstance(p, torch.Tensor):  # a non-param key (opt.state["note"] = 1): passed through, as torch does
            packed_state[p] = st
            continue
        key = mapping[id(p)]
        if id(p) in rotated and st:  # empty: "no state yet", saved as it is
            packed_state[key] = {"step": marker(rotated[id(p)]), **{PREFIX + k: v for k, v in st.items()}}
        else:
            packed_state[key] = dict(st)
    sd = {
        "state": packed_state,
        "param_groups": groups,
        "rotkern": {
            "format": FORMAT,
            "optimizer": "rotated",
            "moments": list(opt._moment_keys),
            "rotated_prefix": PREFIX,
        },
    }
    if hooks:
        for hook in opt._optimizer_state_dict_post_hooks.values():
            result = hook(opt, sd)
            if result is not None:
                sd = result
    return sd


def run_pre_hooks(opt: RotatedOptimizerBase, state_dict: Any) -> dict:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_state_dict expects an optimizer state_dict (a dict), got {type(state_dict).__name__}")
    state_dict = dict(state_dict)  # shallow, as torch: hooks may edit or replace it, the caller's stays as it was
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def strip_wrappers(name: str | None) -> str | None:
    """A parameter name without the prefixes module wrappers add (``module.``, ``_orig_mod.`` ...)."""
    if name is None:
        return None
    parts = [c for c in name.split(".") if c not in WRAPPER_COMPONENTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def read_format(state_dict: Mapping) -> int | None:
    """1 or 2 for rotkern state_dicts, None for others (torch.optim's); raises for an unknown rotkern format."""
    if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError(
            "load_state_dict: expected a dict with 'state' (a dict) and 'param_groups' (a list): an optimizer "
            "state_dict"
        )
    meta = state_dict.get("rotkern")
    if meta is None:
        # torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and "param_groups": a rotated
        # param's marker still says which format the state is in.
        for st in state_dict["state"].values() if isinstance(state_dict["state"], Mapping) else ():
            if isinstance(st, Mapping) and isinstance(st.get("step"), bytes) and st["step"].startswith(b"rotkern:"):
                return FORMAT
        return None
    fmt = meta.get("format") if isinstance(meta, Mapping) else None
    if fmt not in READABLE_FORMATS:
        raise ValueError(
            f"load_state_dict: this state_dict has rotkern format {fmt!r}; this rotkern reads formats "
            f"{READABLE_FORMATS} (was it saved by a newer rotkern?)"
        )
    return fmt


def unpack(opt: RotatedOptimizerBase, state_dict: Mapping) -> tuple[defaultdict, list[dict]]:
    """Check ``state_dict`` against ``opt`` and build the new (state, param_groups); ``opt`` is not changed."""
    fmt = read_format(state_dict)
    saved_groups = copy.deepcopy(state_dict["param_groups"])
    groups = opt.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"loaded state dict has a different number of parameter groups: {len(saved_groups)} in the checkpoint, "
            f"{len(groups)} in this optimizer"
        )
    for gi, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
        if not isinstance(sg, Mapping) or "params" not in sg:
            raise ValueError(f"checkpoint param group {gi} is not a dict with 'params'")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(
                f"loaded state dict contains a parameter group that doesn't match the size of optimizer's group: "
                f"param group {gi} has {len(sg['params'])} params in the checkpoint, {len(g['params'])} here"
            )
        if fmt is not None:
            _compare_spec(gi, g, sg)
    id_map = {}
    for sg, g in zip(saved_groups, groups, strict=True):
        id_map.update(zip(sg["params"], g["params"], strict=True))
    labels = {id(p): _label(g["names"], gi, i) for gi, g in enumerate(groups) for i, p in enumerate(g["params"])}
    rotated = rotated_scopes(opt)
    svd_shapes = opt._basis_state_shapes()
    new_state: defaultdict = defaultdict(dict)
    for pid, st in state_dict["state"].items():
        if pid not in id_map:
            if isinstance(pid, numbers.Integral):
                raise ValueError(f"checkpoint state refers to param id {pid!r}, which no param group lists")
            new_state[pid] = copy.deepcopy(st)  # a non-param key: loaded back as it was saved (torch's semantics)
            continue
        p = id_map[pid]
        label = labels[id(p)]
        if not isinstance(st, Mapping):
            raise ValueError(f"checkpoint state of {label} is a {type(st).__name__}, not a dict")
        if len(st) == 0:  # no state yet (a defaultdict read, opt.state[p] = {}, a flattened DCP load): as torch
            continue
        st = _decode(st, fmt, rotated.get(id(p)), label)
        new_state[p] = _load_param_state(opt, p, st, label, svd_shapes.get(id(p), {}))
    _complete_units(opt, new_state, labels)
    return new_state, [_merge_group(g, sg) for g, sg in zip(groups, saved_groups, strict=True)]


def _compare_spec(gi: int, g: dict, sg: Mapping) -> None:
    n = len(g["params"])
    for key in SPEC_KEYS + ("names",):
        mine, theirs = g.get(key), sg.get(key)
        if key == "names":
            mine, theirs = g.get("names", g.get("param_names")), sg.get("names", sg.get("param_names"))
            if mine is None or theirs is None:
                continue
            mine, theirs = [strip_wrappers(x) for x in mine], [strip_wrappers(x) for x in theirs]
        if key == "svd_every" and (g.get("rotation") != "svd" or "svd_every" not in sg):
            continue
        if key == "max_precond_dim" and (g.get("rotation") != "eigen" or key not in sg):
            continue
        if key == "structure":  # checkpoints older than the option are Haar
            mine, theirs = mine or "haar", theirs or "haar"
        if key == "frozen":
            if g.get("rotation") == "none":
                continue
            theirs = [False] * n if theirs is None else theirs
        if _freeze(mine) != _freeze(theirs):
            hint = ""
            if key == "frozen":
                hint = (
                    "; frozen params are left out of the others' rotations (checkpoints of older rotkern versions "
                    "record none): pass the group option frozen=[...] as saved to load it"
                )
            if key == "shard_layout":
                hint = (
                    f"; rotation={g.get('rotation')!r} with shard_mode='local' rotates each rank's shard (rotkern."
                    "optim._sharded), so its moments are tied to the world size it was saved with: resume with as "
                    "many processes, or train with the group option shard_mode='gather' (exact, reshardable)"
                )
            raise ValueError(
                f"checkpoint mismatch in param group {gi}: {key} is {sg.get(key)!r} in the checkpoint but "
                f"{g.get(key)!r} in this optimizer{hint}"
            )


def _decode(st: Mapping, fmt: int | None, scope: str | None, label: str) -> dict:
    """The state in memory-layout keys (step, exp_avg, ...), whatever the format it was saved in."""
    prefixed = [k for k in st if isinstance(k, str) and k.startswith(PREFIX)]
    if scope is None:
        if prefixed:
            raise ValueError(
                f"checkpoint state of {label} is saved in a rotated basis ({prefixed}), but this optimizer does not "
                "rotate that param"
            )
        return dict(st)
    if fmt is None:
        raise ValueError(
            f"checkpoint state of {label} has no rotkern metadata: it looks like a torch.optim state, with moments "
            f"in the standard basis, but rotation={scope!r} keeps this param's moments in a rotated basis. Convert "
            "it: opt.load_state_dict(rotkern.from_adamw_state(opt, state_dict))"
        )
    if fmt == 1:
        return dict(st)
    if not prefixed:
        raise ValueError(
            f"checkpoint state of {label} has no {PREFIX}* keys: it was saved unrotated, but rotation={scope!r} "
            "rotates this param"
        )
    return {k[len(PREFIX) :]: v for k, v in st.items() if k in prefixed}


_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _load_param_state(opt: RotatedOptimizerBase, p: torch.Tensor, st: dict, label: str, want_svd: dict) -> dict:
    missing = [k for k in ("step",) + opt._moment_keys if k not in st]
    if missing:
        raise ValueError(f"checkpoint state of {label} lacks {missing}; it was saved by another optimizer")
    step = _step_value(st["step"], label)
    have_svd = sorted(k for k in st if isinstance(k, str) and k.startswith(("svd_", "eigen_")))
    # Bases exist from step 1 on; without them the moments' basis is lost.
    if (have_svd or step >= 1) and have_svd != sorted(want_svd):
        raise ValueError(
            f"checkpoint state of {label} has basis keys {have_svd}, this optimizer expects {sorted(want_svd)}"
        )
    new = {"step": torch.tensor(step, dtype=torch.float32, device=opt._step_device(p))}
    for key, val in st.items():
        if key == "step":
            continue
        if not torch.is_tensor(val):
            new[key] = copy.deepcopy(val)
            continue
        want = want_svd.get(key, () if key == "basis_reset_at" else tuple(p.shape))
        if tuple(val.shape) != want:
            what = "the bases of this param need" if key in want_svd else "the param has"
            raise ValueError(f"checkpoint state '{key}' of {label} has shape {tuple(val.shape)}, {what} {want}")
        if not (val.is_floating_point() or val.is_complex()):
            raise ValueError(f"checkpoint state '{key}' of {label} has dtype {val.dtype}; expected floating point")
        # Moments in this optimizer's state dtype (a bf16-moment checkpoint loads into fp32 moments exactly, an fp32
        # one into bf16 moments rounded to nearest); bases in the compute dtype.
        dtype = opt.state_dtype if key in _MOMENT_KEYS else opt.compute_dtype
        new[key] = val.detach().to(device=p.device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return new


def _step_value(step: Any, label: str) -> float:
    if torch.is_tensor(step):
        if step.numel() != 1 or step.is_complex():
            raise ValueError(f"checkpoint state 'step' of {label} is a tensor of shape {tuple(step.shape)}")
        value = float(step)
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    else:
        raise ValueError(f"checkpoint state 'step' of {label} is {step!r}; expected a number or a scalar tensor")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"checkpoint state 'step' of {label} is {value}; expected a finite count >= 0")
    return value


def _complete_units(opt: RotatedOptimizerBase, new_state: dict, labels: Mapping) -> None:
    """Members of one multi-param unit share their moments' vector and one step count. A member the checkpoint
    has no state for (torch: "no state yet") gets zero moments at the unit's step, as a live step gives a member
    whose state was emptied; members with different steps are refused."""
    for gi, group in enumerate(opt.param_groups):
        params = group["params"]
        for unit in opt.units(gi):
            if len(unit.params) < 2 or isinstance(unit.rotation, DynamicRotation):
                continue
            members = [params[i] for i in unit.params]
            have = [p for p in members if p in new_state]
            steps = {float(new_state[p]["step"]) for p in have}
            if len(steps) > 1:
                raise ValueError(
                    f"param group {gi}: members of one '{group['rotation']}' unit have different steps {sorted(steps)} "
                    "in the checkpoint; they share one step count"
                )
            if have and len(have) != len(members):
                model = new_state[have[0]]
                for p in members:
                    if p not in new_state:
                        new_state[p] = _zero_state_like(model, p)


def _merge_group(g: dict, sg: dict) -> dict:
    """torch semantics: the saved group's values replace the live ones; rotkern keys the checkpoint lacks (older
    formats, torch.optim's groups) and the live model's names, shapes and frozen flags are kept."""
    new = dict(sg)
    new["params"] = g["params"]
    for key, val in g.items():
        new.setdefault(key, val)
    for key in ("shapes", "frozen"):
        new[key] = g[key]
    if g.get("names") is not None:
        new["names"] = g["names"]
    return new
