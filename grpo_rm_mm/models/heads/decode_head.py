"""GRPO-RM decode head for mmseg: a per-position MLP ``in -> hidden (64) -> C`` on frozen
backbone features whose softmax is the policy of every labelled pixel over the group of all C
classes (method.md sections 1-6)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.registry import MODELS as ROOT_MODELS
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.losses import accuracy
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, SampleList
from torch import Tensor, nn

from .policy_head import GRPOCachedBatch, GRPOPolicyHeadMixin

__all__ = ['GRPORMSegHead', 'LayerNorm2d']

_LN2D = dict(type='LN2d')
_GRPO = dict(type='GRPORMLoss')


@ROOT_MODELS.register_module('LN2d')
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position: (N, C, H, W) -> (N, C, H, W).

    ``norm_cfg=dict(type='LN2d')`` (registered in mmengine's root registry, so every scope
    finds it). Unlike BN it has no batch statistics: a pixel's policy depends on its own
    features only, training and test behave alike, and DDP ranks need no buffer sync.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f'LN2d expects (N, C, H, W), got {tuple(x.shape)}')
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


@MODELS.register_module()
class GRPORMSegHead(GRPOPolicyHeadMixin, BaseDecodeHead):
    """Per-position MLP decode head trained with the GRPO-RM loss.

    ``x`` (N, in_channels, h, w) -> ``hidden``: 1x1 conv + norm + act -> (N, channels, h, w)
    -> dropout -> ``conv_seg``: 1x1 conv -> (N, num_classes, h, w) logits, resized (bilinear)
    to the label size (N, H, W) for the loss and to the input size for prediction, as every
    mmseg head does. Each labelled pixel q is a query with ``pi_theta(.|q) = softmax`` over the
    C classes; ``ignore_index`` pixels have no group.

    A :class:`~.policy_head.GRPOPolicyHeadMixin`: each ``loss()`` call takes ``pi_old`` = the
    current logits detached (ratio 1 on the first update) and, when a GRPO-RM loss has
    ``beta > 0``, ``pi_ref`` from ``ref_layers``: a frozen copy of the starting ``hidden`` +
    ``conv_seg`` (saved in checkpoints; BN layers in it, if ``norm_cfg`` is BN, use the batch
    statistics as the training head does, so KL = 0 before the first update). With the
    optimizer wrapper's ``inner_steps > 1`` it caches the batch (features, labels,
    ``pi_old``/``pi_ref`` logits at feature resolution) for the further steps. Any other loss
    in ``loss_decode`` (e.g. ``CrossEntropyLoss``, the baseline) is called as in
    ``BaseDecodeHead``; a list of losses is summed by ``loss_name`` as there.

    Args:
        in_channels: width of the backbone (or neck) feature map (a list with
            ``input_transform``, as in ``BaseDecodeHead``).
        channels: width of the hidden layer (64 in GRPO-RM).
        num_classes: C (>= 2).
        norm_cfg: normalisation after the hidden 1x1 conv: ``LN2d`` (per-position LayerNorm)
            by default; BN/SyncBN also work (pi_ref then uses batch statistics, see above).
        dropout_ratio: dropout before ``conv_seg`` (0 by default).
        loss_decode: loss config(s); default GRPO-RM with its default rewards.
        **kwargs: the other ``BaseDecodeHead`` arguments (``in_index``, ``input_transform``,
            ``ignore_index`` (255), ``sampler``, ``align_corners``, ``act_cfg``, ``init_cfg``).
    """

    reference_name = 'ref_layers'

    def __init__(self, in_channels: int | list[int], channels: int = 64, *, num_classes: int,
                 norm_cfg: ConfigType | None = _LN2D,
                 dropout_ratio: float = 0.0,
                 loss_decode: ConfigType | list[ConfigType] = _GRPO,
                 **kwargs) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f'GRPORMSegHead: num_classes={num_classes!r}; a group needs >= 2 '
                             f'classes (binary segmentation: use 2 classes, not out_channels=1)')
        if kwargs.get('out_channels') not in (None, num_classes):
            raise ValueError(f'GRPORMSegHead: out_channels={kwargs["out_channels"]} must equal '
                             f'num_classes={num_classes} (one logit per class of the group)')
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f'GRPORMSegHead: channels={channels!r} must be a positive int')
        if isinstance(loss_decode, dict):
            loss_decode = dict(loss_decode)
        norm_cfg = None if norm_cfg is None else dict(norm_cfg)
        super().__init__(in_channels, channels, num_classes=num_classes, norm_cfg=norm_cfg,
                         dropout_ratio=dropout_ratio, loss_decode=loss_decode, **kwargs)
        self.hidden = ConvModule(self.in_channels, self.channels, 1, conv_cfg=self.conv_cfg,
                                 norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        self.setup_policy()

    # ------------------------------------------------------------------ policy protocol
    def grpo_loss_modules(self) -> list[nn.Module]:
        if isinstance(self.loss_decode, nn.ModuleList):
            return list(self.loss_decode)
        return [self.loss_decode]

    def policy_layers(self) -> nn.Sequential:
        """The trained layers (``hidden``, ``conv_seg``) as one module, without dropout."""
        return nn.Sequential(OrderedDict(hidden=self.hidden, conv_seg=self.conv_seg))

    # ------------------------------------------------------------------ forward
    def _features(self, inputs: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        x = self._transform_inputs(inputs)
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'GRPORMSegHead expects a (N, in_channels={self.in_channels}, h, w) feature map, '
                f'got {tuple(getattr(x, "shape", ()))}; set decode_head.in_channels to the '
                f"backbone width, and use a backbone that outputs feature maps (a ViT with "
                f"out_type='featmap')")
        return x

    def _logits(self, x: Tensor) -> Tensor:
        """(N, in_channels, h, w) -> (N, num_classes, h, w)."""
        return self.cls_seg(self.hidden(x))

    def forward(self, inputs: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        """Backbone features -> (N, num_classes, h, w) logits at feature resolution."""
        return self._logits(self._features(inputs))

    # ------------------------------------------------------------------ loss
    def _check_labels(self, seg_label: Tensor, batch_data_samples: SampleList) -> None:
        """Labels must be classes ``0..C-1`` or ``ignore_index``; name the bad masks."""
        bad = (seg_label != self.ignore_index) & ((seg_label < 0) |
                                                  (seg_label >= self.num_classes))
        if not bool(bad.any()):
            return
        per_sample = bad.flatten(1).any(1).tolist()
        files = [s.metainfo.get('seg_map_path', f'sample {i}')
                 for i, (s, b) in enumerate(zip(batch_data_samples, per_sample)) if b]
        values = torch.unique(seg_label[bad]).tolist()
        raise ValueError(
            f'label values {values[:10]} in {files} are neither classes 0..'
            f'{self.num_classes - 1} nor ignore_index {self.ignore_index}; set '
            f'decode_head.num_classes to the number of classes of the data set, or mark '
            f'unlabelled pixels with {self.ignore_index}')

    def _losses(self, logits: Tensor, seg_label: Tensor, old_logits: Tensor | None,
                ref_logits: Tensor | None,
                group_seeds: Sequence[int | None] | None = None,
                validated: bool = False) -> dict[str, Tensor]:
        """Loss dict as ``BaseDecodeHead.loss_by_feat`` with GRPO-RM inputs and diagnostics.

        logits, old_logits, ref_logits: (N, C, h, w); seg_label: (N, 1, H, W). Every logit map
        is resized to (H, W) first (bilinear, hence pi_old/pi_ref resized = resized then
        detached). ``group_seeds``: per loss module, the seed of the sampled group to reuse
        (inner steps), else None. ``validated``: the labels were checked on the batch's first
        call (inner steps), so GRPO-RM losses skip their check. ``old_logits=None`` means
        pi_old = the current logits detached (ratio 1), which saves resizing a copy.
        """
        size = seg_label.shape[2:]

        def up(t: Tensor | None) -> Tensor | None:
            return None if t is None else resize(t, size=size, mode='bilinear',
                                                 align_corners=self.align_corners)

        seg_logits, old_logits, ref_logits = up(logits), up(old_logits), up(ref_logits)
        seg_weight = None
        if self.sampler is not None:
            seg_weight = self.sampler.sample(seg_logits, seg_label)
        label = seg_label.squeeze(1)
        losses: dict[str, Tensor] = {}
        for i, loss_decode in enumerate(self.grpo_loss_modules()):
            grpo = self.is_grpo_loss(loss_decode)
            kwargs = dict(weight=seg_weight, ignore_index=self.ignore_index)
            if grpo:
                kwargs.update(old_logits=old_logits, ref_logits=ref_logits,
                              group_seed=group_seeds[i] if group_seeds else None,
                              **self.grpo_loss_kwargs(validated))
            value = loss_decode(seg_logits, label, **kwargs)
            name = loss_decode.loss_name
            losses[name] = losses[name] + value if name in losses else value
            if grpo:
                for key, diag in loss_decode.last_diagnostics.items():
                    losses[key if key not in losses else f'{key}_{i}'] = diag.detach()
        losses['acc_seg'] = accuracy(seg_logits, label, ignore_index=self.ignore_index)
        return losses

    def loss(self, inputs: list[Tensor] | tuple[Tensor, ...], batch_data_samples: SampleList,
             train_cfg: ConfigType) -> dict[str, Tensor]:
        """Loss of a batch: ``loss_grpo`` (or the configured losses' names), ``acc_seg`` and
        the ``grpo_*`` diagnostics (logged, not optimised: their names lack ``loss``)."""
        x = self._features(inputs)
        seg_label = self._stack_batch_gt(batch_data_samples)
        self._check_labels(seg_label, batch_data_samples)
        logits = self._logits(x)
        ref_logits = self.reference_logits(x)
        # pi_old is the current policy on this first update: passing None instead of the
        # detached logits is exactly equal (ratio 1) and spares an (N, C, H, W) resize
        losses = self._losses(logits, seg_label, None, ref_logits)
        self.grpo_cache_batch(x, seg_label, logits, ref_logits)
        return losses

    def _grpo_inner_loss(self, item: GRPOCachedBatch) -> dict[str, Tensor]:
        """Loss of a further inner step on a cached batch: new logits from the cached detached
        features, the same pi_old/pi_ref, labels and groups (so the ratio moves and the clip
        acts)."""
        return self._losses(self._logits(item.feats), item.labels, item.old_logits,
                            item.ref_logits, item.group_seeds, validated=True)
