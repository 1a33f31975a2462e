"""configs/grpo_rm_voc.py and configs/ce_voc.py: what they promise (DINOv2 ViT-S/14 from
mmpretrain with its published checkpoint, frozen, patch features; the GRPO-RM head; batch 256 in
total; Adam; eps 0.2, beta 0; IoUMetric; the aug set in configs/grpo_rm_voc_aug.py), and the
DINOv2 model builds and runs a forward pass with random weights."""
from __future__ import annotations

from pathlib import Path

import mmpretrain
import pytest
import torch
import yaml
from conftest import REPO
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

GRPO_CFG = REPO / 'configs' / 'grpo_rm_voc.py'
CE_CFG = REPO / 'configs' / 'ce_voc.py'
AUG_CFG = REPO / 'configs' / 'grpo_rm_voc_aug.py'


def published_dinov2_small() -> str:
    """The ViT-S/14 DINOv2 weights listed in mmpretrain's own model index."""
    meta = Path(mmpretrain.__file__).parent / '.mim' / 'configs' / 'dinov2' / 'metafile.yml'
    models = yaml.safe_load(meta.read_text())['Models']
    return next(m['Weights'] for m in models if m['Name'] == 'vit-small-p14_dinov2-pre_3rdparty')


@pytest.fixture(scope='module')
def cfg() -> Config:
    return Config.fromfile(str(GRPO_CFG))


def test_config_promises(cfg: Config) -> None:
    model = cfg.model
    assert model.type == 'GRPORMEncoderDecoder' and model.freeze_backbone
    assert model.trainable_backbone == ()
    bb = model.backbone
    assert bb.type == 'mmpretrain.VisionTransformer' and bb.arch == 'dinov2-small'
    assert bb.patch_size == 14 and bb.out_type == 'featmap'
    assert bb.init_cfg.type == 'Pretrained' and bb.init_cfg.checkpoint == published_dinov2_small()
    assert all(s % 14 == 0 for s in cfg.crop_size)
    head = model.decode_head
    assert (head.type, head.in_channels, head.channels, head.num_classes) == (
        'GRPORMSegHead', 384, 64, 21)
    # the objective chosen by benchmarks/seg_ablation.py on its selection split
    assert head.loss_decode == dict(type='GRPORMLoss', group_weighting='pi_old',
                                    surrogate='dual_clip', clip_eps=0.2, beta=0.0)
    assert cfg.optim_wrapper.inner_steps == 4
    assert cfg.train_dataloader.batch_size * cfg.num_gpus == 256 == cfg.total_batch_size
    assert cfg.auto_scale_lr.base_batch_size == 256
    assert cfg.optim_wrapper.optimizer.type == 'Adam'
    assert cfg.optim_wrapper.type == 'GRPOOptimWrapper'
    assert cfg.val_evaluator.type == cfg.test_evaluator.type == 'IoUMetric'
    assert set(cfg.custom_imports.imports) == {'grpo_rm_mm', 'mmpretrain.models'}


def test_cross_entropy_baseline_differs_only_in_the_loss(cfg: Config) -> None:
    ce = Config.fromfile(str(CE_CFG))
    a, b = cfg.to_dict(), ce.to_dict()
    assert b['model']['decode_head'].pop('loss_decode')['type'] == 'CrossEntropyLoss'
    a['model']['decode_head'].pop('loss_decode')
    # inner steps are GRPO-RM's (pi_old is fixed per batch; the schedule base
    # configs/_base_/schedules/grpo_rm_seg_2k.py); CE takes one step per batch
    assert (a['optim_wrapper'].pop('inner_steps'), b['optim_wrapper'].pop('inner_steps')) == (4, 1)
    assert a == b


