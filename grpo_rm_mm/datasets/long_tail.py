"""Long-tailed subsets of balanced classification datasets (e.g. CIFAR-10-LT)."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
from mmengine.dataset import BaseDataset
from mmpretrain.registry import DATASETS


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                     profile: str = 'exp') -> list[int]:
    """Per-class sample counts of a long-tailed split, head class first.

    ``exp`` (Cui et al. 2019, Cao et al. 2019): ``n_c = floor(n_max * ratio^(-c / (C - 1)))``;
    ``step``: the first ``floor(C / 2)`` classes keep ``n_max``, the rest ``floor(n_max / ratio)``.
    E.g. CIFAR-10, n_max 5000, ratio 100, exp: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
    """
    if num_classes < 1 or n_max < 1:
        raise ValueError(f'need num_classes >= 1 and n_max >= 1, got {num_classes}, {n_max}')
    if not imbalance_ratio >= 1:
        raise ValueError(f'imbalance_ratio={imbalance_ratio} must be >= 1 '
                         f'(count of the largest class / count of the smallest)')
    if profile == 'exp':
        if num_classes == 1:
            return [n_max]
        counts = [math.floor(n_max * imbalance_ratio ** (-c / (num_classes - 1)) + 1e-9)
                  for c in range(num_classes)]
    elif profile == 'step':
        tail = math.floor(n_max / imbalance_ratio + 1e-9)
        counts = [n_max if c < num_classes // 2 else tail for c in range(num_classes)]
    else:
        raise ValueError(f"profile={profile!r}: use 'exp' or 'step'")
    if min(counts) < 1:
        raise ValueError(f'imbalance_ratio={imbalance_ratio} leaves no sample in the tail class '
                         f'(largest class has {n_max}); use a ratio <= {n_max}')
    return counts


@DATASETS.register_module()
class LongTailDataset:
    """Deterministic long-tailed subset of a (balanced) classification dataset.

    Class ``c`` keeps ``counts[c]`` of its samples, drawn without replacement with
    ``numpy.random.default_rng(seed)``; the kept samples stay in their original order. Counts come
    from ``class_counts`` if given, else from :func:`long_tail_counts` with ``n_max`` = the
    smallest class size of the wrapped dataset (or ``max_per_class``).

    Args:
        dataset: the wrapped dataset (config or object); it must give labels through
            ``get_gt_labels()`` or ``get_cat_ids(i)`` and list its ``classes`` in ``metainfo``.
        imbalance_ratio: size of the largest class / size of the smallest (e.g. 100).
        profile: ``'exp'`` or ``'step'``.
        seed: seed of the subsampling.
        max_per_class: size of the head class (default: the smallest class size).
        class_counts: explicit per-class counts, in label order (overrides the ratio).

    Example::

        train_dataloader = dict(dataset=dict(
            type='LongTailDataset', imbalance_ratio=100, seed=0,
            dataset=dict(type='CIFAR10', data_root='data/cifar10', split='train', ...)))
    """

    def __init__(self, dataset: dict | BaseDataset, imbalance_ratio: float = 100.0,
                 profile: str = 'exp', seed: int = 0, max_per_class: int | None = None,
                 class_counts: Sequence[int] | None = None) -> None:
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.imbalance_ratio = imbalance_ratio
        self.profile = profile
        self.seed = seed
        labels = self._labels()
        if len(labels) == 0:
            raise ValueError(f'LongTailDataset: {type(self.dataset).__name__} is empty')
        classes = self.dataset.metainfo.get('classes')
        num_classes = len(classes) if classes else int(labels.max()) + 1
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f'labels of {type(self.dataset).__name__} span '
                             f'[{labels.min()}, {labels.max()}] but it has {num_classes} classes')
        available = np.bincount(labels, minlength=num_classes)
        empty = [self._name(c) for c in np.flatnonzero(available == 0)]
        if empty:
            raise ValueError(f'LongTailDataset: class(es) {empty[:10]} of '
                             f'{type(self.dataset).__name__} have no samples; a long-tailed '
                             f'subset needs every class present in the wrapped dataset')
        if class_counts is not None:
            counts = [int(n) for n in class_counts]
            if len(counts) != num_classes:
                raise ValueError(f'class_counts has {len(counts)} entries but the dataset has '
                                 f'{num_classes} classes')
        else:
            n_max = int(available.min()) if max_per_class is None else int(max_per_class)
            counts = long_tail_counts(n_max, num_classes, imbalance_ratio, profile)
        for c, (want, have) in enumerate(zip(counts, available)):
            if not 1 <= want <= have:
                raise ValueError(f'LongTailDataset: class {self._name(c)!r} needs {want} samples '
                                 f'but has {have}; counts must lie in [1, class size]')
        rng = np.random.default_rng(seed)
        keep = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
                for c, n in enumerate(counts)]
        self.indices = np.sort(np.concatenate(keep)).astype(np.int64)
        self.class_counts = counts
        self._labels_kept = labels[self.indices]

    def _labels(self) -> np.ndarray:
        if hasattr(self.dataset, 'get_gt_labels'):
            return np.asarray(self.dataset.get_gt_labels(), dtype=np.int64).reshape(-1)
        cats = [self.dataset.get_cat_ids(i) for i in range(len(self.dataset))]
        if any(len(c) != 1 for c in cats):
            raise ValueError('LongTailDataset needs exactly one label per sample')
        return np.asarray([c[0] for c in cats], dtype=np.int64)

    def _name(self, c: int) -> str:
        classes = self.dataset.metainfo.get('classes') or ()
        return str(classes[c]) if c < len(classes) else str(c)

    @property
    def metainfo(self) -> dict:
        meta = copy.deepcopy(self.dataset.metainfo)
        meta['long_tail_counts'] = tuple(self.class_counts)
        return meta

    def full_init(self) -> None:
        """Already initialised in ``__init__`` (the labels are needed to subsample)."""

    def get_gt_labels(self) -> np.ndarray:
        return self._labels_kept.copy()

    def get_cat_ids(self, idx: int) -> list[int]:
        return [int(self._labels_kept[idx])]

    def get_data_info(self, idx: int) -> dict:
        return self.dataset.get_data_info(int(self.indices[idx]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict:
        return self.dataset[int(self.indices[idx])]

    def __repr__(self) -> str:
        return (f'LongTailDataset({type(self.dataset).__name__}, ratio={self.imbalance_ratio}, '
                f'profile={self.profile!r}, seed={self.seed}, counts={self.class_counts})')
