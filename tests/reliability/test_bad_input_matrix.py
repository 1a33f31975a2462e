"""The bad-input matrix, in one place: every case raises an error whose message names
the bad value (or file) and the fix; the runner-level cases leave no checkpoint or prediction
file behind.

Cases also covered in depth elsewhere (this matrix calls the same code briefly):
tests/core/test_objective.py, tests/models/test_grpo_loss.py (loss inputs, eps, beta, rewards),
tests/engine/test_optim_wrapper.py (inner_steps), tests/cls/test_cls_datasets.py and
tests/cls/test_cls_train_misc.py (missing root, empty class, num_classes), tests/seg/
test_seg_checks.py (VOC labels, sizes, split files), tests/test_compat.py (pickled payload).
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from reliability_common import TEST, TRAIN, cls_config, env_for, output, run, write_cifar

from grpo_rm_mm.engine.guards import check_checkpoint_file, check_state_dict_shapes
from grpo_rm_mm.engine.optim_wrappers import GRPOOptimWrapper
from grpo_rm_mm.models.losses import GRPORMLoss
from grpo_rm_mm.testing import make_cifar10, make_voc2012


class _Payload:
    """Unpickling this creates ``marker`` (i.e. runs code from the checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


# ---------------------------------------------------------------------------- builders
def _cls_head():
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    return MODELS.build(dict(type='GRPORMClsHead', num_classes=10, in_channels=8,
                             hidden_channels=4))


def _cls_samples(labels: list[int]):
    from mmpretrain.structures import DataSample
    return [DataSample().set_gt_label(y) for y in labels]


def _seg_loss(label_value: int) -> None:
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    head = MODELS.build(dict(type='GRPORMSegHead', in_channels=8, channels=4, num_classes=5))
    samples = []
    for i in range(2):
        s = SegDataSample(metainfo=dict(seg_map_path=f'mask_{i}.png', img_shape=(8, 8)))
        s.gt_sem_seg = PixelData(data=torch.full((1, 8, 8), label_value))
        samples.append(s)
    head.loss([torch.randn(2, 8, 4, 4)], samples, dict())


def _voc_dataset(root: Path, pipeline: list | None = None):
    init_default_scope('mmseg')
    from mmseg.registry import DATASETS
    return DATASETS.build(dict(
        type='CheckedPascalVOCDataset', data_root=str(root),
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/train.txt',
        pipeline=pipeline or [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                              dict(type='PackSegInputs')]))


def _cifar(root: Path, verify_md5: bool):
    init_default_scope('mmpretrain')
    from mmpretrain.registry import DATASETS
    return DATASETS.build(dict(type='LocalCIFAR10', data_root=str(root), split='train',
                               verify_md5=verify_md5, pipeline=[]))


@pytest.fixture(scope='module')
def clean_voc(tmp_path_factory) -> Path:
    return make_voc2012(tmp_path_factory.mktemp('voc'), n_train=3, n_val=2, size=32)


@pytest.fixture(scope='module')
def clean_cifar(tmp_path_factory) -> Path:
    return make_cifar10(tmp_path_factory.mktemp('cifar'), n_train=20, n_test=10)


@pytest.fixture
def voc(clean_voc: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_voc, tmp_path / 'VOC2012'))


@pytest.fixture
def cifar(clean_cifar: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_cifar, tmp_path / 'cifar'))


