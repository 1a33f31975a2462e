"""Tiny-ImageNet-200 read from its standard folder layout (mmpretrain 1.2 has no such class).

Layout (as released at http://cs231n.stanford.edu/tiny-imagenet-200.zip)::

    data_root/
        wnids.txt                       one WordNet id per line, in label order
        words.txt                       optional: ``<wnid>\\t<names>`` lines
        train/<wnid>/images/*.JPEG
        val/images/*.JPEG
        val/val_annotations.txt         ``<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>`` lines

Labels follow the order of ``wnids.txt``. The released ``test`` split has no labels and is not
read. Any folder with this layout and any number of classes works (tests write small ones).
"""
from __future__ import annotations

import os
import os.path as osp

from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS

IMG_EXTENSIONS = ('.jpeg', '.jpg', '.png')


def read_wnids(path: str) -> list[str]:
    """The class ids listed in ``path`` (a ``wnids.txt``, or a folder holding one), in order."""
    if osp.isdir(path):
        path = osp.join(path, 'wnids.txt')
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'TinyImageNet: {path!r} not found; data_root must be the extracted '
            f'tiny-imagenet-200 folder (wnids.txt, train/, val/), e.g. data/tiny-imagenet-200')
    with open(path) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids:
        raise ValueError(f'TinyImageNet: {path!r} lists no class ids')
    dup = sorted({w for w in wnids if wnids.count(w) > 1})
    if dup:
        raise ValueError(f'TinyImageNet: {path!r} lists {dup} more than once')
    return wnids


def read_words(data_root: str, wnids: list[str]) -> list[str]:
    """Human-readable names of ``wnids`` from ``words.txt`` (the wnid where it has none)."""
    path = osp.join(data_root, 'words.txt')
    words: dict[str, str] = {}
    if osp.isfile(path):
        with open(path) as f:
            for line in f:
                wnid, _, names = line.rstrip('\n').partition('\t')
                words[wnid] = names.strip()
    return [words.get(w) or w for w in wnids]


@DATASETS.register_module()
class TinyImageNet(BaseDataset):
    """Tiny-ImageNet (200 classes, 64x64) from the released folder layout.

    Args:
        data_root: the extracted ``tiny-imagenet-200`` folder.
        split: ``'train'`` (``train/<wnid>/images``) or ``'val'`` (``val/images`` labelled by
            ``val/val_annotations.txt``).
        **kwargs: passed to mmpretrain's ``BaseDataset`` (``pipeline``, ``test_mode``,
            ``indices``, ...).

    ``metainfo['classes']`` are the wnids (unique); ``metainfo['words']`` their names. Each item
    has ``img_path`` and ``gt_label``, so the pipeline starts with ``LoadImageFromFile``.
    """

    SPLITS = ('train', 'val')

    def __init__(self, data_root: str, split: str = 'train', **kwargs) -> None:
        if split not in self.SPLITS:
            raise ValueError(f'TinyImageNet: split={split!r} is not one of {self.SPLITS} '
                             f'(the released test split has no labels)')
        if not data_root or not osp.isdir(data_root):
            raise FileNotFoundError(
                f'TinyImageNet: data_root {data_root!r} is not a folder; download and extract '
                f'tiny-imagenet-200.zip and set data_root to it (e.g. data/tiny-imagenet-200)')
        self.split = split
        wnids = read_wnids(osp.join(data_root, 'wnids.txt'))
        metainfo = dict(classes=tuple(wnids), words=tuple(read_words(data_root, wnids)))
        metainfo.update(kwargs.pop('metainfo', None) or {})
        if tuple(metainfo['classes']) != tuple(wnids):
            raise ValueError('TinyImageNet: metainfo classes must be the wnids of wnids.txt; '
                             'use a dataset wrapper to select classes')
        super().__init__(ann_file='', data_root=data_root, metainfo=metainfo, **kwargs)

    def load_data_list(self) -> list[dict]:
        wnids = list(self.metainfo['classes'])
        index = {w: i for i, w in enumerate(wnids)}
        if self.split == 'train':
            data_list = self._load_train(wnids)
        else:
            data_list = self._load_val(index)
        counts = [0] * len(wnids)
        for info in data_list:
            counts[info['gt_label']] += 1
        empty = [w for w, n in zip(wnids, counts) if n == 0]
        if empty:
            raise ValueError(
                f'TinyImageNet ({self.split}): class(es) {empty[:10]} of wnids.txt have no '
                f'images under {self.data_root!r}; a class without images cannot be learned or '
                f'scored -- restore the images or remove the wnids from wnids.txt')
        return data_list

    def _load_train(self, wnids: list[str]) -> list[dict]:
        data_list = []
        for label, wnid in enumerate(wnids):
            folder = osp.join(self.data_root, 'train', wnid, 'images')
            if not osp.isdir(folder):
                raise FileNotFoundError(
                    f'TinyImageNet (train): class {wnid!r} listed in wnids.txt has no folder '
                    f'{folder!r}; expected train/<wnid>/images/*.JPEG')
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMG_EXTENSIONS):
                    data_list.append(dict(img_path=osp.join(folder, name), gt_label=label))
        return data_list

    def _load_val(self, index: dict[str, int]) -> list[dict]:
        ann = osp.join(self.data_root, 'val', 'val_annotations.txt')
        if not osp.isfile(ann):
            raise FileNotFoundError(f'TinyImageNet (val): {ann!r} not found; expected '
                                    f'val/images/*.JPEG and val/val_annotations.txt')
        data_list = []
        with open(ann) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.split('\t')
                if len(fields) < 2:
                    raise ValueError(f'{ann}:{lineno}: expected "<file>\\t<wnid>\\t...", '
                                     f'got {line.rstrip()!r}')
                name, wnid = fields[0].strip(), fields[1].strip()
                if wnid not in index:
                    raise ValueError(f'{ann}:{lineno}: wnid {wnid!r} is not in wnids.txt')
                path = osp.join(self.data_root, 'val', 'images', name)
                if not osp.isfile(path):
                    raise FileNotFoundError(f'{ann}:{lineno}: image {path!r} does not exist')
                data_list.append(dict(img_path=path, gt_label=index[wnid]))
        return data_list

    def extra_repr(self) -> list[str]:
        return [f'Split: \t{self.split}', f'Data root: \t{self.data_root}']


