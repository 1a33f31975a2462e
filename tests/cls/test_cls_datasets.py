"""Tiny-ImageNet folders, Tiny-ImageNet-C-style folders, .npy OOD sets and long-tailed subsets."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from mmpretrain.registry import DATASETS

import grpo_rm_mm  # noqa: F401  (registers the datasets)
from grpo_rm_mm.datasets.long_tail import LongTailDataset, long_tail_counts
from grpo_rm_mm.testing import (
    balanced_labels,
    colour_images,
    make_cifar10,
    make_tiny_imagenet,
    write_tiny_imagenet,
)

# deliberately not in alphabetical order: labels must follow wnids.txt
WNIDS = ['n09999999', 'n01443537', 'n05555555']


@pytest.fixture(scope='module')
def tin_root(tmp_path_factory) -> Path:
    ytr, yva = balanced_labels(12, 3, 0), balanced_labels(6, 3, 1)
    return write_tiny_imagenet(tmp_path_factory.mktemp('tin'), WNIDS,
                               (colour_images(ytr, 16, 3, 0), ytr),
                               (colour_images(yva, 16, 3, 1), yva))


def build(cfg: dict):
    return DATASETS.build(cfg)


class TestTinyImageNet:

    def test_train_split_labels_follow_wnids(self, tin_root: Path) -> None:
        ds = build(dict(type='TinyImageNet', data_root=str(tin_root), split='train'))
        assert ds.metainfo['classes'] == tuple(WNIDS)
        assert len(ds) == 12
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            # train/<wnid>/images/<file>: the folder names the class
            assert Path(info['img_path']).parts[-3] == WNIDS[info['gt_label']]
        assert np.bincount(ds.get_gt_labels(), minlength=3).tolist() == [4, 4, 4]

    def test_val_split_labels_follow_annotations(self, tin_root: Path) -> None:
        ds = build(dict(type='TinyImageNet', data_root=str(tin_root), split='val',
                        pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]))
        ann = {line.split('\t')[0]: line.split('\t')[1]
               for line in (tin_root / 'val' / 'val_annotations.txt').read_text().splitlines()}
        assert len(ds) == len(ann) == 6
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            assert WNIDS[info['gt_label']] == ann[Path(info['img_path']).name]
        item = ds[0]
        assert tuple(item['inputs'].shape) == (3, 16, 16)
        assert int(item['data_samples'].gt_label) == ds.get_data_info(0)['gt_label']

    def test_missing_root(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match='tiny-imagenet-200'):
            build(dict(type='TinyImageNet', data_root=str(tmp_path / 'nope')))

    def test_bad_split(self, tin_root: Path) -> None:
        with pytest.raises(ValueError, match="split='test'"):
            build(dict(type='TinyImageNet', data_root=str(tin_root), split='test'))

    def test_empty_class_named(self, tin_root: Path, tmp_path: Path) -> None:
        root = shutil.copytree(tin_root, tmp_path / 'tin')
        for f in (root / 'train' / WNIDS[1] / 'images').iterdir():
            f.unlink()
        with pytest.raises(ValueError, match=f"{WNIDS[1]}.*no images"):
            build(dict(type='TinyImageNet', data_root=str(root), split='train'))

    def test_unknown_wnid_in_val_annotations(self, tin_root: Path, tmp_path: Path) -> None:
        root = shutil.copytree(tin_root, tmp_path / 'tin')
        ann = root / 'val' / 'val_annotations.txt'
        ann.write_text(ann.read_text().replace(WNIDS[0], 'n00000001', 1))
        with pytest.raises(ValueError, match="'n00000001' is not in wnids.txt"):
            build(dict(type='TinyImageNet', data_root=str(root), split='val'))

    def test_wnid_folder_dataset_keeps_the_models_label_order(self, tin_root: Path,
                                                              tmp_path: Path) -> None:
        # Tiny-ImageNet-C layout: <corruption>/<severity>/<wnid>/*.JPEG, no wnids.txt
        corrupted = tmp_path / 'fog' / '5'
        for wnid in WNIDS:
            shutil.copytree(tin_root / 'train' / wnid / 'images', corrupted / wnid)
        ds = build(dict(type='WnidFolderDataset', data_root=str(corrupted),
                        wnids_file=str(tin_root / 'wnids.txt')))
        assert len(ds) == 12
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            assert Path(info['img_path']).parent.name == WNIDS[info['gt_label']]
        shutil.rmtree(corrupted / WNIDS[2])
        with pytest.raises(ValueError, match=WNIDS[2]):
            build(dict(type='WnidFolderDataset', data_root=str(corrupted),
                       wnids_file=str(tin_root / 'wnids.txt')))


def test_npy_image_dataset_rows(tmp_path: Path) -> None:
    labels = np.arange(30) % 10
    imgs = colour_images(labels, 32, 10, seed=0)
    np.save(tmp_path / 'fog.npy', imgs)
    np.save(tmp_path / 'labels.npy', labels)
    ds = build(dict(type='NpyImageDataset', data_root=str(tmp_path), data_file='fog.npy',
                    label_file='labels.npy', rows=(10, 20)))
    assert len(ds) == 10
    for i in range(10):
        info = ds.get_data_info(i)
        np.testing.assert_array_equal(info['img'], imgs[10 + i])
        assert info['gt_label'] == labels[10 + i]
    with pytest.raises(ValueError, match='rows'):
        build(dict(type='NpyImageDataset', data_root=str(tmp_path), data_file='fog.npy',
                   label_file='labels.npy', rows=(20, 40)))
    with pytest.raises(FileNotFoundError, match='snow.npy'):
        build(dict(type='NpyImageDataset', data_root=str(tmp_path), data_file='snow.npy',
                   label_file='labels.npy'))


class TestLongTail:

    def test_published_cifar10_lt_counts(self) -> None:
        # CIFAR-10-LT, imbalance 100 (Cao et al. 2019, LDAM-DRW): 12406 training images
        counts = long_tail_counts(5000, 10, 100)
        assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
        assert sum(counts) == 12406
        assert long_tail_counts(500, 100, 100)[-1] == 5 and long_tail_counts(
            500, 100, 100)[0] == 500  # CIFAR-100-LT ends
        assert long_tail_counts(100, 4, 10, 'step') == [100, 100, 10, 10]

    @pytest.fixture(scope='class')
    def cifar(self, tmp_path_factory):
        root = make_cifar10(tmp_path_factory.mktemp('cifar'), n_train=600, n_test=10)
        return dict(type='LocalCIFAR10', data_root=str(root), split='train', verify_md5=False,
                    pipeline=[dict(type='PackInputs')])

    def test_exact_class_counts_from_a_seed(self, cifar: dict) -> None:
        base = build(cifar)
        ds = LongTailDataset(cifar, imbalance_ratio=10, seed=3)
        # 60 per class, ratio 10: floor(60 * 10 ** (-c / 9)), written out independently
        expected = [math.floor(60 * 10 ** (-c / 9) + 1e-9) for c in range(10)]
        assert expected[0] == 60 and expected[-1] == 6
        assert ds.class_counts == expected
        labels = np.array([int(ds[i]['data_samples'].gt_label) for i in range(len(ds))])
        assert np.bincount(labels, minlength=10).tolist() == expected
        assert len(set(ds.indices.tolist())) == len(ds) == sum(expected)
        base_labels = base.get_gt_labels()
        for i in (0, 7, len(ds) - 1):  # each item is the wrapped dataset's item
            j = int(ds.indices[i])
            np.testing.assert_array_equal(ds.get_data_info(i)['img'],
                                          base.get_data_info(j)['img'])
            assert ds.get_cat_ids(i) == [int(base_labels[j])]
        again = LongTailDataset(cifar, imbalance_ratio=10, seed=3)
        other = LongTailDataset(cifar, imbalance_ratio=10, seed=4)
        np.testing.assert_array_equal(ds.indices, again.indices)
        assert not np.array_equal(ds.indices, other.indices)
        assert ds.metainfo['classes'] == base.metainfo['classes']

    def test_explicit_counts_and_dataloader_build(self, cifar: dict) -> None:
        counts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        ds = build(dict(type='LongTailDataset', dataset=cifar, class_counts=counts, seed=0))
        assert np.bincount(ds.get_gt_labels(), minlength=10).tolist() == counts

    def test_bad_input(self, cifar: dict) -> None:
        with pytest.raises(ValueError, match='imbalance_ratio=0.5'):
            LongTailDataset(cifar, imbalance_ratio=0.5)
        with pytest.raises(ValueError, match='no sample in the tail'):
            LongTailDataset(cifar, imbalance_ratio=1000)
        with pytest.raises(ValueError, match='needs 61 samples but has 60'):
            LongTailDataset(cifar, class_counts=[61] + [1] * 9)
        with pytest.raises(ValueError, match='class_counts has 3 entries'):
            LongTailDataset(cifar, class_counts=[1, 2, 3])

    def test_empty_class_named(self, tmp_path: Path) -> None:
        y = np.arange(40) % 9  # class 9 ('truck') never occurs
        from grpo_rm_mm.testing import write_cifar10
        write_cifar10(tmp_path, (colour_images(y, 32, 10), y), (colour_images(y, 32, 10), y))
        with pytest.raises(ValueError, match="'truck'.*no samples"):
            LongTailDataset(dict(type='LocalCIFAR10', data_root=str(tmp_path), split='train',
                                 verify_md5=False), imbalance_ratio=2)


def test_make_tiny_imagenet_is_read_back(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path, num_classes=4, n_train=20, n_val=8, size=16)
    train = build(dict(type='TinyImageNet', data_root=str(root), split='train'))
    val = build(dict(type='TinyImageNet', data_root=str(root), split='val'))
    assert (len(train), len(val)) == (20, 8)
    assert len(train.metainfo['classes']) == 4
