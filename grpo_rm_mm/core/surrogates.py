"""Per-output policy surrogates of GRPO-RM (to be maximised). Plain torch.

For ratios ``r = pi_theta / pi_old`` (N, C) and advantages ``A`` (N, C, constants)::

    'clip'       s_i = min(r_i A_i, clip(r_i, 1 - eps_low, 1 + eps_high) A_i)       (PPO)
    'dual_clip'  s_i = max(s_i^clip, c A_i)  where A_i < 0, else s_i^clip            (c > 1)

``eps_low = eps_high`` is PPO's symmetric clip; ``eps_high > eps_low`` is "clip-higher" (DAPO).
The dual clip (Ye et al. 2020, verl's ``clip_ratio_c``) bounds how far a negative-advantage
term can fall as the ratio grows: the plain clip never bounds ``r A`` for ``A < 0, r > 1``.

Every surrogate returns ``(s, active)``: ``active`` (bool, N x C) marks the outputs whose value
is the unclipped ``r_i A_i`` (the only ones with a gradient, ``d s_i / d log r_i = r_i A_i``);
elsewhere a clip holds and the gradient is 0.

New surrogates register with :func:`register_surrogate` and are chosen by name.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ['SURROGATES', 'clip_surrogate', 'dual_clip_surrogate', 'register_surrogate',
           'surrogate_terms']

SurrogateFn = Callable[..., tuple[Tensor, Tensor]]
SURROGATES: dict[str, SurrogateFn] = {}


def register_surrogate(name: str) -> Callable[[SurrogateFn], SurrogateFn]:
    """Register ``fn(ratio, adv, *, eps_low, eps_high, dual_clip_c) -> (s, active)``."""

    def decorator(fn: SurrogateFn) -> SurrogateFn:
        if name in SURROGATES:
            raise ValueError(f'surrogate {name!r} is already registered')
        SURROGATES[name] = fn
        return fn

    return decorator


@register_surrogate('clip')
def clip_surrogate(ratio: Tensor, adv: Tensor, *, eps_low: float, eps_high: float,
                   dual_clip_c: float = 3.0) -> tuple[Tensor, Tensor]:
    """``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``; ``dual_clip_c`` is unused."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    with torch.no_grad():
        active = unclipped <= clipped
    return torch.minimum(unclipped, clipped), active


@register_surrogate('dual_clip')
def dual_clip_surrogate(ratio: Tensor, adv: Tensor, *, eps_low: float, eps_high: float,
                        dual_clip_c: float = 3.0) -> tuple[Tensor, Tensor]:
    """The clip surrogate, floored at ``c A`` where ``A < 0`` (so ``r > c`` has no gradient)."""
    s, active = clip_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high)
    floor = dual_clip_c * adv
    negative = adv < 0
    with torch.no_grad():
        active = active & ~(negative & (s < floor))
    return torch.where(negative, torch.maximum(s, floor), s), active


def surrogate_terms(name: str, ratio: Tensor, adv: Tensor, *, eps_low: float,
                    eps_high: float, dual_clip_c: float = 3.0) -> tuple[Tensor, Tensor]:
    """The registered surrogate ``name``: ``(s (N, C), active (N, C) bool)``."""
    try:
        fn = SURROGATES[name]
    except KeyError:
        raise ValueError(f'surrogate={name!r} is unknown; use one of {tuple(SURROGATES)}') \
            from None
    return fn(ratio, adv, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
