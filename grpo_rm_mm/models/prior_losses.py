"""Registered logit-adjusted cross-entropy: the baseline of a logit-adjusted GRPO-RM."""
from __future__ import annotations

import math

from mmengine.registry import MODELS
from torch import Tensor, nn

from ..core.prior import (
    check_class_weighting,
    check_tau,
    class_balanced_weights,
    log_prior_from_counts,
    logit_adjusted_cross_entropy,
)

__all__ = ['LogitAdjustedCrossEntropyLoss']


@MODELS.register_module()
class LogitAdjustedCrossEntropyLoss(nn.Module):
    """``mean_{valid q} u_q CE(z_q + tau log prior, y_q)`` (Menon et al. 2021, eq. 10).

    Training sees the logits shifted by ``tau log prior``; the head predicts with the plain
    logits, which is the logit-adjusted classifier. The prior is the training set's class
    frequencies, set by ``ClassPriorHook`` (or :meth:`set_class_counts`) before training.

    Called as mmpretrain's ``CrossEntropyLoss`` (``loss(cls_score (N, C), target (N,),
    avg_factor=N)``) or as an mmseg ``loss_decode`` (``loss(seg_logits (N, C, H, W), seg_label
    (N, H, W), weight=..., ignore_index=255)``).

    Args:
        tau: strength of the adjustment (1; 0 is plain cross-entropy).
        class_weighting: 'none' or 'balanced' (each query weighted by ``1 / (C prior_y)``;
            with ``tau=0`` the class-balanced cross-entropy).
        loss_weight: multiplies the loss.
        loss_name: key in mmseg's loss dict (must start with ``loss_``).
    """

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0,
                 loss_name: str = 'loss_ce', class_weighting: str = 'none') -> None:
        super().__init__()
        try:
            self.tau = check_tau(tau)
            check_class_weighting(class_weighting)
        except ValueError as err:
            raise ValueError(f'LogitAdjustedCrossEntropyLoss: {err}') from None
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
                or not math.isfinite(loss_weight) or loss_weight < 0:
            raise ValueError(f'LogitAdjustedCrossEntropyLoss: loss_weight={loss_weight!r} must '
                             f'be a finite number >= 0')
        if not isinstance(loss_name, str) or not loss_name.startswith('loss_'):
            raise ValueError(f'LogitAdjustedCrossEntropyLoss: loss_name={loss_name!r} must start '
                             f'with "loss_"')
        self.loss_weight = float(loss_weight)
        self.class_weighting = class_weighting
        self._loss_name = loss_name
        self.register_buffer('class_log_prior', None, persistent=False)

    @property
    def loss_name(self) -> str:
        return self._loss_name

    @property
    def uses_class_prior(self) -> bool:
        """Whether the loss needs :meth:`set_class_counts` (``tau > 0`` or class weights)."""
        return self.tau > 0 or self.class_weighting != 'none'

    def set_class_counts(self, counts) -> None:
        """Set the prior from the (C,) training-set class counts."""
        try:
            self.class_log_prior = log_prior_from_counts(counts)
        except ValueError as err:
            raise ValueError(f'LogitAdjustedCrossEntropyLoss: {err}') from None

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | None = None, ignore_index: int | None = None,
                **kwargs) -> Tensor:
        """Scalar loss; ``avg_factor`` is ignored (the loss is a mean over valid queries)."""
        if self.uses_class_prior and self.class_log_prior is None:
            raise ValueError(f'LogitAdjustedCrossEntropyLoss: tau={self.tau}, class_weighting='
                             f'{self.class_weighting!r} needs the training '
                             f"set's class prior: add custom_hooks=[dict(type='ClassPriorHook')] "
                             f'to the config, or call set_class_counts(counts) before training')
        if target.ndim == pred.ndim:
            if pred.ndim == 2:
                raise ValueError('LogitAdjustedCrossEntropyLoss needs hard labels (N,), got soft '
                                 f'targets of shape {tuple(target.shape)}')
            target = target.squeeze(1)
        if weight is not None and weight.ndim == pred.ndim:
            weight = weight.squeeze(1)
        if pred.ndim > 2 and ignore_index is None:
            ignore_index = 255
        if self.class_weighting != 'none':
            valid = target != ignore_index if ignore_index is not None \
                else target.new_ones(target.shape, dtype=bool)
            cb = class_balanced_weights(target, self.class_log_prior, valid)
            weight = cb if weight is None else weight * cb.to(weight.dtype)
        loss = logit_adjusted_cross_entropy(pred, target, self.class_log_prior, self.tau,
                                            weight=weight, ignore_index=ignore_index)
        return self.loss_weight * loss
