"""Pascal VOC 2012 format: its colour map and palette PNGs, checked loading, own class lists.

- :func:`voc_palette`, :func:`save_voc_mask`: the 256-entry VOC colour map and label maps saved
  as palette PNGs, as ``SegmentationClass`` holds them (``SegPalettePredictionHook`` writes its
  predictions this way).
- ``CheckSegAnnotation`` (a transform, put right after ``LoadAnnotations``): the mask must have
  the size of its image and hold only class indices ``0..C-1`` or ``ignore_index``.
- ``CheckedPascalVOCDataset``: mmseg's ``PascalVOCDataset`` that refuses a missing or empty split
  file and inserts ``CheckSegAnnotation`` after every ``LoadAnnotations`` of its pipeline.
- ``VOCFormatDataset``: a ``CheckedPascalVOCDataset`` for a folder in the VOC layout whose
  classes are not VOC's: the config's ``metainfo`` names them.
"""
from __future__ import annotations

import os.path as osp
from pathlib import Path

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.datasets import PascalVOCDataset
from mmseg.registry import DATASETS, TRANSFORMS
from PIL import Image

__all__ = ['VOC_CLASSES', 'CheckSegAnnotation', 'CheckedPascalVOCDataset', 'VOCFormatDataset',
           'save_voc_mask', 'voc_palette']

VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car',
               'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')


def voc_palette() -> list[int]:
    """The 256-entry Pascal VOC colour map, flattened to ``[r0, g0, b0, r1, ...]``.

    Colour of label ``c``: bit ``j`` of each of r, g, b (from the top bit down) is bit
    ``3 j + 0/1/2`` of ``c``.
    """
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_voc_mask(mask: np.ndarray, path: str | Path) -> None:
    """Save an (H, W) uint8 label map as a palette PNG, as VOC's SegmentationClass does."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f'mask must be an (H, W) uint8 array, got {mask.dtype} {mask.shape}')
    img = Image.fromarray(mask, mode='P')
    img.putpalette(voc_palette())
    img.save(path)


@TRANSFORMS.register_module()
class CheckSegAnnotation(BaseTransform):
    """Check a loaded ``gt_seg_map`` against its image; raise ``ValueError`` naming both files.

    Needs ``ori_shape`` (from ``LoadImageFromFile``) and ``gt_seg_map`` (from
    ``LoadAnnotations``), so it also works in test pipelines that resize the image before loading
    the mask. Returns ``results`` unchanged.

    Args:
        num_classes: C; valid labels are ``0..C-1``.
        ignore_index: the label of unlabelled pixels (255 in VOC), also allowed.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'CheckSegAnnotation: num_classes={num_classes!r} must be a '
                             f'positive int')
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        if 'gt_seg_map' not in results or 'ori_shape' not in results:
            raise KeyError('CheckSegAnnotation needs `gt_seg_map` and `ori_shape`; put it after '
                           'LoadImageFromFile and LoadAnnotations in the pipeline')
        seg = results['gt_seg_map']
        mask_file = results.get('seg_map_path', '<mask>')
        img_file = results.get('img_path', '<image>')
        img_hw = tuple(results['ori_shape'][:2])
        if tuple(seg.shape[:2]) != img_hw:
            raise ValueError(
                f'{mask_file}: mask size {seg.shape[1]}x{seg.shape[0]} (WxH) differs from its '
                f'image {img_file} ({img_hw[1]}x{img_hw[0]}); every mask must have the size of '
                f'its image (re-export the mask, or remove the pair from the split file)')
        bad = (seg >= self.num_classes) & (seg != self.ignore_index)
        bad |= seg < 0
        if bad.any():
            values = np.unique(seg[bad])
            shown = ', '.join(str(int(v)) for v in values[:10])
            more = f' (+{len(values) - 10} more)' if len(values) > 10 else ''
            raise ValueError(
                f'{mask_file}: label values [{shown}]{more} in {int(bad.sum())} pixels are '
                f'neither classes 0..{self.num_classes - 1} nor ignore_index '
                f'{self.ignore_index}; masks must hold class indices (VOC: palette PNGs as in '
                f'SegmentationClass, or grey PNGs as in SegmentationClassAug), not RGB colours. '
                f'If the data set really has more classes, set num_classes/metainfo to match')
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, '
                f'ignore_index={self.ignore_index})')


