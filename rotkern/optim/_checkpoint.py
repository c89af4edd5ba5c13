"""The optimizer's side of checkpoints: ``state_dict`` / ``load_state_dict`` with torch's hooks, over the format
and loader of :mod:`rotkern.optim._state_dict`, and the basis shapes the loader checks dynamic units' state against.
"""

from __future__ import annotations

from typing import Any

import torch

from ..scopes import DYNAMIC_SCOPES, DynamicRotation
from . import _state_dict
from ._spec import PER_PARAM_KEYS


class CheckpointMixin:
    """torch.optim's state_dict contract for the rotated optimizers (see :mod:`rotkern.optim._state_dict`)."""

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict (hooks, param ids, references to the live state tensors), plus rotkern's
        metadata. The saved per-param entries have the live state's keys: the moments of params whose state
        lives in a rotated basis are kept (live and saved) as ``rotated_exp_avg``, ``rotated_exp_avg_sq``, ...,
        which torch.optim optimizers do not find. See :mod:`rotkern.optim._state_dict`."""
        return _state_dict.pack(self)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (torch semantics: pre-hooks, then the state, then post-hooks).

        Accepts what a rotated optimizer saved with the same rotation settings (any rotkern version), and torch
        optimizers' state for params this optimizer does not rotate (``rotation="none"``); tensors are copied
        onto the params' devices (never shared with ``state_dict``), ``step`` becomes a float32 tensor whatever
        number type it was saved as. Raises ValueError, naming the difference, before anything changes when the
        checkpoint's scope, seed, block size, roles, names (up to wrapper prefixes such as ``module.`` or
        ``_orig_mod.``), parameter shapes or state tensors do not match; the input dict is never modified.
        """
        state_dict = _state_dict.run_pre_hooks(self, state_dict)
        state, groups = _state_dict.unpack(self, state_dict)
        # In place: svd units stay bound to this state mapping, and the cached units (and the fused kernels'
        # plans built from them) stay valid, since the checkpoint's rotation spec equals this optimizer's.
        self.state.clear()
        self.state.update(state)
        self.param_groups[:] = groups
        for gi, group in enumerate(groups):  # the checkpoint's lists are this group's now (see _reclaim_lists)
            if gi in self._group_lists:
                self._group_lists[gi] = {k: group[k] for k in PER_PARAM_KEYS if k in group}
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _basis_state_shapes(self) -> dict[int, dict[str, tuple[int, ...]]]:
        """id(param) -> {state key: shape} of the bases its dynamic units keep (params of svd/eigen groups only)."""
        out: dict[int, dict[str, tuple[int, ...]]] = {}
        for gi, g in enumerate(self.param_groups):
            if g["rotation"] not in DYNAMIC_SCOPES:
                continue
            for unit in self.units(gi):
                if isinstance(unit.rotation, DynamicRotation):
                    out.setdefault(id(g["params"][unit.params[0]]), {}).update(unit.rotation.state_shapes())
        return out
