"""Small learnable synthetic data sets for tests, written through :mod:`.formats`.

Each class has its own colour, so a small network can learn the task in a few iterations while
the files on disk are in the real formats (the point is to exercise the real loading code).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import write_cifar10, write_tiny_imagenet, write_voc2012, write_voc_aug


def class_colours(num_classes: int, seed: int = 0) -> np.ndarray:
    """(num_classes, 3) well separated RGB colours (uint8)."""
    rng = np.random.default_rng(seed)
    hues = (np.arange(num_classes) / num_classes + rng.uniform(0, 0.02)) % 1.0
    # HSV (h, 0.9, 0.9) -> RGB
    i = np.floor(hues * 6).astype(int) % 6
    f = hues * 6 - np.floor(hues * 6)
    v, s = 0.9, 0.9
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(x, -1) for x in (
        (np.full_like(f, v), t, np.full_like(f, p)), (q, np.full_like(f, v), np.full_like(f, p)),
        (np.full_like(f, p), np.full_like(f, v), t), (np.full_like(f, p), q, np.full_like(f, v)),
        (t, np.full_like(f, p), np.full_like(f, v)), (np.full_like(f, v), np.full_like(f, p), q),
    )], 0)
    rgb = table[i, np.arange(num_classes)]
    return (rgb * 255).astype(np.uint8)


def colour_images(labels: np.ndarray, size: int, num_classes: int, seed: int = 0,
                  noise: float = 20.0) -> np.ndarray:
    """(N, size, size, 3) uint8 images: a class-coloured square on a grey noisy background."""
    rng = np.random.default_rng(seed)
    colours = class_colours(num_classes).astype(np.float32)
    n = len(labels)
    imgs = rng.normal(110.0, noise, size=(n, size, size, 3)).astype(np.float32)
    for k, label in enumerate(labels):
        s = int(rng.integers(size // 2, size - 1))
        y, x = rng.integers(0, size - s + 1, size=2)
        imgs[k, y:y + s, x:x + s] = colours[label] + rng.normal(0, noise, (s, s, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8)


def balanced_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """(n,) int64 labels, each class ``n // num_classes`` or one more times, shuffled."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def make_cifar10(root: str | Path, n_train: int = 200, n_test: int = 100,
                 seed: int = 0) -> Path:
    """Write a learnable CIFAR-10-format folder under ``root``; returns ``root``."""
    ytr, yte = balanced_labels(n_train, 10, seed), balanced_labels(n_test, 10, seed + 1)
    write_cifar10(root, (colour_images(ytr, 32, 10, seed), ytr),
                  (colour_images(yte, 32, 10, seed + 1), yte))
    return Path(root)


def make_tiny_imagenet(root: str | Path, num_classes: int = 5, n_train: int = 100,
                       n_val: int = 50, size: int = 64, seed: int = 0) -> Path:
    """Write a learnable Tiny-ImageNet-format folder with ``num_classes`` wnids."""
    wnids = [f'n{1440764 + 7 * i:08d}' for i in range(num_classes)]
    ytr = balanced_labels(n_train, num_classes, seed)
    yva = balanced_labels(n_val, num_classes, seed + 1)
    return write_tiny_imagenet(root, wnids,
                               (colour_images(ytr, size, num_classes, seed), ytr),
                               (colour_images(yva, size, num_classes, seed + 1), yva))


def segmentation_sample(rng: np.random.Generator, size: int, num_classes: int,
                        colours: np.ndarray, noise: float = 15.0,
                        border: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One (image (H, W, 3) uint8, mask (H, W) uint8) pair: 1-3 coloured rectangles of classes
    1..C-1 on a class-0 background, with a ``border``-pixel 255 (ignore) outline as in VOC."""
    img = rng.normal(100.0, noise, size=(size, size, 3)).astype(np.float32)
    img[:] += colours[0].astype(np.float32) * 0.2
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        h, w = rng.integers(size // 4, size // 2 + 1, size=2)
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        img[y:y + h, x:x + w] = colours[cls] + rng.normal(0, noise, (h, w, 3))
        mask[y:y + h, x:x + w] = cls
        if border:
            outline = np.zeros_like(mask, bool)
            outline[y:y + h, x:x + w] = True
            outline[y + border:y + h - border, x + border:x + w - border] = False
            mask[outline] = 255
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_voc2012(root: str | Path, n_train: int = 16, n_val: int = 8, size: int = 64,
                 num_classes: int = 21, seed: int = 0, n_aug: int = 0) -> Path:
    """Write a learnable Pascal VOC 2012 folder; returns ``root/VOCdevkit/VOC2012``. With
    ``n_aug > 0`` it also holds an SBD-style aug set of that many more images
    (``SegmentationClassAug``, ``aug.txt``; see :func:`~.formats.write_voc_aug`)."""
    rng = np.random.default_rng(seed)
    colours = class_colours(num_classes, seed)
    pairs = [segmentation_sample(rng, size, num_classes, colours)
             for _ in range(n_train + n_val)]
    train, val = list(range(n_train)), list(range(n_train, n_train + n_val))
    voc = write_voc2012(root, [p[0] for p in pairs], [p[1] for p in pairs],
                        {'train': train, 'val': val, 'trainval': train + val})
    if n_aug:
        aug = [segmentation_sample(rng, size, num_classes, colours) for _ in range(n_aug)]
        write_voc_aug(voc, [p[0] for p in aug], [p[1] for p in aug])
    return voc
