"""Registered GRPO-RM loss: the OpenMMLab face of :func:`grpo_rm_mm.core.grpo_rm_loss`.

Usable as

- an mmpretrain head loss: ``loss=dict(type='GRPORMLoss')``, called as
  ``loss(cls_score (N, C), target (N,), avg_factor=N)``;
- an mmseg ``loss_decode`` entry of any decode head (e.g. ``FCNHead``), called as
  ``loss(seg_logits (N, C, H, W), seg_label (N, H, W), weight=seg_weight, ignore_index=255)``:
  every labelled pixel is a query with its own group of C classes.

The GRPO-RM heads also pass ``old_logits``/``ref_logits`` (pi_old / pi_ref, same shape as the
prediction); a foreign head passes neither, so there pi_old is the current prediction detached
(ratio 1: exactly the first GRPO update of each batch) and beta must be 0.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..core.advantages import check_advantage_options
from ..core.dispatch import backend_names
from ..core.fused import grpo_rm_loss_fused
from ..core.objective import check_objective_options
from ..core.prior import (
    adjust_logits,
    check_class_weighting,
    check_query_weighting,
    check_tau,
    class_balanced_weights,
    inverse_odds_weights,
    log_prior_from_counts,
)
from .rewards import build_reward

__all__ = ['GRPORMLoss']

DEFAULT_REWARDS = (dict(type='AccuracyReward', weight=1.0),
                   dict(type='UniformityReward', weight=1.0))

_KNOWN_IGNORED_KWARGS = ('reduction_override', )


@MODELS.register_module()
class GRPORMLoss(nn.Module):
    """GRPO-RM loss ``mean_{valid q} w_q (-surr_q + beta KL_q)`` (method.md sections 2-4).

    Args:
        rewards: reward configs (or callables ``fn(probs, labels) -> (N, C)``), summed.
        clip_eps: PPO clip range (0.2). beta: weight of the exact KL to pi_ref (0).
        adv_std: 'population' or 'unbiased' std of the group. adv_eps: added to the std.
        adv_scale: 'std' (GRPO) or 'none' (Dr.GRPO: mean-centred only).
        group_weighting: how the group's outputs are averaged: 'pi_old' (default: the exact
            expectation over pi_old that sampled GRPO estimates; advantage statistics under the
            same weights), 'uniform' (1/C, the paper's literal form, which plateaus below
            cross-entropy) or 'sampled' (``group_size`` draws per query from pi_old, as
            TRL/verl GRPO). The default is the choice of benchmarks/ablation.py (README).
        surrogate: 'clip' (PPO) or 'dual_clip' (also floors negative-advantage terms at
            ``dual_clip_c * A``).
        clip_eps_low, clip_eps_high: asymmetric clip range ``[1 - low, 1 + high]`` (each
            defaults to ``clip_eps``; ``high > low`` is clip-higher).
        dual_clip_c: the dual clip's c (3).
        group_size: draws per query for 'sampled' (8).
        seed: seed of the 'sampled' draws. Each outer call draws with a generator seeded from
            (seed, call counter, rank); the counter is a buffer, so ``--resume`` continues the
            same sequence, and inner steps on a cached batch pass back ``group_seed`` (see
            ``last_group_seed``) to reuse that batch's draws.
        loss_weight: multiplies the loss.
        ignore_index: label of unlabelled pixels (255), used for dense (N, C, H, W)
            predictions; for (N, C) predictions only an ``ignore_index`` passed to ``forward``
            applies (so class 255 of a 1000-class dataset stays a class).
        loss_name: key of the loss in the head's loss dict; must start with ``loss_``.
        log_diagnostics: push ``train/grpo_*`` scalars to mmengine's MessageHub after each
            call (for foreign heads; GRPO-RM heads set False and merge ``last_diagnostics``).
        backend: which implementation computes the objective
            (:mod:`grpo_rm_mm.core.dispatch`): 'auto' (default: Triton on CUDA, the compiled
            kernel on the CPU, chunks of torch operations elsewhere; each computes the
            gradient in closed form at about the memory of cross-entropy, with one host sync
            per call), one of those by name ('triton', 'cpu_native', 'torch_chunked'; an error
            says why when it cannot run a call) or 'reference'
            (:func:`grpo_rm_mm.core.grpo_rm_loss`, the straightforward autograd
            implementation). Same values, gradients, diagnostics and errors.
        chunk_size: queries per chunk of the torch_chunked backend (None: sized for the
            device).
        query_weighting: per-query weights from pi_old, stop-gradient, multiplied into mmseg's
            per-pixel ``weight`` (:mod:`grpo_rm_mm.core.prior`): 'none' (default) or
            'inverse_odds', ``u_q = sqrt((1 - p_old_y) / p_old_y)``, which cancels the
            ``sqrt(p_y / (1 - p_y))`` factor between the ``pi_old`` objective's gradient and
            cross-entropy's (docs/method.md section 4.1).
        query_weight_norm: 'mean' (the weights divided by their mean over the batch's valid
            queries) or 'none' (raw: with the accuracy reward alone the first update is then
            exactly cross-entropy's).
        query_weight_cap: largest raw inverse-odds weight (100).
        logit_adjust_tau: logit adjustment (Menon et al. 2021): in training the objective
            (policy, ratio, rewards, weights, KL) sees ``z + tau log prior`` for the logits,
            ``old_logits`` and ``ref_logits``; predictions use the plain logits. 0 (default)
            is off. The prior is the training set's class frequencies, set by
            ``ClassPriorHook`` (or :meth:`set_class_counts`) before training.
        class_weighting: 'none' (default) or 'balanced': each query also weighted by
            ``1 / (C prior_y)`` (the same prior), as ``LogitAdjustedCrossEntropyLoss`` does.

    ``avg_factor`` is accepted and ignored: the loss is already a mean over valid queries.
    After each call, ``last_diagnostics`` holds detached scalars (see ``grpo_rm_loss``) and
    ``grpo_ignored_batches``, the number of calls so far whose queries were all ignored (they
    give a zero loss with zero gradients, and a warning the first time).
    """

    def __init__(self, rewards: Sequence[dict | Callable] | dict | None = DEFAULT_REWARDS,
                 clip_eps: float = 0.2, beta: float = 0.0, adv_std: str = 'population',
                 adv_eps: float = 1e-6, adv_scale: str = 'std', loss_weight: float = 1.0,
                 ignore_index: int | None = 255, loss_name: str = 'loss_grpo',
                 log_diagnostics: bool = True, group_weighting: str = 'pi_old',
                 surrogate: str = 'clip', clip_eps_low: float | None = None,
                 clip_eps_high: float | None = None, dual_clip_c: float = 3.0,
                 group_size: int = 8, seed: int = 0, backend: str = 'auto',
                 chunk_size: int | None = None, query_weighting: str = 'none',
                 query_weight_norm: str = 'mean', query_weight_cap: float = 100.0,
                 logit_adjust_tau: float = 0.0, class_weighting: str = 'none') -> None:
        super().__init__()
        try:
            check_query_weighting(query_weighting, query_weight_norm, query_weight_cap)
            check_class_weighting(class_weighting)
            self.logit_adjust_tau = check_tau(logit_adjust_tau)
        except ValueError as err:
            raise ValueError(f'GRPORMLoss: {err}') from None
        self.query_weighting = query_weighting
        self.query_weight_norm = query_weight_norm
        self.query_weight_cap = float(query_weight_cap)
        self.class_weighting = class_weighting
        # (C,) log class frequencies of the training set; set by ClassPriorHook, not saved
        self.register_buffer('class_log_prior', None, persistent=False)
        for name, value, low in (('clip_eps', clip_eps, 'gt'), ('beta', beta, 'ge'),
                                 ('loss_weight', loss_weight, 'ge')):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or (value <= 0 if low == 'gt' else value < 0):
                bound = '> 0' if low == 'gt' else '>= 0'
                raise ValueError(f'GRPORMLoss: {name}={value!r} must be a finite number {bound}')
        check_advantage_options(adv_std, adv_eps, adv_scale)
        try:
            check_objective_options(group_weighting, surrogate, clip_eps, clip_eps_low,
                                    clip_eps_high, dual_clip_c, group_size)
        except ValueError as err:
            raise ValueError(f'GRPORMLoss: {err}') from None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f'GRPORMLoss: seed={seed!r} must be an int')
        if backend not in backend_names():
            raise ValueError(f'GRPORMLoss: backend={backend!r} is unknown; use one of '
                             f'{backend_names()}')
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f'GRPORMLoss: chunk_size={chunk_size!r} must be a positive int or '
                             f'None')
        if not isinstance(loss_name, str) or not loss_name.startswith('loss_'):
            raise ValueError(f'GRPORMLoss: loss_name={loss_name!r} must start with "loss_" '
                             f'(mmengine only sums and backpropagates keys containing "loss")')
        if ignore_index is not None and (isinstance(ignore_index, bool)
                                         or not isinstance(ignore_index, int)):
            raise ValueError(f'GRPORMLoss: ignore_index={ignore_index!r} must be an int or None')
        if rewards is None or isinstance(rewards, dict) or callable(rewards):
            rewards = [rewards] if rewards is not None else []
        self.reward_fns = [build_reward(r) for r in rewards]
        if not self.reward_fns:
            raise ValueError('GRPORMLoss: rewards is empty; give at least one, e.g. '
                             "[dict(type='AccuracyReward'), dict(type='UniformityReward')]")
        weights = [getattr(r, 'weight', None) for r in self.reward_fns]
        if all(w is not None and w == 0 for w in weights):
            raise ValueError('GRPORMLoss: every reward weight is 0, so the loss would be '
                             'identically 0; give at least one reward a positive weight')
        self.clip_eps = float(clip_eps)
        self.beta = float(beta)
        self.adv_std = adv_std
        self.adv_eps = float(adv_eps)
        self.adv_scale = adv_scale
        self.loss_weight = float(loss_weight)
        self.ignore_index = ignore_index
        self._loss_name = loss_name
        self.log_diagnostics = bool(log_diagnostics)
        self.group_weighting = group_weighting
        self.surrogate = surrogate
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip_c = float(dual_clip_c)
        self.group_size = group_size
        self.seed = seed
        self.backend = backend
        self.chunk_size = chunk_size
        # outer calls that drew a group ('sampled' only); a buffer so that it is checkpointed
        self.register_buffer('group_draws', torch.zeros((), dtype=torch.long)
                             if group_weighting == 'sampled' else None)
        self._group_draws_host: int | None = 0
        self._register_load_state_dict_pre_hook(self._forget_host_draws)
        self.last_group_seed: int | None = None
        self.ignored_batches = 0
        self.last_diagnostics: dict[str, Tensor] = {}
        self._warned_kwargs: set[str] = set()

    @property
    def uses_class_prior(self) -> bool:
        """Whether the loss needs :meth:`set_class_counts` (``logit_adjust_tau > 0`` or
        class-balanced weights)."""
        return self.logit_adjust_tau > 0 or self.class_weighting != 'none'

    def set_class_counts(self, counts) -> None:
        """Set the class prior of the logit adjustment and the class-balanced weights from the
        (C,) training-set class counts (``ClassPriorHook`` calls this before training)."""
        try:
            prior = log_prior_from_counts(counts)
        except ValueError as err:
            raise ValueError(f'GRPORMLoss: {err}') from None
        self.class_log_prior = prior

    def _check_prior(self) -> None:
        if self.class_log_prior is None:
            option = f'logit_adjust_tau={self.logit_adjust_tau}' if self.logit_adjust_tau > 0 \
                else f'class_weighting={self.class_weighting!r}'
            raise ValueError(f"GRPORMLoss: {option} needs the training set's class prior: add "
                             f"custom_hooks=[dict(type='ClassPriorHook')] to the config, or "
                             f'call set_class_counts(counts) on the loss before training')

    def _adjusted(self, logits: Tensor, old: Tensor | None,
                  ref: Tensor | None) -> list[Tensor | None]:
        """The logits, pi_old and pi_ref logits shifted by ``tau log prior`` (class dim 1)."""
        self._check_prior()
        return [None if x is None else
                adjust_logits(x, self.class_log_prior, self.logit_adjust_tau, class_dim=1)
                for x in (logits, old, ref)]

    def _query_weights(self, logits: Tensor, old: Tensor | None, labels: Tensor,
                       weight: Tensor | None, ignore_index: int | None) -> Tensor:
        """mmseg's per-query ``weight`` times the inverse-odds weights of pi_old and / or the
        class-balanced weights."""
        c = logits.shape[1]
        valid = (labels >= 0) & (labels < c)
        if ignore_index is not None:
            valid &= labels != ignore_index
        u = None
        if self.query_weighting != 'none':
            u = inverse_odds_weights(logits.detach() if old is None else old, labels, valid,
                                     cap=self.query_weight_cap, norm=self.query_weight_norm)
        if self.class_weighting != 'none':
            self._check_prior()
            if self.class_log_prior.numel() != c:
                raise ValueError(f'GRPORMLoss: the class prior has '
                                 f'{self.class_log_prior.numel()} classes but the logits '
                                 f'{tuple(logits.shape)} have {c}')
            cb = class_balanced_weights(labels, self.class_log_prior, valid).to(
                torch.float64 if logits.dtype == torch.float64 else torch.float32)
            u = cb if u is None else u * cb
        return u if weight is None else weight * u.to(weight.dtype)

    @property
    def loss_name(self) -> str:
        """Name of the loss in the loss dict (mmseg reads it)."""
        return self._loss_name

    def extra_repr(self) -> str:
        return (f'rewards={self.reward_fns}, group_weighting={self.group_weighting!r}, '
                f'surrogate={self.surrogate!r}, clip_eps={self.clip_eps}, beta={self.beta}, '
                f'adv_std={self.adv_std!r}, adv_eps={self.adv_eps}, '
                f'adv_scale={self.adv_scale!r}, loss_weight={self.loss_weight}, '
                f'ignore_index={self.ignore_index}, backend={self.backend!r}, '
                f'query_weighting={self.query_weighting!r}, '
                f'logit_adjust_tau={self.logit_adjust_tau}, '
                f'class_weighting={self.class_weighting!r}')

    # ------------------------------------------------------------------ sampled groups
    def _forget_host_draws(self, *args) -> None:
        self._group_draws_host = None  # re-read from the loaded buffer on the next draw

    def _next_group_seed(self) -> int:
        """A fresh seed from (seed, draw counter, rank); advances the counter."""
        if self._group_draws_host is None:
            self._group_draws_host = int(self.group_draws)
        count = self._group_draws_host
        self._group_draws_host = count + 1
        self.group_draws.fill_(count + 1)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(
            hash((self.seed, count, rank)) % 2**63)))

    def _generator(self, device: torch.device, group_seed: int | None) -> torch.Generator | None:
        """The generator of this call's draws ('sampled' only): from ``group_seed`` when an
        inner step passes it back, else from a fresh seed (kept in ``last_group_seed``)."""
        if self.group_weighting != 'sampled':
            return None
        if group_seed is None:
            group_seed = self._next_group_seed()
        self.last_group_seed = group_seed
        return torch.Generator(device=device).manual_seed(group_seed)

    def _as_queries(self, pred: Tensor, target: Tensor, weight: Tensor | None,
                    old_logits: Tensor | None, ref_logits: Tensor | None):
        """Check the shapes; (N, C, H, W) predictions stay dense, with (N, H, W) labels and
        weights (the objective reads them in place as queries)."""
        if not torch.is_tensor(pred) or pred.ndim < 2:
            raise ValueError(f'GRPORMLoss: pred must be (N, C) or (N, C, H, W) logits, got '
                             f'{getattr(pred, "shape", type(pred).__name__)}')
        if not torch.is_tensor(target):
            raise ValueError(f'GRPORMLoss: target must be a tensor, got {type(target).__name__}')
        for name, other in (('old_logits', old_logits), ('ref_logits', ref_logits)):
            if other is not None and tuple(other.shape) != tuple(pred.shape):
                raise ValueError(f'GRPORMLoss: {name} of shape {tuple(other.shape)} do not match '
                                 f'pred of shape {tuple(pred.shape)}')
        if pred.ndim == 2:
            if target.ndim == 2:
                raise ValueError(
                    f'GRPORMLoss needs hard labels of shape ({pred.shape[0]},), got a target of '
                    f'shape {tuple(target.shape)} (soft/one-hot scores, e.g. from Mixup/CutMix '
                    f'batch augments): remove train_cfg.augments / use hard labels')
            if weight is not None and weight.ndim == 2 and weight.shape[1] == pred.shape[1]:
                raise ValueError(f'GRPORMLoss: weight must be per query ({pred.shape[0]},), '
                                 f'got per-class weights {tuple(weight.shape)}')
            return pred, target, weight, old_logits, ref_logits
        spatial = tuple(pred.shape[2:])
        expected = (pred.shape[0], ) + spatial
        if target.ndim == pred.ndim and target.shape[1] == 1:
            target = target.squeeze(1)  # (N, 1, H, W) label maps
        if tuple(target.shape) != expected:
            raise ValueError(f'GRPORMLoss: seg_label of shape {tuple(target.shape)} does not '
                             f'match seg_logits of shape {tuple(pred.shape)}; expected '
                             f'{expected} (resize the logits to the label size first)')
        if weight is not None:
            if weight.ndim == pred.ndim and weight.shape[1] == 1:
                weight = weight.squeeze(1)
            if tuple(weight.shape) != expected:
                raise ValueError(f'GRPORMLoss: weight of shape {tuple(weight.shape)} does not '
                                 f'match seg_label of shape {expected}')
        return pred, target, weight, old_logits, ref_logits

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | None = None, ignore_index: int | None = None,
                old_logits: Tensor | None = None, ref_logits: Tensor | None = None,
                group_seed: int | None = None, validated: bool = False,
                diagnostics: bool = True, **kwargs) -> Tensor:
        """Scalar loss; see the class docstring for the shapes. ``group_seed``: reuse the
        draws of an earlier call ('sampled'; GRPO-RM heads pass it in inner steps).
        ``validated``: the labels were validated by an earlier call on the same batch (inner
        steps on a cached batch): the closed-form backends skip their check.
        ``diagnostics``: False lets the closed-form backends skip them (``last_diagnostics``
        then holds ``grpo_queries`` and ``grpo_ignored_batches`` only); GRPO-RM heads pass
        False in inner steps, whose diagnostics are not logged."""
        for key, value in kwargs.items():
            if key == 'reduction_override' and value not in (None, 'mean'):
                raise ValueError(f'GRPORMLoss: reduction_override={value!r} is not supported; '
                                 f'the loss is a mean over valid queries')
            if key not in _KNOWN_IGNORED_KWARGS and key not in self._warned_kwargs:
                self._warned_kwargs.add(key)
                warnings.warn(f'GRPORMLoss ignores the keyword argument {key!r}', stacklevel=2)
        dense = torch.is_tensor(pred) and pred.ndim > 2
        if ignore_index is None and dense:
            ignore_index = self.ignore_index
        logits, labels, w, old, ref = self._as_queries(pred, target, weight, old_logits,
                                                       ref_logits)
        if self.logit_adjust_tau > 0:
            logits, old, ref = self._adjusted(logits, old, ref)
        if self.query_weighting != 'none' or self.class_weighting != 'none':
            w = self._query_weights(logits, old, labels, w, ignore_index)
        options = dict(
            old_logits=old, ref_logits=ref, clip_eps=self.clip_eps, beta=self.beta,
            ignore_index=ignore_index, weight=w, adv_std=self.adv_std, adv_eps=self.adv_eps,
            adv_scale=self.adv_scale, group_weighting=self.group_weighting,
            surrogate=self.surrogate, clip_eps_low=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high, dual_clip_c=self.dual_clip_c,
            group_size=self.group_size, generator=self._generator(logits.device, group_seed))
        # the reward objects themselves: the registered ones carry their fused terms and
        # unchecked kernels
        loss, diagnostics = grpo_rm_loss_fused(logits, labels, self.reward_fns,
                                               validated=validated, chunk_size=self.chunk_size,
                                               diagnostics=diagnostics, backend=self.backend,
                                               **options)
        if float(diagnostics['grpo_queries']) == 0:
            self._note_ignored_batch(tuple(pred.shape), ignore_index)
        diagnostics['grpo_ignored_batches'] = torch.tensor(float(self.ignored_batches))
        self.last_diagnostics = {k: v.detach() if v.requires_grad else v
                                 for k, v in diagnostics.items()}
        if self.log_diagnostics:
            self._push_to_message_hub()
        if self.loss_weight == 1.0 and not loss._is_view():
            return loss  # no product node: the same value and gradient
        return self.loss_weight * loss

    def _note_ignored_batch(self, shape: tuple[int, ...], ignore_index: int | None) -> None:
        self.ignored_batches += 1
        if self.ignored_batches == 1:
            warnings.warn(f'GRPORMLoss: every query of a batch of shape {shape} is ignored '
                          f'(ignore_index={ignore_index}); it contributes a zero loss and zero '
                          f'gradients, and the run goes on. The logged grpo_ignored_batches '
                          f'counts such batches; this warning is given once.', stacklevel=3)

    def _push_to_message_hub(self) -> None:
        """``train/grpo_*`` scalars in the current MessageHub, if one exists (no new one)."""
        from mmengine.logging import MessageHub

        if not getattr(MessageHub, '_instance_dict', None):
            return
        hub = MessageHub.get_current_instance()
        for key, value in self.last_diagnostics.items():
            hub.update_scalar(f'train/{key}', float(value))