@DATASETS.register_module()
class WnidFolderDataset(BaseDataset):
    """Images in ``data_root/<wnid>/`` (or ``<wnid>/images/``), labelled by the order of a
    ``wnids.txt`` -- e.g. one corruption/severity of Tiny-ImageNet-C
    (``Tiny-ImageNet-C/fog/5/<wnid>/*.JPEG``), scored with a Tiny-ImageNet model.

    mmpretrain's ``CustomDataset`` numbers folders alphabetically, which is not the order of
    ``wnids.txt``; this class keeps the label space of the model.

    Args:
        data_root: the folder holding one sub-folder per wnid.
        wnids_file: the ``wnids.txt`` of the data set the model was trained on.
    """

    def __init__(self, data_root: str, wnids_file: str, **kwargs) -> None:
        if not data_root or not osp.isdir(data_root):
            raise FileNotFoundError(f'WnidFolderDataset: data_root {data_root!r} is not a '
                                    f'folder (expected <data_root>/<wnid>/*.JPEG)')
        metainfo = dict(classes=tuple(read_wnids(wnids_file)))
        super().__init__(ann_file='', data_root=data_root, metainfo=metainfo, **kwargs)

    def load_data_list(self) -> list[dict]:
        data_list, empty = [], []
        for label, wnid in enumerate(self.metainfo['classes']):
            folder = osp.join(self.data_root, wnid)
            if osp.isdir(osp.join(folder, 'images')):
                folder = osp.join(folder, 'images')
            names = sorted(os.listdir(folder)) if osp.isdir(folder) else []
            names = [n for n in names if n.lower().endswith(IMG_EXTENSIONS)]
            if not names:
                empty.append(wnid)
            data_list += [dict(img_path=osp.join(folder, n), gt_label=label) for n in names]
        if empty:
            raise ValueError(f'WnidFolderDataset: class(es) {empty[:10]} have no images under '
                             f'{self.data_root!r} (expected <data_root>/<wnid>/*.JPEG)')
        return data_list