def _first_train_name(voc: Path) -> str:
    return (voc / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()[0]


def _truncate(path: Path, keep: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# ---------------------------------------------------------------------------- cases
def case_cls_label_out_of_range(ctx) -> None:
    _cls_head().loss((torch.randn(2, 8), ), _cls_samples([3, 12]))


def case_seg_label_out_of_range(ctx) -> None:
    _seg_loss(30)


def case_empty_split_file(ctx) -> None:
    (ctx['voc'] / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('')
    _voc_dataset(ctx['voc'])


def case_missing_voc_root(ctx) -> None:
    _voc_dataset(ctx['tmp'] / 'nonexistent' / 'VOC2012')


def case_missing_cifar_root(ctx) -> None:
    _cifar(ctx['tmp'] / 'nonexistent', verify_md5=False)


def case_corrupt_voc_jpeg(ctx) -> None:
    name = _first_train_name(ctx['voc'])
    _truncate(ctx['voc'] / 'JPEGImages' / f'{name}.jpg')
    _voc_dataset(ctx['voc'])[0]


def case_corrupt_cifar_pickle_md5(ctx) -> None:
    _truncate(ctx['cifar'] / 'cifar-10-batches-py' / 'data_batch_1')
    _cifar(ctx['cifar'], verify_md5=True)


def case_corrupt_cifar_pickle_no_md5(ctx) -> None:
    _truncate(ctx['cifar'] / 'cifar-10-batches-py' / 'data_batch_1')
    _cifar(ctx['cifar'], verify_md5=False)


def case_truncated_checkpoint(ctx) -> None:
    ckpt = ctx['tmp'] / 'epoch_3.pth'
    torch.save({'state_dict': {'w': torch.zeros(64, 64)}}, ckpt)
    _truncate(ckpt)
    check_checkpoint_file(str(ckpt))


def case_checkpoint_shape_mismatch(ctx) -> None:
    check_state_dict_shapes(torch.nn.Linear(4, 3), {'weight': torch.zeros(5, 4)},
                            source="checkpoint 'other.pth'")


def case_pickled_payload_checkpoint(ctx) -> None:
    ckpt = ctx['tmp'] / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _Payload(ctx['tmp'] / 'executed')}, ckpt)
    try:
        check_checkpoint_file(str(ckpt))
    finally:
        assert not (ctx['tmp'] / 'executed').exists(), 'the payload ran'


def case_unknown_reward(ctx) -> None:
    GRPORMLoss(rewards=[dict(type='NoSuchReward')])


def case_bad_reward_weight(ctx) -> None:
    GRPORMLoss(rewards=[dict(type='AccuracyReward', weight=-1.0)])


def case_non_finite_reward_weight(ctx) -> None:
    GRPORMLoss(rewards=[dict(type='UniformityReward', weight=float('inf'))])


def case_eps_zero(ctx) -> None:
    GRPORMLoss(clip_eps=0.0)


def case_eps_negative(ctx) -> None:
    GRPORMLoss(clip_eps=-0.2)


def case_inner_steps_zero(ctx) -> None:
    GRPOOptimWrapper(optimizer=torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                     inner_steps=0)


def case_beta_without_reference(ctx) -> None:
    z = torch.randn(3, 4)
    GRPORMLoss(beta=0.1)(z, torch.tensor([0, 1, 2]), old_logits=z)


def case_non_finite_logits(ctx) -> None:
    z = torch.randn(3, 4)
    z[1, 2] = float('nan')
    GRPORMLoss()(z, torch.tensor([0, 1, 2]))


# id -> (case, error type, patterns that must all be in the message: the value and the fix)
MATRIX: dict[str, tuple[Callable, type[BaseException], list[str]]] = {
    'labels out of range (cls)': (case_cls_label_out_of_range, ValueError, [
        r'label 12', r'num_classes=10', r'set model\.head\.num_classes']),
    'labels out of range (seg)': (case_seg_label_out_of_range, ValueError, [
        r'label values \[30\]', r'mask_0\.png', r'set decode_head\.num_classes']),
    'empty split file': (case_empty_split_file, ValueError, [
        r'train\.txt', r'is empty']),
    'missing data root (VOC)': (case_missing_voc_root, FileNotFoundError, [
        r'nonexistent/VOC2012', r'check data_root']),
    'missing data root (CIFAR)': (case_missing_cifar_root, FileNotFoundError, [
        r"no 'cifar-10-batches-py' folder", r'nonexistent', r'extract the python version']),
    'corrupt image file (VOC JPEG)': (case_corrupt_voc_jpeg, Exception, [
        r'failed to load image', r'JPEGImages/2007_\d+\.jpg']),
    'corrupt CIFAR pickle (verify_md5=True)': (case_corrupt_cifar_pickle_md5, RuntimeError, [
        r'cifar-10-batches-py', r'wrong md5 sums', r'data_batch_1']),
    'truncated checkpoint': (case_truncated_checkpoint, RuntimeError, [
        r'epoch_3\.pth', r'truncated or corrupt', r'use an earlier checkpoint']),
    'checkpoint shapes differ from the model': (case_checkpoint_shape_mismatch, ValueError, [
        r'other\.pth', r'weight: \(5, 4\) in the file vs \(3, 4\) in the model',
        r'use the matching config']),
    'checkpoint with a pickled payload': (case_pickled_payload_checkpoint, RuntimeError, [
        r'evil\.pth', r'Weights only load failed|Unsupported global']),
    'unknown reward name': (case_unknown_reward, ValueError, [
        r"unknown reward type 'NoSuchReward'", r'AccuracyReward', r'register']),
    'negative reward weight': (case_bad_reward_weight, ValueError, [
        r'weight=-1\.0', r'finite float >= 0']),
    'non-finite reward weight': (case_non_finite_reward_weight, ValueError, [
        r'weight=inf', r'finite float >= 0']),
    'eps = 0': (case_eps_zero, ValueError, [r'clip_eps=0\.0', r'> 0']),
    'eps < 0': (case_eps_negative, ValueError, [r'clip_eps=-0\.2', r'> 0']),
    'inner_steps < 1': (case_inner_steps_zero, ValueError, [
        r'inner_steps=0', r'int >= 1']),
    'beta > 0 without a reference head': (case_beta_without_reference, ValueError, [
        r'beta=0\.1 > 0 needs ref_logits', r'set beta=0']),
    'non-finite logits': (case_non_finite_logits, ValueError, [r'non-finite']),
}


@pytest.mark.parametrize('name', list(MATRIX))
def test_bad_input(name: str, voc: Path, cifar: Path, tmp_path: Path) -> None:
    case, error, patterns = MATRIX[name]
    with pytest.raises(error) as info:
        case(dict(voc=voc, cifar=cifar, tmp=tmp_path))
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f'{pattern!r} not in: {message}'


def test_corrupt_cifar_pickle_without_md5_names_the_file(cifar: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        case_corrupt_cifar_pickle_no_md5(dict(cifar=cifar, tmp=tmp_path))
    assert 'data_batch_1' in str(info.value) and 'extract' in str(info.value)


# ---------------------------------------------------------------------------- runner level
@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """A 1-epoch GRPO-RM run: (config, data env, work dir with epoch_1.pth)."""
    root = tmp_path_factory.mktemp('runner')
    data = write_cifar(root)
    cfg = cls_config(root / 'cfg.py', max_epochs=1)
    proc = run(TRAIN, cfg, '--work-dir', root / 'w', env=env_for(data))
    assert proc.returncode == 0, output(proc)[-4000:]
    return cfg, data, root / 'w'


def _no_output(work: Path, *files: Path) -> None:
    assert not list(work.glob('*.pth')), sorted(work.glob('*.pth'))
    for f in files:
        assert not f.exists(), f


def test_test_tool_refuses_a_truncated_checkpoint(trained, tmp_path: Path) -> None:
    cfg, data, work = trained
    bad = tmp_path / 'epoch_1.pth'
    shutil.copy(work / 'epoch_1.pth', bad)
    _truncate(bad, 0.5)
    pred = tmp_path / 'pred.pkl'
    proc = run(TEST, cfg, bad, '--work-dir', tmp_path / 't', '--out', pred, env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert f"RuntimeError: checkpoint '{bad}'" in log and 'truncated or corrupt' in log, \
        log[-3000:]
    _no_output(tmp_path / 't', pred)


def test_test_tool_refuses_a_checkpoint_of_another_shape(trained, tmp_path: Path) -> None:
    cfg, data, work = trained
    pred = tmp_path / 'pred.pkl'
    proc = run(TEST, cfg, work / 'epoch_1.pth', '--work-dir', tmp_path / 't', '--out', pred,
               '--cfg-options', 'model.head.hidden_channels=32', env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert f"ValueError: checkpoint '{work / 'epoch_1.pth'}' does not match the model" in log
    assert 'head.mlp.fc1.weight: (64, 32) in the file vs (32, 32) in the model' in log
    _no_output(tmp_path / 't', pred)


def test_resume_refuses_a_truncated_latest_checkpoint(trained, tmp_path: Path) -> None:
    """A run killed while saving leaves a truncated file behind; --resume names it."""
    cfg, data, work = trained
    copy = Path(shutil.copytree(work, tmp_path / 'w'))
    _truncate(copy / 'epoch_1.pth', 0.5)
    (copy / 'last_checkpoint').write_text(str(copy / 'epoch_1.pth'))
    proc = run(TRAIN, cfg, '--work-dir', copy, '--resume',
               '--cfg-options', 'train_cfg.max_epochs=2', env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert f"checkpoint '{copy / 'epoch_1.pth'}'" in log and 'truncated or corrupt' in log, \
        log[-3000:]
    assert not (copy / 'epoch_2.pth').exists()


def test_num_classes_mismatch_stops_before_any_checkpoint(trained, tmp_path: Path) -> None:
    cfg, data, _ = trained
    proc = run(TRAIN, cfg, '--work-dir', tmp_path / 'w', '--cfg-options',
               'model.head.num_classes=7', env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert 'model.head.num_classes=7 but the train dataset LocalCIFAR10 has 10 classes' in log
    _no_output(tmp_path / 'w')
