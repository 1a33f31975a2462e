"""Bad VOC input fails early with an error naming the file: labels above the classes that are not
255, a mask whose size differs from its image, an empty or missing split file."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS
from PIL import Image
from seg_common import TINY_CFG

import grpo_rm_mm  # noqa: F401  (registers the components)
from grpo_rm_mm.datasets.voc import save_voc_mask
from grpo_rm_mm.testing import make_voc2012

TRAIN_PIPELINE = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]
# mmseg's test order: the image is resized before the mask is loaded
TEST_PIPELINE = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(48, 48)),
                 dict(type='LoadAnnotations'), dict(type='PackSegInputs')]


@pytest.fixture(scope='module')
def clean_voc(tmp_path_factory) -> Path:
    return make_voc2012(tmp_path_factory.mktemp('voc'), n_train=3, n_val=2, size=32)


@pytest.fixture
def voc(clean_voc: Path, tmp_path: Path) -> Path:
    """A private copy that a test may break."""
    return Path(shutil.copytree(clean_voc, tmp_path / 'VOC2012'))


@pytest.fixture(autouse=True)
def mmseg_scope() -> None:
    init_default_scope('mmseg')


def dataset(root: Path, split: str = 'train', pipeline: list | None = None):
    return DATASETS.build(dict(
        type='CheckedPascalVOCDataset', data_root=str(root),
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file=f'ImageSets/Segmentation/{split}.txt', pipeline=pipeline or TRAIN_PIPELINE))


def names(root: Path, split: str = 'train') -> list[str]:
    return (root / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()


def test_clean_folder_loads_with_255_borders(voc: Path) -> None:
    ds = dataset(voc)
    assert len(ds) == 3
    for i in range(len(ds)):
        seg = ds[i]['data_samples'].gt_sem_seg.data
        assert 255 in seg and int(seg[seg != 255].max()) < 21
    assert [type(t).__name__ for t in ds.pipeline.transforms] == [
        'LoadImageFromFile', 'LoadAnnotations', 'CheckSegAnnotation', 'RandomFlip',
        'PackSegInputs']


@pytest.mark.parametrize('pipeline', [TRAIN_PIPELINE, TEST_PIPELINE], ids=['train', 'test'])
def test_label_above_the_classes_names_the_mask(voc: Path, pipeline: list) -> None:
    bad = names(voc)[1]
    path = voc / 'SegmentationClass' / f'{bad}.png'
    mask = np.array(Image.open(path))
    mask[5:7, 5:7] = 30  # not a VOC class (0..20) and not 255
    save_voc_mask(mask, path)
    ds = dataset(voc, pipeline=pipeline)
    ds[0]  # the other files are fine
    with pytest.raises(ValueError, match=r'label values \[30\]') as err:
        ds[1]
    assert str(path) in str(err.value) and '0..20' in str(err.value)


@pytest.mark.parametrize('pipeline', [TRAIN_PIPELINE, TEST_PIPELINE], ids=['train', 'test'])
def test_image_mask_size_mismatch_names_both_files(voc: Path, pipeline: list) -> None:
    bad = names(voc)[2]
    path = voc / 'SegmentationClass' / f'{bad}.png'
    save_voc_mask(np.zeros((20, 32), np.uint8), path)  # image is 32 x 32
    with pytest.raises(ValueError, match='mask size 32x20') as err:
        dataset(voc, pipeline=pipeline)[2]
    message = str(err.value)
    assert str(path) in message and str(voc / 'JPEGImages' / f'{bad}.jpg') in message


def test_empty_split_file_names_the_file(voc: Path) -> None:
    split = voc / 'ImageSets' / 'Segmentation' / 'train.txt'
    split.write_text('\n')
    with pytest.raises(ValueError, match='is empty') as err:
        dataset(voc)
    assert str(split) in str(err.value)


def test_missing_split_file_names_the_file(voc: Path) -> None:
    with pytest.raises(FileNotFoundError, match='does not exist') as err:
        dataset(voc, split='trainaug')
    assert str(voc / 'ImageSets' / 'Segmentation' / 'trainaug.txt') in str(err.value)


def test_trailing_blank_lines_are_not_images(voc: Path) -> None:
    split = voc / 'ImageSets' / 'Segmentation' / 'train.txt'
    split.write_text(split.read_text() + '\n\n')
    assert len(dataset(voc)) == 3


def test_train_tool_reports_the_bad_mask(run_tool, voc: Path, tmp_path: Path) -> None:
    """What a user sees: tools/train.py with the GRPO-RM config stops, naming the file."""
    bad = names(voc)[0]
    path = voc / 'SegmentationClass' / f'{bad}.png'
    mask = np.array(Image.open(path))
    mask[0, 0] = 99
    save_voc_mask(mask, path)
    proc = run_tool('train.py', TINY_CFG, '--work-dir', tmp_path / 'work', '--cfg-options',
                    'train_cfg.max_iters=2', 'train_dataloader.batch_size=3', check=False,
                    VOC_ROOT=str(voc))
    assert proc.returncode != 0
    assert 'label values [99]' in proc.stderr and str(path) in proc.stderr
