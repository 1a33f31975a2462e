"""Shared by the tests/cls/test_cls_train_*.py files: generated data and log parsing."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from conftest import REPO

from grpo_rm_mm.testing import balanced_labels, colour_images, make_cifar10

CIFAR_CFG = REPO / 'tests' / 'cls' / 'configs' / 'grpo_rm_cifar10_tiny.py'
TIN_CFG = REPO / 'tests' / 'cls' / 'configs' / 'grpo_rm_tiny_imagenet_tiny.py'


def metrics_of(log: str, prefix: str = 'Epoch(val)') -> dict[str, float]:
    """The metrics of the last ``prefix`` line of an mmengine log."""
    lines = [line for line in log.splitlines() if prefix in line]
    assert lines, f'no {prefix} line in the output:\n{log[-3000:]}'
    pairs = re.findall(r'([\w\-/]+): (-?[0-9.]+)', lines[-1].split(prefix, 1)[1])
    return {k: float(v) for k, v in pairs if k not in ('time', 'data_time')}


def write_cifar_data(root: Path) -> dict[str, str]:
    """CIFAR-10 pickles (200 train / 100 test) and two shifted .npy test sets of the same
    classes; returns the environment the test configs read."""
    make_cifar10(root / 'cifar', n_train=200, n_test=100, seed=0)
    y = balanced_labels(60, 10, seed=7)
    clean = colour_images(y, 32, 10, seed=7)
    (root / 'ood').mkdir()
    np.save(root / 'ood' / 'labels.npy', y)
    np.save(root / 'ood' / 'shifted.npy', np.clip(clean.astype(int) + 40, 0, 255).astype(np.uint8))
    np.save(root / 'ood' / 'noisy.npy', colour_images(y, 32, 10, seed=7, noise=60.0))
    return dict(CIFAR_ROOT=str(root / 'cifar'), OOD_ROOT=str(root / 'ood'))
