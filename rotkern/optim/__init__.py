"""Stage 4: optimizers."""

from .fused import FusedRotatedAdamW
from .rotated_adamw import RotatedAdamW
from .sgd import RotatedSGD

__all__ = ["FusedRotatedAdamW", "RotatedAdamW", "RotatedSGD"]
