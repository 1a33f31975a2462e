"""The GRPO-RM policy-head protocol, shared by :class:`~.cls_head.GRPORMClsHead` and
:class:`~.decode_head.GRPORMSegHead` (method.md section 5).

A policy head maps detached input features to logits whose softmax is the policy over the
group of all C classes. With a :class:`~grpo_rm_mm.models.losses.GRPORMLoss`,
:class:`GRPOPolicyHeadMixin` gives it

- GRPO-loss detection (``isinstance``), and the loss's own MessageHub logging switched off (the
  head returns the ``grpo_*`` diagnostics in its loss dict, which mmengine logs);
- pi_ref for ``beta > 0``: a frozen copy of the policy layers, synchronised after
  ``init_weights`` and filled from the policy layers when a checkpoint lacks it;
- the batch cache of the optimizer wrapper's inner steps (what they are:
  :class:`~grpo_rm_mm.engine.optim_wrappers.InnerStepsOptimWrapperMixin`): one
  :class:`GRPOCachedBatch` per micro-batch, and :meth:`GRPOPolicyHeadMixin.grpo_inner_losses`,
  the loss of a further step on them.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..losses import GRPORMLoss

__all__ = ['GRPOCachedBatch', 'GRPOPolicyHeadMixin', 'detach_context', 'make_reference']


@dataclass
class GRPOCachedBatch:
    """One micro-batch kept for the inner steps: every input of the loss but the new logits.

    Attributes:
        feats: the head's input features, detached: (N, in_channels) or
            (N, in_channels, h, w).
        labels: (N,) class indices (or the (N, C) soft scores a non-GRPO loss may take), or
            (N, 1, H, W) label maps.
        old_logits: pi_old, the logits of the pre-update policy, detached, at the resolution of
            the policy layers' output: (N, C) or (N, C, h, w).
        ref_logits: pi_ref logits of the same shape (``beta > 0``), else None.
        group_seeds: per loss module of the head, the seed of the group it drew on this batch
            (``group_weighting='sampled'``), else None; the inner steps reuse the draws.
    """

    feats: Tensor
    labels: Tensor
    old_logits: Tensor
    ref_logits: Tensor | None = None
    group_seeds: tuple[int | None, ...] = ()


def detach_context(item: Any) -> Any:
    """Detach every tensor in a (nested) dataclass / dict / list / tuple; other values are
    kept."""
    if torch.is_tensor(item):
        return item.detach()
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.replace(item, **{f.name: detach_context(getattr(item, f.name))
                                            for f in dataclasses.fields(item) if f.init})
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


def _batch_statistics_only(module: nn.Module) -> None:
    """Make every BN layer of ``module`` normalise with the statistics of the current batch,
    in eval mode too, and keep no running statistics."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


