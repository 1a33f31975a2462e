"""Group-relative advantages of GRPO-RM (method.md section 3). Plain torch.

The group of a query is its C outputs (the last dim), so for rewards ``r`` (N, C)::

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)     scale='std'   (GRPO)
    A_i =  r_i - mean_j r_j                          scale='none'  (Dr.GRPO)

``std='population'`` divides the sum of squares by C, ``'unbiased'`` by C - 1. A group whose
rewards are all equal gets A = 0 exactly (never NaN, even with eps = 0).

With group weights ``w`` (N, C) (rows summing to 1, see :mod:`.weighting`) the statistics are
taken under ``w``: ``mean_w = sum_j w_j r_j``, ``var_w = sum_j w_j (r_j - mean_w)^2``, times
``n / (n - 1)`` for ``std='unbiased'`` with ``n`` the weighting's sample size. Uniform weights
give the formulas above; then ``sum_i w_i A_i = 0`` for every weighting.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ['STD_MODES', 'SCALE_MODES', 'check_advantage_options', 'group_advantages',
           'weighted_advantages']

STD_MODES = ('population', 'unbiased')
SCALE_MODES = ('std', 'none')


def check_advantage_options(std: str, eps: float, scale: str) -> None:
    """Raise ValueError for an unknown ``std``/``scale`` or a negative/non-finite ``eps``."""
    if std not in STD_MODES:
        raise ValueError(f'std={std!r} is not a std convention; use one of {STD_MODES}')
    if scale not in SCALE_MODES:
        raise ValueError(f"scale={scale!r} is unknown; use 'std' (GRPO) or 'none' (Dr.GRPO)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f'eps={eps!r} must be a finite float >= 0 (default 1e-6)')


def group_advantages(rewards: Tensor, std: str = 'population', eps: float = 1e-6,
                     scale: str = 'std', weights: Tensor | None = None,
                     sample_size: Tensor | None = None) -> Tensor:
    """Advantages (N, C) from rewards (N, C), normalised within each row (the group).

    ``weights`` (N, C) and ``sample_size`` (N, 1) come from a group weighting (None: uniform).
    The result is detached (advantages are constants of the objective).
    """
    check_advantage_options(std, eps, scale)
    if not torch.is_tensor(rewards) or rewards.ndim != 2:
        shape = tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__
        raise ValueError(f'rewards must have shape (N, C), got {shape}')
    if rewards.shape[1] < 2:
        raise ValueError(f'a group needs C >= 2 outputs, got rewards of shape '
                         f'{tuple(rewards.shape)}')
    if not rewards.is_floating_point():
        rewards = rewards.float()
    r = rewards.detach()
    n_bad = int((~torch.isfinite(r)).sum())
    if n_bad:
        raise ValueError(f'{n_bad} non-finite reward value(s) in rewards of shape '
                         f'{tuple(r.shape)}; check the reward functions and their weights')
    if weights is not None:
        if tuple(weights.shape) != tuple(r.shape):
            raise ValueError(f'weights of shape {tuple(weights.shape)} do not match rewards of '
                             f'shape {tuple(r.shape)}')
        return weighted_advantages(r, weights.detach().to(r.dtype), std, eps, scale,
                                   sample_size)
    flat = (r.amax(dim=-1, keepdim=True) == r.amin(dim=-1, keepdim=True))
    centred = r - r.mean(dim=-1, keepdim=True)
    if scale == 'std':
        # centred / (std + eps) computed on centred / max|centred| (in [-1, 1]), so the squares
        # in the std cannot underflow (rewards 1e-164 apart) or overflow; same value otherwise.
        mag = centred.abs().amax(dim=-1, keepdim=True)
        mag = torch.where(mag > 0, mag, torch.ones_like(mag))
        unit = centred / mag
        sd = unit.std(dim=-1, keepdim=True, correction=0 if std == 'population' else 1)
        adv = unit / (sd + eps / mag)
        # a flat group would be 0/0 with eps == 0: set to exactly 0
        adv = torch.where(flat, torch.zeros_like(adv), adv)
    else:
        adv = torch.where(flat, torch.zeros_like(centred), centred)
    return adv


def weighted_advantages(r: Tensor, w: Tensor, std: str = 'population', eps: float = 1e-6,
                        scale: str = 'std', sample_size: Tensor | None = None) -> Tensor:
    """Advantages (N, C) under group weights ``w`` (N, C); unchecked (the caller validates).

    ``A = (r - mean_w) / (sd_w + eps)`` (``scale='std'``) or ``r - mean_w`` (``'none'``);
    a group with ``var_w = 0`` (all its weight on equal rewards) gets A = 0 exactly.
    """
    total = w.sum(dim=-1, keepdim=True)
    centred = r - (w * r).sum(dim=-1, keepdim=True) / total
    # flat: every output with weight has the same reward (exact, unlike var_w == 0 in floats)
    weighted = w > 0
    top = r.masked_fill(~weighted, float('-inf')).amax(dim=-1, keepdim=True)
    bottom = r.masked_fill(~weighted, float('inf')).amin(dim=-1, keepdim=True)
    flat = top <= bottom
    # as in group_advantages: the squares are taken of centred / max|centred| (in [-1, 1])
    mag = centred.abs().amax(dim=-1, keepdim=True)
    mag = torch.where(mag > 0, mag, torch.ones_like(mag))
    unit = centred / mag
    var = (w * unit.square()).sum(dim=-1, keepdim=True) / total
    if scale == 'none':
        return torch.where(flat, torch.zeros_like(centred), centred)
    if std == 'unbiased':
        if sample_size is None:
            sample_size = torch.full_like(var, float(r.shape[-1]))
        var = var * sample_size / (sample_size - 1).clamp_min(torch.finfo(r.dtype).eps)
    adv = unit / (var.sqrt() + eps / mag)
    return torch.where(flat, torch.zeros_like(adv), adv)
