"""Class counts of a classification dataset: the prior of a logit adjustment."""
from __future__ import annotations

import numpy as np

__all__ = ['dataset_class_counts']


def dataset_class_counts(dataset, num_classes: int | None = None) -> list[int]:
    """``[n_0, ..., n_{C-1}]``: how many samples of each class ``dataset`` holds.

    Labels come from ``get_gt_labels()`` (mmpretrain datasets, ``LongTailDataset``) or, for
    wrappers without it (``ConcatDataset``, ``RepeatDataset``, ...), ``get_cat_ids(i)``. C is
    ``num_classes``, else the length of ``metainfo['classes']``, else the largest label + 1, so
    a class without samples still gets its 0.
    """
    if hasattr(dataset, 'get_gt_labels'):
        labels = np.asarray(dataset.get_gt_labels(), dtype=np.int64).reshape(-1)
    elif hasattr(dataset, 'get_cat_ids'):
        cats = [dataset.get_cat_ids(i) for i in range(len(dataset))]
        if any(len(c) != 1 for c in cats):
            raise ValueError(f'{type(dataset).__name__}: class counts need exactly one label '
                             f'per sample (a classification dataset)')
        labels = np.asarray([c[0] for c in cats], dtype=np.int64)
    else:
        raise ValueError(f'{type(dataset).__name__} gives no labels (neither get_gt_labels() nor '
                         f'get_cat_ids(i)); count the classes yourself and call '
                         f'set_class_counts(counts) on the loss')
    if num_classes is None:
        classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
        num_classes = len(classes) if classes else int(labels.max(initial=-1)) + 1
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'{type(dataset).__name__}: labels span [{labels.min()}, '
                         f'{labels.max()}] but the dataset has {num_classes} classes')
    return np.bincount(labels, minlength=num_classes).tolist()
