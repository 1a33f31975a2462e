"""Group weightings of GRPO-RM: how the C enumerated outputs of a query are averaged. Plain torch.

The group of a query is all C outputs. GRPO proper (TRL, verl) draws G outputs from pi_old and
averages over the draws, which estimates an expectation over ``o ~ pi_old``. Because the whole
group is known here, that expectation can be taken exactly or estimated as GRPO does. A
weighting maps the old-policy probabilities to per-output weights ``w`` (N, C) that sum to 1
over each row; the advantages are centred and scaled under the same weights, and the objective
is ``sum_i w_i s_i`` (``s_i`` the per-output surrogate)::

    'uniform'  w_i = 1/C                      the paper's literal (1/G) sum over the group
    'pi_old'   w_i = pi_old(o_i|q)            the exact expectation that sampled GRPO estimates
    'sampled'  w_i = n_i / G                  n_i = times o_i is drawn in G draws with
                                              replacement from pi_old (TRL/verl GRPO)

Each weighting also gives the *sample size* ``n`` (N, 1) that the ``std='unbiased'`` advantage
convention divides by ``n - 1``: C for 'uniform', G for 'sampled' (the draws), and Kish's
effective size ``1 / sum_i w_i^2`` for 'pi_old' (the reliability-weights unbiased variance).

New weightings register with :func:`register_group_weighting` and are chosen by name.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ['GROUP_WEIGHTINGS', 'GroupWeights', 'group_weights', 'pi_old_weights',
           'register_group_weighting', 'sampled_weights', 'uniform_weights']


class GroupWeights(NamedTuple):
    """Per-output weights (N, C), rows summing to 1, and the sample size (N, 1)."""

    weights: Tensor
    sample_size: Tensor


WeightingFn = Callable[..., GroupWeights]
GROUP_WEIGHTINGS: dict[str, WeightingFn] = {}


def register_group_weighting(name: str) -> Callable[[WeightingFn], WeightingFn]:
    """Register ``fn(old_probs (N, C), *, group_size: int, generator) -> GroupWeights``."""

    def decorator(fn: WeightingFn) -> WeightingFn:
        if name in GROUP_WEIGHTINGS:
            raise ValueError(f'group weighting {name!r} is already registered')
        GROUP_WEIGHTINGS[name] = fn
        return fn

    return decorator


@register_group_weighting('uniform')
def uniform_weights(old_probs: Tensor, *, group_size: int = 0,
                    generator: torch.Generator | None = None) -> GroupWeights:
    """``w_i = 1/C``; sample size C."""
    n, c = old_probs.shape
    w = torch.full_like(old_probs, 1.0 / c)
    return GroupWeights(w, old_probs.new_full((n, 1), float(c)))


@register_group_weighting('pi_old')
def pi_old_weights(old_probs: Tensor, *, group_size: int = 0,
                   generator: torch.Generator | None = None) -> GroupWeights:
    """``w_i = pi_old_i``; sample size ``1 / sum_i w_i^2`` (Kish)."""
    w = old_probs.detach()
    return GroupWeights(w, 1.0 / w.square().sum(dim=-1, keepdim=True))


@register_group_weighting('sampled')
def sampled_weights(old_probs: Tensor, *, group_size: int = 8,
                    generator: torch.Generator | None = None) -> GroupWeights:
    """``w_i = n_i / G`` for G draws per query from pi_old with replacement; sample size G.

    ``generator`` (on the device of ``old_probs``) makes the draws reproducible: the same
    generator state and probabilities give the same counts.
    """
    p = old_probs.detach()
    draws = torch.multinomial(p, group_size, replacement=True, generator=generator)
    counts = torch.zeros_like(p).scatter_add_(1, draws, torch.ones_like(draws, dtype=p.dtype))
    return GroupWeights(counts / group_size, p.new_full((p.shape[0], 1), float(group_size)))


def group_weights(name: str, old_probs: Tensor, *, group_size: int = 8,
                  generator: torch.Generator | None = None) -> GroupWeights:
    """The registered weighting ``name`` applied to ``old_probs`` (N, C)."""
    try:
        fn = GROUP_WEIGHTINGS[name]
    except KeyError:
        raise ValueError(f'group_weighting={name!r} is unknown; use one of '
                         f'{tuple(GROUP_WEIGHTINGS)}') from None
    return fn(old_probs, group_size=group_size, generator=generator)
