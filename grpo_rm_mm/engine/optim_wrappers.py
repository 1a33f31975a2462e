"""Optimizer wrappers that take GRPO-RM inner steps (method.md section 5)::

    optim_wrapper = dict(type='GRPOOptimWrapper', inner_steps=4,
                         optimizer=dict(type='Adam', lr=1e-3))
    # AMP: dict(type='GRPOAmpOptimWrapper', inner_steps=4, dtype='bfloat16', optimizer=...)

What inner steps are, and what they rely on: :class:`InnerStepsOptimWrapperMixin`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from mmengine.model import BaseModel
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..models.heads.policy_head import GRPOPolicyHeadMixin

__all__ = ['GRPOAmpOptimWrapper', 'GRPOOptimWrapper', 'InnerStepsOptimWrapperMixin']

STATE_KEY = 'grpo_inner_steps'


def _check_inner_steps(inner_steps: int) -> int:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f'inner_steps={inner_steps!r} must be an int >= 1 (1 = one optimizer '
                         f'step per batch, as plain OptimWrapper)')
    return inner_steps


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (MM)DistributedDataParallel wrapper, else the model."""
    inner = getattr(model, 'module', None)
    return inner if isinstance(inner, nn.Module) else model


def _policy_heads(model: nn.Module) -> list[GRPOPolicyHeadMixin]:
    return [m for m in model.modules() if isinstance(m, GRPOPolicyHeadMixin)]


def _loss_parser(model: nn.Module) -> Callable[[dict], tuple[Tensor, dict]]:
    """The model's own ``parse_losses``; for a model that is not an mmengine ``BaseModel``
    (e.g. a bare head) the rule of ``BaseModel.parse_losses``, which reads no model state."""
    parse = getattr(model, 'parse_losses', None)
    return parse if callable(parse) else partial(BaseModel.parse_losses, model)


