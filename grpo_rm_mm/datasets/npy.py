"""``NpyImageDataset``: an image classification set stored as ``.npy`` arrays."""
from __future__ import annotations

import os.path as osp
from collections.abc import Sequence

import numpy as np
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS

__all__ = ['NpyImageDataset']


@DATASETS.register_module()
class NpyImageDataset(BaseDataset):
    """Images and labels stored as ``.npy`` arrays, e.g. CIFAR-10.1 (``cifar10.1_v6_data.npy``,
    ``cifar10.1_v6_labels.npy``) or one corruption of CIFAR-10-C (``fog.npy``, ``labels.npy``;
    severities 1..5 are consecutive blocks of 10000 rows).

    Args:
        data_root: folder of the arrays.
        data_file: (N, H, W, 3) uint8 RGB array file, relative to ``data_root``.
        label_file: (N,) integer label array file.
        rows: optional ``(start, stop)`` row range, e.g. ``(40000, 50000)`` for severity 5.
        **kwargs: passed to mmpretrain's ``BaseDataset`` (``pipeline``, ``classes``, ...).

    Items carry ``img`` (RGB arrays, as mmpretrain's CIFAR10 gives them; its configs keep
    ``to_rgb=False``) and ``gt_label``.
    """

    def __init__(self, data_root: str, data_file: str, label_file: str,
                 rows: Sequence[int] | None = None, **kwargs) -> None:
        self.data_file, self.label_file = data_file, label_file
        self.rows = tuple(rows) if rows is not None else None
        if not data_root or not osp.isdir(data_root):
            raise FileNotFoundError(f'NpyImageDataset: data_root {data_root!r} is not a folder; '
                                    f'extract the data set there')
        super().__init__(ann_file='', data_root=data_root, **kwargs)

    def load_data_list(self) -> list[dict]:
        paths = [osp.join(self.data_root, f) for f in (self.data_file, self.label_file)]
        for path in paths:
            if not osp.isfile(path):
                raise FileNotFoundError(f'NpyImageDataset: {path!r} does not exist')
        imgs = np.load(paths[0], mmap_mode='r')
        labels = np.load(paths[1]).reshape(-1)
        if imgs.ndim != 4 or imgs.shape[-1] != 3 or len(imgs) != len(labels):
            raise ValueError(f'NpyImageDataset: expected (N, H, W, 3) images and (N,) labels, '
                             f'got {imgs.shape} and {labels.shape}')
        start, stop = self.rows if self.rows is not None else (0, len(labels))
        if not 0 <= start < stop <= len(labels):
            raise ValueError(f'NpyImageDataset: rows={self.rows} outside [0, {len(labels)}]')
        classes = self.metainfo.get('classes')
        if classes is not None and labels[start:stop].max() >= len(classes):
            raise ValueError(f'NpyImageDataset: label {labels[start:stop].max()} but only '
                             f'{len(classes)} classes')
        rgb = np.ascontiguousarray(imgs[start:stop])
        return [dict(img=img, gt_label=int(y)) for img, y in zip(rgb, labels[start:stop])]
