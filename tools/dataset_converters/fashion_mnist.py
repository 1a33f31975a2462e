"""Fashion-MNIST and Fashion-MNIST-C in the IDX layout, from what the package registries install.

Nothing here downloads anything. The sources:

- Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes): Debian
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).
- Fashion-MNIST-C (corrupted test set, same labels): the clean test set under corruptions from
  PyPI ``imagecorruptions`` (Hendrycks & Dietterich's ImageNet-C code).

Every set is written in the IDX ("ubyte") layout of the MNIST release
(:mod:`grpo_rm_mm.testing.formats`), so mmpretrain's own ``FashionMNIST`` dataset class reads it
with the same pipeline as the clean set. A corrupted set is test-only: its ``train-*`` files
link to the clean training set. Usage::

    python tools/dataset_converters/fashion_mnist.py data/fashion_mnist \
        [--corrupted-dir data/fashion_mnist_c --corruptions contrast pixelate --severity 3]

Config use (mmpretrain 1.2 picks the files by ``test_mode``, not ``split``, so a test set needs
``test_mode=True``; ``download=False`` turns a missing file into an error instead of a
download)::

    test_dataloader = dict(dataset=dict(type='FashionMNIST', data_root='data/fashion_mnist',
                                        test_mode=True, download=False, pipeline=...))
    ood_test_sets = {
        f'fmnist-c/{c}': dict(type='FashionMNIST', data_root=f'data/fashion_mnist_c/{c}',
                              test_mode=True, download=False)
        for c in ('gaussian_noise', 'motion_blur', 'contrast')}

Each ``prepare_*`` function is idempotent: it keeps files that are already complete (checked
against a small ``meta.json`` of the parameters and the IDX headers) and rewrites anything
else. ``tools/dataset_converters/mnist_digits.py`` shares these helpers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's grpo_rm_mm

from grpo_rm_mm.testing.formats import (  # noqa: E402
    IDX_FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    idx_complete,
    read_idx,
    read_idx_header,
    write_idx,
)

#: Where Debian's ``dataset-fashion-mnist`` puts the gzipped IDX files.
FASHION_MNIST_DEB_DIR = Path('/usr/share/datasets/fashion-mnist')
#: Environment variable that overrides :data:`FASHION_MNIST_DEB_DIR` (a folder with the ``.gz``).
FASHION_MNIST_ENV = 'GRPO_RM_FASHION_MNIST_GZ'

#: The ``imagecorruptions`` corruptions written by default: the 15 "common" ones of ImageNet-C
#: except ``glass_blur`` and ``fog``, which fail in imagecorruptions 1.1.2 with scikit-image
#: >= 0.19 (``gaussian(multichannel=...)``) and numpy 2 (``np.float_``).
DEFAULT_CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur',
                       'motion_blur', 'zoom_blur', 'snow', 'frost', 'brightness', 'contrast',
                       'elastic_transform', 'pixelate', 'jpeg_compression')

_META = 'meta.json'


# --- prepared folders ---------------------------------------------------------------------------

def link_file(target: Path, link: Path) -> None:
    """Make ``link`` a relative symlink to ``target`` (a copy where symlinks are unsupported)."""
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    try:
        link.symlink_to(os.path.relpath(target, link.parent))
    except OSError:
        shutil.copyfile(target, link)


def folder_matches(folder: Path, meta: dict, files: Sequence[str]) -> bool:
    """Whether ``folder`` holds a ``meta.json`` equal to ``meta`` and complete IDX ``files``."""
    try:
        saved = json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return False
    return saved == meta and all(idx_complete(folder / name) for name in files)


def write_meta(folder: Path, meta: dict) -> None:
    """Record the parameters ``folder`` was written with (see :func:`folder_matches`)."""
    (folder / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist`` (recorded in ``meta.json``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return 'unknown'


# --- Fashion-MNIST -------------------------------------------------------------------------------

def find_fashion_mnist_gz() -> Path:
    """The folder with Fashion-MNIST's four gzipped IDX files, as Debian installs them.

    ``$GRPO_RM_FASHION_MNIST_GZ`` overrides the default ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: with the install command, if the files are not there.
    """
    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEB_DIR)
    missing = [f'{name}.gz' for name in IDX_FILES if not (folder / f'{name}.gz').is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST not found: {folder} lacks {missing}. Install the Debian/Ubuntu '
            'package: `sudo apt-get install dataset-fashion-mnist` (or point '
            f'${FASHION_MNIST_ENV} at a folder with the four *-ubyte.gz files of the release).')
    return folder


def prepare_fashion_mnist(dst: str | Path) -> Path:
    """Un-gzip the Debian Fashion-MNIST into ``dst`` for mmpretrain's ``FashionMNIST``.

    Writes ``dst/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (60,000 train and 10,000 test
    28x28 uint8 images, labels 0-9; about 55 MB). Files that are already complete are kept.

    Returns:
        ``dst``, to use as the dataset's ``data_root``.
    """
    src = find_fashion_mnist_gz()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        out = dst / name
        gz = src / f'{name}.gz'
        if idx_complete(out) and read_idx_header(out) == read_idx_header(gz):
            continue
        write_idx(out, read_idx(gz))  # the release's bytes: same header, same values
    return dst


# --- Fashion-MNIST-C -----------------------------------------------------------------------------

def _imagecorruptions():
    """Import ``imagecorruptions`` without its import-time deprecation warnings."""
    with warnings.catch_warnings():
        # pkg_resources (UserWarning) and scipy.ndimage.interpolation (DeprecationWarning).
        warnings.simplefilter('ignore', UserWarning)
        warnings.simplefilter('ignore', DeprecationWarning)
        import imagecorruptions
    return imagecorruptions


def corrupt_gray(image: np.ndarray, corruption: str, severity: int, seed: int,
                 scale: int = 2) -> np.ndarray:
    """Corrupt one (H, W) uint8 grayscale image with ``imagecorruptions``; same shape out.

    imagecorruptions needs an RGB image of at least 32x32, and its pixel-size parameters (blur
    radii, elastic displacements) are ImageNet-C's, tuned for 224 px photos. So the image is
    upsampled ``scale`` times (nearest neighbour), zero-padded to at least 32x32 if still
    smaller (the black Fashion-MNIST/MNIST background), copied to three channels, corrupted,
    converted back to gray (ITU-R 601 luma, ``cv2.COLOR_RGB2GRAY``), cropped, and area-averaged
    back to (H, W). Without a corruption this round trip returns the image unchanged.

    ``scale=2`` (56 px for Fashion-MNIST) keeps every default corruption informative: at 32 px
    defocus/motion blur and the elastic transform at severity 3 leave little of the object, at
    112 px the per-pixel noises are mostly averaged away.

    numpy's global RNG, which the corruptions draw from, is seeded with ``seed`` for the call and
    restored afterwards.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f'expected an (H, W) uint8 image, got {image.dtype} {image.shape}')
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f'scale must be a positive int, got {scale!r}')
    ic = _imagecorruptions()
    h, w = image.shape
    big = image if scale == 1 else cv2.resize(image, (w * scale, h * scale),
                                              interpolation=cv2.INTER_NEAREST)
    bh, bw = big.shape
    ph, pw = max(32 - bh, 0), max(32 - bw, 0)
    top, left = ph // 2, pw // 2
    canvas = np.pad(big, ((top, ph - top), (left, pw - left)))
    rgb = np.repeat(canvas[..., None], 3, axis=2)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            out = ic.corrupt(rgb, severity=severity, corruption_name=corruption)
    finally:
        np.random.set_state(state)
    gray = cv2.cvtColor(np.ascontiguousarray(out, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    gray = gray[top:top + bh, left:left + bw]
    return gray if scale == 1 else cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)


def _image_seed(seed: int, corruption: str, index: int) -> int:
    """A per-image seed: the same image gets the same noise whatever ``limit`` is."""
    return int(np.random.SeedSequence(
        [seed, zlib.crc32(corruption.encode()), index]).generate_state(1)[0])


def prepare_fashion_mnist_corruptions(
        dst: str | Path,
        corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
        severity: int = 3,
        limit: int | None = None,
        seed: int = 0,
        clean_root: str | Path | None = None,
        scale: int = 2,
        train_indices: Sequence[int] | None = None) -> dict[str, Path]:
    """Write Fashion-MNIST-C: the test set under each corruption, one FashionMNIST root each.

    ``dst/<corruption>/`` gets ``t10k-images-idx3-ubyte`` (the corrupted 28x28 uint8 test
    images, see :func:`corrupt_gray`), ``t10k-labels-idx1-ubyte`` (the clean labels, unchanged)
    and ``train-*`` links to the clean training set (mmpretrain wants all four files; a test
    config never reads them), plus ``meta.json``. Read a set with
    ``dict(type='FashionMNIST', data_root=str(dst / corruption), test_mode=True)``.

    Args:
        dst: Output folder.
        corruptions: ``imagecorruptions`` names (default :data:`DEFAULT_CORRUPTIONS`).
        severity: 1-5, the same for every image.
        limit: Only the first ``limit`` test images (quick runs); None: all 10,000.
        seed: Image ``i`` under corruption ``c`` is drawn with a seed made from
            ``(seed, c, i)``, so the output depends only on these, not on ``limit``.
        clean_root: A prepared clean Fashion-MNIST root (:func:`prepare_fashion_mnist`); None:
            prepared in ``dst/clean``.
        scale: The corruptions act on ``scale`` x upsampled images (see :func:`corrupt_gray`).
        train_indices: Corrupt these *training* images instead of the test set (a held-out
            validation split for model selection); they are written, in this order, as the
            ``t10k-*`` files of each folder, so the same ``test_mode=True`` config reads them.
            ``limit`` then applies to this list.

    Returns:
        ``{corruption: folder}``.

    Raises:
        ValueError: an unknown corruption name or a severity outside 1-5.
        RuntimeError: a corruption that fails in the installed imagecorruptions (checked on a
            probe image before anything is written).
    """
    ic = _imagecorruptions()
    known = ic.get_corruption_names('all')
    unknown = [c for c in corruptions if c not in known]
    if unknown:
        raise ValueError(f'unknown corruption(s) {unknown}; imagecorruptions has {known}')
    if severity not in range(1, 6):
        raise ValueError(f'severity must be 1..5, got {severity}')
    probe = np.full((28, 28), 128, np.uint8)
    for corruption in corruptions:
        try:
            corrupt_gray(probe, corruption, severity, seed, scale)
        except Exception as e:  # a library incompatibility, reported by name
            raise RuntimeError(f'imagecorruptions cannot apply {corruption!r} here '
                               f'({type(e).__name__}: {e}); leave it out') from e

    dst = Path(dst)
    clean = prepare_fashion_mnist(dst / 'clean') if clean_root is None else Path(clean_root)
    for name in IDX_FILES:
        if not idx_complete(clean / name):
            raise FileNotFoundError(f'{clean / name} is missing; run prepare_fashion_mnist first')
    source = 'Fashion-MNIST test set (Debian dataset-fashion-mnist)'
    if train_indices is None:
        images = read_idx(clean / TEST_IMAGES)
        labels = read_idx(clean / TEST_LABELS)
    else:
        chosen = np.asarray(train_indices, dtype=np.int64)
        images = read_idx(clean / TRAIN_IMAGES)[chosen]
        labels = read_idx(clean / TRAIN_LABELS)[chosen]
        source = (f'Fashion-MNIST train images {zlib.crc32(chosen.tobytes()):08x} (crc32 of '
                  f'the {len(chosen)} indices; Debian dataset-fashion-mnist)')
    if limit is not None:
        images, labels = images[:limit], labels[:limit]

    out: dict[str, Path] = {}
    for corruption in corruptions:
        folder = dst / corruption
        meta = dict(source=source, corruption=corruption, severity=severity, seed=seed,
                    num_images=len(images), scale=scale,
                    imagecorruptions=dist_version('imagecorruptions'),
                    method='nearest upsample x scale, gray->RGB, corrupt, RGB->gray '
                    '(ITU-R 601), area downsample')
        if not folder_matches(folder, meta, (TEST_IMAGES, TEST_LABELS)):
            corrupted = np.stack([
                corrupt_gray(img, corruption, severity, _image_seed(seed, corruption, i), scale)
                for i, img in enumerate(images)
            ]) if len(images) else images.copy()
            folder.mkdir(parents=True, exist_ok=True)
            write_idx(folder / TEST_IMAGES, corrupted)
            write_idx(folder / TEST_LABELS, labels)
            write_meta(folder, meta)
        for name in (TRAIN_IMAGES, TRAIN_LABELS):
            link_file(clean / name, folder / name)
        out[corruption] = folder
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write Fashion-MNIST (from Debian dataset-fashion-mnist) and, with '
        '--corrupted-dir, Fashion-MNIST-C in the IDX layout mmpretrain reads')
    parser.add_argument('out_dir', help='the clean set goes here (a FashionMNIST data_root)')
    parser.add_argument('--corrupted-dir',
                        help='also write the corrupted test sets here, one folder each')
    parser.add_argument('--corruptions', nargs='+', default=list(DEFAULT_CORRUPTIONS),
                        help='imagecorruptions names (default: %(default)s)')
    parser.add_argument('--severity', type=int, default=3, help='1..5 (default: 3)')
    parser.add_argument('--limit', type=int, help='only the first LIMIT test images')
    parser.add_argument('--seed', type=int, default=0, help='corruption noise seed')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    clean = prepare_fashion_mnist(args.out_dir)
    print(f'Fashion-MNIST: {clean}')
    if args.corrupted_dir:
        sets = prepare_fashion_mnist_corruptions(
            args.corrupted_dir, args.corruptions, severity=args.severity, limit=args.limit,
            seed=args.seed, clean_root=clean)
        for name, folder in sets.items():
            print(f'Fashion-MNIST-C {name}: {folder}')


if __name__ == '__main__':
    main()
