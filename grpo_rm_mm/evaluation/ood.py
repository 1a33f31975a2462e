"""Out-of-distribution evaluation: one checkpoint, several test sets with the same label space.

Test sets come from the config's ``ood_test_sets`` (name -> dataset config; a set without a
``pipeline`` gets the one of ``test_dataloader``). ``tools/test_ood.py`` runs them all with one
model and prints one table: each set, the in-distribution test set, and the OOD average.
"""
from __future__ import annotations

import copy
import json
import os.path as osp
from collections.abc import Sequence

import numpy as np
from mmengine.config import Config
from mmengine.runner import TestLoop
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS

ID_NAME = 'in-distribution'
AVG_NAME = 'OOD average'


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


def ood_sets(cfg: Config, names: Sequence[str] | None = None,
             include_id: bool = True) -> dict[str, dict]:
    """``{name: dataloader config}`` of the OOD sets (in-distribution test set first)."""
    declared = dict(cfg.get('ood_test_sets') or {})
    if not declared:
        raise ValueError('the config defines no `ood_test_sets`; add '
                         'ood_test_sets = dict(<name>=<dataset config>, ...)')
    unknown = sorted(set(names or ()) - set(declared))
    if unknown:
        raise ValueError(f'unknown OOD set(s) {unknown}; the config has {sorted(declared)}')
    base = cfg.test_dataloader
    out = {}
    if include_id:
        out[ID_NAME] = copy.deepcopy(base)
    for name in names or declared:
        dataset = copy.deepcopy(declared[name])
        dataset.setdefault('pipeline', copy.deepcopy(base.dataset.get('pipeline', [])))
        dataset.setdefault('test_mode', True)
        loader = copy.deepcopy(base)
        loader.dataset = dataset
        out[name] = loader
    return out


def run_ood(runner, loaders: dict[str, dict], evaluator) -> dict[str, dict]:
    """Test ``runner``'s model on every dataloader; returns ``{name: metrics}``.

    The model and checkpoint are loaded once; each set gets a fresh ``TestLoop``.
    """
    results = {}
    for name, loader in loaders.items():
        # Runner has no public setter for its test loop; Runner.test() builds a loop from
        # ``_test_loop`` unless it is one already.
        runner._test_loop = TestLoop(runner, loader, copy.deepcopy(evaluator))
        results[name] = {k: float(v) for k, v in runner.test().items()}
    return results


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Add the ``OOD average`` row: the mean over all sets but the in-distribution one."""
    ood = [m for name, m in results.items() if name not in (ID_NAME, AVG_NAME)]
    out = dict(results)
    if ood:
        keys = [k for k in ood[0] if all(k in m for m in ood)]
        out[AVG_NAME] = {k: float(np.mean([m[k] for m in ood])) for k in keys}
    return out


def format_table(results: dict[str, dict], baseline: dict[str, dict] | None = None,
                 digits: int = 2) -> str:
    """One text table: a row per set, a column per metric; with ``baseline`` (the same
    structure, e.g. the cross-entropy model's results) each metric also gets the baseline
    value and the gain ``this - baseline``."""
    keys = [k for k in next(iter(results.values())) if not k.endswith(('num_train', 'num_test'))]
    compared = {k for m in (baseline or {}).values() for k in m} & set(keys)
    header = ['set']
    for k in keys:
        header += [k] + ([f'{k} (baseline)', f'{k} gain'] if k in compared else [])

    def fmt(v: float | None, sign: str = '') -> str:
        return '-' if v is None else f'{v:{sign}.{digits}f}'

    rows = []
    for name, metrics in results.items():
        row = [name]
        for k in keys:
            v = metrics.get(k)
            row.append(fmt(v))
            if k in compared:
                b = (baseline.get(name) or {}).get(k)
                row += [fmt(b), fmt(None if b is None or v is None else v - b, '+')]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'

    sep = '+-' + '-+-'.join('-' * w for w in widths) + '-+'
    return '\n'.join([sep, line(header), sep] + [line(r) for r in rows] + [sep])


def load_results(path: str) -> dict[str, dict]:
    with open(path) as f:
        return json.load(f)
