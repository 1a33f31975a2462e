"""The DINOv2 ViT-S/14 configs build and run a forward pass with random weights; the kNN / SR
reference set their RepresentationReferenceHook derives."""
from __future__ import annotations

from pathlib import Path

import mmpretrain
import numpy as np
import pytest
import torch
from conftest import REPO
from mmcv.transforms import Compose
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmpretrain.registry import MODELS, TRANSFORMS
from mmpretrain.structures import DataSample
from PIL import Image

import grpo_rm_mm  # noqa: F401  (registers the model components)
from grpo_rm_mm.evaluation.hooks import RepresentationReferenceHook, reference_dataloader_cfg
from grpo_rm_mm.testing import make_cifar10

CONFIGS = {name: REPO / 'configs' / f'{name}.py' for name in (
    'grpo_rm_cifar10', 'ce_cifar10', 'grpo_rm_tiny_imagenet', 'ce_tiny_imagenet')}
NUM_CLASSES = {'cifar10': 10, 'tiny_imagenet': 200}


def build_model(cfg: Config, **backbone):
    model_cfg = cfg.model.copy()
    model_cfg.data_preprocessor = cfg.data_preprocessor
    model_cfg.backbone.update(backbone)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(model_cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_dinov2_config_builds_and_runs_forward(name: str) -> None:
    cfg = Config.fromfile(CONFIGS[name])
    num_classes = NUM_CLASSES[name.removeprefix('grpo_rm_').removeprefix('ce_')]
    init = cfg.model.backbone.init_cfg
    assert init.type == 'Pretrained' and init.prefix == 'backbone'
    assert init.checkpoint.startswith('https://download.openmmlab.com/mmpretrain/')
    assert cfg.train_dataloader.batch_size == 1024
    assert cfg.optim_wrapper.optimizer.type == 'Adam'
    assert cfg.model.head.hidden_channels == 256

    torch.manual_seed(0)
    model = build_model(cfg, init_cfg=None)  # random weights: no download in tests
    backbone = model.backbone
    # DINOv2 ViT-S/14: 12 blocks of width 384, 14-px patches, layer scale; 22.06M parameters
    # (mmpretrain's metafile, vit-small-p14_dinov2-pre_3rdparty)
    assert (backbone.embed_dims, backbone.num_layers) == (384, 12)
    assert backbone.patch_embed.projection.kernel_size == (14, 14)
    assert all(hasattr(layer.attn, 'gamma1') for layer in backbone.layers)  # layer scale
    n_params = sum(p.numel() for p in backbone.parameters())
    assert n_params == pytest.approx(22.06e6, rel=0.01)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert model.head.num_classes == num_classes

    model.train()
    assert not backbone.training  # frozen backbone stays in eval mode
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)  # 2x2 patches
    samples = [DataSample().set_gt_label(i % num_classes) for i in range(2)]
    data = model.data_preprocessor(dict(inputs=list(images), data_samples=samples), False)
    model.eval()
    with torch.no_grad():
        logits = model(data['inputs'], mode='tensor')
        preds = model(data['inputs'], data['data_samples'], mode='predict')
    assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()
    assert preds[0].pred_score.shape == (num_classes, )
    assert preds[0].rep_backbone.shape == (384, ) and preds[0].rep_pre_logits.shape == (256, )
    torch.testing.assert_close(preds[1].pred_score, logits[1].softmax(0))


@pytest.mark.parametrize('dataset', ['cifar10', 'tiny_imagenet'])
def test_ce_baseline_differs_only_in_the_head_loss(dataset: str) -> None:
    grpo = Config.fromfile(CONFIGS[f'grpo_rm_{dataset}']).to_dict()
    ce = Config.fromfile(CONFIGS[f'ce_{dataset}']).to_dict()
    assert grpo['model']['head'].pop('loss')['type'] == 'GRPORMLoss'
    assert ce['model']['head'].pop('loss') == dict(type='CrossEntropyLoss', loss_weight=1.0)
    # the baseline takes one step per batch; so does the selected GRPO-RM default
    assert (grpo['optim_wrapper'].pop('inner_steps'), ce['optim_wrapper'].pop('inner_steps')) \
        == (1, 1)
    assert grpo == ce


def test_published_checkpoint_layout_loads_into_the_backbone(tmp_path: Path) -> None:
    """The checkpoint of mmpretrain's headless DINOv2 model holds ``backbone.*`` keys; the
    config's ``prefix='backbone'`` maps them onto our frozen backbone."""
    cfg = Config.fromfile(CONFIGS['grpo_rm_cifar10'])
    headless = Config.fromfile(Path(mmpretrain.__file__).parent / '.mim' / 'configs' / 'dinov2' /
                               'vit-small-p14_dinov2-pre_headless.py')
    torch.manual_seed(1)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        published = MODELS.build(headless.model)
    ckpt = tmp_path / 'dinov2_vits14.pth'
    torch.save({'state_dict': published.state_dict(), 'meta': {}}, ckpt)

    torch.manual_seed(2)
    model = build_model(cfg, init_cfg=dict(type='Pretrained', checkpoint=str(ckpt),
                                           prefix='backbone'))
    for name, value in published.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], value, msg=name)


