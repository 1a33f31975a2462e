"""Per-query weights and class priors for the GRPO-RM objective (plain torch).

Two additions that act on the objective's inputs, so that every implementation of it (the
reference autograd one and the fused one) gets them unchanged:

- **Inverse-odds query weights** (``query_weighting='inverse_odds'``). With the ``pi_old``
  group weighting and the accuracy reward, the gradient of one query at ratio 1 is
  cross-entropy's times ``sqrt(p_y / (1 - p_y))`` (p = pi_old; docs/method.md section 4): small
  exactly where the true class is improbable (rare classes, early training). The stop-gradient
  weight ``u_q = sqrt((1 - p_y) / p_y)`` cancels that factor, so the first update on a batch
  follows cross-entropy's gradient; the uniformity reward and the clip act as before.
- **Logit adjustment** (Menon et al. 2021, "Long-tail learning via logit adjustment"): in
  training the policy is ``softmax(z + tau log prior)`` (pi_theta, pi_old, pi_ref, so also the
  ratio, the rewards and the weights), at test the plain logits ``z`` are used. The prior is
  the training set's class frequencies.
- **Class-balanced query weights** (``class_weighting='balanced'``): each query weighted by
  ``1 / (C prior_y)`` (re-weighting; mean 1 over the training set), the same weights for
  cross-entropy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['CLASS_WEIGHTINGS', 'QUERY_WEIGHTINGS', 'QUERY_WEIGHT_NORMS', 'adjust_logits',
           'check_class_weighting', 'check_query_weighting', 'check_tau',
           'class_balanced_weights', 'inverse_odds_weights', 'log_prior_from_counts',
           'logit_adjusted_cross_entropy']

QUERY_WEIGHTINGS = ('none', 'inverse_odds')
QUERY_WEIGHT_NORMS = ('mean', 'none')
CLASS_WEIGHTINGS = ('none', 'balanced')


def check_class_weighting(class_weighting: str) -> None:
    if class_weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f'class_weighting={class_weighting!r} is unknown; use one of '
                         f'{CLASS_WEIGHTINGS}')


def class_balanced_weights(labels: Tensor, log_prior: Tensor, valid: Tensor) -> Tensor:
    """Per-query weights ``1 / (C prior_y)`` (the shape of ``labels``, the prior's dtype; 0
    where not ``valid``): the training set's mean weight is 1, each class carries the same
    total."""
    c = log_prior.numel()
    w = (-log_prior.to(labels.device)).exp() / c
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return torch.where(valid, w[y], torch.zeros_like(w[y]))


def check_query_weighting(query_weighting: str, query_weight_norm: str,
                          query_weight_cap: float) -> None:
    """Validate the query weighting's options (errors name the bad value and the choices)."""
    if query_weighting not in QUERY_WEIGHTINGS:
        raise ValueError(f'query_weighting={query_weighting!r} is unknown; use one of '
                         f'{QUERY_WEIGHTINGS}')
    if query_weight_norm not in QUERY_WEIGHT_NORMS:
        raise ValueError(f'query_weight_norm={query_weight_norm!r} is unknown; use one of '
                         f'{QUERY_WEIGHT_NORMS}')
    if isinstance(query_weight_cap, bool) or not isinstance(query_weight_cap, (int, float)) \
            or not math.isfinite(query_weight_cap) or query_weight_cap < 1:
        raise ValueError(f'query_weight_cap={query_weight_cap!r} must be a finite number >= 1 '
                         f'(the largest inverse-odds weight before normalisation; e.g. 100)')


def check_tau(tau: float) -> float:
    """``tau`` of the logit adjustment: a finite number >= 0 (0 turns it off)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
            or tau < 0:
        raise ValueError(f'logit adjustment tau={tau!r} must be a finite number >= 0 (0: off; '
                         f'1 is Menon et al.\'s choice)')
    return float(tau)


def log_prior_from_counts(counts: Sequence[int] | Tensor) -> Tensor:
    """(C,) class counts -> (C,) float64 ``log(n_c / sum_j n_j)``.

    Every class needs at least one training sample (its log prior would be -inf)."""
    n = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if n.numel() < 2:
        raise ValueError(f'class counts need >= 2 classes, got {n.tolist()}')
    if not bool(torch.isfinite(n).all()) or bool((n != n.round()).any()):
        raise ValueError(f'class counts must be finite integers, got {n.tolist()[:10]}')
    empty = torch.nonzero(n <= 0).flatten().tolist()
    if empty:
        raise ValueError(f'class(es) {empty[:10]} have {n[empty[0]].item():g} training samples; '
                         f'a class prior needs every class present (log 0 = -inf)')
    return (n / n.sum()).log()


def adjust_logits(logits: Tensor, log_prior: Tensor, tau: float, class_dim: int = 1) -> Tensor:
    """``logits + tau * log_prior`` with the (C,) ``log_prior`` broadcast along ``class_dim``
    ((N, C) or (N, C, *S) logits), in the logits' dtype; ``tau == 0`` returns ``logits``."""
    if tau == 0:
        return logits
    c = logits.shape[class_dim]
    if log_prior.numel() != c:
        raise ValueError(f'the class prior has {log_prior.numel()} classes but the logits '
                         f'{tuple(logits.shape)} have {c} along dim {class_dim}')
    shape = [1] * logits.ndim
    shape[class_dim] = c
    shift = (tau * log_prior).to(device=logits.device, dtype=logits.dtype).reshape(shape)
    return logits + shift


