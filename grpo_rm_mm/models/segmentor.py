"""mmseg ``EncoderDecoder`` on a frozen pretrained backbone (GRPO-RM post-training)."""
from __future__ import annotations

from collections.abc import Sequence

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch import Tensor

from .freeze import FrozenBackboneMixin

__all__ = ['GRPORMEncoderDecoder']


@MODELS.register_module()
class GRPORMEncoderDecoder(FrozenBackboneMixin, EncoderDecoder):
    """``EncoderDecoder`` whose backbone is frozen (the representation model of GRPO-RM).

    With ``freeze_backbone=True`` and no ``trainable_backbone`` prefixes the backbone has
    ``requires_grad=False``, stays in eval mode under ``model.train()`` and runs under
    ``torch.no_grad()``; only the neck (if any) and the heads train. Every other argument is
    ``EncoderDecoder``'s.

    Args:
        freeze_backbone: freeze the backbone (default True).
        trainable_backbone: parameter-name prefixes of the backbone left trainable, e.g.
            ``('layers.11.', 'ln1.')`` for the last ViT block and its final norm (the backbone
            then runs with grad, still with the frozen parameters fixed).
    """

    def __init__(self, *args, freeze_backbone: bool = True,
                 trainable_backbone: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.setup_frozen_backbone(freeze_backbone, trainable_backbone)

    def extract_feat(self, inputs: Tensor) -> list[Tensor]:
        """(N, 3, H, W) images -> backbone (no grad when fully frozen) -> neck features."""
        with self.backbone_context():
            x = self.backbone(inputs)
        if self.with_neck:
            x = self.neck(x)
        return x
