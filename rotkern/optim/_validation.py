"""Checks of what the rotated optimizers are given: the params argument, a candidate param group's options (run
before the group is added, and again when its param list changed in place), hyperparameter ranges, and at each
step every param and gradient (before anything is mutated). Every message names the group, the param and the fix;
nothing here changes an optimizer (the group checks fill in a candidate group's recorded keys only).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..bases import BASIS_CHANGES
from ..rotations import check_block_size, check_structure
from ..scopes import (
    ALL_SCOPES,
    DYNAMIC_SCOPES,
    EMBEDDING_ORIENTATIONS,
    ROLES,
    VECTOR_POLICIES,
    check_qkv_pieces,
    infer_roles,
)
from . import _sharded
from ._spec import param_label

# Options of the dynamic scopes, checked for every group that has them.
DYNAMIC_KEYS = ("svd_every", "precondition_every", "shampoo_beta", "max_precond_dim", "basis_change")


class GroupValidationMixin:
    """The per-step checks of a group's params and gradients, and the subclasses' hyperparameter hook."""

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        """Subclasses check their hyperparameters (torch.optim's messages) for every group."""

    def _check_group(self, gi: int, group: dict[str, Any]) -> list[torch.Tensor | None]:
        """Validate the group's params and grads; returns grads (None where absent)."""
        grads: list[torch.Tensor | None] = []
        for i, (p, shape) in enumerate(zip(group["params"], group["shapes"], strict=True)):
            g = p.grad
            # One cheap combined test per param; the messages are built only on failure.
            if p.shape != tuple(shape) or (
                g is not None
                and (g.is_sparse or g.shape != p.shape or g.device != p.device or g.is_complex() != p.is_complex())
            ):
                self._raise_bad_param(gi, group, i)
            grads.append(g)
        return grads

    @staticmethod
    def _raise_bad_param(gi: int, group: dict[str, Any], i: int) -> None:
        p, g, shape = group["params"][i], group["params"][i].grad, tuple(group["shapes"][i])
        label = param_label(group["names"], gi, i)
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
        if g.is_complex() != p.is_complex():
            raise ValueError(f"{label}: grad has dtype {g.dtype}; the param is {p.dtype}")
        raise ValueError(f"{label}: grad is on {g.device} but the param is on {p.device}")


# -- the params argument and add_param_group's dict -------------------------------------------------------
def normalise_params(params: Iterable) -> list:
    """torch.optim's accepted forms (tensors, dicts, (name, tensor) pairs), without touching the caller's dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + torch.typename(params)
        )
    params = list(params)
    if len(params) == 0:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        return [{"params": params}]
    return [dict(g) if isinstance(g, dict) else g for g in params]


def normalise_group(param_group: Any, differentiable: bool) -> dict[str, Any]:
    """A copy of ``param_group`` with ``params`` a list of tensors (torch.optim's checks and messages);
    ``(name, tensor)`` pairs give ``param_names`` (and ``names`` unless given). The caller's dict is not modified."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    group = dict(param_group)
    params = group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
            "in sets will change between runs. Please use a list instead."
        )
    else:
        params = list(params)
    if any(isinstance(p, tuple) for p in params):
        if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
            raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        group["param_names"] = [n for n, _ in params]
        group.setdefault("names", list(group["param_names"]))
        params = [p for _, p in params]
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
        if not differentiable and not (p.is_leaf or p.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor")
    group["params"] = params
    return group


# -- a candidate group's options, in the order _check_group_options runs them ----------------------------------
def check_param_lists(gi: int, group: dict[str, Any]) -> None:
    """The per-param lists a user may give (names, roles, decay_mask, frozen): copied, one entry per param."""
    params = group["params"]
    for key in ("names", "roles", "decay_mask", "frozen"):
        if group.get(key) is not None:
            group[key] = list(group[key])
            if len(group[key]) != len(params):
                raise ValueError(f"param group {gi}: '{key}' has {len(group[key])} entries for {len(params)} params")


def check_param_dtypes(gi: int, params: Sequence[torch.Tensor], names, state_dtype: torch.dtype) -> None:
    """Floating-point params; complex ones only where their moments can be complex and they are not DTensors."""
    for i, p in enumerate(params):
        if p.is_complex():
            # A complex element is two real coordinates (torch.optim steps torch.view_as_real(p)).
            if state_dtype == torch.bfloat16:
                raise ValueError(
                    f"{param_label(names, gi, i)}: complex params keep complex moments; state_dtype=torch.bfloat16 "
                    "has no complex counterpart (put them in another optimizer, or leave state_dtype=None)"
                )
            if _sharded.is_dtensor(p):
                raise ValueError(f"{param_label(names, gi, i)}: complex DTensor params are not supported")
            continue
        if not p.is_floating_point():
            raise ValueError(f"{param_label(names, gi, i)}: dtype {p.dtype} is not a floating-point dtype")


def check_scope_options(gi: int, group: dict[str, Any], supports_dynamic: bool, optimizer_name: str) -> None:
    """The rotation scope and the options that shape its units (dynamic options, block size, structure, seed,
    embedding, vectors, split_qkv, qkv_pieces)."""
    if group["rotation"] not in ALL_SCOPES:
        raise ValueError(f"param group {gi}: unknown rotation {group['rotation']!r}; choose one of {ALL_SCOPES}")
    if group["rotation"] in DYNAMIC_SCOPES and not supports_dynamic:
        raise ValueError(
            f"param group {gi}: rotation={group['rotation']!r} (a dynamic basis) is implemented for RotatedAdamW "
            f"and FusedRotatedAdamW only, not {optimizer_name}"
        )
    check_dynamic_options(group, f"param group {gi}: ")
    check_block_size(group["block_size"], f"param group {gi}: block_size")
    check_structure(group.get("structure", "haar"), group["block_size"], f"param group {gi}: structure")
    if isinstance(group["seed"], bool) or not isinstance(group["seed"], numbers.Integral):
        raise ValueError(f"param group {gi}: seed must be an int, got {group['seed']!r}")
    if group["embedding"] not in EMBEDDING_ORIENTATIONS:
        raise ValueError(f"param group {gi}: embedding={group['embedding']!r}, not one of {EMBEDDING_ORIENTATIONS}")
    if group["vectors"] not in VECTOR_POLICIES:
        raise ValueError(f"param group {gi}: vectors={group['vectors']!r}, not one of {VECTOR_POLICIES}")
    if isinstance(group["split_qkv"], torch.Tensor) or not isinstance(group["split_qkv"], bool):
        raise ValueError(f"param group {gi}: split_qkv must be a bool, got {group['split_qkv']!r}")
    if "qkv_pieces" in group:
        _check_group_qkv_pieces(gi, group)


def _check_group_qkv_pieces(gi: int, group: dict[str, Any]) -> None:
    pieces = check_qkv_pieces(group["qkv_pieces"], f"param group {gi}: qkv_pieces")
    if pieces == "qkv":
        del group["qkv_pieces"]  # the default is recorded by its absence (older checkpoints lack the key)
    elif group["rotation"] in DYNAMIC_SCOPES:
        raise ValueError(
            f"param group {gi}: qkv_pieces={pieces!r} is for the static scopes; rotation={group['rotation']!r} "
            "rotates every third of a fused QKV weight (put the weights to leave alone in a group of their own)"
        )
    elif not group["split_qkv"] and group["rotation"] not in ("none", "global"):
        raise ValueError(
            f"param group {gi}: qkv_pieces={pieces!r} rotates some thirds of fused QKV weights; it needs split_qkv=True"
        )
    else:
        group["qkv_pieces"] = pieces


def check_shard_options(gi: int, group: dict[str, Any], names) -> None:
    """DTensor params (see :mod:`rotkern.optim._sharded`): shard_mode, recorded only when not the default, and
    the shard layout a shard-local rotation ties the moments to."""
    params = group["params"]
    _sharded.check_group(params, lambda i: param_label(names, gi, i))
    if "shard_mode" in group:
        if group["shard_mode"] not in _sharded.SHARD_MODES:
            raise ValueError(
                f"param group {gi}: shard_mode={group['shard_mode']!r} is not one of {_sharded.SHARD_MODES}"
            )
        if group["shard_mode"] == "local":
            del group["shard_mode"]  # the default is recorded by its absence
    if group["rotation"] in _sharded.LOCAL_SCOPES and group.get("shard_mode", "local") == "local":
        layout = _sharded.shard_layout(params)
        if layout:
            group["shard_layout"] = layout


def record_group_keys(gi: int, group: dict[str, Any], names) -> None:
    """Fill in the keys recorded when a group is added: shapes, frozen flags, roles (guessed from shapes and
    names where not given; unknown roles refused), and names and decay_mask (None unless given)."""
    params = group["params"]
    group["shapes"] = [list(p.shape) for p in params]
    if group.get("frozen") is None:
        group["frozen"] = [isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in params]
    group["frozen"] = [bool(f) for f in group["frozen"]]
    if group.get("roles") is None:
        group["roles"] = infer_roles([p.shape for p in params], names)
    for i, r in enumerate(group["roles"]):
        if r not in ROLES:
            raise ValueError(f"{param_label(names, gi, i)}: unknown role {r!r}; choose one of {ROLES}")
    group.setdefault("names", None)
    group.setdefault("decay_mask", None)


# -- option and hyperparameter ranges (the subclasses and the CLI use these too) --------------------------------
def check_dynamic_options(group: dict[str, Any], where: str) -> None:
    """The dynamic scopes' group options, where present (ValueError naming the option and the fix)."""
    for key in ("svd_every", "precondition_every"):
        if key in group:
            check_svd_every(group[key], f"{where}{key}")
    if "max_precond_dim" in group:
        v = group["max_precond_dim"]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{where}max_precond_dim must be a positive int (SOAP's default is 10000), got {v!r}")
    if "shampoo_beta" in group:
        check_hyper("shampoo_beta", group["shampoo_beta"], 0.0, 1.0, where=where)
    if "basis_change" in group and group["basis_change"] not in ("auto",) + BASIS_CHANGES:
        raise ValueError(
            f"{where}basis_change={group['basis_change']!r} is not one of {('auto',) + BASIS_CHANGES} "
            "(what the moments do when a dynamic basis changes; see rotkern.bases)"
        )


def check_svd_every(value: object, name: str = "svd_every") -> int:
    """Validate F, the SVD basis period (a positive int); returns it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int (steps between SVD basis recomputes), got {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1 (the paper uses F = 250)")
    return int(value)


def check_hyper(
    name: str,
    value: float,
    low: float | None = 0.0,
    high: float | None = None,
    high_open: bool = True,
    *,
    where: str = "",
    tensor_name: str | None = None,
) -> None:
    """Raise ValueError for an out-of-range hyperparameter (torch.optim's messages, after ``where``; a tensor
    of more than one element is named ``tensor_name``, torch's name for it, e.g. ``lr``, ``betas[0]``)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{where}Tensor {tensor_name or name} must be 1-element, got {value.numel()} elements")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}Invalid {name}: {value!r} (must be a real number)")
    if low is not None and not value >= low:
        raise ValueError(f"{where}Invalid {name}: {value} (must be >= {low})")
    if high is not None and not (value < high if high_open else value <= high):
        raise ValueError(f"{where}Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