@pytest.mark.parametrize('with_aug', [False, True])
def test_training_set_does_not_depend_on_the_files_present(
        with_aug: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No data-dependent branch when a config is read: grpo_rm_voc.py always trains on the VOC
    train set, grpo_rm_voc_aug.py always on mmseg's ConcatDataset of train + SBD aug, whatever
    the working directory holds."""
    voc = tmp_path / 'data' / 'VOCdevkit' / 'VOC2012'
    (voc / 'SegmentationClass').mkdir(parents=True)
    if with_aug:
        (voc / 'SegmentationClassAug').mkdir()
    monkeypatch.chdir(tmp_path)  # data_root is relative to the working directory
    plain = Config.fromfile(str(GRPO_CFG)).train_dataloader.dataset
    assert plain.type == 'CheckedPascalVOCDataset'
    assert plain.data_prefix.seg_map_path == 'SegmentationClass'
    assert plain.ann_file == 'ImageSets/Segmentation/train.txt'
    aug = Config.fromfile(str(AUG_CFG)).train_dataloader.dataset
    assert aug.type == 'ConcatDataset'
    parts = [(d.type, d.data_prefix.seg_map_path, d.ann_file) for d in aug.datasets]
    assert parts == [
        ('CheckedPascalVOCDataset', 'SegmentationClass', 'ImageSets/Segmentation/train.txt'),
        ('CheckedPascalVOCDataset', 'SegmentationClassAug', 'ImageSets/Segmentation/aug.txt')]


@pytest.mark.parametrize('loss', ['grpo_rm', 'ce'])
def test_aug_configs_differ_only_in_the_training_set(loss: str) -> None:
    """configs/{grpo_rm,ce}_voc_aug.py are mmseg's pascal_voc12_aug.py base + the same model,
    pipelines and schedule as configs/{grpo_rm,ce}_voc.py."""
    plain = Config.fromfile(str(REPO / 'configs' / f'{loss}_voc.py')).to_dict()
    aug = Config.fromfile(str(REPO / 'configs' / f'{loss}_voc_aug.py')).to_dict()
    concat = aug['train_dataloader'].pop('dataset')
    for part in concat['datasets']:
        assert part['pipeline'] == plain['train_pipeline']
        assert part['data_root'] == plain['data_root']
    train = plain['train_dataloader'].pop('dataset')
    assert train['pipeline'] == plain['train_pipeline']
    # the aug base's own variables (dataset_train / dataset_aug) are the only other keys
    assert set(aug) - set(plain) == {'dataset_train', 'dataset_aug'}
    assert {k: v for k, v in aug.items() if k in plain} == plain


def test_dinov2_model_runs_with_random_weights(cfg: Config) -> None:
    init_default_scope('mmseg')
    model_cfg = cfg.model.copy()
    model_cfg.backbone.init_cfg = None  # random weights: no download in tests
    model_cfg.data_preprocessor.size = (56, 56)  # 4 x 4 patches keep it fast on a CPU
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    vit = model.backbone
    assert len(vit.layers) == 12 and vit.embed_dims == 384
    assert not any(p.requires_grad for p in vit.parameters())
    model.train()
    imgs = [torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8) for _ in range(2)]
    data_samples = []
    for _ in imgs:
        s = SegDataSample(metainfo=dict(img_shape=(56, 56), ori_shape=(56, 56)))
        labels = torch.randint(0, 21, (1, 56, 56))
        labels[:, :, :3] = 255
        s.gt_sem_seg = PixelData(data=labels)
        data_samples.append(s)
    data = model.data_preprocessor(dict(inputs=imgs, data_samples=data_samples), True)
    assert model.extract_feat(data['inputs'])[0].shape == (2, 384, 4, 4)
    losses = model(**data, mode='loss')
    assert torch.isfinite(losses['decode.loss_grpo'])
    losses['decode.loss_grpo'].backward()
    assert all(p.grad is None for p in vit.parameters())
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0

    model.eval()  # whole-image test: 50 x 65 is padded to whole patches, then cropped back
    sample = SegDataSample(metainfo=dict(img_shape=(50, 65), ori_shape=(50, 65)))
    data = model.data_preprocessor(dict(
        inputs=[torch.randint(0, 256, (3, 50, 65), dtype=torch.uint8)],
        data_samples=[sample]), False)
    assert data['inputs'].shape[-2:] == (56, 70)
    with torch.no_grad():
        pred = model(**data, mode='predict')
    assert pred[0].pred_sem_seg.shape == (50, 65)

