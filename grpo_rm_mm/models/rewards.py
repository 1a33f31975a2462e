"""Registered GRPO-RM rewards (method.md section 2): weighted faces of ``grpo_rm_mm.core``.

Config use (inside ``GRPORMLoss(rewards=...)``)::

    rewards=[dict(type='AccuracyReward', weight=1.0), dict(type='UniformityReward', weight=1.0)]

Every reward is called as ``reward(probs, labels, valid=None) -> weight * r`` with ``probs``
(N, C) the detached old-policy probabilities, ``labels`` (N,) int64 and ``r`` (N, C).
Registered in mmengine's root ``MODELS``, so mmseg and mmpretrain configs find them too.

The classes are derived from :mod:`grpo_rm_mm.core.rewards`: every public function there named
``<name>_reward`` becomes the registered :class:`BaseReward` subclass ``<Name>Reward``
(``confidence_penalty_reward`` -> ``ConfidencePenaltyReward``), with the fused objective's
kernels the function carries (``fn.unchecked``, ``fn.add_unchecked``). Adding a reward is
adding that function.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from mmengine.registry import MODELS
from torch import Tensor

from ..core import rewards as core_rewards

__all__ = ['BaseReward', 'REWARD_CLASSES', 'build_reward']


class BaseReward:
    """A weighted reward ``weight * fn(probs, labels, valid)``; subclasses set ``fn``.

    For the fused objective's hot path ``fn`` may carry ``fn.unchecked(probs, labels, dim,
    out=None)`` (``fn`` without input checks, class axis ``dim``) or, for a reward that is
    non-zero only at the label, ``fn.add_unchecked(out, labels, dim, scale)`` (adds
    ``scale * r`` to ``out`` in place); :attr:`unchecked` / :attr:`add_unchecked` weight them.
    """

    fn: Callable[..., Tensor]

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
        kernel = getattr(type(self).fn, 'unchecked', None)
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
        kernel = getattr(type(self).fn, 'add_unchecked', None)
        if kernel is None:
            return None
        return lambda out, labels, dim=-1: kernel(out, labels, dim, scale=self.weight)

    @property
    def fused_term(self) -> tuple[str, float] | None:
        """``(name, weight)`` when this reward is ``weight`` times the core reward ``name``
        (what the fused objective's compiled kernel computes itself), else None."""
        term = getattr(type(self).fn, 'fused_term', None)
        if term is None or type(self).__call__ is not BaseReward.__call__:
            return None
        return term[0], term[1] * self.weight

    def __repr__(self) -> str:
        return f'{type(self).__name__}(weight={self.weight})'


def _reward_class(fn: Callable[..., Tensor]) -> type[BaseReward]:
    """The registered class of core reward ``fn`` (``<name>_reward`` -> ``<Name>Reward``)."""
    name = ''.join(part.capitalize() for part in fn.__name__.split('_'))
    summary = inspect.getdoc(fn).split('\n\n')[0]
    cls = type(name, (BaseReward, ), dict(
        fn=staticmethod(fn), __module__=__name__, __qualname__=name,
        __doc__=f'{summary}\n\nWeighted :func:`grpo_rm_mm.core.rewards.{fn.__name__}`.'))
    return MODELS.register_module(module=cls)


#: ``{registry name: class}`` of the rewards derived from :mod:`grpo_rm_mm.core.rewards`.
REWARD_CLASSES: dict[str, type[BaseReward]] = {
    cls.__name__: cls for cls in (
        _reward_class(fn) for name, fn in vars(core_rewards).items()
        if name.endswith('_reward') and not name.startswith('_') and inspect.isfunction(fn))}
globals().update(REWARD_CLASSES)  # importable by name: from grpo_rm_mm.models.rewards import ...
__all__ += sorted(REWARD_CLASSES)


def build_reward(cfg: dict | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A reward from a config dict (``dict(type='UniformityReward', weight=0.5)``) or a
    callable ``fn(probs, labels) -> (N, C)`` (returned as is)."""
    if callable(cfg) and not isinstance(cfg, dict):
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'a reward must be a dict with a "type" (one of '
                         f'{tuple(REWARD_CLASSES)}) or a callable, got {cfg!r}')
    rtype = cfg['type']
    if isinstance(rtype, str) and MODELS.get(rtype) is None:
        raise ValueError(f'unknown reward type {rtype!r}; registered GRPO-RM rewards: '
                         f'{tuple(REWARD_CLASSES)} (or register your own in mmengine MODELS)')
    try:
        reward = MODELS.build(dict(cfg))
    except TypeError as err:  # bad keyword, e.g. dict(type='AccuracyReward', wieght=1)
        raise ValueError(f'cannot build reward {cfg!r}: {err}') from err
    if not callable(reward):
        raise ValueError(f'reward {cfg!r} built a {type(reward).__name__}, which is not callable')
    return reward
