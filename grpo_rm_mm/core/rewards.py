"""Per-output rewards of GRPO-RM (method.md section 2). Plain torch.

Every reward has the same signature ``reward(probs, labels, valid=None) -> (N, C)``:

- ``probs``: (N, C) old-policy probabilities ``pi_old`` (treated as constants: detached here);
- ``labels``: (N,) int64 true class of each query, in [0, C) where valid;
- ``valid``: optional (N,) bool mask; invalid rows get reward 0 and their labels are not read.

A reward is a float tensor (N, C) in the dtype of ``probs``; ``r[q, i]`` rewards output o_i of
query q. Rewards are combined linearly (``w_acc * r_acc + w_uni * r_uni + ...``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RewardFn = Callable[..., Tensor]

__all__ = ['FUSED_REWARDS', 'RewardFn', 'accuracy_reward', 'accuracy_reward_add_unchecked',
           'accuracy_reward_unchecked', 'check_reward_inputs',
           'confidence_penalty_reward', 'confidence_penalty_reward_unchecked',
           'fused_reward_terms', 'uniformity_reward', 'uniformity_reward_unchecked']


def check_reward_inputs(probs: Tensor, labels: Tensor,
                        valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` (N, C), ``labels`` (N,), ``valid`` (N,) bool.

    Returns ``(labels_safe, valid)``: labels with invalid rows replaced by 0 (so they can be
    gathered) and the full bool mask. Raises ValueError naming the bad value.
    """
    if not torch.is_tensor(probs) or probs.ndim != 2:
        shape = tuple(probs.shape) if torch.is_tensor(probs) else type(probs).__name__
        raise ValueError(f'rewards expect probs of shape (N, C), got {shape}')
    n, c = probs.shape
    if c < 2:
        raise ValueError(f'rewards need a group of C >= 2 outputs, got C={c}')
    if not probs.is_floating_point():
        raise ValueError(f'probs must be floating point, got dtype {probs.dtype}')
    if not torch.is_tensor(labels) or tuple(labels.shape) != (n, ):
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f'labels must have shape (N,)=({n},) to match probs {tuple(probs.shape)}'
                         f', got {shape}')
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f'labels must be integer class indices, got dtype {labels.dtype}')
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=probs.device)
    elif tuple(valid.shape) != (n, ) or valid.dtype != torch.bool:
        raise ValueError(f'valid must be a bool tensor of shape ({n},), got '
                         f'{tuple(valid.shape)} {valid.dtype}')
    bad = valid & ((labels < 0) | (labels >= c))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f'label {int(labels[idx])} at query {idx} is outside [0, C={c}); '
                         f'fix the labels or the number of classes, or mask the query out')
    return torch.where(valid, labels, torch.zeros_like(labels)).long(), valid


