"""rotkern: AdamW in a rotated parameter space, fast and exactly.

Public API: :class:`RotatedAdamW` (eager fp32 reference), :class:`FusedRotatedAdamW` (the same step as
fused Triton kernels), :class:`RotatedSGD`, the rotation and scope building blocks, and
:func:`param_groups_for` to annotate a model's parameters for the scopes, :func:`from_adamw_state` /
:func:`to_adamw_state` to move AdamW state into and out of a rotated basis, and :mod:`rotkern.metrics`, the
paper's analysis metrics.
"""

from . import metrics
from .optim import FusedRotatedAdamW, RotatedAdamW, RotatedSGD, from_adamw_state, to_adamw_state
from .rotations import MAX_BLOCK_SIZE, BlockRotation, Stream, haar_orthogonal, random_permutation
from .scopes import ALL_SCOPES, SCOPES, Unit, build_units, param_groups_for

__version__ = "0.2.0"

__all__ = [
    "ALL_SCOPES",
    "MAX_BLOCK_SIZE",
    "SCOPES",
    "BlockRotation",
    "FusedRotatedAdamW",
    "RotatedAdamW",
    "RotatedSGD",
    "Stream",
    "Unit",
    "build_units",
    "from_adamw_state",
    "haar_orthogonal",
    "metrics",
    "param_groups_for",
    "random_permutation",
    "to_adamw_state",
]
