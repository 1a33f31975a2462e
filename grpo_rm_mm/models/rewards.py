"""Registered GRPO-RM rewards (method.md section 2): weighted faces of ``grpo_rm_mm.core``.

Config use (inside ``GRPORMLoss(rewards=...)``)::

    rewards=[dict(type='AccuracyReward', weight=1.0), dict(type='UniformityReward', weight=1.0)]

Every reward is called as ``reward(probs, labels, valid=None) -> weight * r`` with ``probs``
(N, C) the detached old-policy probabilities, ``labels`` (N,) int64 and ``r`` (N, C).
Registered in mmengine's root ``MODELS``, so mmseg and mmpretrain configs find them too.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from mmengine.registry import MODELS
from torch import Tensor

from ..core.rewards import (
    accuracy_reward,
    accuracy_reward_add_unchecked,
    confidence_penalty_reward,
    confidence_penalty_reward_unchecked,
    uniformity_reward,
    uniformity_reward_unchecked,
)

__all__ = ['AccuracyReward', 'BaseReward', 'ConfidencePenaltyReward', 'UniformityReward',
           'build_reward']


class BaseReward:
    """A weighted reward ``weight * fn(probs, labels)``; subclasses set ``fn``.

    For the fused objective's hot path a subclass may also set ``unchecked_fn(probs, labels,
    dim, out=None)`` (``fn`` without input checks, class axis ``dim``) or, for a reward that
    is non-zero only at the label, ``add_unchecked_fn(out, labels, dim, scale)`` (adds
    ``scale * r`` to ``out`` in place); :attr:`unchecked` / :attr:`add_unchecked` weight them.
    """

    fn: Callable[..., Tensor]
    unchecked_fn: Callable[..., Tensor] | None = None
    add_unchecked_fn: Callable[..., Tensor] | None = None

    def __init__(self, weight: float = 1.0) -> None:
        name = type(self).__name__
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f'{name}: weight={weight!r} must be a finite float >= 0')
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f'{name}: weight={weight!r} must be a finite float >= 0 (a '
                             f'negative weight would reward the opposite behaviour; 0 '
                             f'switches the reward off)')
        self.weight = float(weight)

    def __call__(self, probs: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
        """(N, C), (N,) -> (N, C) weighted rewards."""
        return self.weight * type(self).fn(probs, labels, valid)

    @property
    def unchecked(self) -> Callable[..., Tensor] | None:
        """``(probs, labels, dim, out=None) -> weight * r`` without checks, or None."""
        kernel = type(self).unchecked_fn
        if kernel is None:
            return None

        def weighted(probs: Tensor, labels: Tensor, dim: int = -1,
                     out: Tensor | None = None) -> Tensor:
            r = kernel(probs, labels, dim, out=out)
            return r if self.weight == 1.0 else r.mul_(self.weight)

        return weighted

    @property
    def add_unchecked(self) -> Callable[..., Tensor] | None:
        """``(out, labels, dim)``: adds ``weight * r`` to ``out`` without checks, or None."""
        kernel = type(self).add_unchecked_fn
        if kernel is None:
            return None
        return lambda out, labels, dim=-1: kernel(out, labels, dim, scale=self.weight)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(weight={self.weight})'


@MODELS.register_module()
class AccuracyReward(BaseReward):
    """``r_i = 1[o_i == y]``."""

    fn = staticmethod(accuracy_reward)
    add_unchecked_fn = staticmethod(accuracy_reward_add_unchecked)


@MODELS.register_module()
class UniformityReward(BaseReward):
    """``r_i = -(p_i / (1 - p_y) - 1/(C-1))`` for ``i != y``, 0 for ``y`` (p = pi_old)."""

    fn = staticmethod(uniformity_reward)
    unchecked_fn = staticmethod(uniformity_reward_unchecked)


@MODELS.register_module()
class ConfidencePenaltyReward(BaseReward):
    """``r_i = -p_i`` for ``i != y``, 0 for ``y`` (p = pi_old)."""

    fn = staticmethod(confidence_penalty_reward)
    unchecked_fn = staticmethod(confidence_penalty_reward_unchecked)


REWARD_TYPES = ('AccuracyReward', 'UniformityReward', 'ConfidencePenaltyReward')


def build_reward(cfg: dict | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A reward from a config dict (``dict(type='UniformityReward', weight=0.5)``) or a
    callable ``fn(probs, labels) -> (N, C)`` (returned as is)."""
    if callable(cfg) and not isinstance(cfg, dict):
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'a reward must be a dict with a "type" (one of {REWARD_TYPES}) or a '
                         f'callable, got {cfg!r}')
    rtype = cfg['type']
    if isinstance(rtype, str) and MODELS.get(rtype) is None:
        raise ValueError(f'unknown reward type {rtype!r}; registered GRPO-RM rewards: '
                         f'{REWARD_TYPES} (or register your own in mmengine MODELS)')
    try:
        reward = MODELS.build(dict(cfg))
    except TypeError as err:  # bad keyword, e.g. dict(type='AccuracyReward', wieght=1)
        raise ValueError(f'cannot build reward {cfg!r}: {err}') from err
    if not callable(reward):
        raise ValueError(f'reward {cfg!r} built a {type(reward).__name__}, which is not callable')
    return reward