class InnerStepsOptimWrapperMixin:
    """GRPO-RM inner steps on top of an mmengine optimizer wrapper (mixed in before
    ``OptimWrapper`` or ``AmpOptimWrapper``).

    *Inner steps* (``inner_steps``, k) are the optimisation steps taken on one batch against
    the fixed pre-update policy pi_old: the first is the ordinary step on the loss of the
    model's forward (ratio pi_theta / pi_old = 1), the k - 1 further ones evaluate the head's
    loss on the same batch with the updated parameters, so the ratio moves and the PPO clip
    acts. TRL calls k ``num_iterations``, verl ``ppo_epochs``. They are unrelated to mmengine's
    ``_inner_count`` (``inner_count``), the number of :meth:`update_params` calls, which
    drives gradient accumulation.

    One iteration, as ``BaseModel.train_step`` runs it:

    1. ``with optim_wrapper.optim_context(model)``: the model's forward. The wrapper remembers
       the model (the ``module`` of a DDP wrapper) and sets ``grpo_cache_enabled =
       inner_steps > 1`` on every
       :class:`~grpo_rm_mm.models.heads.policy_head.GRPOPolicyHeadMixin` in it; their
       ``loss()`` then caches the batch as a
       :class:`~grpo_rm_mm.models.heads.policy_head.GRPOCachedBatch`.
    2. ``optim_wrapper.update_params(loss)``: the parent's update (``scale_loss``, then
       ``backward``, which does ``_inner_count += 1``, then ``step`` and ``zero_grad`` if
       ``should_update()``). While gradients accumulate (``should_update()`` is False) the
       caches are kept, one batch per micro-batch of the window.
    3. After each real optimizer step, ``inner_steps - 1`` inner steps, each: every head's
       ``grpo_inner_losses()`` (the mean over its cached micro-batches: the scale of an
       accumulated step) under the parent's ``optim_context`` (AMP: the same autocast),
       reduced to one loss by the model's own ``parse_losses`` per head and summed over the
       heads; ``backward`` (AMP: loss scaling), with ``_inner_count`` restored afterwards;
       the gradients all-reduce-averaged over the ranks (DDP's reducer only acts after a DDP
       forward); ``step`` (with ``clip_grad``) and ``zero_grad``. Only the last inner step
       asks the losses for their diagnostics (``grpo_inner_diagnostics``); they are not
       logged, and stay in each loss's ``last_diagnostics``. Then the caches are cleared.

    Inner steps reuse the cached batch: its detached head input (no backbone or neck forward;
    a partly trainable backbone moves on the first step only), its labels (not validated
    again), the first step's pi_old and pi_ref logits, and the seeds of its sampled groups.
    They take the iteration's learning rate (parameter schedulers step per iteration or
    epoch) and leave ``_inner_count`` as the ordinary updates set it, so accumulation windows,
    ``should_update`` and ``should_sync`` are those of the parent.

    The contract with mmengine relied on: ``update_params`` calls ``backward`` once, and
    ``backward`` adds one to ``_inner_count``; ``should_update()`` after it says whether the
    parent stepped; the parent's ``optim_context`` can be entered again on the unwrapped
    model (for AMP's autocast).

    Attributes:
        inner_steps: k >= 1 (1: the parent's behaviour).
        outer_steps: ordinary optimizer steps taken.
        inner_steps_taken: further steps taken.

    The three are saved by :meth:`state_dict` under ``'grpo_inner_steps'`` and restored on
    resume.
    """

    inner_steps: int
    outer_steps: int
    inner_steps_taken: int

    def _grpo_setup(self, inner_steps: int) -> None:
        self.inner_steps = _check_inner_steps(inner_steps)
        self.outer_steps = 0
        self.inner_steps_taken = 0
        self._grpo_model: nn.Module | None = None

    # ------------------------------------------------------------------ context
    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Remember the model and switch the policy heads' caches on iff ``inner_steps > 1``;
        then the parent's context (DDP ``no_sync`` while accumulating, AMP autocast)."""
        self._grpo_model = _unwrap(model)
        for module in _policy_heads(self._grpo_model):
            module.grpo_cache_enabled = self.inner_steps > 1
        with super().optim_context(model):  # type: ignore[misc]
            yield

    # ------------------------------------------------------------------ update
    def update_params(self, loss: Tensor, step_kwargs: dict | None = None,
                      zero_kwargs: dict | None = None) -> None:
        """The ordinary update (gradient accumulation included); after each real optimizer
        step, ``inner_steps - 1`` inner steps on the cached micro-batches."""
        super().update_params(loss, step_kwargs=step_kwargs,  # type: ignore[misc]
                              zero_kwargs=zero_kwargs)
        if not self.should_update():  # type: ignore[attr-defined]
            return  # accumulating: keep the caches for the step at the end of the window
        self.outer_steps += 1
        if self.inner_steps > 1:
            self._take_inner_steps(step_kwargs or {}, zero_kwargs or {})

    def _take_inner_steps(self, step_kwargs: dict, zero_kwargs: dict) -> None:
        model = self._grpo_model
        if model is None:
            raise RuntimeError(f'{type(self).__name__}(inner_steps={self.inner_steps}) needs the '
                               f'model: run the forward inside optim_wrapper.optim_context(model)'
                               f' (BaseModel.train_step does)')
        modules = _policy_heads(model)
        heads = [m for m in modules if m.grpo_has_cache()]
        if not heads:
            raise RuntimeError(
                f'{type(self).__name__}(inner_steps={self.inner_steps}): no GRPO-RM head cached '
                f'a batch, so there is nothing to take inner steps on. Inner steps need a head '
                f'with GRPOPolicyHeadMixin (GRPORMClsHead / GRPORMSegHead); a plain head with '
                f'GRPORMLoss as loss_decode supports inner_steps=1 only')
        parse_losses = _loss_parser(model)
        enabled = [m.grpo_cache_enabled for m in modules]
        try:
            for m in modules:  # inner losses must not cache themselves again
                m.grpo_cache_enabled = False
            for step in range(self.inner_steps - 1):
                for m in modules:  # diagnostics of the last inner step only
                    m.grpo_inner_diagnostics = step == self.inner_steps - 2
                with super().optim_context(model):  # type: ignore[misc]  (autocast for AMP)
                    keys: list[str] = []
                    total = None
                    for head in heads:
                        head_losses = head.grpo_inner_losses()
                        keys += head_losses
                        term, _ = parse_losses(head_losses)
                        if isinstance(term, Tensor):  # 0 when no key contains 'loss'
                            total = term if total is None else total + term
                if total is None or not total.requires_grad:
                    raise RuntimeError(f'the GRPO-RM heads returned no differentiable loss for '
                                       f'the inner step (keys: {sorted(keys)})')
                count = self._inner_count  # type: ignore[has-type]
                self.backward(total)  # type: ignore[attr-defined]  (AMP loss scaling)
                self._inner_count = count  # inner steps do not advance gradient accumulation
                self._all_reduce_grads()
                self.step(**step_kwargs)  # type: ignore[attr-defined]
                self.zero_grad(**zero_kwargs)  # type: ignore[attr-defined]
                self.inner_steps_taken += 1
            self.message_hub.update_scalar(  # type: ignore[attr-defined]
                'train/grpo_inner_last', float(total.detach()))
        finally:
            for m, flag in zip(modules, enabled):
                m.grpo_cache_enabled = flag
                m.grpo_inner_diagnostics = True
                m.grpo_cache_clear()

    def _all_reduce_grads(self) -> None:
        """Average the gradients of the optimizer's trainable parameters over all ranks."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        params: list[Tensor] = []
        seen: set[int] = set()
        for group in self.optimizer.param_groups:  # type: ignore[attr-defined]
            for p in group['params']:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            return
        # Ranks must reduce the same tensors: agree on which parameters have a gradient.
        has_grad = torch.tensor([float(p.grad is not None) for p in params],
                                device=params[0].device)
        dist.all_reduce(has_grad)
        reduced = [p for p, flag in zip(params, has_grad.tolist()) if flag > 0]
        for p in reduced:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        world = dist.get_world_size()
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in reduced:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in buckets.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(world)
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The parent state dict plus ``{'grpo_inner_steps': {outer_steps, inner_steps_taken,
        inner_steps}}``."""
        state = super().state_dict()  # type: ignore[misc]
        state[STATE_KEY] = dict(outer_steps=self.outer_steps,
                                inner_steps_taken=self.inner_steps_taken,
                                inner_steps=self.inner_steps)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the counters (absent in a plain OptimWrapper checkpoint: kept) and the rest."""
        state_dict = dict(state_dict)
        grpo = state_dict.pop(STATE_KEY, None)
        if grpo is not None:
            self.outer_steps = int(grpo.get('outer_steps', 0))
            self.inner_steps_taken = int(grpo.get('inner_steps_taken', 0))
        super().load_state_dict(state_dict)  # type: ignore[misc]


@OPTIM_WRAPPERS.register_module()
class GRPOOptimWrapper(InnerStepsOptimWrapperMixin, OptimWrapper):
    """``OptimWrapper`` + GRPO-RM inner steps. Args: ``inner_steps`` (int >= 1, default 1)
    and everything ``OptimWrapper`` takes (``optimizer``, ``accumulative_counts``,
    ``clip_grad``)."""

    def __init__(self, *args, inner_steps: int = 1, **kwargs) -> None:
        _check_inner_steps(inner_steps)
        super().__init__(*args, **kwargs)
        self._grpo_setup(inner_steps)


@OPTIM_WRAPPERS.register_module()
class GRPOAmpOptimWrapper(InnerStepsOptimWrapperMixin, AmpOptimWrapper):
    """``AmpOptimWrapper`` + GRPO-RM inner steps. Args: ``inner_steps`` (int >= 1, default 1)
    and everything ``AmpOptimWrapper`` takes (``loss_scale``, ``dtype``, ...)."""

    def __init__(self, *args, inner_steps: int = 1, **kwargs) -> None:
        _check_inner_steps(inner_steps)
        super().__init__(*args, **kwargs)
        self._grpo_setup(inner_steps)
