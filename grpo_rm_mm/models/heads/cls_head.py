"""GRPO-RM classification head for mmpretrain: an MLP ``in -> hidden -> C`` whose softmax is the
policy over the group of all C classes (method.md sections 1-5)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from mmcv.cnn import build_activation_layer
from mmpretrain.evaluation.metrics import Accuracy
from mmpretrain.models.heads import ClsHead
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import nn

from .policy_head import GRPOCachedBatch, GRPOPolicyHeadMixin


@MODELS.register_module()
class GRPORMClsHead(GRPOPolicyHeadMixin, ClsHead):
    """MLP classification head trained with the GRPO-RM loss; predicts like any ``ClsHead``.

    ``feats[-1]`` (N, in_channels) -> ``fc1`` -> act -> (N, hidden_channels) = ``pre_logits``
    -> ``fc2`` -> (N, num_classes) logits; ``pi_theta = softmax(logits)``.

    A :class:`~.policy_head.GRPOPolicyHeadMixin`: with a GRPO-RM loss, each ``loss()`` call
    takes ``pi_old`` = the current logits detached and, if the loss has ``beta > 0``,
    ``pi_ref`` from ``ref_mlp`` (a frozen copy of the starting MLP, kept in checkpoints), and
    caches the batch for the optimizer wrapper's inner steps. Any other loss (e.g.
    ``CrossEntropyLoss``) is called as in ``ClsHead``, which gives the cross-entropy baseline
    with the same head. Inner steps (``inner_steps > 1``) update the head only: they reuse the
    cached features, also when part of the backbone is trainable.

    Args:
        num_classes: C.
        in_channels: width of the backbone (or neck) output.
        hidden_channels: width of the hidden layer (256 in GRPO-RM).
        act_cfg: activation after the hidden layer.
        dropout: dropout probability on the hidden layer during training.
        loss: the loss config (default GRPO-RM with its default rewards).
        topk, cal_acc, init_cfg: as in ``ClsHead``; ``cal_acc`` adds ``accuracy_top-k`` to the
            training log.
    """

    reference_name = 'ref_mlp'

    def __init__(self, num_classes: int, in_channels: int, hidden_channels: int = 256,
                 act_cfg: dict | None = None, dropout: float = 0.0,
                 loss: dict | nn.Module | None = None, topk: int | Sequence[int] = (1, ),
                 cal_acc: bool = False, init_cfg: dict | None = None) -> None:
        for name, value in (('num_classes', num_classes), ('in_channels', in_channels),
                            ('hidden_channels', hidden_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'GRPORMClsHead: {name}={value!r} must be a positive integer')
        if num_classes < 2:
            raise ValueError(f'GRPORMClsHead: num_classes={num_classes}; a group needs >= 2 '
                             f'classes')
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f'GRPORMClsHead: dropout={dropout} must be in [0, 1)')
        if loss is None:
            loss = dict(type='GRPORMLoss')
        topk = (topk, ) if isinstance(topk, int) else tuple(topk)
        super().__init__(loss=loss, topk=topk, cal_acc=cal_acc, init_cfg=init_cfg)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        layers = [('fc1', nn.Linear(in_channels, hidden_channels)),
                  ('act', build_activation_layer(act_cfg or dict(type='ReLU')))]
        if dropout > 0:
            layers.append(('drop', nn.Dropout(dropout)))
        layers.append(('fc2', nn.Linear(hidden_channels, num_classes)))
        self.mlp = nn.Sequential(OrderedDict(layers))
        self.setup_policy()

    # ------------------------------------------------------------------ policy protocol
    def grpo_loss_modules(self) -> list[nn.Module]:
        return [self.loss_module]

    def policy_layers(self) -> nn.Module:
        return self.mlp

    @property
    def is_grpo(self) -> bool:
        """Whether the head's loss is a GRPO-RM loss."""
        return self.is_grpo_loss(self.loss_module)

    # ------------------------------------------------------------------ forward
    def _input(self, feats: tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
        x = feats[-1] if isinstance(feats, (tuple, list)) else feats
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'GRPORMClsHead expects (N, in_channels={self.in_channels}) features, got '
                f'{tuple(x.shape)}; set in_channels to the backbone width, and pool feature '
                f"maps first (neck=dict(type='GlobalAveragePooling'), or a ViT with "
                f"out_type='cls_token')")
        return x

    def pre_logits(self, feats: tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
        """(N, in_channels) -> (N, hidden_channels): the head's hidden representation."""
        return self.mlp[:-1](self._input(feats))

    def forward(self, feats: tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
        """(N, in_channels) -> (N, num_classes) logits."""
        return self.mlp(self._input(feats))

    # ------------------------------------------------------------------ loss
    def _targets(self, data_samples: list[DataSample]) -> torch.Tensor:
        if 'gt_score' in data_samples[0]:
            if self.is_grpo:
                raise ValueError('GRPO-RM rewards need hard labels, but the data samples carry '
                                 'soft gt_score (batch augments such as Mixup/CutMix); remove '
                                 'train_cfg.augments')
            return torch.stack([s.gt_score for s in data_samples])
        target = torch.cat([s.gt_label for s in data_samples])
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f'label {int(target.max())} (min {int(target.min())}) is outside '
                             f'[0, num_classes={self.num_classes}); set model.head.num_classes '
                             f'to the number of classes of the dataset')
        return target

    def _loss_dict(self, logits: torch.Tensor, target: torch.Tensor,
                   old_logits: torch.Tensor | None = None,
                   ref_logits: torch.Tensor | None = None,
                   group_seed: int | None = None,
                   validated: bool = False) -> dict[str, torch.Tensor]:
        if not self.is_grpo:
            return {'loss': self.loss_module(logits, target, avg_factor=logits.size(0))}
        value = self.loss_module(logits, target, avg_factor=logits.size(0),
                                 old_logits=old_logits, ref_logits=ref_logits,
                                 group_seed=group_seed, **self.grpo_loss_kwargs(validated))
        losses = {self.loss_module.loss_name: value}
        losses.update({k: v.detach() for k, v in self.loss_module.last_diagnostics.items()})
        return losses

    def loss(self, feats: tuple[torch.Tensor, ...], data_samples: list[DataSample],
             **kwargs) -> dict[str, torch.Tensor]:
        """GRPO-RM (or the configured) loss of a batch; ``pi_old`` = the current logits,
        detached, so the ratio is 1 on this first step."""
        x = self._input(feats)
        target = self._targets(data_samples)
        logits = self.mlp(x)
        ref_logits = self.reference_logits(x)
        # pi_old = the current logits detached: None is exactly that (ratio 1), computed once
        losses = self._loss_dict(logits, target, None, ref_logits)
        self.grpo_cache_batch(x, target, logits, ref_logits)
        if self.cal_acc and target.ndim == 1:
            acc = Accuracy.calculate(logits.detach(), target, topk=self.topk)
            losses.update({f'accuracy_top-{k}': a for k, a in zip(self.topk, acc)})
        return losses

    def _grpo_inner_loss(self, item: GRPOCachedBatch) -> dict[str, torch.Tensor]:
        """Loss of a later inner step on a cached batch: new logits from the cached detached
        inputs, the same ``pi_old``/``pi_ref`` and group (so the clip acts)."""
        return self._loss_dict(self.mlp(item.feats), item.labels, item.old_logits,
                               item.ref_logits, item.group_seeds[0], validated=True)
