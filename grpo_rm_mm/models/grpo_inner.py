"""Inner GRPO steps without a second backbone forward (method.md section 5).

A head that mixes in :class:`GRPOInnerStepMixin` caches, for every micro-batch of a training
iteration, a detached *context* (its detached input features, labels, ``old_logits``,
``ref_logits``...). After the optimizer wrapper's first (ordinary) step, it calls
:meth:`GRPOInnerStepMixin.grpo_inner_losses` for each further inner step: the head recomputes its
logits from the cached features with the updated parameters and evaluates the loss against the
same pi_old, so the ratio moves away from 1 and the clip acts.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ['GRPOInnerStepMixin', 'detach_context', 'make_reference']


def detach_context(item: Any) -> Any:
    """Detach every tensor in a (nested) dict / list / tuple; other values are kept."""
    if torch.is_tensor(item):
        return item.detach()
    if isinstance(item, dict):
        return type(item)((k, detach_context(v)) for k, v in item.items())
    if isinstance(item, tuple) and hasattr(item, '_fields'):  # namedtuple
        return type(item)(*(detach_context(v) for v in item))
    if isinstance(item, (list, tuple)):
        return type(item)(detach_context(v) for v in item)
    return item


def _force_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen reference: run in eval mode even after ``model.train()``
    (deterministic pi_ref). A module-level function, so the module stays picklable."""
    if module.training:
        module.eval()


def make_reference(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` for pi_ref (beta > 0): deepcopy, ``requires_grad=False``,
    eval mode (a forward pre-hook puts it back in eval mode after ``model.train()``).
    Register it as a submodule of the head (e.g. ``self.ref_mlp``) so it is saved in and
    restored from checkpoints."""
    if not isinstance(module, nn.Module):
        raise ValueError(f'make_reference needs an nn.Module, got {type(module).__name__}')
    ref = copy.deepcopy(module)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref.register_forward_pre_hook(_force_eval)
    return ref.eval()


class GRPOInnerStepMixin:
    """Mixin for heads (``nn.Module``) that support the optimizer wrapper's inner steps.

    The optimizer wrapper sets ``grpo_cache_enabled`` (True when ``inner_steps > 1``); the
    head calls ``grpo_cache_append(context)`` in its ``loss()`` and implements
    ``_grpo_inner_loss(context) -> loss dict``.
    """

    grpo_cache_enabled: bool = False
    make_reference = staticmethod(make_reference)

    def _grpo_cache(self) -> list[Any]:
        # stored in __dict__ directly: works before/without nn.Module.__init__ ordering issues
        return self.__dict__.setdefault('_grpo_cache_items', [])

    def grpo_cache_append(self, item: Any) -> None:
        """Keep a detached copy of one micro-batch context (only when caching is enabled)."""
        if self.grpo_cache_enabled:
            self._grpo_cache().append(detach_context(item))

    def grpo_cache_clear(self) -> None:
        """Forget every cached context."""
        self._grpo_cache().clear()

    def grpo_has_cache(self) -> bool:
        """Whether at least one context is cached."""
        return bool(self._grpo_cache())

    def grpo_cache_size(self) -> int:
        """Number of cached micro-batch contexts."""
        return len(self._grpo_cache())

    def _grpo_inner_loss(self, item: Any) -> dict[str, Tensor]:
        """Loss dict of one cached context with the current parameters (implemented by heads:
        recompute the logits from the cached detached features and call the loss with the
        cached ``old_logits``/``ref_logits``/labels)."""
        raise NotImplementedError(f'{type(self).__name__} must implement _grpo_inner_loss(item)')

    def grpo_inner_losses(self) -> dict[str, Tensor]:
        """Average over the cached contexts of ``_grpo_inner_loss(item)`` (key by key).

        Averaging matches the scale of an accumulated outer step (mmengine divides each
        micro-batch loss by ``accumulative_counts``). Empty dict when nothing is cached.
        """
        items = self._grpo_cache()
        if not items:
            return {}
        total: dict[str, Tensor] = {}
        for item in items:
            losses = self._grpo_inner_loss(item)
            if total and set(losses) != set(total):
                raise RuntimeError(f'{type(self).__name__}._grpo_inner_loss returned keys '
                                   f'{sorted(losses)} for one cached micro-batch and '
                                   f'{sorted(total)} for another')
            for key, value in losses.items():
                total[key] = value if key not in total else total[key] + value
        return {key: value / len(items) for key, value in total.items()}
