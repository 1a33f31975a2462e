"""The GRPO-RM objective (method.md section 4). Plain torch.

For a query with C outputs (the group), log-probabilities ``logp`` (current policy),
``old_logp`` (pi_old, constant), ``ref_logp`` (pi_ref, constant), group weights ``w`` from a
registered weighting (:mod:`.weighting`: 'uniform' 1/C, 'pi_old', 'sampled'), advantages ``A``
under the same weights and a registered per-output surrogate ``s`` (:mod:`.surrogates`: 'clip',
'dual_clip')::

    ratio_i = exp(logp_i - old_logp_i)
    surr    = sum_i w_i s_i(ratio_i, A_i)       s = min(ratio A, clip(ratio, 1-eps_lo, 1+eps_hi) A)
    KL      = sum_i p_i (logp_i - ref_logp_i)                    (exact: the group is enumerated)
    loss    = mean_{valid q} u_q (-surr_q + beta KL_q)            (u_q = 1 unless given)

At ratio 1 (the first update on a batch) ``d loss / d logit_k = -w_k A_k / n_valid`` because
``sum_i w_i A_i = 0``: ``-A_k / (C n_valid)`` for 'uniform', ``-p_k A_k / n_valid`` for 'pi_old'.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .advantages import check_advantage_options, group_advantages
from .surrogates import SURROGATES, surrogate_terms
from .weighting import GROUP_WEIGHTINGS, group_weights

__all__ = ['LOG_RATIO_CLAMP', 'check_objective_options', 'clip_fraction', 'clipped_surrogate',
           'entropy', 'exact_kl', 'grpo_rm_loss', 'query_mean']

# |log ratio| is clamped here before exp (as verl does), so ratio * A stays finite for any
# finite logits. It only matters for ratios beyond e^20 ~ 5e8, far outside any clip range.
LOG_RATIO_CLAMP = 20.0

RewardSpec = Tensor | Callable[..., Tensor] | Sequence[Callable[..., Tensor]]


def _ratio(log_probs: Tensor, old_log_probs: Tensor) -> Tensor:
    log_ratio = (log_probs - old_log_probs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio)


def clipped_surrogate(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                      clip_eps: float) -> Tensor:
    """(N, C) x3 -> (N,): ``mean_i min(ratio_i A_i, clip(ratio_i, 1-eps, 1+eps) A_i)``.

    The uniform-weight PPO surrogate, to maximise (the loss is its negative).
    ``old_log_probs`` and ``advantages`` are detached.
    """
    ratio = _ratio(log_probs, old_log_probs)
    s, _ = surrogate_terms('clip', ratio, advantages.detach(), eps_low=clip_eps,
                           eps_high=clip_eps)
    return s.mean(dim=-1)


def query_mean(per_query: Tensor, query_weight: Tensor | None = None) -> Tensor:
    """Loss aggregation: ``mean_q u_q l_q`` over the (N,) valid queries (u = 1 if None)."""
    if query_weight is not None:
        per_query = per_query * query_weight
    return per_query.mean()


def clip_fraction(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                  clip_eps: float) -> Tensor:
    """(N, C) x3 -> scalar: fraction of (query, output) pairs where the clipped branch is the
    smaller one strictly, i.e. where the clip zeroes the gradient
    (``A > 0 and ratio > 1+eps``, or ``A < 0 and ratio < 1-eps``)."""
    with torch.no_grad():
        ratio = _ratio(log_probs, old_log_probs)
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
        return (clipped < ratio * advantages).to(ratio.dtype).mean()


def exact_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """(N, C) x2 -> (N,): ``KL(p || ref) = sum_i p_i (log p_i - log ref_i)`` (ref detached)."""
    p = log_probs.exp()
    diff = log_probs - ref_log_probs.detach()
    # p_i == 0 contributes 0 (no 0 * inf even if a log-probability is -inf)
    return torch.where(p > 0, p * diff, torch.zeros_like(diff)).sum(dim=-1)


def entropy(log_probs: Tensor) -> Tensor:
    """(N, C) -> (N,): ``-sum_i p_i log p_i``."""
    p = log_probs.exp()
    return -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(dim=-1)


# ----------------------------------------------------------------------------- validation
def _shape(x: object) -> object:
    return tuple(x.shape) if torch.is_tensor(x) else type(x).__name__


def _check_float(name: str, value: float, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'{name}={value!r} must be a finite number')
    if positive and value <= 0:
        raise ValueError(f'{name}={value} must be > 0 (GRPO-RM default 0.2)')
    if not positive and value < 0:
        raise ValueError(f'{name}={value} must be >= 0 (0 disables the KL term)')
    return float(value)


def check_objective_options(group_weighting: str, surrogate: str, clip_eps: float,
                            clip_eps_low: float | None, clip_eps_high: float | None,
                            dual_clip_c: float, group_size: int) -> tuple[float, float]:
    """Validate the objective's options; returns ``(eps_low, eps_high)``.

    ``clip_eps_low`` / ``clip_eps_high`` default to ``clip_eps``; ``eps_low < 1`` keeps the
    lower clip bound positive; the dual clip needs ``c > 1 + eps_high``; 'sampled' needs
    ``group_size >= 2`` draws.
    """
    if group_weighting not in GROUP_WEIGHTINGS:
        raise ValueError(f'group_weighting={group_weighting!r} is unknown; use one of '
                         f'{tuple(GROUP_WEIGHTINGS)}')
    if surrogate not in SURROGATES:
        raise ValueError(f'surrogate={surrogate!r} is unknown; use one of {tuple(SURROGATES)}')
    clip_eps = _check_float('clip_eps', clip_eps, positive=True)
    eps_low = clip_eps if clip_eps_low is None else _check_float('clip_eps_low', clip_eps_low,
                                                                  positive=True)
    eps_high = clip_eps if clip_eps_high is None else _check_float(
        'clip_eps_high', clip_eps_high, positive=True)
    if eps_low >= 1:
        raise ValueError(f'clip_eps_low={eps_low} must be < 1 (the ratio is clipped at '
                         f'1 - clip_eps_low > 0); e.g. 0.2')
    if isinstance(dual_clip_c, bool) or not isinstance(dual_clip_c, (int, float)) \
            or not math.isfinite(dual_clip_c):
        raise ValueError(f'dual_clip_c={dual_clip_c!r} must be a finite number > 1 + '
                         f'clip_eps_high (default 3)')
    if surrogate == 'dual_clip' and dual_clip_c <= 1 + eps_high:
        raise ValueError(f'dual_clip_c={dual_clip_c} must be > 1 + clip_eps_high = '
                         f'{1 + eps_high} (default 3)')
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f'group_size={group_size!r} must be an int >= 2 (draws per query of '
                         f"group_weighting='sampled'; e.g. 8)")
    return eps_low, eps_high


def _check_finite(name: str, x: Tensor) -> None:
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f'{name} has {n_bad} non-finite value(s) (NaN/Inf) out of {x.numel()}, '
                         f'first at index {first}; the model diverged or its input is broken '
                         f'(lower the learning rate, check the data, use bf16 instead of fp16)')


def _check_labels(labels: Tensor, n: int, logits_shape: tuple[int, ...]) -> None:
    if not torch.is_tensor(labels):
        raise ValueError(f'labels must be a tensor of shape ({n},), got {type(labels).__name__}')
    if labels.ndim == 2 and tuple(labels.shape) == logits_shape:
        raise ValueError(f'labels of shape {tuple(labels.shape)} look like soft or one-hot '
                         f'targets (e.g. from Mixup/CutMix); GRPO-RM needs hard class indices '
                         f'of shape ({n},): remove the batch augments')
    if tuple(labels.shape) != (n, ):
        raise ValueError(f'labels of shape {tuple(labels.shape)} do not match logits of shape '
                         f'{logits_shape}; expected ({n},)')
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f'labels must be integer class indices, got dtype {labels.dtype}')


def check_valid_argument(valid: object, n: int) -> None:
    """``valid`` must be None or a bool tensor of shape (n,)."""
    if valid is not None and (not torch.is_tensor(valid) or tuple(valid.shape) != (n, )
                              or valid.dtype != torch.bool):
        raise ValueError(f'valid must be a bool tensor of shape ({n},), got '
                         f'{_shape(valid)} {getattr(valid, "dtype", "")}')


def _valid_mask(labels: Tensor, valid: Tensor | None, ignore_index: int | None,
                c: int) -> Tensor:
    n = labels.shape[0]
    if valid is None:
        mask = torch.ones(n, dtype=torch.bool, device=labels.device)
    else:
        check_valid_argument(valid, n)
        mask = valid.to(labels.device)
    if ignore_index is not None:
        mask = mask & (labels != ignore_index)
    bad = mask & ((labels < 0) | (labels >= c))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        ign = '' if ignore_index is None else f' and not ignore_index={ignore_index}'
        raise ValueError(f'label {int(labels[idx])} at query {idx} is outside [0, C={c}){ign}; '
                         f'set num_classes to the dataset, or map the value to ignore_index')
    return mask


def _rewards(spec: RewardSpec, probs: Tensor, labels: Tensor, mask: Tensor,
             n: int) -> Tensor:
    c = probs.shape[1]
    if torch.is_tensor(spec):
        if tuple(spec.shape) != (n, c):
            raise ValueError(f'rewards of shape {tuple(spec.shape)} do not match logits of '
                             f'shape ({n}, {c})')
        r = spec.detach()[mask].to(probs.dtype)
    else:
        fns = [spec] if callable(spec) else list(spec)
        if not fns:
            raise ValueError('rewards is empty: give at least one reward function')
        r = torch.zeros_like(probs)
        for fn in fns:
            term = fn(probs, labels)
            if not torch.is_tensor(term) or tuple(term.shape) != tuple(probs.shape):
                raise ValueError(f'reward {fn!r} returned {_shape(term)}, expected '
                                 f'{tuple(probs.shape)} (N_valid, C)')
            r = r + term.detach().to(probs.dtype)
    _check_finite('rewards', r)
    return r


def check_call(logits: Tensor, labels: Tensor, old_logits: Tensor | None,
               ref_logits: Tensor | None, clip_eps: float, beta: float, *,
               weight: Tensor | None, adv_std: str, adv_eps: float, adv_scale: str,
               group_weighting: str, surrogate: str, clip_eps_low: float | None,
               clip_eps_high: float | None, dual_clip_c: float,
               group_size: int) -> tuple[float, float, float]:
    """The data-independent checks of a :func:`grpo_rm_loss` call (options, shapes, dtypes;
    no host synchronisation), in the order that call makes them; returns
    ``(beta, eps_low, eps_high)``. The fused objective makes the same checks, so both give
    the same errors."""
    beta = _check_float('beta', beta, positive=False)
    eps_low, eps_high = check_objective_options(group_weighting, surrogate, clip_eps,
                                                clip_eps_low, clip_eps_high, dual_clip_c,
                                                group_size)
    check_advantage_options(adv_std, adv_eps, adv_scale)
    if not torch.is_tensor(logits) or logits.ndim != 2:
        raise ValueError(f'logits must have shape (N, C), got {_shape(logits)}; flatten dense '
                         f'predictions (N, C, H, W) into pixels first (GRPORMLoss does)')
    n, c = logits.shape
    if n == 0:
        raise ValueError(f'empty batch: logits of shape {tuple(logits.shape)} have no query')
    if c < 2:
        raise ValueError(f'a group needs C >= 2 outputs (classes), got logits of shape '
                         f'{tuple(logits.shape)}')
    if not logits.is_floating_point():
        raise ValueError(f'logits must be floating point, got dtype {logits.dtype}')
    for name, other in (('old_logits', old_logits), ('ref_logits', ref_logits)):
        if other is not None and (not torch.is_tensor(other)
                                  or tuple(other.shape) != tuple(logits.shape)):
            raise ValueError(f'{name} of shape {_shape(other)} do not match logits of shape '
                             f'{tuple(logits.shape)}')
    if beta > 0 and ref_logits is None:
        raise ValueError(f'beta={beta} > 0 needs ref_logits (the frozen reference policy); '
                         f'pass them, or set beta=0')
    _check_labels(labels, n, tuple(logits.shape))
    if weight is not None and (not torch.is_tensor(weight) or tuple(weight.shape) != (n, )):
        raise ValueError(f'weight of shape {_shape(weight)} does not match the {n} queries; '
                         f'expected ({n},)')
    return beta, eps_low, eps_high


# ----------------------------------------------------------------------------- entry point
def grpo_rm_loss(logits: Tensor, labels: Tensor, rewards: RewardSpec,
                 old_logits: Tensor | None = None, ref_logits: Tensor | None = None,
                 valid: Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.0, *,
                 ignore_index: int | None = None, weight: Tensor | None = None,
                 adv_std: str = 'population', adv_eps: float = 1e-6, adv_scale: str = 'std',
                 group_weighting: str = 'uniform', surrogate: str = 'clip',
                 clip_eps_low: float | None = None, clip_eps_high: float | None = None,
                 dual_clip_c: float = 3.0, group_size: int = 8,
                 generator: torch.Generator | None = None,
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-RM loss of a batch of queries; returns ``(loss, diagnostics)``.

    Args:
        logits: (N, C) current-policy logits (any float dtype; computed in float32, or float64
            if the logits are float64).
        labels: (N,) int true classes, in [0, C) for valid queries.
        rewards: either a precomputed (N, C) tensor, or a reward function / sequence of reward
            functions ``fn(probs_old, labels) -> (n, C)`` that are summed; they are called on
            the valid queries only, with ``probs_old = softmax(old_logits)``.
        old_logits: (N, C) pi_old logits; None means the current logits detached (ratio 1).
        ref_logits: (N, C) frozen reference logits, required when ``beta > 0``.
        valid: (N,) bool; False queries contribute nothing and get no gradient.
        clip_eps: PPO clip range eps > 0. beta: KL weight >= 0.
        ignore_index: label value that also marks a query invalid (e.g. 255).
        weight: (N,) per-query weight ``u_q`` (mmseg ``seg_weight``); None = 1.
        adv_std, adv_eps, adv_scale: see :func:`group_advantages`.
        group_weighting: 'uniform', 'pi_old' or 'sampled' (:mod:`.weighting`).
        surrogate: 'clip' or 'dual_clip' (:mod:`.surrogates`).
        clip_eps_low, clip_eps_high: asymmetric clip range (default ``clip_eps`` each).
        dual_clip_c: the dual clip's ``c`` (> 1 + clip_eps_high).
        group_size: draws per query for 'sampled'. generator: their random generator (on the
            logits' device), for reproducible draws.

    A batch whose queries are all invalid (e.g. every pixel ``ignore_index``) is legitimate:
    the loss is a zero still connected to ``logits`` (zero gradient) and
    ``diagnostics['grpo_queries'] == 0``.

    Returns:
        loss: scalar ``mean_{valid q} u_q (-surr_q + beta KL_q)``.
        diagnostics (detached scalars, over valid queries):
            ``grpo_reward``: mean expected reward ``sum_i p_old_i r_i`` (the reward the old
            policy would collect; for the accuracy reward it is the mean ``p_old(y)``);
            ``grpo_adv_abs``: mean |A_i|; ``grpo_clip_frac``: fraction of (query, output)
            pairs where a clip holds (no gradient);
            ``grpo_kl``: mean KL(pi_theta || pi_ref) (0 without ``ref_logits``);
            ``grpo_kl_old``: mean KL(pi_theta || pi_old) (how far the inner steps moved);
            ``grpo_entropy``: mean entropy of pi_theta; ``grpo_acc``: top-1 accuracy of
            ``logits`` in %; ``grpo_queries``: number of valid queries (a CPU tensor).
    """
    beta, eps_low, eps_high = check_call(
        logits, labels, old_logits, ref_logits, clip_eps, beta, weight=weight, adv_std=adv_std,
        adv_eps=adv_eps, adv_scale=adv_scale, group_weighting=group_weighting,
        surrogate=surrogate, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        dual_clip_c=dual_clip_c, group_size=group_size)
    n, c = logits.shape
    mask = _valid_mask(labels, valid, ignore_index, c)
    _check_finite('logits', logits.detach())
    for name, other in (('old_logits', old_logits), ('ref_logits', ref_logits)):
        if other is not None:
            _check_finite(name, other.detach())

    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_valid = int(mask.sum())
    if n_valid == 0:
        return _empty_batch_loss(logits, cdt)
    y = labels[mask].long()
    logp = F.log_softmax(logits[mask].to(cdt), dim=-1)
    if old_logits is None:
        old_logp = logp.detach()
    else:
        old_logp = F.log_softmax(old_logits.detach()[mask].to(cdt), dim=-1)
    p_old = old_logp.exp()
    r = _rewards(rewards, p_old, y, mask, n)
    groups = group_weights(group_weighting, p_old, group_size=group_size, generator=generator)
    adv = group_advantages(r, std=adv_std, eps=adv_eps, scale=adv_scale,
                           weights=groups.weights, sample_size=groups.sample_size)

    ratio = _ratio(logp, old_logp)
    s, active = surrogate_terms(surrogate, ratio, adv, eps_low=eps_low, eps_high=eps_high,
                                dual_clip_c=dual_clip_c)
    per_query = -(groups.weights * s).sum(dim=-1)
    ref_logp = None
    if ref_logits is not None:
        ref_logp = F.log_softmax(ref_logits.detach()[mask].to(cdt), dim=-1)
    if beta > 0:
        per_query = per_query + beta * exact_kl(logp, ref_logp)
    w = None
    if weight is not None:
        w = weight.detach()[mask].to(cdt)
        _check_finite('weight', w)
    loss = query_mean(per_query, w)

    with torch.no_grad():
        lp = logp.detach()
        zero = lp.new_zeros(())
        diagnostics = {
            'grpo_reward': (p_old * r).sum(dim=-1).mean(),
            'grpo_adv_abs': adv.abs().mean(),
            'grpo_clip_frac': (~active).to(cdt).mean(),
            'grpo_kl': exact_kl(lp, ref_logp).mean() if ref_logp is not None else zero,
            'grpo_kl_old': exact_kl(lp, old_logp).mean(),
            'grpo_entropy': entropy(lp).mean(),
            'grpo_acc': (lp.argmax(dim=-1) == y).to(cdt).mean() * 100.0,
            'grpo_queries': torch.tensor(float(n_valid)),
        }
    return loss, diagnostics


DIAGNOSTIC_KEYS = ('grpo_reward', 'grpo_adv_abs', 'grpo_clip_frac', 'grpo_kl', 'grpo_kl_old',
                   'grpo_entropy', 'grpo_acc')


def _empty_batch_loss(logits: Tensor, cdt: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
    """Zero loss connected to ``logits`` (so backward and DDP's all-reduce run, with zero
    gradients) and zero diagnostics, for a batch without a valid query."""
    loss = logits.to(cdt).sum() * 0.0
    zero = loss.detach().new_zeros(())
    diagnostics = {key: zero for key in DIAGNOSTIC_KEYS}
    diagnostics['grpo_queries'] = torch.tensor(0.0)
    return loss, diagnostics
