"""A real-image segmentation set: Fashion-MNIST items on canvases, as a Pascal VOC folder.

Each canvas (``canvas`` x ``canvas`` RGB, 64 px by default) gets a smooth random background (a
colour gradient in a random direction plus low-frequency colour noise) and 1-3 real
Fashion-MNIST items (28x28, scaled 1-1.5x, tinted with a random colour, pasted at a random place
fully inside the canvas). An item's mask is its own pixels: those whose (resized) grey value is
above :data:`MASK_THRESHOLD`; only these pixels are pasted, opaquely, so the image and the mask
agree exactly. Later items lie on top of earlier ones (occlusion). The label map holds
``item label + 1`` on an item's visible pixels (0 = background, 11 classes, see
:data:`FASHION_VOC_CLASSES`) and, as in Pascal VOC, 255 (ignore) on a 1-px ring around each
item's mask (also where it borders an item it covers).

Training canvases use items of the Fashion-MNIST training split, validation canvases items of
the test split. Everything is written with :func:`~grpo_rm_mm.testing.formats.write_voc2012`
as a Pascal VOC 2012 folder (``ImageSets/Segmentation/{train,val}.txt``), plus ``items.json``
(where each item went) and ``meta.json`` (the parameters: a second call with the same ones keeps
the folder). Usage (the Fashion-MNIST root from ``tools/dataset_converters/fashion_mnist.py``)::

    python tools/dataset_converters/fashion_voc.py data/fashion_mnist data/fashion_voc

mmseg's ``PascalVOCDataset`` maps any other class list onto VOC's 21 classes and refuses names
that are not VOC ones, so configs read the folder with ``VOCFormatDataset`` (a
``CheckedPascalVOCDataset`` whose classes are the ones its ``metainfo`` names)::

    dataset = dict(type='VOCFormatDataset', data_root='data/fashion_voc/VOCdevkit/VOC2012',
                   metainfo=dict(classes=FASHION_VOC_CLASSES),
                   ann_file='ImageSets/Segmentation/train.txt', ...)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's grpo_rm_mm

from grpo_rm_mm.testing.formats import (  # noqa: E402
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    read_idx,
    write_voc2012,
)

__all__ = ['FASHION_VOC_CLASSES', 'MASK_THRESHOLD', 'composite', 'item_mask',
           'prepare_fashion_voc', 'random_background']

#: Class names: 0 is the background, ``k + 1`` is Fashion-MNIST label ``k``.
FASHION_VOC_CLASSES = ('background', 'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                       'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
#: An item pixel belongs to the item when its (resized) grey value is above this.
MASK_THRESHOLD = 32
IGNORE_INDEX = 255
_FORMAT = 1  # bump when the way canvases are drawn changes (invalidates written folders)


def item_mask(item: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A 28x28 uint8 item resized to ``size`` x ``size`` (bilinear) and its mask (> threshold)."""
    resized = item if size == item.shape[0] else cv2.resize(
        item, (size, size), interpolation=cv2.INTER_LINEAR)
    return resized, resized > MASK_THRESHOLD


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth (size, size, 3) uint8 background: a random colour gradient plus colour noise."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    bg = c0 + t[..., None] * (c1 - c0)
    noise = rng.normal(0, 30, (4, 4, 3)).astype(np.float32)
    bg += cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8)


