"""The Fashion-VOC converter: Fashion-MNIST items on canvases, written as a Pascal VOC folder that
the checked VOC-format dataset reads, and a short GRPO-RM training run on it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from mmengine.registry import DefaultScope
from PIL import Image

from grpo_rm_mm.datasets.voc import CheckedPascalVOCDataset, VOCFormatDataset
from grpo_rm_mm.testing.formats import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    read_idx,
)
from tools.dataset_converters.fashion_mnist import find_fashion_mnist_gz, prepare_fashion_mnist
from tools.dataset_converters.fashion_voc import (
    FASHION_VOC_CLASSES,
    MASK_THRESHOLD,
    composite,
    prepare_fashion_voc,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / 'configs' / 'demo' / 'fashion_voc_grpo_rm.py'


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist_gz()
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _has_fashion_mnist(),
    reason='Debian package dataset-fashion-mnist is not installed '
    '(apt-get install dataset-fashion-mnist); CI installs it')


@pytest.fixture(scope='module')
def fashion_root(tmp_path_factory) -> Path:
    return prepare_fashion_mnist(tmp_path_factory.mktemp('fmnist'))


@pytest.fixture(scope='module')
def voc(fashion_root, tmp_path_factory) -> Path:
    return prepare_fashion_voc(tmp_path_factory.mktemp('fv') / 'fashion_voc', fashion_root,
                               n_train=16, n_val=8, seed=0)


def _names(voc: Path, split: str) -> list[str]:
    return (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()


def _mask(voc: Path, name: str) -> np.ndarray:
    return np.array(Image.open(voc / 'SegmentationClass' / f'{name}.png'))


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels outside ``mask`` with a mask pixel among their 8 neighbours (numpy only)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + h, dx:dx + w]
    return grown & ~mask


def test_mmseg_voc_dataset_reads_the_folder(voc) -> None:
    assert voc.parts[-2:] == ('VOCdevkit', 'VOC2012')
    assert issubclass(VOCFormatDataset, CheckedPascalVOCDataset)
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')]
    for split, n in (('train', 16), ('val', 8)):
        with DefaultScope.overwrite_default_scope('mmseg'):  # mmseg's LoadAnnotations
            ds = VOCFormatDataset(
                data_root=str(voc), ann_file=f'ImageSets/Segmentation/{split}.txt',
                metainfo=dict(classes=FASHION_VOC_CLASSES),
                data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
                pipeline=pipeline)
        assert len(ds) == n
        assert tuple(ds.metainfo['classes']) == FASHION_VOC_CLASSES
        assert len(ds.metainfo['palette']) == 11
        values = set()
        for i in range(n):
            item = ds[i]  # includes CheckSegAnnotation: labels 0..10 or 255, sizes agree
            assert item['img'].shape == (64, 64, 3)
            assert item['gt_seg_map'].shape == (64, 64)
            values |= set(np.unique(item['gt_seg_map']).tolist())
        assert values <= set(range(11)) | {255}
        assert 0 in values and 255 in values and len(values - {0, 255}) >= 2
    assert not set(_names(voc, 'train')) & set(_names(voc, 'val'))


def test_masks_are_the_source_items_pixels(fashion_root, tmp_path) -> None:
    """One item per canvas: the mask is re-derived here from the Fashion-MNIST source image."""
    voc = prepare_fashion_voc(tmp_path / 'one', fashion_root, n_train=6, n_val=6,
                              items=(1, 1), seed=3)
    records = json.loads((tmp_path / 'one' / 'items.json').read_text())
    sources = {'train': read_idx(fashion_root / TRAIN_IMAGES),
               'val': read_idx(fashion_root / TEST_IMAGES)}
    labels = {'train': read_idx(fashion_root / TRAIN_LABELS),
              'val': read_idx(fashion_root / TEST_LABELS)}
    for split in ('train', 'val'):
        for name, (rec, ) in zip(_names(voc, split), records[split]):
            src = sources[split][rec['source_index']]
            assert rec['label'] == int(labels[split][rec['source_index']]) + 1
            s, y, x = rec['size'], rec['y'], rec['x']
            assert 28 <= s <= 42 and 0 <= y <= 64 - s and 0 <= x <= 64 - s
            grey = cv2.resize(src, (s, s), interpolation=cv2.INTER_LINEAR)
            item = np.zeros((64, 64), bool)
            item[y:y + s, x:x + s] = grey > MASK_THRESHOLD
            expected = np.zeros((64, 64), np.uint8)
            expected[_ring(item)] = 255
            expected[item] = rec['label']
            np.testing.assert_array_equal(_mask(voc, name), expected)
            # the image shows the tinted item on its mask (JPEG: approximately)
            img = np.array(Image.open(voc / 'JPEGImages' / f'{name}.jpg')).astype(float)
            canvas_grey = np.zeros((64, 64))
            canvas_grey[y:y + s, x:x + s] = grey
            want = canvas_grey[item][:, None] / 255 * np.array(rec['color'], float)
            assert np.abs(img[item] - want).mean() < 15


def test_composite_known_place_and_occlusion() -> None:
    bg = np.full((64, 64, 3), 100, np.uint8)
    square = np.zeros((28, 28), np.uint8)
    square[4:14, 6:20] = 200  # a 10 x 14 block
    image, labels = composite(bg, [dict(image=square, label=3, size=28, y=10, x=20,
                                        color=(255, 0, 0))])
    expected = np.zeros((64, 64), np.uint8)
    expected[13:25, 25:41] = 255  # the 1-px ring
    expected[14:24, 26:40] = 3
    np.testing.assert_array_equal(labels, expected)
    assert (image[14:24, 26:40] == (200, 0, 0)).all()
    assert (image[labels != 3] == 100).all()
    # a second item on top: its pixels and ring replace the first item's
    second = np.zeros((28, 28), np.uint8)
    second[0:10, 0:10] = 255
    image, labels = composite(bg, [
        dict(image=square, label=3, size=28, y=10, x=20, color=(255, 0, 0)),
        dict(image=second, label=7, size=28, y=20, x=30, color=(0, 255, 0))])
    assert (labels[20:30, 30:40] == 7).all() and (image[20:30, 30:40] == (0, 255, 0)).all()
    assert (labels[19, 29:41] == 255).all() and (labels[20:24, 29] == 255).all()
    assert (labels[14:19, 26:40] == 3).all() and (labels[19:24, 26:29] == 3).all()
    with pytest.raises(ValueError, match='does not fit'):
        composite(bg, [dict(image=square, label=1, size=42, y=30, x=0, color=(1, 1, 1))])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


def test_deterministic_and_idempotent(fashion_root, voc, tmp_path) -> None:
    again = prepare_fashion_voc(tmp_path / 'fashion_voc', fashion_root, n_train=16, n_val=8,
                                seed=0)
    assert _files(again) == _files(voc)
    other = prepare_fashion_voc(tmp_path / 'seed1', fashion_root, n_train=16, n_val=8, seed=1)
    assert _files(other) != _files(voc)
    # same parameters: kept as is; other parameters: rewritten, nothing stale left
    png = again / 'SegmentationClass' / '2007_000000.png'
    before = png.stat().st_mtime_ns
    prepare_fashion_voc(tmp_path / 'fashion_voc', fashion_root, n_train=16, n_val=8, seed=0)
    assert png.stat().st_mtime_ns == before
    prepare_fashion_voc(tmp_path / 'fashion_voc', fashion_root, n_train=4, n_val=2, seed=0)
    assert len(list((again / 'JPEGImages').iterdir())) == 6
    assert len(_names(again, 'train')) == 4 and len(_names(again, 'val')) == 2


def test_short_grpo_rm_training_beats_background_only(fashion_root, run_tool, tmp_path) -> None:
    demo = tmp_path / 'demo'
    voc = prepare_fashion_voc(demo / 'fashion_voc', fashion_root, n_train=64, n_val=16, seed=0)
    run_tool('model_converters/efficientnet_lite0_to_mmpretrain.py',
             demo / 'pretrained' / 'efficientnet_lite0.pth')
    iters = 40
    proc = run_tool('train.py', CONFIG, '--work-dir', tmp_path / 'work', '--cfg-options',
                    f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
                    f'param_scheduler.0.end={iters}', f'default_hooks.checkpoint.interval={iters}',
                    'train_dataloader.batch_size=16', GRPO_RM_DEMO_DATA=str(demo))
    out = proc.stdout + proc.stderr
    found = re.findall(r'Iter\(val\) \[\d+/\d+\]\s+aAcc: ([\d.]+)\s+mIoU: ([\d.]+)', out)
    assert found, out[-3000:]
    a_acc, miou = map(float, found[-1])
    # predicting background everywhere: IoU = background share for class 0, 0 for each other
    # class present in the val masks (mmseg's mIoU averages over the classes present)
    masks = np.stack([_mask(voc, n) for n in _names(voc, 'val')])
    labelled = masks[masks != 255]
    bg_share = 100 * float((labelled == 0).mean())
    bg_only_miou = bg_share / len(np.unique(labelled))
    assert miou > bg_only_miou + 2, (miou, bg_only_miou)
    assert a_acc > bg_share, (a_acc, bg_share)
    assert (tmp_path / 'work' / f'iter_{iters}.pth').is_file()