class GRPOPolicyHeadMixin:
    """Mixin of a head (an ``nn.Module``, mixed in before the toolbox's head class) trained with
    the GRPO-RM loss and the optimizer wrapper's inner steps.

    A head implements

    - :meth:`grpo_loss_modules`: its loss modules (GRPO-RM or not);
    - :meth:`policy_layers`: its trained layers as one module, ``feats -> logits``;
    - :meth:`_grpo_inner_loss`: the loss dict of one cached batch with the current parameters;

    sets :attr:`reference_name` (the attribute of pi_ref, hence its checkpoint keys), calls
    :meth:`setup_policy` at the end of ``__init__``, and in ``loss()`` takes pi_ref from
    :meth:`reference_logits` and passes the batch to :meth:`grpo_cache_batch` after the loss
    call (which sets the sampled groups' seeds).

    The optimizer wrapper sets ``grpo_cache_enabled`` (True when ``inner_steps > 1``) inside
    its ``optim_context``, calls :meth:`grpo_inner_losses` for each further step and then
    :meth:`grpo_cache_clear`; it sets ``grpo_inner_diagnostics`` False for every inner step
    but the last, whose diagnostics (how far the inner steps moved: ``grpo_kl_old``,
    ``grpo_clip_frac``) stay in the losses' ``last_diagnostics``.

    Attributes:
        beta: the largest ``beta`` of the head's GRPO-RM losses (0 without one); pi_ref exists
            iff ``beta > 0``.
        grpo_cache_enabled: whether ``loss()`` caches its batch.
        grpo_inner_diagnostics: whether :meth:`_grpo_inner_loss` asks its GRPO-RM losses for
            their diagnostics (``GRPORMLoss(diagnostics=...)``; skipping them saves about a
            third of the fused loss's arithmetic).
    """

    reference_name: ClassVar[str] = 'ref_policy'
    grpo_cache_enabled: bool = False
    grpo_inner_diagnostics: bool = True
    beta: float = 0.0
    make_reference = staticmethod(make_reference)

    # ------------------------------------------------------------------ protocol
    def grpo_loss_modules(self) -> list[nn.Module]:
        """Every loss module of the head, GRPO-RM or not, in the order of its loss dict."""
        raise NotImplementedError(f'{type(self).__name__} must implement grpo_loss_modules()')

    def policy_layers(self) -> nn.Module:
        """The trained layers as one module, ``feats -> logits``; pi_ref is a frozen copy of
        it with the same parameter names (in eval mode: dropout in it is off)."""
        raise NotImplementedError(f'{type(self).__name__} must implement policy_layers()')

    def _grpo_inner_loss(self, item: Any) -> dict[str, Tensor]:
        """Loss dict of one cached batch with the current parameters: the logits recomputed
        from the cached detached features, the loss called with the cached ``old_logits``,
        ``ref_logits``, labels and group seeds (labels already validated)."""
        raise NotImplementedError(f'{type(self).__name__} must implement _grpo_inner_loss(item)')

    def grpo_loss_kwargs(self, inner_step: bool) -> dict[str, bool]:
        """Keyword arguments of a GRPO-RM loss call beyond its inputs: in an inner step the
        labels were validated on the batch's first call, and the diagnostics are computed as
        the optimizer wrapper asks (:attr:`grpo_inner_diagnostics`)."""
        return dict(validated=True, diagnostics=self.grpo_inner_diagnostics) if inner_step else {}

    @staticmethod
    def is_grpo_loss(module: nn.Module) -> bool:
        """A GRPO-RM loss takes ``old_logits``/``ref_logits``/``group_seed`` and returns its
        diagnostics in ``last_diagnostics``."""
        return isinstance(module, GRPORMLoss)

    # ------------------------------------------------------------------ reference
    def setup_policy(self) -> None:
        """Switch off the GRPO-RM losses' own logging, read ``beta`` and, for ``beta > 0``,
        create pi_ref (BN layers in it use the batch statistics, as the training head does, so
        KL = 0 before the first update). Call once, after the policy layers exist."""
        grpo = [m for m in self.grpo_loss_modules() if self.is_grpo_loss(m)]
        for module in grpo:
            module.log_diagnostics = False
        self.beta = max((float(m.beta) for m in grpo), default=0.0)
        if self.beta > 0:
            reference = make_reference(self.policy_layers())
            _batch_statistics_only(reference)
            self.add_module(self.reference_name, reference)  # type: ignore[attr-defined]
            self._register_load_state_dict_pre_hook(  # type: ignore[attr-defined]
                self._fill_missing_reference)

    def reference_logits(self, feats: Tensor) -> Tensor | None:
        """pi_ref logits of ``feats`` (no grad), or None when ``beta = 0``."""
        if self.beta <= 0:
            return None
        with torch.no_grad():
            return getattr(self, self.reference_name)(feats.detach())

    def _policy_keys(self) -> dict[str, str]:
        """Parameter name in pi_ref -> name of the same parameter in the head."""
        own = {id(p): name for name, p in self.named_parameters()}  # type: ignore[attr-defined]
        return {name: own[id(p)] for name, p in self.policy_layers().named_parameters()}

    def init_weights(self) -> None:
        """The toolbox's initialisation, then pi_ref = the *starting* policy layers."""
        super().init_weights()  # type: ignore[misc]
        if self.beta > 0:
            reference = dict(getattr(self, self.reference_name).named_parameters())
            with torch.no_grad():
                for name, param in self.policy_layers().named_parameters():
                    reference[name].copy_(param)

    def _fill_missing_reference(self, state_dict: dict, prefix: str, *args) -> None:
        """Load-state-dict pre-hook: a checkpoint without pi_ref (e.g. of a cross-entropy or
        beta = 0 run) starts pi_ref at the loaded policy layers."""
        for name, src in self._policy_keys().items():
            key, src = f'{prefix}{self.reference_name}.{name}', prefix + src
            if key not in state_dict and src in state_dict:
                state_dict[key] = state_dict[src]

    # ------------------------------------------------------------------ batch cache
    def _grpo_cache(self) -> list[Any]:
        # kept in __dict__, outside nn.Module's attribute handling: usable before __init__
        return self.__dict__.setdefault('_grpo_cache_items', [])

    def grpo_cache_batch(self, feats: Tensor, labels: Tensor, logits: Tensor,
                         ref_logits: Tensor | None) -> None:
        """Cache this ``loss()`` call's batch (when caching is enabled): ``logits`` of the
        current policy become the batch's pi_old; the group seeds are read from the loss
        modules, so call this after the loss."""
        if not self.grpo_cache_enabled:
            return
        seeds = tuple(m.last_group_seed if self.is_grpo_loss(m) else None
                      for m in self.grpo_loss_modules())
        self.grpo_cache_append(GRPOCachedBatch(feats, labels, logits, ref_logits, seeds))

    def grpo_cache_append(self, item: Any) -> None:
        """Keep a detached copy of one micro-batch (a :class:`GRPOCachedBatch`, or whatever
        the head's ``_grpo_inner_loss`` reads) when caching is enabled."""
        if self.grpo_cache_enabled:
            self._grpo_cache().append(detach_context(item))

    def grpo_cache_clear(self) -> None:
        """Forget every cached batch."""
        self._grpo_cache().clear()

    def grpo_has_cache(self) -> bool:
        """Whether at least one batch is cached."""
        return bool(self._grpo_cache())

    def grpo_cache_size(self) -> int:
        """Number of cached micro-batches."""
        return len(self._grpo_cache())

    def grpo_inner_losses(self) -> dict[str, Tensor]:
        """Average over the cached batches of ``_grpo_inner_loss(item)`` (key by key).

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
