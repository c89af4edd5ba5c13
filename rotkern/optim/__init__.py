"""Stage 4: optimizers."""

from .rotated_adamw import RotatedAdamW
from .sgd import RotatedSGD

__all__ = ["RotatedAdamW", "RotatedSGD"]
