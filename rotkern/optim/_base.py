"""Machinery shared by the rotated optimizers: rotation options per param group, units, checks,
state_dict round-trips and the dense-matrix testing oracle."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ..rotations import check_block_size
from ..scopes import (
    ALL_SCOPES,
    EMBEDDING_ORIENTATIONS,
    ROLES,
    VECTOR_POLICIES,
    SvdRotation,
    Unit,
    build_units,
    infer_roles,
    unit_index_map,
)

STATE_DICT_FORMAT = 1

# Group keys that decide the units (cached per group; they may not change once the moments exist).
UNIT_KEYS = ("rotation", "block_size", "seed", "split_qkv", "embedding", "vectors", "roles", "shapes")
# Group keys that decide which basis the moments live in: a checkpoint must agree on all of them. svd_every
# only sets when the next SVD basis is computed, so it may change between steps of a live optimizer; it is
# compared only for rotation="svd" groups (checkpoints older than the svd scope lack it).
SPEC_KEYS = UNIT_KEYS + ("svd_every",)
_COMPUTE_DTYPES = (torch.float32, torch.float64)


class RotatedOptimizerBase(Optimizer):
    """Base class: a torch Optimizer whose param groups carry rotation options.

    Group keys beyond the optimizer's hyperparameters:
        rotation: scope name (``none``, ``global``, ``layer``, ``output``, ``input``, and ``svd`` where the
            subclass sets ``_supports_svd``).
        svd_every: F, the SVD basis period of the ``svd`` scope (optimizers that support it).
        block_size, seed: Haar block size n and the rotation seed.
        split_qkv, embedding, vectors: scope options (see :mod:`rotkern.scopes`).
        names, roles: optional per-parameter names and roles (see :func:`rotkern.param_groups_for`).
        decay_mask: optional per-parameter bools; False disables weight decay for that parameter.
        shapes: recorded at construction; a parameter that changes shape afterwards is an error.
    """

    _moment_keys: tuple[str, ...] = ()
    # Whether the step implements rotation="svd" (it needs the basis recompute in the step).
    _supports_svd = False

    def __init__(self, params: Iterable, defaults: dict[str, Any], compute_dtype: torch.dtype) -> None:
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        self._unit_cache: dict[int, tuple[tuple, tuple, list[Unit]]] = {}
        params = _normalise_params(params)
        super().__init__(params, defaults)

    # -- groups ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        params = group["params"]
        names = group.get("names")
        for key in ("names", "roles", "decay_mask"):
            if group.get(key) is not None and len(group[key]) != len(params):
                raise ValueError(f"param group {gi}: '{key}' has {len(group[key])} entries for {len(params)} params")
        for i, p in enumerate(params):
            label = _label(names, gi, i)
            if p.is_complex():
                raise ValueError(
                    f"{label}: complex parameters are not supported; optimise torch.view_as_real(p) instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"{label}: dtype {p.dtype} is not a floating-point dtype")
        if group["rotation"] not in ALL_SCOPES:
            raise ValueError(f"param group {gi}: unknown rotation {group['rotation']!r}; choose one of {ALL_SCOPES}")
        if group["rotation"] == "svd" and not self._supports_svd:
            raise ValueError(
                f"param group {gi}: rotation='svd' (paper Alg 5) is implemented for RotatedAdamW and "
                f"FusedRotatedAdamW only, not {type(self).__name__}"
            )
        if "svd_every" in group:
            check_svd_every(group["svd_every"], f"param group {gi}: svd_every")
        check_block_size(group["block_size"], f"param group {gi}: block_size")
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
            raise ValueError(f"param group {gi}: seed must be an int, got {group['seed']!r}")
        if group["embedding"] not in EMBEDDING_ORIENTATIONS:
            raise ValueError(f"param group {gi}: embedding={group['embedding']!r}, not one of {EMBEDDING_ORIENTATIONS}")
        if group["vectors"] not in VECTOR_POLICIES:
            raise ValueError(f"param group {gi}: vectors={group['vectors']!r}, not one of {VECTOR_POLICIES}")
        shapes = [tuple(p.shape) for p in params]
        group["shapes"] = [list(s) for s in shapes]
        if group.get("roles") is None:
            group["roles"] = infer_roles([torch.Size(s) for s in shapes], names)
        for i, r in enumerate(group["roles"]):
            if r not in ROLES:
                raise ValueError(f"{_label(names, gi, i)}: unknown role {r!r}; choose one of {ROLES}")
        group.setdefault("names", None)
        group.setdefault("decay_mask", None)
        # Build now so that a bad scope option fails at construction, not at the first step.
        self.units(gi)

    def units(self, group_index: int) -> list[Unit]:
        """The rotation units of a param group (cached; rebuilt only if its rotation options change)."""
        group = self.param_groups[group_index]
        values = [group.get(k) for k in UNIT_KEYS]
        # Fast path by the identity of list-valued keys (this runs every step); when a list was replaced
        # (load_state_dict does that), fall back to comparing contents.
        quick = tuple(id(v) if isinstance(v, list) else v for v in values)
        cached = self._unit_cache.get(group_index)
        if cached is not None and cached[0] == quick:
            return cached[2]
        spec = tuple(_freeze(v) for v in values)
        if cached is not None and cached[1] == spec:
            self._unit_cache[group_index] = (quick, spec, cached[2])
            return cached[2]
        if cached is not None and any(p in self.state for p in group["params"]):
            raise ValueError(
                f"param group {group_index}: rotation options changed after the optimizer took a step; the "
                "moments live in the old basis. Build a new optimizer instead."
            )
        units = build_units(
            [torch.Size(s) for s in group["shapes"]],
            group["rotation"],
            block_size=group["block_size"],
            seed=group["seed"],
            roles=group["roles"],
            names=group["names"],
            split_qkv=group["split_qkv"],
            embedding=group["embedding"],
            vectors=group["vectors"],
        )
        # svd units read their current bases from this optimizer's state (for rotate(x) outside the step).
        for unit in units:
            if isinstance(unit.rotation, SvdRotation):
                unit.rotation.bind(self.state, group["params"][unit.params[0]])
        self._unit_cache[group_index] = (quick, spec, units)
        return units

    # -- per-step checks ------------------------------------------------------------------------------
    def _check_group(self, gi: int, group: dict[str, Any]) -> list[torch.Tensor | None]:
        """Validate the group's params and grads; returns grads (None where absent)."""
        grads: list[torch.Tensor | None] = []
        for i, (p, shape) in enumerate(zip(group["params"], group["shapes"], strict=True)):
            g = p.grad
            # One cheap combined test per param; the messages are built only on failure.
            if p.shape != tuple(shape) or (
                g is not None and (g.is_sparse or g.shape != p.shape or g.device != p.device)
            ):
                self._raise_bad_param(gi, group, i)
            grads.append(g)
        return grads

    @staticmethod
    def _raise_bad_param(gi: int, group: dict[str, Any], i: int) -> None:
        p, g, shape = group["params"][i], group["params"][i].grad, tuple(group["shapes"][i])
        label = _label(group["names"], gi, i)
        if p.shape != shape:
            raise ValueError(
                f"{label} changed shape from {shape} to {tuple(p.shape)} after the optimizer was built; build a "
                "new optimizer for the new shapes"
            )
        if g.is_sparse:
            raise RuntimeError(
                f"{label} has a sparse gradient, which rotated optimizers do not support (a rotation makes it "
                "dense); use nn.Embedding(sparse=False) or convert with grad.to_dense()"
            )
        if g.shape != p.shape:
            raise ValueError(f"{label}: grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
        raise ValueError(f"{label}: grad is on {g.device} but the param is on {p.device}")

    def _active_units(self, gi: int, group: dict, grads: list[torch.Tensor | None]) -> tuple[list[Unit], list]:
        """Units with at least one gradient; members without one count as zero gradients."""
        params = group["params"]
        active, filled = [], list(grads)
        for unit in self.units(gi):
            members = unit.params
            if all(grads[i] is None for i in members):
                continue
            devices = {params[i].device for i in members} if len(members) > 1 else ()
            if len(devices) > 1:
                raise ValueError(
                    f"param group {gi}: a '{group['rotation']}' rotation spans params on several devices "
                    f"({', '.join(sorted(map(str, devices)))}); put them on one device or in separate param groups"
                )
            for i in members:
                if filled[i] is None:
                    filled[i] = torch.zeros_like(params[i])
            active.append(unit)
        return active, filled

    def _prepare(self, gi: int, group: dict, extra_keys: tuple[str, ...] = ()) -> tuple[list, list, list] | None:
        """Checks, active units and lazily created state of one group: (grads, units, states), or None when
        no unit has a gradient. ``states[i]`` is None for params outside the active units."""
        grads = self._check_group(gi, group)
        units, grads = self._active_units(gi, group, grads)
        if not units:
            return None
        touched = {i for u in units for i in u.params}
        states = [self._init_state(p, extra_keys) if i in touched else None for i, p in enumerate(group["params"])]
        return grads, units, states

    def _step_device(self, p: torch.Tensor) -> torch.device:
        """Where ``state["step"]`` of ``p`` lives: the CPU here; fused subclasses keep it on ``p``'s device
        so that kernels read it without a host sync. Checkpoints load onto this device either way."""
        return torch.device("cpu")

    def _init_state(self, p: torch.Tensor, extra_keys: tuple[str, ...] = ()) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(p))
        for key in self._moment_keys + extra_keys:
            if key not in state:
                state[key] = torch.zeros(p.shape, dtype=self.compute_dtype, device=p.device)
        return state

    # -- state_dict -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rotkern"] = {"format": STATE_DICT_FORMAT, "optimizer": "rotated", "moments": list(self._moment_keys)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint saved by a rotated optimizer with the same rotation settings.

        Raises ValueError, naming the difference, when the checkpoint's scope, seed, block size, roles,
        parameter shapes or state tensors do not match; the input dict is never modified.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                "load_state_dict: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)"
            )
        meta = state_dict.get("rotkern")
        if not isinstance(meta, dict) or meta.get("format") != STATE_DICT_FORMAT:
            raise ValueError(
                "load_state_dict: this state_dict was not saved by a rotkern rotated optimizer (format "
                f"{STATE_DICT_FORMAT}); its moments would be in the wrong basis. Start a fresh optimizer instead."
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {gi}: checkpoint has {len(sg['params'])} params, optimizer has {len(g['params'])}"
                )
            for key in SPEC_KEYS + ("names",):
                mine, theirs = _freeze(g.get(key)), _freeze(sg.get(key))
                if key == "names" and (mine is None or theirs is None):
                    continue
                if key == "svd_every" and g.get("rotation") != "svd":
                    continue
                if mine != theirs:
                    raise ValueError(
                        f"checkpoint mismatch in param group {gi}: {key} is {sg.get(key)!r} in the checkpoint but "
                        f"{g.get(key)!r} in this optimizer"
                    )
        id_map = dict(
            zip(
                itertools.chain.from_iterable(sg["params"] for sg in saved_groups),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        labels = {
            id(p): _label(g["names"], gi, i)
            for gi, g in enumerate(self.param_groups)
            for i, p in enumerate(g["params"])
        }
        svd_shapes = self._svd_state_shapes()
        new_state: dict = {}
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"checkpoint state refers to param id {pid!r}, which no param group lists")
            p = id_map[pid]
            label = labels[id(p)]
            missing = [k for k in ("step",) + self._moment_keys if k not in st]
            if missing:
                raise ValueError(f"checkpoint state of {label} lacks {missing}; it was saved by another optimizer")
            want_svd = svd_shapes.get(id(p), {})
            have_svd = sorted(k for k in st if k.startswith("svd_"))
            # Bases exist from step 1 on; without them the moments' basis is lost.
            if (have_svd or float(st["step"]) >= 1) and have_svd != sorted(want_svd):
                raise ValueError(
                    f"checkpoint state of {label} has SVD basis keys {have_svd}, this optimizer expects "
                    f"{sorted(want_svd)}"
                )
            new = {}
            for key, val in st.items():
                if not torch.is_tensor(val):
                    new[key] = val
                elif key == "step":
                    new[key] = val.detach().clone().to(dtype=torch.float32, device=self._step_device(p))
                elif key in want_svd:
                    if tuple(val.shape) != want_svd[key]:
                        raise ValueError(
                            f"checkpoint state '{key}' of {label} has shape {tuple(val.shape)}, the SVD bases of "
                            f"this param need {want_svd[key]}"
                        )
                    new[key] = val.detach().to(device=p.device, dtype=self.compute_dtype, copy=True)
                else:
                    if tuple(val.shape) != tuple(p.shape):
                        raise ValueError(
                            f"checkpoint state '{key}' of {label} has shape {tuple(val.shape)}, "
                            f"the param has {tuple(p.shape)}"
                        )
                    new[key] = val.detach().to(device=p.device, dtype=self.compute_dtype, copy=True)
            new_state[p] = new
        for g, sg in zip(self.param_groups, saved_groups, strict=True):
            for key, val in sg.items():
                if key != "params":
                    g[key] = val
        self.state.clear()
        self.state.update(new_state)

    def _svd_state_shapes(self) -> dict[int, dict[str, tuple[int, ...]]]:
        """id(param) -> {state key: shape} of the SVD bases its svd units keep (params of svd groups only)."""
        out: dict[int, dict[str, tuple[int, ...]]] = {}
        for gi, g in enumerate(self.param_groups):
            if g["rotation"] != "svd":
                continue
            for unit in self.units(gi):
                if isinstance(unit.rotation, SvdRotation):
                    out.setdefault(id(g["params"][unit.params[0]]), {}).update(unit.rotation.state_shapes())
        return out

    # -- testing oracle -------------------------------------------------------------------------------
    def rotation_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense (d, d) orthogonal matrix D with ``vec(state-layout g~) = D vec(g)`` for all groups.

        ``vec`` concatenates every param's flattened values in param-group order; moments are stored in
        the same order, so AdamW run on ``D vec(g)`` with updates mapped back by ``D^T`` is the oracle for
        this optimizer. Only for small models (d <= 4096). svd units contribute their current bases
        (``kron(L^T, R^T)`` on the matrix's row-major entries), which change every ``svd_every`` steps, and
        the identity before their first step.
        """
        numels = [p.numel() for g in self.param_groups for p in g["params"]]
        d = sum(numels)
        if d > 4096:
            raise ValueError(f"rotation_matrix(): d={d} > 4096; the dense oracle is for small models only")
        out = torch.zeros(d, d, dtype=dtype)
        offset = 0
        for gi, g in enumerate(self.param_groups):
            gn = [p.numel() for p in g["params"]]
            for unit in self.units(gi):
                idx = unit_index_map(unit, gn) + offset
                if isinstance(unit.rotation, SvdRotation):
                    flat = idx.reshape(-1)
                    out[flat.unsqueeze(1), flat.unsqueeze(0)] = unit.rotation.dense(dtype)
                    continue
                length = unit.shape[1]
                block = unit.rotation.dense(dtype) if unit.rotation is not None else torch.eye(length, dtype=dtype)
                for row in idx:
                    out[row.unsqueeze(1), row.unsqueeze(0)] = block
            offset += sum(gn)
        return out


def _normalise_params(params: Iterable) -> list:
    """Accept tensors, (name, tensor) pairs (as torch >= 2.6 does) or dicts; pairs become names."""
    params = list(params)
    if params and isinstance(params[0], tuple) and len(params[0]) == 2 and isinstance(params[0][0], str):
        return [{"params": [p for _, p in params], "names": [n for n, _ in params]}]
    if params and isinstance(params[0], dict):
        out = []
        for g in params:
            g = dict(g)
            ps = list(g["params"]) if not torch.is_tensor(g["params"]) else [g["params"]]
            if ps and isinstance(ps[0], tuple):
                g["names"] = [n for n, _ in ps]
                ps = [p for _, p in ps]
            g["params"] = ps
            out.append(g)
        return out
    return params


def _label(names, gi: int, i: int) -> str:
    if names is not None and i < len(names) and names[i] is not None:
        return f"param {names[i]!r}"
    return f"param {i} of param group {gi}"


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def check_svd_every(value: object, name: str = "svd_every") -> int:
    """Validate F, the SVD basis period (a positive int); returns it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int (steps between SVD basis recomputes), got {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1 (the paper uses F = 250)")
    return int(value)


def check_hyper(
    name: str, value: float, low: float | None = 0.0, high: float | None = None, high_open: bool = True
) -> None:
    """Raise ValueError for an out-of-range hyperparameter (torch.optim's messages)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got {value.numel()} elements")
        value = value.item()
    if low is not None and not value >= low:
        raise ValueError(f"Invalid {name}: {value} (must be >= {low})")
    if high is not None and not (value < high if high_open else value <= high):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