@pytest.mark.parametrize('name', ['grpo_rm_cifar10', 'grpo_rm_tiny_imagenet'])
def test_real_pipelines_give_224_px_inputs(name: str, tmp_path: Path) -> None:
    """32-px CIFAR arrays and 64-px Tiny-ImageNet JPEGs both reach the ViT at 224 = 16 x 14."""
    cfg = Config.fromfile(CONFIGS[name])
    size = 32 if 'cifar' in name else 64
    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / 'x.JPEG')
    item = dict(img=img, img_path=str(tmp_path / 'x.JPEG'), gt_label=3)
    reference = reference_dataloader_cfg(cfg.train_dataloader, cfg.test_dataloader)
    for loader in (cfg.train_dataloader, cfg.test_dataloader, ConfigDict(reference)):
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            pipeline = Compose([TRANSFORMS.build(t) for t in loader.dataset.pipeline])
        out = pipeline(dict(item))
        assert tuple(out['inputs'].shape) == (3, 224, 224)
        assert int(out['data_samples'].gt_label) == 3


def test_reference_set_is_derived_from_the_training_set_with_the_test_pipeline() -> None:
    """The split and ConcatDataset parts stay, a resampling wrapper (long tail, repeat) goes:
    every image once; every pipeline inside becomes the test one; the test loader's batch
    settings, no shuffling, no kept workers."""
    test_pipeline = [dict(type='Resize', scale=8), dict(type='PackInputs')]
    part = dict(type='LocalCIFAR10', data_root='a', split='train',
                pipeline=[dict(type='RandomFlip', prob=0.5), dict(type='PackInputs')])
    train = dict(batch_size=64, num_workers=2, persistent_workers=True,
                 sampler=dict(type='DefaultSampler', shuffle=True, seed=3),
                 dataset=dict(type='ConcatDataset', datasets=[
                     dict(type='LongTailDataset', imbalance_ratio=10, dataset=part),
                     dict(type='mmpretrain.RepeatDataset', times=2, dataset=part),
                     dict(type='KFoldDataset', fold=0, dataset=part)]))
    test = dict(batch_size=16, num_workers=1, persistent_workers=True,
                sampler=dict(type='DefaultSampler', shuffle=False),
                dataset=dict(type='LocalCIFAR10', data_root='a', split='test',
                             pipeline=test_pipeline))
    ref = reference_dataloader_cfg(train, test)
    assert (ref['batch_size'], ref['num_workers'], ref['persistent_workers']) == (16, 1, False)
    assert ref['sampler'] == dict(type='DefaultSampler', shuffle=False)
    inner = dict(part, pipeline=test_pipeline)
    assert ref['dataset'] == dict(type='ConcatDataset', datasets=[
        inner, inner, dict(type='KFoldDataset', fold=0, dataset=inner)])
    assert part['pipeline'][0]['type'] == 'RandomFlip'  # the train config is copied, not changed
    with pytest.raises(ValueError, match='no `pipeline`'):
        reference_dataloader_cfg(train, dict(test, dataset=dict(type='LocalCIFAR10')))


def test_reference_hook_feeds_the_training_set_unless_given_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a runner of the test-size CIFAR config, with a training pipeline that flips every
    image: the hook's default reference set is the 20 training images, unflipped (the test
    pipeline); a ``dataloader`` passed to the hook (the 10 test images) replaces it."""
    make_cifar10(tmp_path / 'cifar', n_train=20, n_test=10, seed=0)
    monkeypatch.setenv('CIFAR_ROOT', str(tmp_path / 'cifar'))
    cfg = Config.fromfile(REPO / 'tests' / 'cls' / 'configs' / 'grpo_rm_cifar10_tiny.py')
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='RandomFlip', prob=1.0, direction='horizontal'), dict(type='PackInputs')]
    cfg.work_dir = str(tmp_path / 'work')
    runner = Runner.from_cfg(cfg)
    hooks = [h for h in runner.hooks if isinstance(h, RepresentationReferenceHook)]
    assert len(hooks) == 1 and hooks[0].dataloader_cfg is None
    metrics = [m for m in runner.val_loop.evaluator.metrics if hasattr(m, 'set_reference')]
    assert len(metrics) == 2  # kNN and SR

    hooks[0].before_val_epoch(runner)
    loader = hooks[0]._loader
    train_images = [item['inputs'] for item in runner.train_dataloader.dataset]
    assert all(torch.equal(a, b.flip(-1)) for a, b in
               zip(train_images, (loader.dataset[i]['inputs'] for i in range(20))))
    assert len(loader.dataset) == 20 and all(m.reference_size == 20 for m in metrics)
    assert all(len(m.reference) == 20 for m in metrics)

    test_set = dict(cfg.test_dataloader.dataset, pipeline=[dict(type='PackInputs')])
    explicit = RepresentationReferenceHook(dataloader=dict(
        batch_size=4, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=test_set))
    explicit.before_val_epoch(runner)
    assert len(explicit._loader.dataset) == 10 and all(m.reference_size == 10 for m in metrics)
