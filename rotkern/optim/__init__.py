"""Stage 4: optimizers: the torch.optim classes around the functional step (:mod:`rotkern.kernels.dispatch`).

``_base.RotatedOptimizerBase`` holds the torch.optim contract (composed of ``_validation``, ``_units_cache``,
``_plan``, ``_staging``, ``_sharded``, ``_checkpoint`` and ``_oracle``); ``_spec`` the group keys and state naming;
``_state_dict`` the checkpoint format. A new backend or basis family needs no change here (see
:mod:`rotkern.kernels` and :mod:`rotkern.bases`).
"""

from ._base import moment
from .convert import from_adamw_state, to_adamw_state
from .fused import FusedRotatedAdamW
from .rotated_adamw import RotatedAdamW
from .sgd import RotatedSGD

__all__ = ["FusedRotatedAdamW", "RotatedAdamW", "RotatedSGD", "from_adamw_state", "moment", "to_adamw_state"]
