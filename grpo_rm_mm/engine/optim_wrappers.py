"""Optimizer wrappers that take GRPO-RM inner steps (method.md section 5).

Per batch (after gradient accumulation, per optimizer step), the model's forward computes
features once and pi_old once; the wrapper takes the ordinary step on that loss, then
``inner_steps - 1`` more steps on the loss that the GRPO-RM heads recompute from their cached,
detached features (no second backbone forward), with the same pi_old, so the PPO clip acts::

    optim_wrapper = dict(type='GRPOOptimWrapper', inner_steps=4,
                         optimizer=dict(type='Adam', lr=1e-3))
    # AMP: dict(type='GRPOAmpOptimWrapper', inner_steps=4, dtype='bfloat16', optimizer=...)

Works with ``accumulative_counts`` (the inner steps run over every cached micro-batch of the
accumulation window, their losses averaged), AMP (backward through the loss scaler, inner
forwards under the same autocast) and DDP (the inner gradients are all-reduce-averaged here:
DDP's reducer only runs after a DDP forward).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..models.grpo_inner import GRPOInnerStepMixin

__all__ = ['GRPOAmpOptimWrapper', 'GRPOInnerStepsWrapperMixin', 'GRPOOptimWrapper']

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


def _grpo_modules(model: nn.Module) -> list[GRPOInnerStepMixin]:
    return [m for m in model.modules() if isinstance(m, GRPOInnerStepMixin)]


def _sum_losses(losses: dict[str, Tensor]) -> Tensor | None:
    """Sum of the entries whose key contains ``loss`` (mmengine's ``parse_losses`` rule)."""
    total = None
    for key, value in losses.items():
        if 'loss' not in key:
            continue
        if isinstance(value, Tensor):
            term = value.mean()
        else:  # a list of tensors, as parse_losses accepts
            term = sum(v.mean() for v in value)
        total = term if total is None else total + term
    return total


class GRPOInnerStepsWrapperMixin:
    """Inner-step logic shared by :class:`GRPOOptimWrapper` and :class:`GRPOAmpOptimWrapper`.

    Counters (saved in ``state_dict()`` under ``'grpo_inner_steps'``, restored on resume):
    ``outer_steps`` (ordinary optimizer steps) and ``inner_steps_taken`` (extra steps).
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
        """Remember the model and switch the GRPO heads' caches on iff ``inner_steps > 1``."""
        self._grpo_model = _unwrap(model)
        for module in _grpo_modules(self._grpo_model):
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
        modules = _grpo_modules(model)
        heads = [m for m in modules if m.grpo_has_cache()]
        if not heads:
            raise RuntimeError(
                f'{type(self).__name__}(inner_steps={self.inner_steps}): no GRPO-RM head cached '
                f'a batch, so there is nothing to take inner steps on. Inner steps need a head '
                f'with GRPOInnerStepMixin (GRPORMClsHead / the GRPO-RM decode head); a plain head '
                f'with GRPORMLoss as loss_decode supports inner_steps=1 only')
        enabled = [m.grpo_cache_enabled for m in modules]
        try:
            for m in modules:  # inner losses must not cache themselves again
                m.grpo_cache_enabled = False
            for _ in range(self.inner_steps - 1):
                with super().optim_context(model):  # type: ignore[misc]  (autocast for AMP)
                    losses: dict[str, Tensor] = {}
                    total = None
                    for head in heads:
                        head_losses = head.grpo_inner_losses()
                        losses.update(head_losses)
                        term = _sum_losses(head_losses)
                        if term is not None:
                            total = term if total is None else total + term
                if total is None or not total.requires_grad:
                    raise RuntimeError(f'the GRPO-RM heads returned no differentiable loss for '
                                       f'the inner step (keys: {sorted(losses)})')
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
class GRPOOptimWrapper(GRPOInnerStepsWrapperMixin, OptimWrapper):
    """``OptimWrapper`` + GRPO-RM inner steps. Args: ``inner_steps`` (int >= 1, default 1)
    and everything ``OptimWrapper`` takes (``optimizer``, ``accumulative_counts``,
    ``clip_grad``)."""

    def __init__(self, *args, inner_steps: int = 1, **kwargs) -> None:
        _check_inner_steps(inner_steps)
        super().__init__(*args, **kwargs)
        self._grpo_setup(inner_steps)


@OPTIM_WRAPPERS.register_module()
class GRPOAmpOptimWrapper(GRPOInnerStepsWrapperMixin, AmpOptimWrapper):
    """``AmpOptimWrapper`` + GRPO-RM inner steps. Args: ``inner_steps`` (int >= 1, default 1)
    and everything ``AmpOptimWrapper`` takes (``loss_scale``, ``dtype``, ...)."""

    def __init__(self, *args, inner_steps: int = 1, **kwargs) -> None:
        _check_inner_steps(inner_steps)
        super().__init__(*args, **kwargs)
        self._grpo_setup(inner_steps)
