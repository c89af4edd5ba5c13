"""The testing oracle: the dense orthogonal matrix of every group's rotation, for small models."""

from __future__ import annotations

import torch

from ..scopes import DynamicRotation, unit_index_map
from ._spec import real_numel


class OracleMixin:
    """``rotation_matrix()``, built from ``units()``."""

    def rotation_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense (d, d) orthogonal matrix D with ``vec(state-layout g~) = D vec(g)`` for all groups.

        ``vec`` concatenates every param's flattened values in param-group order; moments are stored in
        the same order, so AdamW run on ``D vec(g)`` with updates mapped back by ``D^T`` is the oracle for
        this optimizer. Only for small models (d <= 4096). svd and eigen units contribute their current bases
        (``kron(L^T, R^T)`` on the matrix's row-major entries), which change every ``svd_every`` /
        ``precondition_every`` steps, and the identity before their first step.
        """
        numels = [real_numel(p) for g in self.param_groups for p in g["params"]]
        d = sum(numels)
        if d > 4096:
            raise ValueError(f"rotation_matrix(): d={d} > 4096; the dense oracle is for small models only")
        out = torch.zeros(d, d, dtype=dtype)
        offset = 0
        for gi, g in enumerate(self.param_groups):
            gn = [real_numel(p) for p in g["params"]]
            for unit in self.units(gi):
                idx = unit_index_map(unit, gn) + offset
                if isinstance(unit.rotation, DynamicRotation):
                    flat = idx.reshape(-1)
                    out[flat.unsqueeze(1), flat.unsqueeze(0)] = unit.rotation.dense(dtype)
                    continue
                length = unit.shape[1]
                block = unit.rotation.dense(dtype) if unit.rotation is not None else torch.eye(length, dtype=dtype)
                for row in idx:
                    out[row.unsqueeze(1), row.unsqueeze(0)] = block
            offset += sum(gn)
        return out
