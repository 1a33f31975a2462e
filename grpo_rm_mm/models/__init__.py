"""Registered model components (heads, losses, rewards)."""
from . import (
    backbones,  # noqa: F401  (EfficientNetLite)
    losses,  # noqa: F401
    prior_losses,  # noqa: F401  (LogitAdjustedCrossEntropyLoss)
    rewards,  # noqa: F401
)
from .heads import cls_head, decode_head  # noqa: F401

# isort: split
from . import classifier  # noqa: F401  (GRPORMClassifier)

# isort: split
from . import segmentor  # noqa: F401  (GRPORMEncoderDecoder)