def inverse_odds_weights(logits: Tensor, labels: Tensor, valid: Tensor, cap: float = 100.0,
                         norm: str = 'mean') -> Tensor:
    """Stop-gradient per-query weights ``u_q = min(sqrt((1 - p_y) / p_y), cap)``.

    Args:
        logits: (N, C) or (N, C, *S) logits of pi_old (detached here).
        labels: (N,) or (N, *S) class indices; read only where ``valid``.
        valid: bool, the shape of ``labels``: the queries that count.
        cap: upper bound of the weight (``p_y >= 1 / (1 + cap^2)``): a query whose true class
            has probability 0 in floating point would otherwise get an infinite weight.
        norm: 'mean': divided by the mean over the valid queries (mean weight 1, so the loss
            keeps its scale and only the balance between queries changes); 'none': the raw
            weights (at ratio 1 with the accuracy reward alone the gradient is then exactly
            cross-entropy's, up to the advantage's ``eps``).

    Returns:
        weights of the shape of ``labels`` in the logits' dtype (float32 at least), 0 where not
        ``valid``. Computed in log space: ``(1 - p) / p = expm1(-log p)``.
    """
    with torch.no_grad():
        z = logits.detach()
        cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
        y = torch.where(valid, labels, torch.zeros_like(labels)).long()
        z_y = z.gather(1, y.unsqueeze(1)).squeeze(1).to(cdt)
        log_p = z_y - torch.logsumexp(z.to(cdt), dim=1)
        odds_inv = torch.expm1(-log_p).clamp(min=0.0)
        u = odds_inv.sqrt().clamp(max=float(cap))
        u = torch.where(valid, u, torch.zeros_like(u))
        if norm == 'mean':
            n_valid = valid.sum()
            mean = u.sum() / n_valid.clamp(min=1)
            # a batch of certain queries (p_y = 1 everywhere) has weight 0 already: keep it 0
            u = torch.where(mean > 0, u / mean.clamp(min=torch.finfo(cdt).tiny), u)
        return u


def logit_adjusted_cross_entropy(logits: Tensor, labels: Tensor, log_prior: Tensor | None,
                                 tau: float, weight: Tensor | None = None,
                                 ignore_index: int | None = None) -> Tensor:
    """``mean_{valid q} u_q CE(z_q + tau log prior, y_q)``: the logit-adjusted softmax
    cross-entropy (Menon et al. 2021, eq. 10); ``tau = 0`` is plain cross-entropy.

    Args:
        logits: (N, C) or (N, C, *S). labels: (N,) or (N, *S) class indices.
        log_prior: (C,) log class frequencies (:func:`log_prior_from_counts`); needed if tau > 0.
        weight: per-query weights of the shape of ``labels`` (None: 1).
        ignore_index: label of queries that do not count (e.g. 255).

    The gradient with respect to ``z_q`` is ``u_q (softmax(z_q + tau log prior) - onehot(y_q))
    / n_valid``. A batch without a valid query gives a zero connected to ``logits``.
    """
    if tau > 0 and log_prior is None:
        raise ValueError('logit adjustment with tau > 0 needs the class prior')
    adjusted = adjust_logits(logits, log_prior, tau) if tau > 0 else logits
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None \
        else labels != ignore_index
    if adjusted.dtype not in (torch.float32, torch.float64):
        adjusted = adjusted.float()  # half-precision logits: the loss in float32
    per_query = F.cross_entropy(adjusted, torch.where(valid, labels, 0).long(),
                                reduction='none')
    if weight is not None:
        per_query = per_query * weight.to(per_query.dtype)
    per_query = torch.where(valid, per_query, torch.zeros_like(per_query))
    return per_query.sum() / valid.sum().clamp(min=1)