def composite(background: np.ndarray, items: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Paste items onto a background in order; return (image, label map).

    Args:
        background: (H, W, 3) uint8 RGB.
        items: each ``dict(image=(28, 28) uint8, label=int class (1..10), size=int px,
            y=int, x=int top-left, color=(r, g, b) in 0..255)``; the item must fit inside.

    Returns:
        The (H, W, 3) uint8 image (item pixels ``grey / 255 * color``, opaque on the mask) and
        the (H, W) uint8 label map (``label`` on visible item pixels, 255 on a 1-px ring around
        each item's mask, 0 elsewhere).
    """
    image = background.copy()
    h, w = image.shape[:2]
    labels = np.zeros((h, w), np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for it in items:
        size, y, x = int(it['size']), int(it['y']), int(it['x'])
        if not (0 <= y and y + size <= h and 0 <= x and x + size <= w):
            raise ValueError(f'item of {size} px at ({y}, {x}) does not fit a {h}x{w} canvas')
        grey, mask = item_mask(np.asarray(it['image'], np.uint8), size)
        full = np.zeros((h, w), bool)
        full[y:y + size, x:x + size] = mask
        ring = cv2.dilate(full.astype(np.uint8), kernel).astype(bool) & ~full
        labels[ring] = IGNORE_INDEX
        labels[full] = int(it['label'])
        color = np.asarray(it['color'], np.float32)
        pixels = grey[mask].astype(np.float32)[:, None] / 255.0 * color
        patch = image[y:y + size, x:x + size]
        patch[mask] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, labels


def _draw_canvases(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, n: int,
                   canvas: int, items: tuple[int, int], scale: tuple[float, float]
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[dict]]]:
    """``n`` canvases with items drawn at random from ``images``/``labels``."""
    out_imgs, out_masks, records = [], [], []
    for _ in range(n):
        bg = random_background(rng, canvas)
        placed = []
        for _ in range(int(rng.integers(items[0], items[1] + 1))):
            src = int(rng.integers(len(images)))
            size = int(round(28 * rng.uniform(*scale)))
            size = min(size, canvas)
            y, x = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
            color = [int(v) for v in rng.integers(64, 256, 3)]
            placed.append(dict(source_index=src, label=int(labels[src]) + 1, size=size, y=y, x=x,
                               color=color))
        img, mask = composite(bg, [dict(p, image=images[p['source_index']]) for p in placed])
        out_imgs.append(img)
        out_masks.append(mask)
        records.append(placed)
    return out_imgs, out_masks, records


def prepare_fashion_voc(dst: str | Path, fashion_root: str | Path, n_train: int = 1000,
                        n_val: int = 200, canvas: int = 64, items: tuple[int, int] = (1, 3),
                        seed: int = 0, scale: tuple[float, float] = (1.0, 1.5)) -> Path:
    """Write the Fashion-MNIST canvases as a Pascal VOC 2012 folder; return its VOC2012 path.

    Args:
        dst: Output root; the folder is ``dst/VOCdevkit/VOC2012`` (``train.txt``: the first
            ``n_train`` images, ``val.txt``: the next ``n_val``), plus ``dst/items.json``
            (``{'train': [[{source_index, label, size, y, x, color}, ...], ...], 'val': ...}``,
            ``source_index`` into the Fashion-MNIST train resp. test split) and
            ``dst/meta.json``.
        fashion_root: A folder with the un-gzipped Fashion-MNIST IDX files
            (``tools/dataset_converters/fashion_mnist.py``).
        n_train, n_val: Numbers of canvases.
        canvas: Canvas side in px (at least 42, the largest item at the default ``scale``).
        items: (min, max) items per canvas, inclusive.
        seed: Everything drawn is determined by it (train and val use separate streams).
        scale: (min, max) item scale; an item is ``round(28 * s)`` px.

    Idempotent: if ``dst/meta.json`` records the same parameters and the files are there, the
    folder is kept; otherwise ``dst/VOCdevkit`` is rewritten from scratch.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f'n_train and n_val must be positive, got {n_train}, {n_val}')
    if not 1 <= items[0] <= items[1]:
        raise ValueError(f'items must be (min, max) with 1 <= min <= max, got {items}')
    if not 0 < scale[0] <= scale[1] or round(28 * scale[1]) > canvas:
        raise ValueError(f'scale {scale} must be positive and fit a {canvas}-px canvas')
    dst, fashion_root = Path(dst), Path(fashion_root)
    voc = dst / 'VOCdevkit' / 'VOC2012'
    meta = dict(format=_FORMAT, n_train=n_train, n_val=n_val, canvas=canvas, items=list(items),
                seed=seed, scale=list(scale), mask_threshold=MASK_THRESHOLD,
                classes=list(FASHION_VOC_CLASSES),
                source='Fashion-MNIST items: train split -> train, test split -> val')
    if _complete(dst, voc, meta):
        return voc

    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    splits = {}
    all_imgs: list[np.ndarray] = []
    all_masks: list[np.ndarray] = []
    records = {}
    for split, seq, n, (img_file, lbl_file) in (
            ('train', train_seq, n_train, (TRAIN_IMAGES, TRAIN_LABELS)),
            ('val', val_seq, n_val, (TEST_IMAGES, TEST_LABELS))):
        src_imgs, src_labels = read_idx(fashion_root / img_file), read_idx(fashion_root / lbl_file)
        imgs, masks, recs = _draw_canvases(np.random.default_rng(seq), src_imgs, src_labels, n,
                                           canvas, items, scale)
        splits[split] = range(len(all_imgs), len(all_imgs) + n)
        all_imgs += imgs
        all_masks += masks
        records[split] = recs

    (dst / 'meta.json').unlink(missing_ok=True)
    shutil.rmtree(dst / 'VOCdevkit', ignore_errors=True)
    write_voc2012(dst, all_imgs, all_masks, splits)
    (dst / 'items.json').write_text(json.dumps(records) + '\n')
    (dst / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')
    return voc


def _complete(dst: Path, voc: Path, meta: dict) -> bool:
    """Whether ``dst`` already holds the folder ``meta`` describes (all listed files there)."""
    try:
        if json.loads((dst / 'meta.json').read_text()) != meta:
            return False
        names = []
        for split, n in (('train', meta['n_train']), ('val', meta['n_val'])):
            lines = (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()
            if len(lines) != n:
                return False
            names += lines
    except (OSError, ValueError):
        return False
    return (dst / 'items.json').is_file() and all(
        (voc / 'JPEGImages' / f'{n}.jpg').is_file()
        and (voc / 'SegmentationClass' / f'{n}.png').is_file() for n in names)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write Fashion-MNIST items composited onto canvases as a Pascal VOC 2012 '
        'folder (OUT_DIR/VOCdevkit/VOC2012)')
    parser.add_argument('fashion_root', help='un-gzipped Fashion-MNIST (fashion_mnist.py)')
    parser.add_argument('out_dir')
    parser.add_argument('--n-train', type=int, default=1000, help='training canvases')
    parser.add_argument('--n-val', type=int, default=200, help='validation canvases')
    parser.add_argument('--canvas', type=int, default=64, help='canvas side in px')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    voc = prepare_fashion_voc(args.out_dir, args.fashion_root, n_train=args.n_train,
                              n_val=args.n_val, canvas=args.canvas, seed=args.seed)
    print(f'Fashion-VOC: {voc}')


if __name__ == '__main__':
    main()
