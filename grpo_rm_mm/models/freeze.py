"""Freezing a pretrained backbone, fully or partly (toolbox-agnostic, plain torch)."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn


def freeze_parameters(module: nn.Module, trainable: Sequence[str] = ()) -> int:
    """Set ``requires_grad=False`` on every parameter of ``module`` whose name does not start
    with one of the ``trainable`` prefixes (e.g. ``('layers.11.', 'ln1.')``).

    Returns the number of parameters (elements) left trainable. A prefix that matches no
    parameter raises ``ValueError`` naming it, so a typo does not silently freeze everything.
    """
    names = [n for n, _ in module.named_parameters()]
    for prefix in trainable:
        if not any(n.startswith(prefix) for n in names):
            tops = sorted({n.split('.')[0] for n in names})
            raise ValueError(f'trainable prefix {prefix!r} matches no backbone parameter; '
                             f'parameter names start with one of {tops}')
    left = 0
    for name, param in module.named_parameters():
        keep = any(name.startswith(p) for p in trainable)
        param.requires_grad_(keep)
        left += param.numel() if keep else 0
    return left


class FrozenBackboneMixin:
    """For mmengine models with a ``self.backbone``: freeze it, keep it in eval mode when fully
    frozen (BN statistics and dropout stay as pretrained), and run it under ``torch.no_grad()``
    then, so no activations are kept for backward.

    Call :meth:`setup_frozen_backbone` at the end of ``__init__`` and use
    :meth:`backbone_context` around the backbone forward.
    """

    backbone: nn.Module
    freeze_backbone: bool = False
    trainable_backbone: tuple[str, ...] = ()

    def setup_frozen_backbone(self, freeze_backbone: bool = True,
                              trainable_backbone: Sequence[str] = ()) -> None:
        """Freeze ``self.backbone`` except the ``trainable_backbone`` parameter-name prefixes."""
        self.freeze_backbone = bool(freeze_backbone)
        self.trainable_backbone = tuple(trainable_backbone)
        if self.trainable_backbone and not self.freeze_backbone:
            raise ValueError('trainable_backbone only makes sense with freeze_backbone=True')
        if self.freeze_backbone:
            freeze_parameters(self.backbone, self.trainable_backbone)

    @property
    def backbone_fully_frozen(self) -> bool:
        return self.freeze_backbone and not self.trainable_backbone

    def backbone_context(self) -> contextlib.AbstractContextManager:
        """``torch.no_grad()`` when the backbone is fully frozen, else a null context."""
        return torch.no_grad() if self.backbone_fully_frozen else contextlib.nullcontext()

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self.backbone_fully_frozen:
            self.backbone.eval()
        return self
