"""Writers for the real on-disk formats the configs read.

Tests and demos write small data sets in exactly the layout that the public releases use, so the
same dataset classes and pipelines that read real Pascal VOC 2012, CIFAR-10 and Tiny-ImageNet
read these too:

- Pascal VOC 2012: ``VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png (palette),
  ImageSets/Segmentation/{train,val,trainval}.txt}``; the SBD "aug" set as mmseg's
  ``tools/dataset_converters/voc_aug.py`` leaves it: ``SegmentationClassAug/*.png`` (grey
  label PNGs, also for the VOC images) and ``ImageSets/Segmentation/aug.txt``.
- CIFAR-10 (python version): ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``,
  each a pickle of ``{'data': uint8 (N, 3072) rows in CHW order, 'labels': list[int], ...}``
  (the release was pickled by Python 2, so its keys load as ``str`` with ``encoding='latin1'``,
  which is how mmpretrain and torchvision read it).
- Tiny-ImageNet-200: ``wnids.txt``, ``words.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``,
  ``train/<wnid>/<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG``, ``val/val_annotations.txt``.
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car',
               'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')


def voc_palette() -> list[int]:
    """The 256-entry Pascal VOC colour map, flattened to ``[r0, g0, b0, r1, ...]``."""
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


def write_voc2012(root: str | Path, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  splits: dict[str, Sequence[int]], prefix: str = '2007_') -> Path:
    """Write a Pascal VOC 2012 segmentation folder and return ``root/VOCdevkit/VOC2012``.

    Args:
        images: (H, W, 3) uint8 RGB arrays.
        masks: (H, W) uint8 label maps (0..20, 255 = ignore), same size as their image.
        splits: split name (``train``, ``val``, ...) -> indices into ``images``.
    """
    if len(images) != len(masks):
        raise ValueError(f'{len(images)} images but {len(masks)} masks')
    voc = Path(root) / 'VOCdevkit' / 'VOC2012'
    for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names = [f'{prefix}{i:06d}' for i in range(len(images))]
    for name, img, mask in zip(names, images, masks):
        if img.shape[:2] != mask.shape:
            raise ValueError(f'{name}: image {img.shape[:2]} and mask {mask.shape} differ')
        Image.fromarray(img).save(voc / 'JPEGImages' / f'{name}.jpg', quality=95)
        save_voc_mask(mask, voc / 'SegmentationClass' / f'{name}.png')
    for split, idx in splits.items():
        (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(
            ''.join(f'{names[i]}\n' for i in idx))
    return voc


def write_voc_aug(voc: str | Path, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  prefix: str = '2008_') -> Path:
    """Add an SBD-style aug set to the VOC 2012 folder ``voc`` (from :func:`write_voc2012`).

    As mmseg's converter does, every mask of ``SegmentationClass`` is also written to
    ``SegmentationClassAug`` as a grey PNG, and the new images (JPEGImages) with their grey
    masks form ``ImageSets/Segmentation/aug.txt``. Returns ``voc``.

    Args:
        images: (H, W, 3) uint8 RGB arrays of the aug set.
        masks: (H, W) uint8 label maps (0..20, 255 = ignore), same size as their image.
    """
    if len(images) != len(masks):
        raise ValueError(f'{len(images)} images but {len(masks)} masks')
    voc = Path(voc)
    aug = voc / 'SegmentationClassAug'
    aug.mkdir(parents=True, exist_ok=True)
    for png in sorted((voc / 'SegmentationClass').glob('*.png')):
        Image.fromarray(np.array(Image.open(png)), mode='L').save(aug / png.name)
    names = [f'{prefix}{i:06d}' for i in range(len(images))]
    for name, img, mask in zip(names, images, masks):
        if img.shape[:2] != mask.shape or mask.dtype != np.uint8:
            raise ValueError(f'{name}: image {img.shape[:2]} and uint8 mask {mask.shape} '
                             f'({mask.dtype}) must have the same size')
        Image.fromarray(img).save(voc / 'JPEGImages' / f'{name}.jpg', quality=95)
        Image.fromarray(mask, mode='L').save(aug / f'{name}.png')
    (voc / 'ImageSets' / 'Segmentation' / 'aug.txt').write_text(
        ''.join(f'{n}\n' for n in names))
    return voc


def write_cifar10(root: str | Path, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], num_train_batches: int = 5) -> Path:
    """Write the CIFAR-10 python-pickle folder and return ``root/cifar-10-batches-py``.

    Args:
        train, test: ``(images (N, 32, 32, 3) uint8 RGB, labels (N,) int in [0, 10))``.
        num_train_batches: how many ``data_batch_*`` files to split the train set into (5 in
            the real release).
    """
    folder = Path(root) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, imgs: np.ndarray, labels: np.ndarray) -> None:
        if imgs.ndim != 4 or imgs.shape[1:] != (32, 32, 3) or imgs.dtype != np.uint8:
            raise ValueError(f'CIFAR images must be (N, 32, 32, 3) uint8, got '
                             f'{imgs.dtype} {imgs.shape}')
        entry = {
            'batch_label': name,
            'labels': [int(v) for v in labels],
            'data': imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1).copy(),
            'filenames': [f'{name}_{i}.png' for i in range(len(imgs))],
        }
        with open(folder / name, 'wb') as f:
            pickle.dump(entry, f, protocol=2)

    images, labels = train
    for b, idx in enumerate(np.array_split(np.arange(len(images)), num_train_batches)):
        dump(f'data_batch_{b + 1}', images[idx], labels[idx])
    dump('test_batch', *test)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': list(CIFAR10_CLASSES), 'num_cases_per_batch': 10000,
                     'num_vis': 3072}, f, protocol=2)
    return folder


def write_tiny_imagenet(root: str | Path, wnids: Sequence[str],
                        train: tuple[np.ndarray, np.ndarray],
                        val: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write a Tiny-ImageNet-200-style folder (any number of classes) and return ``root``.

    Args:
        wnids: WordNet ids, one per class, in label order.
        train, val: ``(images (N, H, W, 3) uint8 RGB, labels (N,) int in [0, len(wnids)))``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'wnids.txt').write_text(''.join(f'{w}\n' for w in wnids))
    (root / 'words.txt').write_text(''.join(f'{w}\tclass {i}\n' for i, w in enumerate(wnids)))
    images, labels = train
    counters = dict.fromkeys(wnids, 0)
    boxes: dict[str, list[str]] = {w: [] for w in wnids}
    for img, label in zip(images, labels):
        wnid = wnids[int(label)]
        folder = root / 'train' / wnid / 'images'
        folder.mkdir(parents=True, exist_ok=True)
        name = f'{wnid}_{counters[wnid]}.JPEG'
        counters[wnid] += 1
        Image.fromarray(img).save(folder / name, format='JPEG', quality=95)
        h, w = img.shape[:2]
        boxes[wnid].append(f'{name}\t0\t0\t{w - 1}\t{h - 1}\n')
    for wnid, lines in boxes.items():
        (root / 'train' / wnid).mkdir(parents=True, exist_ok=True)
        (root / 'train' / wnid / f'{wnid}_boxes.txt').write_text(''.join(lines))
    images, labels = val
    (root / 'val' / 'images').mkdir(parents=True, exist_ok=True)
    ann = []
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f'val_{i}.JPEG'
        Image.fromarray(img).save(root / 'val' / 'images' / name, format='JPEG', quality=95)
        h, w = img.shape[:2]
        ann.append(f'{name}\t{wnids[int(label)]}\t0\t0\t{w - 1}\t{h - 1}\n')
    (root / 'val' / 'val_annotations.txt').write_text(''.join(ann))
    return root
