"""Machinery shared by the rotated optimizers: the torch.optim contract kept in one place (param groups,
validation before mutation, frozen and zero-size params, odd layouts, copies, state_dict round-trips) and the
dense-matrix testing oracle. Backends only compute: they receive contiguous tensors, one dtype pair per unit
where they need it, and a gradient for every member of every unit they step.

Rules a user can observe (each is a test in tests/optim/test_torch_parity.py):

- A parameter whose ``.grad`` is None at a step is not modified (no update, no weight decay). When no member of
  a unit has a gradient the unit is skipped and its state is untouched, exactly as torch.optim.AdamW skips the
  parameter. In the global scope, where one unit holds many parameters, a member without a gradient while
  others have one takes a zero gradient inside the shared rotation (the gradient of a loss that does not depend
  on it): the unit's moments, stored in chunks under every member's state, advance as one vector with one step
  count, and the member's values stay as they were.
- Frozen parameters (an ``nn.Parameter`` with ``requires_grad=False`` when its group is added, or a group's
  explicit ``frozen`` list) are invisible to the others: they stay outside the shared global rotation and their
  units come last, so the rotations the other parameters see, and their trajectory, are those of an optimizer
  built without them. Each keeps the units its scope gives it (in the global scope, a rotation of its own),
  which act if it is unfrozen later. Plain tensors are never taken as frozen: optimizers are routinely handed
  plain tensors whose ``.grad`` is set by hand.
- Zero-size parameters (what FSDP2 leaves on tail ranks) belong to no unit: their state is created and their
  step counted as torch does, nothing else happens.
- Non-contiguous parameters (transposed views, ``channels_last`` kernels) are optimised on their logical shape:
  the result equals that of a contiguous copy. Moments are stored contiguous.
- Every check of a call runs before anything is changed, so a refused ``add_param_group``, ``step`` or
  ``load_state_dict`` leaves the optimizer exactly as it was.

The class is a composition of one mixin per concern, each in its own module (subclasses override their hooks as
before; the mixins come before ``torch.optim.Optimizer`` in the MRO):

- :mod:`._validation`: the params argument, a group's options, hyperparameter ranges, per-step param/grad checks;
- :mod:`._units_cache`: units per group, cached, and the resync of param lists changed in place;
- :mod:`._plan`: the step plan (:class:`GroupStep`), checks only;
- :mod:`._staging`: state creation and the staging of a step's tensors (dtypes, layouts, GradScaler, rounding);
- :mod:`._sharded`: DTensor (FSDP2) params;
- :mod:`._checkpoint`: ``state_dict`` / ``load_state_dict`` (the format is :mod:`._state_dict`'s);
- :mod:`._oracle`: ``rotation_matrix``, the dense testing oracle.

This module keeps what ties them together: construction, copies, ``add_param_group`` and the group-option checks
in their order. Every name other modules import from it (``GroupStep``, ``check_hyper``, ``moment``, ...) is
still importable from here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ..scopes import DYNAMIC_SCOPES, Unit
from ._checkpoint import CheckpointMixin
from ._oracle import OracleMixin
from ._plan import GroupStep, StepPlanMixin
from ._sharded import ShardedStepMixin
from ._spec import (  # noqa: F401  (re-exported: rotkern.optim.moment, convert, fused)
    MOMENT_KEYS,
    PER_PARAM_KEYS,
    ROTATED_PREFIX,
    SPEC_KEYS,
    UNIT_KEYS,
    as_real,
    freeze,
    has_moment,
    logical_keys,
    moment,
    moment_dtype,
    param_label,
    real_numel,
    real_shape,
    stored_key,
    stored_keys,
    zero_state_like,
)
from ._staging import (  # noqa: F401  (re-exported)
    StagingMixin,
    absent_grad_dtype,
    mixed_dtype_members,
    rounding_seed,
    stochastic_round,
)
from ._units_cache import UnitCacheMixin
from ._validation import (  # noqa: F401  (re-exported: check_hyper for the subclasses, check_svd_every for the CLI)
    DYNAMIC_KEYS,
    GroupValidationMixin,
    check_dynamic_options,
    check_hyper,
    check_param_dtypes,
    check_param_lists,
    check_scope_options,
    check_shard_options,
    check_svd_every,
    normalise_group,
    normalise_params,
    record_group_keys,
)

# The private names this module had before its mixins moved out (rotated_adamw imports _label, _normalise_params).
_label = param_label
_freeze = freeze
_real_numel = real_numel
_zero_state_like = zero_state_like
_normalise_params = normalise_params
_check_dynamic_options = check_dynamic_options
_mixed_dtype_members = mixed_dtype_members
_absent_grad_dtype = absent_grad_dtype
_rounding_seed = rounding_seed

__all__ = ["GroupStep", "RotatedOptimizerBase", "check_hyper", "check_svd_every", "stochastic_round"]

log = logging.getLogger("rotkern")
_warned: set[tuple] = set()

_COMPUTE_DTYPES = (torch.float32, torch.float64)
# Scopes whose units depend on roles that only names reveal (fused QKV, embeddings).
_ROLE_SCOPES = ("layer", "output", "input") + DYNAMIC_SCOPES


class RotatedOptimizerBase(
    CheckpointMixin,
    OracleMixin,
    StagingMixin,
    ShardedStepMixin,
    StepPlanMixin,
    UnitCacheMixin,
    GroupValidationMixin,
    Optimizer,
):
    """Base class: a torch Optimizer whose param groups carry rotation options.

    Group keys beyond the optimizer's hyperparameters:
        rotation: scope name (``none``, ``global``, ``layer``, ``output``, ``input``, and the dynamic ``svd`` and
            ``eigen`` where the subclass sets ``_supports_dynamic``).
        svd_every: F, the SVD basis period of the ``svd`` scope (optimizers that support it).
        precondition_every, shampoo_beta, max_precond_dim: the ``eigen`` scope's refresh period, factor EMA
            coefficient and largest side with a basis.
        basis_change: what the moments do at a basis change of a dynamic scope (:mod:`rotkern.bases`).
        block_size, seed: Haar block size n and the rotation seed.
        structure: ``haar`` (Haar-random blocks, the paper's) or ``hadamard`` (randomized Walsh-Hadamard blocks).
        split_qkv, embedding, vectors: scope options (see :mod:`rotkern.scopes`).
        qkv_pieces: which thirds of fused QKV weights the scope rotates (a subset of ``"qkv"``, e.g. ``"v"``; the
            others step as plain AdamW). Stored in the group only when it is not the default ``"qkv"``, so
            checkpoints from before the option load unchanged.
        shard_mode: DTensor (FSDP2) params only: ``local`` (default) or ``gather``, what the ``input``, ``layer``
            and ``global`` scopes do with units that span shards (see :mod:`rotkern.optim._sharded`); recorded
            only when not the default. A group of DTensors under a shard-local rotation also records
            ``shard_layout`` ([world size]), which a checkpoint must match.
        names, roles: optional per-parameter names and roles (see :func:`rotkern.param_groups_for`); params
            given as ``(name, tensor)`` pairs also get torch's ``param_names``.
        decay_mask: optional per-parameter bools; False disables weight decay for that parameter.
        frozen: per-parameter bools, recorded when the group is added (``nn.Parameter`` with
            ``requires_grad=False``) unless given; frozen params stay outside the global scope's shared unit.
        shapes: recorded when the group is added; a parameter that changes shape afterwards is an error.
    """

    understands_decay_mask = True  # param groups may carry a per-parameter decay_mask (param_groups_for)

    _moment_keys: tuple[str, ...] = ()
    # Whether the step implements the dynamic scopes (svd, eigen: the basis changes happen in the step).
    _supports_dynamic = False
    # Attributes beyond torch's defaults/state/param_groups that copies (deepcopy, pickle) must keep.
    _config_attrs: tuple[str, ...] = ("compute_dtype", "state_dtype", "basis_stats")

    def __init__(self, params: Iterable, defaults: dict[str, Any], compute_dtype: torch.dtype) -> None:
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        # The dtype moments are stored in between steps (state_dtype=): the compute dtype unless a subclass lowers it.
        self.__dict__.setdefault("state_dtype", compute_dtype)
        # Decomposition fallbacks of the dynamic scopes (rotkern.bases.robust_decomposition): kind -> count.
        self.basis_stats: dict[str, int] = {}
        self._unit_cache: dict[int, tuple[tuple, tuple, list[Unit]]] = {}
        self._shard_unit_cache: dict[int, tuple] = {}
        self._group_members: dict[int, list] = {}  # each group's params when its units were built
        self._group_lists: dict[int, dict[str, Any]] = {}  # each group's per-param lists then (see _reclaim_lists)
        super().__init__(normalise_params(params), defaults)

    # -- copies ---------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._config_attrs})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compute_dtype", torch.float32)
        self.__dict__.setdefault("state_dtype", self.compute_dtype)
        self.__dict__.setdefault("basis_stats", {})
        # Units hold caches bound to this object's state (svd bases); copies rebuild their own.
        self._unit_cache = {}
        self._shard_unit_cache = {}
        self._group_members = {}
        self._group_lists = {}
        for group in self.param_groups:
            group.setdefault("frozen", [False] * len(group["params"]))
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=self._step_device(p))

    # -- groups ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics), with rotkern's options checked first.

        Every check runs, and the group's rotation units are built, before the group is added: a refused group
        leaves the optimizer as it was. The caller's dict is not modified.
        """
        group = normalise_group(param_group, bool(self.defaults.get("differentiable", None)))
        gi = len(self.param_groups)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self._check_group_options(gi, group)
        units = self._build_units(gi, group)
        super().add_param_group(group)  # torch's own checks (a param in two groups ...) run before it appends
        self._cache_units(gi, group, units)

    def _check_group_options(self, gi: int, group: dict[str, Any]) -> None:
        """Validate a candidate group's hyperparameters and rotation options and fill in its recorded keys."""
        self._check_hyperparameters(group, f"param group {gi}: ")
        check_param_lists(gi, group)
        names = group.get("names")
        guessed = group.get("roles") is None
        check_param_dtypes(gi, group["params"], names, self.state_dtype)
        check_scope_options(gi, group, self._supports_dynamic, type(self).__name__)
        check_shard_options(gi, group, names)
        record_group_keys(gi, group, names)
        if guessed and names is None and group["rotation"] in _ROLE_SCOPES:
            _warn_roles_guessed(gi, group)


def _warn_roles_guessed(gi: int, group: dict) -> None:
    roles = group["roles"]
    counts = {r: roles.count(r) for r in dict.fromkeys(roles)}
    key = ("roles",)
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "rotkern: param group %d (rotation=%r) has no parameter names, so roles were guessed from shapes (%s). "
        "A fused QKV weight or an embedding cannot be recognised without names, and they rotate differently "
        "(paper Sec. 3.1). Pass model.named_parameters(), rotkern.param_groups_for(model), or a 'roles' list. "
        "(Said once per process.)",
        gi,
        group["rotation"],
        ", ".join(f"{r} x{n}" for r, n in counts.items()),
    )
