"""Stage 4: optimizers."""

from ._base import moment
from .convert import from_adamw_state, to_adamw_state
from .fused import FusedRotatedAdamW
from .rotated_adamw import RotatedAdamW
from .sgd import RotatedSGD

__all__ = ["FusedRotatedAdamW", "RotatedAdamW", "RotatedSGD", "from_adamw_state", "moment", "to_adamw_state"]
