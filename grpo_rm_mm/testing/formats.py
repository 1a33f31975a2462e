"""Writers for the real on-disk formats the configs read (and a reader for IDX files).

Tests and the data converters of ``tools/dataset_converters/`` write data sets in exactly the
layout that the public releases use, so the same dataset classes and pipelines that read real
Pascal VOC 2012, CIFAR-10, Tiny-ImageNet and (Fashion-)MNIST read these too:

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
- MNIST / Fashion-MNIST (IDX, "ubyte"): a folder with :data:`IDX_FILES`, the un-gzipped names
  that mmpretrain's ``MNIST`` / ``FashionMNIST`` read (they check that all four exist). A file
  is a 4-byte magic ``0 0 <type code> <ndim>``, ``ndim`` big-endian uint32 sizes, then the
  values in C order, big-endian.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..datasets.voc import save_voc_mask

__all__ = ['CIFAR10_CLASSES', 'IDX_FILES', 'TEST_IMAGES', 'TEST_LABELS', 'TRAIN_IMAGES',
           'TRAIN_LABELS', 'idx_complete', 'read_idx', 'read_idx_header', 'write_cifar10',
           'write_idx', 'write_tiny_imagenet', 'write_voc2012', 'write_voc_aug']

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')


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


#: The un-gzipped file names mmpretrain's ``MNIST``/``FashionMNIST`` read (train, then test).
TRAIN_IMAGES = 'train-images-idx3-ubyte'
TRAIN_LABELS = 'train-labels-idx1-ubyte'
TEST_IMAGES = 't10k-images-idx3-ubyte'
TEST_LABELS = 't10k-labels-idx1-ubyte'
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# IDX type codes (the MNIST file format; see mmpretrain.datasets.mnist).
_IDX_DTYPES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype('>i2'): 0x0B,
    np.dtype('>i4'): 0x0C,
    np.dtype('>f4'): 0x0D,
    np.dtype('>f8'): 0x0E,
}
_IDX_CODES = {code: dtype for dtype, code in _IDX_DTYPES.items()}


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (the MNIST format) and return its path.

    Args:
        path: Output file (parents are created; written to a temporary file, then renamed).
        array: Images ``(N, H, W)`` or labels ``(N,)`` (1 to 3 dims, which mmpretrain reads), of
            dtype uint8 (what mmpretrain's MNIST reader accepts), int8, int16, int32, float32 or
            float64 (stored big-endian, as the format requires).

    Raises:
        ValueError: on another dtype or number of dims.
    """
    array = np.asarray(array)
    if not 1 <= array.ndim <= 3:
        raise ValueError(f'IDX files here hold 1 to 3 dims, got shape {array.shape}')
    big = array.dtype.newbyteorder('>') if array.dtype.itemsize > 1 else array.dtype
    if big not in _IDX_DTYPES:
        raise ValueError(f'dtype {array.dtype} has no IDX type code; use one of '
                         'uint8, int8, int16, int32, float32, float64')
    header = bytes([0, 0, _IDX_DTYPES[big], array.ndim])
    header += struct.pack(f'>{array.ndim}I', *array.shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # beside the target (same file system), so the rename is atomic
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    with open(tmp, 'wb') as f:
        f.write(header)
        f.write(np.ascontiguousarray(array, dtype=big).tobytes())
    os.replace(tmp, path)
    return path


def _open(path: Path):
    return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


def read_idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...]] | None:
    """The (dtype, shape) an IDX file (or ``.gz``) declares, or None if it is not one."""
    try:
        with _open(Path(path)) as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b'\0\0' or magic[2] not in _IDX_CODES:
                return None
            ndim = magic[3]
            dims = f.read(4 * ndim)
            if len(dims) != 4 * ndim:
                return None
            return _IDX_CODES[magic[2]], struct.unpack(f'>{ndim}I', dims)
    except (OSError, EOFError, zlib.error):
        return None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) into a native-endian array of its declared shape."""
    path = Path(path)
    header = read_idx_header(path)
    if header is None:
        raise ValueError(f'{path} is not an IDX file')
    dtype, shape = header
    with _open(path) as f:
        data = f.read()
    offset = 4 + 4 * len(shape)
    count = int(np.prod(shape))
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f'{path}: {len(data)} bytes, but its header declares {shape} {dtype}')
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder('='))


def idx_complete(path: str | Path) -> bool:
    """Whether ``path`` is an uncompressed IDX file whose size matches its header."""
    path = Path(path)
    header = read_idx_header(path) if path.suffix != '.gz' and path.is_file() else None
    if header is None:
        return False
    dtype, shape = header
    return path.stat().st_size == 4 + 4 * len(shape) + int(np.prod(shape)) * dtype.itemsize
