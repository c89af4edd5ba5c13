"""The rotated optimizers' checkpoint format (format 3), and its loader.

``state_dict()`` is torch.optim's (state-dict hooks, params numbered in group order, the live state tensors
by reference, per-param entries of tensors and Python numbers only, with the live state's keys), plus
``"rotkern": {"format": 3, "optimizer": "rotated", "moments": [...], "rotated_prefix": "rotated_"}``.

The moments of a param that belongs to a rotated unit (they live in a rotated basis) are kept, live and
saved alike, under ``rotated_``-prefixed names (``rotated_exp_avg``, ``rotated_exp_avg_sq``, ...; ``step``
and the dynamic scopes' basis tensors keep their names). A torch.optim optimizer given this state loads it
and then fails at its first step (``KeyError: 'exp_avg'``) instead of applying the moments in the wrong
basis. Params that no rotation touches (``rotation="none"``, unrotated vectors) keep torch's keys, so a
``rotation="none"`` state loads into torch.optim.AdamW and back. Because the live and saved keys agree,
torch.distributed.checkpoint's flattened state dicts, ZeroRedundancyOptimizer (which copies saved entries
into the live state) and other code that treats the state as torch's carry it unchanged.

``load_state_dict`` also reads format 1 (plain keys for every param) and format 2 (every key of a rotated
param prefixed, and a bytes message as its ``step``), and torch optimizers' state for params this optimizer
does not rotate; :mod:`rotkern.optim.convert` moves AdamW state into and out of a rotated basis. A state_dict
without the ``"rotkern"`` entry (torch.distributed.checkpoint keeps only ``state`` and ``param_groups``) is
recognised by its groups' rotation options. Everything is checked before the optimizer changes; tensors are
copied, never shared with the input, which is never modified.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..bases import DynamicRotation
from ._spec import (
    MOMENT_KEYS,
    ROTATED_PREFIX,
    SPEC_KEYS,
    freeze,
    logical_keys,
    moment_dtype,
    param_label,
    stored_keys,
    zero_state_like,
)

if TYPE_CHECKING:  # the optimizers call this module; it needs their class only for annotations
    from ._base import RotatedOptimizerBase

FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
PREFIX = ROTATED_PREFIX
# Module wrappers that prefix parameter names without changing the model: torch.compile, DDP / DataParallel,
# FSDP1 and activation checkpointing.
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _is_marker(value: Any) -> bool:
    """Whether ``value`` is the bytes ``step`` entry format 2 saved for rotated params."""
    return isinstance(value, bytes) and value.startswith(b"rotkern:")


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
    for gi, group in enumerate(opt.param_groups):  # lists a ZeroRedundancyOptimizer copied in are put back
        opt._reclaim_lists(gi, group)
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
        # The live entry as it is; a converter's state (plain moment names) gets the live names.
        packed_state[mapping[id(p)]] = dict(st) if state is None else stored_keys(st, id(p) in rotated)
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
    """1, 2 or 3 for rotkern state_dicts, None for others (torch.optim's); raises for an unknown rotkern format."""
    if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError(
            "load_state_dict: expected a dict with 'state' (a dict) and 'param_groups' (a list): an optimizer "
            "state_dict"
        )
    meta = state_dict.get("rotkern")
    if meta is None:
        # torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and "param_groups": format 2's
        # marker, or format 3's group options, still say whose state it is.
        for st in state_dict["state"].values():
            if isinstance(st, Mapping) and _is_marker(st.get("step")):
                return 2
        groups = state_dict["param_groups"]
        if groups and all(isinstance(g, Mapping) and "rotation" in g and "block_size" in g for g in groups):
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
    labels = {id(p): param_label(g["names"], gi, i) for gi, g in enumerate(groups) for i, p in enumerate(g["params"])}
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
        st = decode_state(st, fmt, rotated.get(id(p)), label)
        st = _load_param_state(opt, p, st, label, svd_shapes.get(id(p), {}))
        new_state[p] = stored_keys(st, id(p) in rotated)
    _complete_units(opt, new_state, labels)
    return new_state, [_merge_group(g, sg) for g, sg in zip(groups, saved_groups, strict=True)]


def _compare_spec(gi: int, g: dict, sg: Mapping) -> None:
    n = len(g["params"])
    # rotation="none" on both sides: no rotation options matter (a torch AdamW that loaded a rotkern state once
    # saves its group keys along)
    keys = ("rotation", "names") if g.get("rotation") == sg.get("rotation") == "none" else SPEC_KEYS + ("names",)
    for key in keys:
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
        if freeze(mine) != freeze(theirs):
            hint = ""
            if key == "rotation" and sg.get(key) == "none":
                hint = (
                    "; its moments are in the standard basis: convert them, "
                    "opt.load_state_dict(rotkern.from_adamw_state(opt, state_dict))"
                )
            if key == "frozen":
                hint = (
                    "; frozen params are left out of the others' rotations (checkpoints of older rotkern versions "
                    "record none): pass the group option frozen=[...] as saved to load it"
                )
            if key == "embedding":
                hint = (
                    f"; build the optimizer with embedding={sg.get(key)!r} to resume it (rotkern before 0.2 "
                    "defaulted to 'transposed', the workshop text's B.1; now 'as_linear', paper C.2)"
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


def decode_state(st: Mapping, fmt: int | None, scope: str | None, label: str) -> dict:
    """One saved per-param entry ``st`` with plain moment names (step, exp_avg, ...), whatever the format it was
    saved in.

    ``fmt`` is the checkpoint's format (:func:`read_format`: 1, 2, 3, or None for torch.optim's state),
    ``scope`` the rotation of the param's unit where its state lives in a rotated basis (None where it is not
    rotated), ``label`` how messages name the param. Raises ValueError when the entry's basis does not match
    (rotated moments for an unrotated param, torch.optim or unrotated moments for a rotated one). ``st`` is
    not modified; the tensors are not copied."""
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
    if fmt == 2 and _is_marker(st.get("step")):  # every key prefixed, the step too
        return {k[len(PREFIX) :]: v for k, v in st.items() if k in prefixed}
    plain = [k for k in st if k in MOMENT_KEYS]
    if plain or not prefixed:
        raise ValueError(
            f"checkpoint state of {label} has its moments under {plain or sorted(map(str, st))}, not "
            f"{PREFIX}*: it was saved unrotated, but rotation={scope!r} rotates this param"
        )
    return logical_keys(st)


def _load_param_state(opt: RotatedOptimizerBase, p: torch.Tensor, st: dict, label: str, want_svd: dict) -> dict:
    missing = [k for k in ("step",) + opt._moment_keys if k not in st]
    if missing:
        raise ValueError(f"checkpoint state of {label} lacks {missing}; it was saved by another optimizer")
    step = step_value(st["step"], label)
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
        dtype = opt.state_dtype if key in MOMENT_KEYS else opt.compute_dtype
        if key in MOMENT_KEYS:
            if val.is_complex() != p.is_complex():
                raise ValueError(
                    f"checkpoint state '{key}' of {label} has dtype {val.dtype}; the param is {p.dtype} (a complex "
                    "param keeps complex moments)"
                )
            dtype = moment_dtype(dtype, p)
        new[key] = val.detach().to(device=p.device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return new


def step_value(step: Any, label: str) -> float:
    """A saved ``step`` (a number or a one-element tensor) as a float; ValueError, naming ``label``, for anything
    else, a non-finite or a negative count."""
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
                        new_state[p] = zero_state_like(model, p)


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
