"""The reference backend: :func:`..objective.grpo_rm_loss` (autograd), dense inputs flattened.

It runs every call, including weightings and surrogates registered without a closed form,
which is why 'auto' tries it last; it is also the oracle the other backends are tested
against, and the one that raises the errors of their failed data checks.
"""
from __future__ import annotations

from torch import Tensor

from ..dispatch import Backend
from ..objective import grpo_rm_loss
from ..problem import Problem, Solution

__all__ = ['ReferenceBackend', 'flatten_queries']


def flatten_queries(x: Tensor | None, queries: bool = False) -> Tensor | None:
    """(B, C, *S) -> (B prod(S), C) in query order, or with ``queries`` (B, *S) -> (B prod(S),);
    (N, C) / (N,) tensors as they are."""
    if x is None or x.ndim <= (1 if queries else 2):
        return x
    return x.reshape(-1) if queries else x.movedim(1, -1).reshape(-1, x.shape[1])


class ReferenceBackend(Backend):
    """:func:`..objective.grpo_rm_loss` on the caller's tensors; the loss is differentiable by
    autograd (``closed_form = False``)."""

    name = 'reference'
    closed_form = False

    def supports(self, problem: Problem) -> str | None:
        return None

    def solve(self, problem: Problem) -> Solution:
        p = problem
        logits = p.logits if p.logits is not None else p.z
        dense = logits.ndim > 2
        c = logits.shape[1]

        def outputs(x: Tensor | None) -> Tensor | None:  # (B, C, S) views -> (N, C)
            if x is None:
                return None
            return x.movedim(1, -1).reshape(-1, c) if dense else x.reshape(-1, c)

        def per_query(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.reshape(-1)

        rewards = outputs(p.reward_tensor) if p.reward_tensor is not None else p.rewards
        loss, diagnostics = grpo_rm_loss(
            flatten_queries(logits), per_query(p.y), rewards, old_logits=outputs(p.old),
            ref_logits=outputs(p.ref), valid=per_query(p.valid),
            clip_eps=p.eps_low, clip_eps_low=p.eps_low, clip_eps_high=p.eps_high,
            beta=p.beta, ignore_index=p.ignore_index, weight=per_query(p.weight),
            adv_std=p.adv_std, adv_eps=p.adv_eps, adv_scale=p.adv_scale,
            group_weighting=p.weighting, surrogate=p.surrogate, dual_clip_c=p.dual_clip_c,
            group_size=p.group_size, generator=p.generator)
        return Solution(loss=loss, grad=None, n_valid=int(diagnostics['grpo_queries']),
                        delegate=False, diagnostics=diagnostics)


BACKEND = ReferenceBackend()