def _one_hot(labels: Tensor, c: int, like: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(labels, c).to(dtype=like.dtype)


def accuracy_reward(probs: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """``r_i = 1[o_i == y]`` (one-hot of the true class); ``probs`` only sets N, C, dtype."""
    labels, valid = check_reward_inputs(probs, labels, valid)
    r = _one_hot(labels, probs.shape[1], probs)
    return r * valid.unsqueeze(1).to(r.dtype)


def uniformity_reward(probs: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """``r_i = -(p_i / (1 - p_y) - 1/(C-1))`` for ``i != y``, ``r_y = 0`` (p = pi_old).

    ``1 - p_y`` is computed as the wrong-class mass ``sum_{j != y} p_j`` (equal for a
    distribution, without cancellation as p_y -> 1), so ``p_i / (1 - p_y)`` lies in [0, 1].
    When that mass is exactly 0 (p_y == 1) the wrong classes count as uniform: reward 0.
    Values lie in [-(C-2)/(C-1), 1/(C-1)] and sum to 0 over the wrong classes.
    """
    labels, valid = check_reward_inputs(probs, labels, valid)
    c = probs.shape[1]
    p = probs.detach()
    is_y = _one_hot(labels, c, p).bool()
    wrong = p.masked_fill(is_y, 0.0).clamp_min(0.0)
    mass = wrong.sum(dim=1, keepdim=True)
    uniform = 1.0 / (c - 1)
    share = torch.where(mass > 0, wrong / mass.clamp_min(torch.finfo(p.dtype).tiny),
                        torch.full_like(wrong, uniform))
    r = -(share - uniform)
    r = r.masked_fill(is_y, 0.0)
    return r * valid.unsqueeze(1).to(r.dtype)


def confidence_penalty_reward(probs: Tensor, labels: Tensor,
                              valid: Tensor | None = None) -> Tensor:
    """``r_i = -p_i`` for ``i != y``, ``r_y = 0``: penalise confidence in wrong classes."""
    labels, valid = check_reward_inputs(probs, labels, valid)
    p = probs.detach()
    is_y = _one_hot(labels, p.shape[1], p).bool()
    r = (-p).masked_fill(is_y, 0.0)
    return r * valid.unsqueeze(1).to(r.dtype)


# ----------------------------------------------------------------------------- hot path
# Unchecked kernels for the fused objective (:mod:`.fused`): no validation and no host
# synchronisation; the class axis is ``dim``; ``probs`` is a distribution along it (finite,
# >= 0) and ``labels`` (int64, the shape of ``probs`` without ``dim``) are classes in [0, C).
# They avoid comparisons and ``where`` on (N, C)-sized tensors (several times slower than
# arithmetic on CPU) and give the checked rewards' values (up to the last bit of a division).
def accuracy_reward_unchecked(probs: Tensor, labels: Tensor, dim: int = -1,
                              out: Tensor | None = None) -> Tensor:
    """:func:`accuracy_reward` without checks: ``1`` at the label, ``0`` elsewhere. ``out``:
    a tensor of the shape and dtype of ``probs`` to write into (a reused buffer)."""
    out = torch.zeros_like(probs) if out is None else out.zero_()
    return out.scatter_(dim, labels.unsqueeze(dim), 1.0)


def accuracy_reward_add_unchecked(out: Tensor, labels: Tensor, dim: int = -1,
                                  scale: float = 1.0) -> Tensor:
    """Add ``scale *`` :func:`accuracy_reward` to ``out`` in place (only the labels' entries
    change), without checks: the accuracy reward is sparse, so summing it needs no temporary."""
    idx = labels.unsqueeze(dim)
    return out.scatter_add_(dim, idx, torch.full(idx.shape, float(scale), dtype=out.dtype,
                                                 device=out.device))


def uniformity_reward_unchecked(probs: Tensor, labels: Tensor, dim: int = -1,
                                out: Tensor | None = None) -> Tensor:
    """:func:`uniformity_reward` without checks:
    ``r_i = [mass > 0] / (C - 1) - p_i / mass`` for ``i != y`` (``mass = sum_{j != y} p_j``),
    ``r_y = 0``. ``out`` as in :func:`accuracy_reward_unchecked`."""
    c = probs.shape[dim]
    idx = labels.unsqueeze(dim)
    wrong = probs.detach().clone() if out is None else out.copy_(probs)
    wrong.scatter_(dim, idx, 0.0)
    mass = wrong.sum(dim=dim, keepdim=True)
    base = (mass > 0).to(wrong.dtype) * (1.0 / (c - 1))
    # base - wrong / mass, rounded as the checked reward's uniform - share
    r = torch.addcdiv(base, wrong, mass.clamp_min(torch.finfo(wrong.dtype).tiny), value=-1.0,
                      out=wrong)
    return r.scatter_(dim, idx, 0.0)


def confidence_penalty_reward_unchecked(probs: Tensor, labels: Tensor, dim: int = -1,
                                        out: Tensor | None = None) -> Tensor:
    """:func:`confidence_penalty_reward` without checks: ``-p_i`` for ``i != y``, 0 at y.
    ``out`` as in :func:`accuracy_reward_unchecked`."""
    r = torch.neg(probs.detach(), out=out) if out is not None else probs.detach().neg()
    return r.scatter_(dim, labels.unsqueeze(dim), 0.0)


# A reward may carry ``unchecked(probs, labels, dim, out=None)`` (its kernel without checks) and
# ``add_unchecked(out, labels, dim)`` (for a reward that is non-zero only at the label): the
# functions named ``<name>_reward_unchecked`` / ``<name>_reward_add_unchecked`` are attached
# to ``<name>_reward``, so a reward and its kernels are found by their names alone.
# Each also carries ``fused_term = (name, 1.0)``: it is the reward ``name`` with coefficient 1,
# which the compiled backends of the fused objective compute themselves (:mod:`.backends`).
for _name, _fn in list(globals().items()):
    if _name.endswith('_reward') and callable(_fn) and not _name.startswith('_'):
        _fn.fused_term = (_name[:-len('_reward')], 1.0)
        for _suffix in ('unchecked', 'add_unchecked'):
            _kernel = globals().get(f'{_name}_{_suffix}')
            if callable(_kernel):
                setattr(_fn, _suffix, _kernel)
del _name, _fn, _suffix, _kernel


#: reward names the compiled backends compute (``fused_term[0]``), in the order of
#: :func:`fused_reward_terms`' coefficients
FUSED_REWARDS = ('accuracy', 'uniformity', 'confidence_penalty')


def fused_reward_terms(rewards: object) -> tuple[float, float, float] | None:
    """The summed coefficients of :data:`FUSED_REWARDS` in a reward spec (a callable or a
    sequence of them), or None if one of its rewards carries no ``fused_term`` of those names
    (a custom callable, a reward tensor)."""
    if torch.is_tensor(rewards):
        return None
    fns = [rewards] if callable(rewards) else list(rewards)
    coeffs = [0.0, 0.0, 0.0]
    for fn in fns:
        term = getattr(fn, 'fused_term', None)
        if term is None or term[0] not in FUSED_REWARDS:
            return None
        coeffs[FUSED_REWARDS.index(term[0])] += float(term[1])
    return coeffs[0], coeffs[1], coeffs[2]