@DATASETS.register_module()
class CheckedPascalVOCDataset(PascalVOCDataset):
    """``PascalVOCDataset`` with clear errors for bad input (same arguments).

    - a missing split file (``ann_file``) raises ``FileNotFoundError``, an empty one
      ``ValueError``, each naming the file;
    - every ``LoadAnnotations`` in the pipeline is followed by
      ``CheckSegAnnotation(num_classes=len(classes), ignore_index)``, so a mask of the wrong size
      or with labels above the classes fails when it is loaded, naming the mask and the image.

    Args:
        check_annotations: insert the per-sample check (on by default; it costs one pass over
            each mask).
    """

    def __init__(self, ann_file: str, check_annotations: bool = True, **kwargs) -> None:
        self.check_annotations = check_annotations
        super().__init__(ann_file=ann_file, **kwargs)
        if check_annotations:
            check = CheckSegAnnotation(num_classes=len(self.metainfo['classes']),
                                       ignore_index=self.ignore_index)
            transforms = []
            for t in self.pipeline.transforms:
                transforms.append(t)
                if type(t).__name__ == 'LoadAnnotations':
                    transforms.append(check)
            self.pipeline.transforms = transforms

    def load_data_list(self) -> list[dict]:
        if not osp.isfile(self.ann_file):
            raise FileNotFoundError(
                f'split file {self.ann_file} does not exist or is not a file; expected '
                f'<data_root>/ImageSets/Segmentation/{{train,val,trainval}}.txt of a Pascal VOC '
                f'2012 folder (check data_root and ann_file)')
        with open(self.ann_file) as f:
            lines = f.read().splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(f'split file {self.ann_file} is empty: it must list one image name '
                             f'per line (e.g. 2007_000032), without extension')
        # blank lines (e.g. a trailing one) would become an image called '.jpg': drop them
        data_list = super().load_data_list()
        return [d for d in data_list if osp.basename(d['img_path']) != self.img_suffix]


@DATASETS.register_module()
class VOCFormatDataset(CheckedPascalVOCDataset):
    """A folder in the Pascal VOC 2012 layout with its own classes (same arguments otherwise).

    mmseg's ``PascalVOCDataset`` maps a ``metainfo`` class list onto VOC's 21 classes and refuses
    names that are not VOC ones; here the list *is* the data set's: label ``k`` of a mask is
    ``metainfo['classes'][k]``. Without a ``palette`` the classes get the first colours of the
    VOC colour map (:func:`voc_palette`), which is how the palette PNGs show them::

        dataset = dict(type='VOCFormatDataset', data_root='data/my_voc/VOCdevkit/VOC2012',
                       metainfo=dict(classes=('background', 'cat', 'dog')),
                       ann_file='ImageSets/Segmentation/train.txt', ...)

    Args:
        metainfo: ``dict(classes=(...), palette=[[r, g, b], ...])``; ``classes`` is required.
    """

    METAINFO: dict = dict()

    def __init__(self, ann_file: str, metainfo: dict | None = None, **kwargs) -> None:
        if not metainfo or not metainfo.get('classes'):
            raise ValueError('VOCFormatDataset needs the classes of its masks: '
                             'metainfo=dict(classes=(name_0, name_1, ...)), label k = name_k')
        metainfo = dict(metainfo)
        if 'palette' not in metainfo:
            colours = voc_palette()
            metainfo['palette'] = [colours[3 * k:3 * k + 3]
                                   for k in range(len(metainfo['classes']))]
        super().__init__(ann_file=ann_file, metainfo=metainfo, **kwargs)
