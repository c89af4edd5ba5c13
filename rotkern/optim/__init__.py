"""Stage 4: optimizers."""

from .convert import from_adamw_state, to_adamw_state
from .fused import FusedRotatedAdamW
from .rotated_adamw import RotatedAdamW
from .sgd import RotatedSGD

__all__ = ["FusedRotatedAdamW", "RotatedAdamW", "RotatedSGD", "from_adamw_state", "to_adamw_state"]
