"""Group keys and per-param state conventions shared by the optimizers and their checkpoints (a leaf: it
imports nothing from rotkern.optim, so that ``_base`` and ``_state_dict`` both build on it without a circle).

- Which group keys decide a group's rotation units, which a checkpoint must agree on, which hold a list with
  one entry per param.
- How a param's moments are named in its state: ``rotated_<key>`` where the moments live in a rotated basis,
  torch's plain names elsewhere (see :func:`moment`).
- Complex params seen as real coordinates (:func:`as_real`), and the dtype their moments are kept in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

# Group keys that decide the units (cached per group; they may not change once the moments exist).
UNIT_KEYS = (
    "rotation", "block_size", "seed", "split_qkv", "embedding", "vectors", "roles", "shapes", "frozen",
    "max_precond_dim", "structure", "qkv_pieces", "shard_mode", "shard_layout",
)  # fmt: skip
# Group keys that decide which basis the moments live in: a checkpoint must agree on all of them. svd_every
# only sets when the next SVD basis is computed, so it may change between steps of a live optimizer; it is
# compared only for rotation="svd" groups (checkpoints older than the svd scope lack it), and max_precond_dim
# only for rotation="eigen" groups.
SPEC_KEYS = UNIT_KEYS + ("svd_every",)
# Group keys with one entry per param of the group.
PER_PARAM_KEYS = ("shapes", "names", "roles", "frozen", "decay_mask", "param_names")

# Moments of params whose state lives in a rotated basis are kept under their own names, live and saved alike
# (rotated_exp_avg, ...): a torch.optim optimizer given such a state finds no exp_avg and fails at its first
# step instead of applying the moments in the wrong basis. Params no rotation touches keep torch's names.
ROTATED_PREFIX = "rotated_"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def stored_key(key: str, rotated: bool) -> str:
    """The state key that holds moment ``key`` (``exp_avg``, ...) of a param: prefixed where it is rotated."""
    return ROTATED_PREFIX + key if rotated and key in MOMENT_KEYS else key


def moment(state: Mapping, key: str) -> torch.Tensor:
    """Moment ``key`` (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``) of one param's
    state (``opt.state[p]`` or a saved per-param entry), under whichever name it is kept: ``rotated_<key>``
    for a param whose moments live in a rotated basis (a tensor of the param's shape in the rotated layout),
    ``key`` otherwise. Raises KeyError when the state has neither (no step taken yet)."""
    rotated = ROTATED_PREFIX + key
    return state[rotated] if rotated in state else state[key]


def has_moment(state: Mapping | None, key: str) -> bool:
    return bool(state) and (key in state or ROTATED_PREFIX + key in state)


def logical_keys(state: Mapping) -> dict:
    """A param's state with its moments under their plain names (``rotated_exp_avg`` -> ``exp_avg``)."""
    n = len(ROTATED_PREFIX)
    return {
        k[n:] if isinstance(k, str) and k.startswith(ROTATED_PREFIX) and k[n:] in MOMENT_KEYS else k: v
        for k, v in state.items()
    }


def stored_keys(state: Mapping, rotated: bool) -> dict:
    """The inverse of :func:`logical_keys` for a param that is (or is not) rotated."""
    return {stored_key(k, rotated) if isinstance(k, str) else k: v for k, v in state.items()}


def as_real(t: torch.Tensor | None) -> torch.Tensor | None:
    """A complex tensor's real coordinates as a view of its storage, real and imaginary parts interleaved along
    the last dim: shape ``(*s, n)`` -> ``(*s, 2n)``, ``()`` -> ``(2,)``. Needs a contiguous last dim (a view,
    never a copy: writes reach ``t``). Real tensors and None are returned as they are."""
    if t is None or not t.is_complex():
        return t
    r = torch.view_as_real(t)
    return r if t.dim() == 0 else r.view(*t.shape[:-1], 2 * t.shape[-1])


def real_shape(shape: Sequence[int], is_complex: bool) -> torch.Size:
    """The shape :func:`as_real` gives a tensor of ``shape``: the layout units are built on."""
    shape = tuple(shape)
    if not is_complex:
        return torch.Size(shape)
    return torch.Size((2,) if not shape else (*shape[:-1], 2 * shape[-1]))


def moment_dtype(real: torch.dtype, p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s moments given the real dtype they are kept in: its complex counterpart for a
    complex param (as torch.optim.AdamW keeps them), ``real`` otherwise."""
    return real.to_complex() if p.is_complex() else real


def real_numel(p: torch.Tensor) -> int:
    """The number of real coordinates of ``p`` (two per element of a complex param)."""
    return p.numel() * (2 if p.is_complex() else 1)


def zero_state_like(model: Mapping, p: torch.Tensor) -> dict:
    """Zero moments for ``p`` with ``model``'s keys, dtypes and step (a member of ``model``'s unit)."""
    out = {}
    for key, val in model.items():
        if key == "step":
            out[key] = val.clone()
        elif torch.is_tensor(val) and val.dim() > 0:
            out[key] = torch.zeros(p.shape, dtype=moment_dtype(val.dtype.to_real(), p), device=p.device)
        else:
            out[key] = copy.deepcopy(val)
    return out


def param_label(names, gi: int, i: int) -> str:
    """How messages name param ``i`` of group ``gi``: by its name where ``names`` has one, else by position."""
    if names is not None and i < len(names) and names[i] is not None:
        return f"param {names[i]!r}"
    return f"param {i} of param group {gi}"


def freeze(x):
    """``x`` with its lists turned into tuples, recursively (hashable, compared by value)."""
    if isinstance(x, (list, tuple)):
        return tuple(freeze(v) for v in x)
    return x
